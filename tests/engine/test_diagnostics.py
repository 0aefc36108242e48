"""Diagnostics: every bug gets named, clean runs stay quiet, and a user's own mistakes are caught."""

from __future__ import annotations

import pytest

from loopscope.devtools.quality import clean_run, recall_run
from loopscope.engine.experiment import load_experiment
from loopscope.engine.stepper import Stepper
from loopscope.shared.bugs import BUGS_BY_ID
from loopscope.shared.catalog import SCENARIOS

PAIRS = [(bug, scenario) for scenario, info in SCENARIOS.items() for bug in info.bugs]


@pytest.mark.parametrize(("bug", "scenario"), PAIRS)
def test_every_bug_is_named_within_200_iterations(bug, scenario):
    row = recall_run(bug, scenario, budget=200)
    assert row.caught, f"{bug} on {scenario}: {row.how}"


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_clean_scenarios_raise_no_warning(scenario):
    assert clean_run(scenario, 1000) == []


def test_findings_say_what_with_numbers_and_suspect_real_bugs():
    stepper = Stepper(load_experiment("spirals", 0), bugs=["skip_zero_grad"])
    stepper.run(3)
    findings = [f for _, f in stepper.diagnostics.all_findings]
    stale = next(f for f in findings if f.id == "stale_gradients")
    assert stale.severity == "error" and "skip_zero_grad" in stale.suspects
    assert any(ch.isdigit() for ch in stale.message) and stale.fix
    assert all(s in BUGS_BY_ID for f in findings for s in f.suspects)


USER_MISTAKES = {
    "softmax_in_model": ("softmax_then_cross_entropy", "double_softmax"),
    "raw_inputs": ("inputs_not_normalised", "unnormalized_inputs"),
    "misaligned_labels": ("validation_at_chance", "shuffled_labels"),
    "learning_rate_ten": (None, "lr_too_high"),
    "sigmoid_before_bce": ("sigmoid_then_bce_with_logits", "sigmoid_before_bce_with_logits"),
}


@pytest.mark.parametrize("factory", list(USER_MISTAKES))
def test_mistakes_in_the_users_own_code_are_named(factory, fixture_modules):
    expected_id, suspect = USER_MISTAKES[factory]
    stepper = Stepper(load_experiment(f"user_mistakes:{factory}", 0))
    named = []
    while stepper.completed_iterations < 200 and not stepper.finished and stepper.halted is None:
        event = stepper.step_stage()
        named += [f for f in event.diagnostics if suspect in f.suspects]
        if named:
            break
    assert named, f"nothing named {suspect}"
    if expected_id:
        assert expected_id in {f.id for f in named}
    assert stepper.active_bugs == ()  # nothing was injected: the mistake is in the user's code


def test_a_clean_user_experiment_raises_no_warning(fixture_modules):
    stepper = Stepper(load_experiment("user_mistakes:clean", 0))
    stepper.run(1000)
    assert stepper.completed_iterations == 600  # 20 epochs of 30 batches
    assert [f for _, f in stepper.diagnostics.all_findings if f.severity != "info"] == []
