"""Pictures of the model: the right kind per scenario, sensible content, and no effect on training."""

from __future__ import annotations

from loopscope.engine.experiment import load_experiment
from loopscope.engine.stepper import Stepper


def run_with_pictures(target: str, iterations: int, draw: bool):
    stepper = Stepper(load_experiment(target, 0))
    maker = stepper.picture_maker()
    picture = None
    for _ in range(iterations):
        stepper.step_stage()
        maker.remember_batch()
        stepper.run_iteration()
        if draw:
            picture = maker.make()
    losses = [e.loss for e in stepper.history.recent() if e.stage == "loss"]
    return picture, losses


def test_spirals_gets_a_decision_boundary_that_separates_classes():
    picture, _ = run_with_pictures("spirals", 120, draw=True)
    assert picture.kind == "boundary" and len(picture.grid) == 24 and len(picture.grid[0]) == 60
    assert {c for row in picture.grid for c in row} == {0, 1, 2}
    assert {label for _, _, label in picture.points} == {0, 1, 2}


def test_regression_gets_predictions_against_targets():
    picture, _ = run_with_pictures("regression", 150, draw=True)
    assert picture.kind == "curve" and len(picture.curve) == 120
    xs = [x for x, _ in picture.curve]
    assert xs == sorted(xs) and picture.points


def test_pictures_only_for_2d_classifiers_and_1d_regressions():
    for target in ("blobs", "digits"):
        picture, _ = run_with_pictures(target, 3, draw=True)
        assert picture is None


def test_drawing_pictures_does_not_change_training():
    for target in ("spirals", "regression"):
        _, with_pictures = run_with_pictures(target, 40, draw=True)
        _, without = run_with_pictures(target, 40, draw=False)
        assert with_pictures == without
