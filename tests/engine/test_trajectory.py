"""The trajectory contract: the stepper's losses and parameters equal a plain loop's, bitwise."""

from __future__ import annotations

import pytest
import torch

from loopscope.engine.experiment import load_experiment, resolve_factory
from loopscope.engine.stepper import Stepper
from loopscope.shared.catalog import SCENARIOS
from tests.conftest import FIXTURES
from tests.engine.reference_loop import plain_run

# Enough iterations to cross at least one epoch boundary (validation, scheduler, checkpoint).
ITERATIONS = {"blobs": 100, "spirals": 30, "regression": 30, "digits": 70, "amp": 25}


def stepper_run(target: str, seed: int, iterations: int):
    stepper = Stepper(load_experiment(target, seed))
    stepper.run(iterations)
    events = stepper.history.recent()
    losses = [e.loss for e in events if e.stage == "loss"]
    val_losses = [e.metrics["val_loss"] for e in events if e.stage == "validate"]
    params = {name: p.detach().clone() for name, p in stepper.model.named_parameters()}
    return losses, params, val_losses, events


def assert_bitwise_equal(ours, theirs):
    losses, params, val_losses, _ = ours
    ref_losses, ref_params, ref_val = theirs
    assert losses == ref_losses  # float equality of every loss: bitwise, not approximately
    assert params.keys() == ref_params.keys()
    for name in params:
        assert torch.equal(params[name], ref_params[name]), name
    assert val_losses == pytest.approx(ref_val, rel=1e-6)  # summed in a different order


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_scenario_matches_plain_loop(scenario):
    iterations = ITERATIONS[scenario]
    ours = stepper_run(scenario, seed=3, iterations=iterations)
    factory, _ = resolve_factory(scenario)
    theirs = plain_run(factory, seed=3, iterations=iterations)
    micro_batches = load_experiment(scenario, 3).accumulation
    assert len(ours[0]) == iterations * micro_batches  # a loss per micro-batch
    assert ours[2], "the run should cross an epoch boundary and validate"
    assert_bitwise_equal(ours, theirs)


def test_different_seed_gives_a_different_trajectory():
    first = stepper_run("blobs", seed=0, iterations=5)[0]
    again = stepper_run("blobs", seed=0, iterations=5)[0]
    other = stepper_run("blobs", seed=1, iterations=5)[0]
    assert first == again
    assert first != other


def dict_forward(model, batch):
    out = model(series=batch["series"], mask=batch["mask"])["logits"]
    return out, batch["labels"]


def tuple_forward(model, batch):
    (a, b), y = batch
    return model(a, b)[0], y


@pytest.mark.parametrize(
    ("name", "forward", "iterations"),
    [("dict_rnn_experiment.py", dict_forward, 14), ("tuple_experiment.py", tuple_forward, 12)],
)
def test_user_file_matches_plain_loop(name, forward, iterations):
    target = str(FIXTURES / name)
    ours = stepper_run(target, seed=5, iterations=iterations)
    factory, _ = resolve_factory(target)
    theirs = plain_run(factory, seed=5, iterations=iterations, forward=forward)
    assert len(ours[0]) == iterations
    assert_bitwise_equal(ours, theirs)
