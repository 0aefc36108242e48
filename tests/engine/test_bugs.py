"""Bug injection: the catalog, what each bug changes (and nothing else), live toggling, the twin."""

from __future__ import annotations

import pytest
import torch

from loopscope.engine.experiment import load_experiment, resolve_factory
from loopscope.engine.features import experiment_features, infer_task
from loopscope.engine.stepper import Stepper
from loopscope.shared.bugs import BUGS, BUGS_BY_ID, applicable
from loopscope.shared.catalog import SCENARIOS
from loopscope.shared.errors import UserError
from loopscope.shared.vocab import ALL_STAGES
from tests.engine.reference_loop import plain_run
from tests.engine.test_trajectory import assert_bitwise_equal, stepper_run

DESIGN_IDS = [
    "skip_zero_grad",
    "zero_grad_after_backward",
    "missing_backward",
    "missing_step",
    "step_before_backward",
    "double_softmax",
    "sigmoid_before_bce_with_logits",
    "lr_too_high",
    "lr_too_low",
    "validate_in_train_mode",
    "train_in_eval_mode",
    "validate_with_grad",
    "shuffled_labels",
    "unnormalized_inputs",
    "target_shape_broadcast",
    "loss_accumulates_graph",
    "inputs_wrong_dtype",
    "forward_under_no_grad",
    "dead_relu_init",
    "exploding_init",
    "no_shuffle_sorted_data",
    "zero_init",
    "missing_activation",
    "dropout_too_high",
    "val_is_train",
    "clip_loss_not_grad",
    "scheduler_before_step",
    "view_instead_of_permute",
]


def test_catalog_has_every_design_bug_fully_described():
    assert set(DESIGN_IDS) <= set(BUGS_BY_ID) and len(DESIGN_IDS) == 28
    for bug in BUGS:
        assert bug.stage in ALL_STAGES, bug.id
        assert bug.title and bug.symptom and bug.why and bug.fix, bug.id
        assert bug.correct != bug.buggy, bug.id
        assert bug.symptom.endswith(".") and bug.fix.endswith("."), bug.id


def test_every_bug_applies_to_some_builtin_scenario():
    covered = {bug for info in SCENARIOS.values() for bug in info.bugs}
    # The distributed bugs, on any scenario run as several processes (--nproc: its ranks' feature).
    covered |= {bug for info in SCENARIOS.values() for bug in applicable(info.features | {"distributed"})}
    assert covered == set(BUGS_BY_ID)
    assert not any("distributed" in info.features for info in SCENARIOS.values())  # one process each


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_catalog_features_match_what_the_engine_reads(scenario):
    experiment = load_experiment(scenario, 0)
    assert experiment_features(experiment, infer_task(experiment)) == SCENARIOS[scenario].features


@pytest.mark.parametrize(
    ("scenario", "bugs"),
    [
        ("blobs", {"skip_zero_grad"}),
        ("blobs", {"lr_too_high"}),
        ("spirals", {"double_softmax"}),
        ("spirals", {"missing_activation"}),
        ("spirals", {"validate_in_train_mode"}),  # dropout in validation draws random numbers too
        ("regression", {"target_shape_broadcast"}),
        ("spirals", {"skip_zero_grad", "lr_too_high"}),
    ],
)
def test_bug_run_equals_the_same_mistake_written_by_hand(scenario, bugs):
    stepper = Stepper(load_experiment(scenario, 2), bugs=sorted(bugs))
    stepper.run(40)
    events = stepper.history.recent()
    ours = (
        [e.loss for e in events if e.stage == "loss"],
        {n: p.detach().clone() for n, p in stepper.model.named_parameters()},
        [e.metrics["val_loss"] for e in events if e.stage == "validate"],
        events,
    )
    factory, _ = resolve_factory(scenario)
    theirs = plain_run(factory, seed=2, iterations=40, mistakes=frozenset(bugs))
    assert_bitwise_equal(ours, theirs)
    clean = stepper_run(scenario, seed=2, iterations=40)[0]
    assert ours[0] != clean  # the bug really changed training
    assert all(e.bugs == tuple(sorted(bugs)) for e in events)


@pytest.mark.parametrize(
    "bug",
    [
        "lr_too_high",
        "lr_too_low",
        "dropout_too_high",
        "missing_activation",
        "no_shuffle_sorted_data",
        "train_in_eval_mode",
    ],
)
def test_a_bug_switched_on_then_off_leaves_the_clean_trajectory(bug):
    stepper = Stepper(load_experiment("spirals", 1))
    stepper.set_bug(bug, True)
    stepper.set_bug(bug, False)
    stepper.run(30)
    losses = [e.loss for e in stepper.history.recent() if e.stage == "loss"]
    assert losses == stepper_run("spirals", seed=1, iterations=30)[0]


def test_bugs_toggle_live_from_the_next_stage():
    stepper = Stepper(load_experiment("blobs", 0))
    stepper.run(2)
    stepper.step_stage()  # load_batch of iteration 3
    stepper.set_bug("skip_zero_grad", True)
    zero_grad = stepper.step_stage()
    assert zero_grad.stage == "zero_grad" and zero_grad.bugs == ("skip_zero_grad",)
    assert zero_grad.metrics["grads_after"]["nonzero"] > 0  # the stale gradients stay
    stepper.run_iteration()
    stepper.set_bug("skip_zero_grad", False)
    events = stepper.run_iteration()
    assert events[1].bugs == () and events[1].metrics["grads_after"]["none"] == 6


def test_stage_order_bugs_change_the_next_iteration_and_raise_as_pytorch_does():
    stepper = Stepper(load_experiment("blobs", 0))
    stepper.step_stage()
    stepper.set_bug("step_before_backward", True)
    assert [e.stage for e in stepper.run_iteration()] == ["zero_grad", "forward", "loss", "backward", "step"]
    events = stepper.run_iteration()
    assert [e.stage for e in events] == ["load_batch", "forward", "loss", "step", "zero_grad", "backward"]
    # step() changed weights in place that this iteration's graph saved: autograd refuses.
    assert "modified by an inplace operation" in events[-1].error.message
    assert "optimizer.step() running before loss.backward()" in events[-1].error.hint


def test_unknown_and_inapplicable_bugs_are_clear_errors():
    with pytest.raises(UserError, match="did you mean skip_zero_grad"):
        Stepper(load_experiment("blobs", 0), bugs=["skip_zerograd"])
    with pytest.raises(UserError, match="does not apply to this experiment: it needs CrossEntropyLoss"):
        Stepper(load_experiment("blobs", 0), bugs=["double_softmax"])


@pytest.mark.parametrize(("scenario", "bug"), [(s, b) for s, i in SCENARIOS.items() for b in i.bugs])
def test_every_applicable_bug_runs_and_is_recorded(scenario, bug):
    stepper = Stepper(load_experiment(scenario, 0), bugs=[bug], diagnose=False)
    stepper.run(3)
    events = stepper.history.recent()
    assert events and all(e.bugs == (bug,) for e in events)
    if stepper.halted is not None:  # some bugs make PyTorch raise: shown at their stage
        raising = ["inputs_wrong_dtype", "forward_under_no_grad", "step_before_backward"]
        if scenario == "amp":  # a GradScaler refuses to unscale or step before it scaled a loss
            raising.append("missing_backward")
        assert bug in raising
        assert events[-1].error.hint


def test_clean_twin_trains_beside_the_bug_without_disturbing_it():
    with_twin = Stepper(load_experiment("spirals", 0), bugs=["lr_too_high"], twin=True)
    with_twin.run(50)
    loss_events = [e for e in with_twin.history.recent() if e.stage == "loss"]
    main = [e.loss for e in loss_events]
    twin = [e.twin_loss for e in loss_events]
    without_twin = Stepper(load_experiment("spirals", 0), bugs=["lr_too_high"])
    without_twin.run(50)
    assert main == [e.loss for e in without_twin.history.recent() if e.stage == "loss"]
    # Copied before the bug acted, fed the same batches and dropout masks: it is the clean run.
    assert twin == stepper_run("spirals", seed=0, iterations=50)[0]
    assert sum(main[-10:]) > 3 * sum(twin[-10:])
    with_twin.set_bug("lr_too_high", False)
    assert with_twin.twin is None


def test_twin_switched_on_mid_run_starts_from_the_current_state():
    stepper = Stepper(load_experiment("blobs", 0))
    stepper.run(5)
    stepper.set_bug("lr_too_high", True)
    stepper.set_twin(True)
    events = stepper.run_iteration()
    loss = next(e for e in events if e.stage == "loss")
    assert loss.twin_loss == pytest.approx(loss.loss)  # same weights, same batch, before any step
    assert torch.is_tensor(next(stepper.twin.model.parameters()))
