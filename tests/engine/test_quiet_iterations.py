"""Running unprobed (`quiet`): whole iterations at close to a plain loop's cost, with the same numbers,
every loss kept, and errors and warnings still shown at their stage."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from loopscope.devtools.quality import clean_run, recall_run
from loopscope.engine.experiment import Experiment, load_experiment, resolve_factory
from loopscope.engine.stepper import Stepper
from loopscope.shared.catalog import SCENARIOS
from tests.engine.reference_loop import plain_run
from tests.engine.test_trajectory import ITERATIONS, assert_bitwise_equal


def run_as_the_app_runs(stepper: Stepper, iterations: int, probe_every: int = 7) -> list:
    """Whole iterations, quiet, full statistics on every `probe_every`-th; returns every event handed on."""
    handed: list = []
    stepper.on_event = handed.append
    stepper.quiet = True
    with stepper.recording_warnings():
        while stepper.completed_iterations < iterations and not stepper.finished and stepper.halted is None:
            stepper.probe = stepper.completed_iterations % probe_every == 0
            stepper.run_iteration()
    stepper.catch_up()
    return handed


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_quiet_run_matches_the_plain_loop_bitwise_and_keeps_every_loss(scenario):
    iterations = ITERATIONS[scenario]
    stepper = Stepper(load_experiment(scenario, 3))
    handed = run_as_the_app_runs(stepper, iterations)
    losses = [e.loss for e in handed if e.stage == "loss"]
    val_losses = [e.metrics["val_loss"] for e in handed if e.stage == "validate"]
    params = {name: p.detach().clone() for name, p in stepper.model.named_parameters()}
    theirs = plain_run(resolve_factory(scenario)[0], seed=3, iterations=iterations)
    micro_batches = load_experiment(scenario, 3).accumulation
    assert len(losses) == iterations * micro_batches  # the plot gets every loss, quiet or not
    assert val_losses, "the run should cross an epoch boundary and validate"
    assert_bitwise_equal((losses, params, val_losses, handed), theirs)
    assert stepper.history.series["loss"].total_points == iterations * micro_batches


def test_quiet_iterations_make_no_training_events_but_the_loss():
    stepper = Stepper(load_experiment("blobs", 0))
    handed = run_as_the_app_runs(stepper, 40, probe_every=1000)  # only the first iteration probed
    training = [e for e in handed if e.iteration > 1 and e.stage not in ("validate", "scheduler")]
    assert training and {e.stage for e in training} == {"loss"}
    probed = [e for e in handed if e.iteration == 1]
    assert [e.stage for e in probed][:6] == ["load_batch", "zero_grad", "forward", "loss", "backward", "step"]
    assert probed[4].layers, "a probed iteration keeps its full statistics"


def test_stepping_after_a_quiet_run_shows_every_stage_again():
    stepper = Stepper(load_experiment("spirals", 0))
    run_as_the_app_runs(stepper, 10)
    stepper.quiet, stepper.probe = False, True
    events = stepper.run_iteration()
    assert [e.stage for e in events] == stepper.iteration_stages()
    assert all(e.iteration == 11 for e in events) and events[4].layers


class RaisesOnCall(nn.Module):
    """Raises in its forward on the `fail_at`-th training call."""

    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 2)
        self.calls, self.fail_at = 0, fail_at

    def forward(self, x):
        self.calls += 1
        if self.calls == self.fail_at:
            raise ValueError("bad batch on purpose")
        return self.layer(x)


def tiny_experiment(model: nn.Module, loss_fn: nn.Module | None = None) -> Experiment:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 4, generator=g), torch.randint(0, 2, (256,), generator=g)
    return Experiment(
        model=model,
        loss_fn=loss_fn or nn.CrossEntropyLoss(),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        train_loader=DataLoader(TensorDataset(x, y), batch_size=16),
        epochs=3,
    )


def test_an_error_in_a_quiet_iteration_is_shown_at_its_stage_and_the_loop_resumes():
    stepper = Stepper(tiny_experiment(RaisesOnCall(fail_at=9)))
    handed = run_as_the_app_runs(stepper, 30, probe_every=1000)
    assert stepper.halted is not None
    failed = handed[-1]
    assert (failed.stage, failed.iteration, failed.error.type) == ("forward", 9, "ValueError")
    assert "bad batch on purpose" in failed.error.message
    assert any(f.id == "stage_error" for f in failed.diagnostics)
    stepper.resume()
    handed = run_as_the_app_runs(stepper, 12, probe_every=1000)
    assert stepper.halted is None and stepper.completed_iterations == 12


def test_a_warning_in_a_quiet_iteration_is_shown_at_the_stage_that_raised_it():
    class Squeezed(nn.Module):  # outputs (N, 1) against targets (N,): MSELoss warns about broadcasting
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(4, 1)

        def forward(self, x):
            return self.layer(x)

    experiment = tiny_experiment(Squeezed(), nn.MSELoss())
    experiment.train_loader = DataLoader(
        TensorDataset(torch.randn(64, 4), torch.randn(64)), batch_size=16
    )  # float targets of shape (N,)
    stepper = Stepper(experiment)
    handed = run_as_the_app_runs(stepper, 6, probe_every=1000)
    warned = [e for e in handed if e.metrics.get("warnings")]
    assert {e.iteration for e in warned} == set(range(1, 7))  # every iteration, quiet or probed
    assert {e.stage for e in warned} == {"loss"}
    assert "target size" in warned[-1].metrics["warnings"][0]


@pytest.mark.parametrize(
    ("bug", "scenario"),
    [
        ("lr_too_high", "spirals"),
        ("skip_zero_grad", "blobs"),
        ("lr_too_low", "blobs"),
        ("validate_in_train_mode", "digits"),
    ],
)
def test_run_mode_still_names_bugs(bug, scenario):
    """The history-judging checks get every loss; the others see the probed iterations."""
    row = recall_run(bug, scenario, budget=200, probe_every=20)
    assert row.caught, f"{bug} on {scenario} in run mode: {row.how}"


def test_run_mode_raises_no_false_alarm_on_a_clean_run():
    assert clean_run("spirals", 600, probe_every=20) == []


def _handed_on(target: str | Callable[[], Experiment], fast: bool, iterations: int = 40) -> tuple[list, dict, int]:
    """What a run hands on (every event, as the screen and the trace get it) and where it ends."""
    stepper = Stepper(load_experiment(target, 1) if isinstance(target, str) else target())
    stepper.fast_path.possible = fast and stepper.fast_path.possible
    handed = run_as_the_app_runs(stepper, iterations)
    seen = [
        (
            e.iteration,
            e.stage,
            repr(e.loss),  # NaN equals NaN
            repr({key: value for key, value in e.metrics.items() if not key.endswith("_seconds")}),  # no clock readings
            e.error and (e.error.type, e.error.message),
            [(f.id, f.message) for f in e.diagnostics],
            e.bugs,
        )
        for e in handed
    ]
    params = {name: p.detach().clone() for name, p in stepper.model.named_parameters()}
    return seen, params, stepper.fast_path.iterations


@pytest.mark.parametrize(
    "target",
    [
        *SCENARIOS,
        "third_party_models:mnist_style",
        "third_party_models:transformer",
        "third_party_models:nanogpt_style",
        "third_party_models:hf_style",
        "third_party_models:vae",
        "third_party_models:bf16_classifier",
        "tuple_experiment:experiment",
        "dict_rnn_experiment:experiment",
        "faulty_experiments:shape_mismatch",
        "faulty_experiments:non_scalar_loss",
        "faulty_experiments:nan_loss",
        "user_mistakes:sigmoid_before_bce",
    ],
)
def test_the_fast_path_hands_on_exactly_what_the_stage_path_does(target, monkeypatch):
    """Unprobed iterations of a loop with no bug on run as straight-line code (issue 17); every
    event, loss, metric, finding and parameter is the one the stage-by-stage path gives."""
    monkeypatch.syspath_prepend("tests/fixtures")
    fast, fast_params, ran_fast = _handed_on(target, fast=True)
    staged, staged_params, ran_staged = _handed_on(target, fast=False)
    assert ran_staged == 0
    if target in ("amp",) or target.startswith(("faulty_experiments:shape", "faulty_experiments:non_scalar")):
        assert ran_fast == 0  # a loss scaler, or an error before any unprobed iteration
    else:
        assert ran_fast > 0, "the fast path should have run the unprobed iterations"
    assert len(fast) == len(staged)
    for mine, theirs in zip(fast, staged):
        assert mine == theirs
    assert fast_params.keys() == staged_params.keys()
    for name, value in fast_params.items():
        torch.testing.assert_close(value, staged_params[name], rtol=0, atol=0, equal_nan=True)


class _BackwardFails(torch.autograd.Function):
    """Identity forward; its backward raises on the `fail_at`-th call."""

    calls = 0
    fail_at = 0

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        _BackwardFails.calls += 1
        if _BackwardFails.calls == _BackwardFails.fail_at:
            raise RuntimeError("backward failed on purpose")
        return grad


class _Chatty(nn.Module):
    """Warns in every forward; its backward fails at a chosen call (0: never)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 2)

    def forward(self, x):
        warnings.warn("forward says hello", UserWarning)
        return _BackwardFails.apply(self.layer(x))


class _WarningSGD(torch.optim.SGD):
    def step(self, closure=None):
        warnings.warn("step says hello", UserWarning)
        return super().step(closure)


def _chatty_experiment(fail_backward_at: int) -> Callable[[], Experiment]:
    def make() -> Experiment:
        _BackwardFails.calls, _BackwardFails.fail_at = 0, fail_backward_at
        torch.manual_seed(0)
        experiment = tiny_experiment(_Chatty())
        experiment.optimizer = _WarningSGD(experiment.model.parameters(), lr=0.1)
        return experiment

    return make


@pytest.mark.parametrize("fail_backward_at", [0, 12])
def test_the_fast_path_shows_warnings_and_errors_at_their_stages(fail_backward_at):
    fast, _, ran_fast = _handed_on(_chatty_experiment(fail_backward_at), fast=True, iterations=20)
    staged, _, _ = _handed_on(_chatty_experiment(fail_backward_at), fast=False, iterations=20)
    assert ran_fast > 0
    assert fast == staged
    warned = {(iteration, stage) for iteration, stage, _, metrics, *_ in fast if "hello" in metrics}
    assert {stage for _, stage in warned} == {"forward", "step"}
    if fail_backward_at:
        iteration, stage, _, _, error, *_ = fast[-1]
        assert (stage, error[0]) == ("backward", "RuntimeError") and iteration > 8
        assert fast[-2][:2] == (iteration, "loss"), "the loss of the failing iteration is handed on before its error"
