"""Karpathy's sanity checks: they pass on clean scenarios, catch broken loops, and touch nothing."""

from __future__ import annotations

import pytest
import torch

from loopscope.engine.checks import run_checks
from loopscope.engine.experiment import load_experiment
from loopscope.engine.stepper import Stepper


def results(scenario: str, bugs=()) -> dict[str, bool]:
    stepper = Stepper(load_experiment(scenario, 0), bugs=list(bugs), diagnose=False)
    return {r.id: r.passed for r in run_checks(stepper)}


@pytest.mark.parametrize("scenario", ["blobs", "spirals", "regression", "digits"])
def test_clean_scenarios_pass_every_check(scenario):
    assert results(scenario) == {"init_loss": True, "overfit_batch": True, "input_baseline": True, "batch_mixing": True}


def test_view_instead_of_permute_is_caught_by_the_batch_mixing_probe():
    assert results("blobs", ["view_instead_of_permute"])["batch_mixing"] is False


def test_a_loop_that_cannot_learn_fails_the_overfit_check():
    outcome = results("blobs", ["missing_step"])
    assert outcome["overfit_batch"] is False and outcome["input_baseline"] is False


def test_exploding_init_fails_the_initial_loss_check():
    assert results("spirals", ["exploding_init"])["init_loss"] is False


def test_checks_leave_the_main_run_untouched():
    stepper = Stepper(load_experiment("spirals", 0))
    stepper.run(5)
    run_checks(stepper)
    stepper.run(20)
    losses = [e.loss for e in stepper.history.recent() if e.stage == "loss"]
    plain = Stepper(load_experiment("spirals", 0))
    plain.run(25)
    assert losses == [e.loss for e in plain.history.recent() if e.stage == "loss"]
    assert torch.equal(next(stepper.model.parameters()), next(plain.model.parameters()))
