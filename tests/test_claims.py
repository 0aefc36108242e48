"""Demo claims: windows, not single batches, and numbers that read as a class would say them."""

from __future__ import annotations

import math

import pytest

from loopscope.shared.claims import Claim, ClaimError, Measure, StepMeter


def meter_with_losses(losses: list[float]) -> StepMeter:
    meter = StepMeter()
    for iteration, loss in enumerate(losses, 1):
        meter.add_loss(iteration, loss, None)
    return meter


def test_a_loss_claim_compares_window_means_so_one_noisy_batch_does_not_decide_it():
    # Falling on average, with a last batch far above everything before it.
    losses = [1.0 - i / 100 for i in range(40)] + [0.5] * 19 + [1.5]
    measure = meter_with_losses(losses).measure("loss", 40, 60)
    assert measure.before == pytest.approx(sum(losses[20:40]) / 20)
    assert measure.after == pytest.approx((0.5 * 19 + 1.5) / 20)
    assert measure.holds(Claim.parse("loss falls")) and not measure.holds(Claim.parse("loss rises"))
    assert measure.describe().startswith("loss, mean of the last 20 iterations: 0.7")


def test_the_first_step_compares_its_own_start_with_its_end():
    measure = meter_with_losses([0.7] * 15 + [0.3] * 15).measure("loss", 0, 30)
    assert (measure.before, measure.after) == (pytest.approx(0.7), pytest.approx(0.3))
    assert measure.describe() == "loss, mean of its first 15 iterations against its last 15: 0.7 -> 0.3 (down 2.3x)"


def test_changes_read_as_words_not_exponents():
    assert Measure("loss", 0.6665, 8.1e-16, "x").change() == "down more than 1000x"
    assert Measure("loss", 1e-15, 5.6, "x").change() == "up more than 1000x"
    assert Measure("val_accuracy", 0.35, 0.306, "x").change() == "-4.4 points"
    assert Measure("loss", 1.11, 1.095, "x").change() == "down 1.4%"  # not "down 1x"
    assert Measure("loss", None, 0.6671, "mean of the last 20 iterations").describe() == (
        "loss, mean of the last 20 iterations: 0.6671"  # nothing before it: no "- ->"
    )
    assert (
        Measure("val_accuracy", 0.5, 0.981, "at the last validation")
        .describe()
        .endswith("50.0% -> 98.1% (+48.1 points)")
    )


def test_a_loss_that_became_nan_rose_and_bounds_judge_the_end_only():
    assert Measure("loss", 0.7, math.nan, "x").holds(Claim.parse("loss rises"))
    assert Measure("loss", 2.3, 1.7, "x").holds(Claim.parse("loss above 1.46"))
    assert not Measure("loss", 2.3, 1.4, "x").holds(Claim.parse("loss above 1.46"))
    assert Measure("val_accuracy", 0.35, 0.31, "x").holds(Claim.parse("val_accuracy below 45%"))
    assert str(Claim.parse("val_accuracy below 45%")) == "val_accuracy below 45.0%"


def test_validation_claims_need_a_validation_during_the_step():
    meter = StepMeter()
    assert meter.measure("val_loss", 0, 10).after is None
    with pytest.raises(ClaimError, match="QUANTITY rises"):
        Claim.parse("loss wanders off")
