"""Third-party-style models: correct code raises no finding; real mistakes still do. The data
flow between modules is followed by tensor identity, not by the order modules run in."""

from __future__ import annotations

import pytest
import torch

from loopscope.engine.experiment import load_experiment
from loopscope.engine.stepper import Stepper


def findings_of(target: str, iterations: int, bugs: tuple[str, ...] = ()) -> list[tuple[int, str, str]]:
    stepper = Stepper(load_experiment(target, 0), bugs=bugs)
    found = []
    while stepper.completed_iterations < iterations and not stepper.finished and stepper.halted is None:
        event = stepper.step_stage()
        if event is None:
            break
        found += [(event.iteration, f.severity, f.id) for f in event.diagnostics]
    assert stepper.halted is None, stepper.halted
    return found


@pytest.mark.parametrize("factory", ["mnist_style", "transformer"])
def test_clean_third_party_models_raise_no_warning_in_300_iterations(fixture_modules, factory):
    found = findings_of(f"third_party_models:{factory}", 300)
    assert [f for f in found if f[1] != "info"] == []


def test_a_net_trained_to_convergence_is_not_told_its_activations_are_too_large(fixture_modules):
    """mnist_style to the end, as the app runs it (a probe every 10th iteration): the loss falls
    from 1.37 to ~3e-4 and, growing confident, the net's penultimate layer passes RMS 10. That is
    no fault of its inputs or initialisation; it was reported as one."""
    stepper = Stepper(load_experiment("third_party_models:mnist_style", 0))
    stepper.quiet = True
    found, largest = [], 0.0
    while not stepper.finished and stepper.halted is None:
        stepper.probe = stepper.completed_iterations % 10 == 0
        for event in stepper.run_iteration():
            found += [(event.iteration, f.id) for f in event.diagnostics if f.severity != "info"]
            for t in event.tensors:
                if event.stage == "forward" and t.module_type == "Dropout" and t.mean is not None:
                    largest = max(largest, (t.mean**2 + t.std**2) ** 0.5)
    assert stepper.completed_iterations == 640 and found == []
    assert largest >= 10  # the layer did grow that large


def test_two_linear_layers_through_an_identity_are_still_found(fixture_modules):
    found = findings_of("third_party_models:linear_stack", 3)
    assert (1, "warning", "no_activation_between_layers") in found


@pytest.mark.parametrize("factory", ["mnist_style", "transformer"])
def test_skip_zero_grad_is_named_at_iteration_2(fixture_modules, factory):
    found = findings_of(f"third_party_models:{factory}", 3, bugs=("skip_zero_grad",))
    assert (2, "error", "stale_gradients") in found


def test_functional_losses_have_their_initial_loss_reference(fixture_modules):
    from loopscope.engine.checks import check_initial_loss, run_checks

    stepper = Stepper(load_experiment("third_party_models:mnist_style", 0), diagnose=False)  # F.nll_loss
    result = next(r for r in run_checks(stepper) if r.id == "init_loss")
    assert "-ln(1/4)" in result.message and result.numbers["expected"] > 1.38
    assert check_initial_loss  # the same check the app's `c` runs


def test_a_badly_initialised_model_is_named_with_a_functional_loss(fixture_modules):
    found = findings_of("third_party_models:mnist_style", 2, bugs=("exploding_init",))
    assert any(f[2] == "initial_loss_high" for f in found)


def test_mse_on_labels_counts_accuracy_at_one_half_and_chance_at_50_percent(fixture_modules):
    stepper = Stepper(load_experiment("third_party_models:mse_on_labels", 0))
    stepper.run_epoch()
    stepper.run_epoch()
    validate = stepper.history.last("validate")
    model, loader = stepper.model, stepper.experiment.val_loader
    with torch.no_grad():
        hits = [((model.eval()(x) > 0.5).float() == y).float() for x, y in loader]
        truth = torch.cat(hits).mean().item()
    model.train()
    assert validate.metrics["val_accuracy"] == pytest.approx(truth) and truth > 0.75
    stepper.run(300)
    assert "validation_at_chance" not in {f.id for _, f in stepper.diagnostics.all_findings}


def test_a_learning_rate_far_too_high_is_never_called_too_low():
    found = findings_of("blobs", 200, bugs=("lr_too_high",))
    ids = {f[2] for f in found}
    assert "update_ratio_high" in ids and "update_ratio_low" not in ids


def test_a_converged_run_is_not_told_its_step_did_not_run(fixture_modules):
    found = findings_of("third_party_models:exact_fit", 400)
    assert [f for f in found if f[2] == "parameters_not_updated"] == []


def test_validation_loss_is_per_example_for_a_summed_loss(fixture_modules):
    from torch import nn

    from loopscope.engine.recorder import StageRecord

    stepper = Stepper(load_experiment("third_party_models:mse_on_labels", 0))
    stepper.run(30)
    values = {}
    for reduction in ("mean", "sum", "none"):
        stepper.experiment.loss_fn = nn.MSELoss(reduction=reduction)
        record = StageRecord()
        stepper.body.validate(record)  # the same model, validated with each reduction
        values[reduction] = record.metrics["val_loss"]
    # One output per example: the summed loss per example is the mean loss (was 40x it: batch 40).
    assert values["sum"] == pytest.approx(values["mean"]) and values["none"] == pytest.approx(values["mean"])


def test_a_converged_fit_is_not_told_to_raise_its_learning_rate(fixture_modules):
    found = findings_of("third_party_models:exact_fit", 400)
    assert [f for f in found if f[2] == "update_ratio_low"] == []
