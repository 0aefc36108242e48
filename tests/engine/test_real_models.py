"""Third-party-style models: correct code raises no finding; real mistakes still do. The data
flow between modules is followed by tensor identity, not by the order modules run in."""

from __future__ import annotations

import pytest

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


def test_two_linear_layers_through_an_identity_are_still_found(fixture_modules):
    found = findings_of("third_party_models:linear_stack", 3)
    assert (1, "warning", "no_activation_between_layers") in found


@pytest.mark.parametrize("factory", ["mnist_style", "transformer"])
def test_skip_zero_grad_is_named_at_iteration_2(fixture_modules, factory):
    found = findings_of(f"third_party_models:{factory}", 3, bugs=("skip_zero_grad",))
    assert (2, "error", "stale_gradients") in found
