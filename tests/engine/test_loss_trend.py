"""The loss-trend check keeps its window's sum as losses come and go (issue 17); its verdicts must
stay those of the exact rule: the mean of the last 50 losses (fsum) against the first 20's."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from loopscope.engine.diagnostics import DiagnosticContext, Diagnostics
from loopscope.engine.diagnostics.findings import (
    DIVERGING_FACTOR,
    REFIRE_AFTER,
    STALLED_FRACTION,
    WARMUP_ITERATIONS,
)
from loopscope.shared.events import StageEvent
from loopscope.shared.vocab import Stage

TREND_IDS = {"loss_diverging", "loss_stalled"}


def _diagnostics() -> Diagnostics:
    context = DiagnosticContext(
        loss_kind="other",
        task=None,
        features=frozenset(),
        scheduler_interval="epoch",
        classes=None,
        has_trainable_params=lambda: True,
        batch_mixing=lambda: None,
    )
    return Diagnostics(context)


def _exact_verdicts(losses: list[float]) -> list[tuple[int, str]]:
    """The rule as written down, with fsum over the windows at every iteration."""
    fired: dict[str, int] = {}
    verdicts = []
    for it in range(WARMUP_ITERATIONS, len(losses) + 1):
        start = math.fsum(losses[:20]) / 20
        recent = math.fsum(losses[it - 50 : it]) / 50
        if recent >= DIVERGING_FACTOR * start:
            finding = "loss_diverging"
        elif recent >= STALLED_FRACTION * start:
            finding = "loss_stalled"
        else:
            continue
        if finding in fired and it - fired[finding] < REFIRE_AFTER:
            continue
        fired[finding] = it
        verdicts.append((it, finding))
    return verdicts


def _observed_verdicts(losses: list[float]) -> list[tuple[int, str]]:
    diagnostics = _diagnostics()
    verdicts = []
    for it, loss in enumerate(losses, start=1):
        event = StageEvent(iteration=it, epoch=1, stage=Stage.LOSS, loss=loss, metrics={"loss_shape": []})
        verdicts += [(it, f.id) for f in diagnostics.observe(event) if f.id in TREND_IDS]
    return verdicts


def _walk(start: float, factors: list[float]) -> list[float]:
    losses, value = [], start
    for factor in factors:
        value *= factor
        losses.append(value)
    return losses


@settings(max_examples=60, deadline=None)
@given(
    start=st.floats(min_value=1e-6, max_value=1e6),
    factors=st.lists(st.floats(min_value=0.9, max_value=1.12), min_size=WARMUP_ITERATIONS, max_size=700),
)
def test_the_kept_window_sum_gives_the_exact_rules_verdicts_on_any_loss_curve(start, factors):
    losses = _walk(start, factors)
    assert _observed_verdicts(losses) == _exact_verdicts(losses)


def test_verdicts_on_the_limit_itself_are_the_exact_ones():
    # The last 50 losses average exactly 97% of the first 20's, then a hair under: only the
    # exact mean can tell the two apart; a loss of mixed magnitudes makes the kept sum round.
    first = [1.0, 3.0, 1e-9, 2.0, 0.1] * 4
    start = math.fsum(first) / 20
    fill = [start * 0.5 + (i % 7) * 1e-3 for i in range(WARMUP_ITERATIONS)]
    at_limit = [STALLED_FRACTION * start] * 50
    under = [math.nextafter(STALLED_FRACTION * start, 0.0)] * 50
    for tail, fires in ((at_limit, True), (under, False)):
        losses = first + fill + tail
        verdicts = _observed_verdicts(losses)
        assert verdicts == _exact_verdicts(losses)
        assert bool(verdicts) is fires


def test_a_negative_loss_is_judged_as_the_exact_rule_judges_it():
    losses = [-1.0 - 0.001 * i for i in range(20)] + [-1.2 + 0.0005 * i for i in range(400)]
    assert _observed_verdicts(losses) == _exact_verdicts(losses)
