"""Every built-in scenario trains to a good result in its default epochs."""

from __future__ import annotations

import pytest

from loopscope.engine.experiment import load_experiment
from loopscope.engine.stepper import Stepper
from loopscope.shared.catalog import SCENARIOS

# What "trained well" means for each: the last validation's numbers.
GOOD = {
    "blobs": ("val_accuracy", ">=", 0.95),
    "spirals": ("val_accuracy", ">=", 0.95),
    "regression": ("val_loss", "<=", 0.03),  # the noise alone costs 0.01
    "digits": ("val_accuracy", ">=", 0.95),
    "amp": ("val_accuracy", ">=", 0.95),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_scenario_trains_to_a_good_result(scenario):
    stepper = Stepper(load_experiment(scenario, 0), probe=False)
    stepper.run()
    assert stepper.finished and stepper.halted is None
    last = stepper.history.last("validate").metrics
    first_val_loss = stepper.history.series["val_loss"].points()[0].mean
    metric, direction, bound = GOOD[scenario]
    if direction == ">=":
        assert last[metric] >= bound
    else:
        assert last[metric] <= bound
    assert last["val_loss"] < 0.5 * first_val_loss


def test_blobs_is_the_classic_tutorial_pipeline():
    exp = load_experiment("blobs", 0)
    x, y = next(iter(exp.train_loader))
    assert x.shape == (10, 10) and y.shape == (10, 1)
    rows = len(exp.train_loader.dataset) + len(exp.val_loader.dataset)
    assert rows == 1000
    features = exp.train_loader.dataset.tensors[0]
    assert features.mean().abs() < 0.05 and (features.std(dim=0) - 1).abs().max() < 0.05


def test_digits_are_8x8_images_of_ten_classes():
    exp = load_experiment("digits", 0)
    images, labels = exp.train_loader.dataset.tensors
    assert images.shape[1:] == (1, 8, 8)
    assert set(labels.tolist()) == set(range(10))
    assert any(isinstance(m, __import__("torch").nn.BatchNorm2d) for m in exp.model.modules())
