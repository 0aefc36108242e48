"""What a demo step says the loop will do, as data, and the numbers that decide it (torch-free).

One batch's loss is noise: a claim compares windows. Per-iteration quantities (loss, gradient
norm, update ratio, the twin's loss) are averaged over the step's last `WINDOW` iterations against
the `WINDOW` iterations before the step; validation quantities compare the last validation before
the step with the last one during it. The app's narration and `loopscope demo --verify` feed the
same `StepMeter` the same events, so the reveal on screen is the number the check judged.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass

from loopscope.shared.events import StageEvent
from loopscope.shared.history import loss_point

WINDOW = 20  # iterations a per-iteration quantity is averaged over
RELATIVE_CHANGE = 0.10  # "rises": at least 10% up; "falls": at least 10% down; "stays": neither
ACCURACY_POINTS = 0.02  # accuracy moves in points, not ratios: 2 points up or down

PER_ITERATION = ("loss", "twin_loss", "grad_norm", "max_update_ratio", "lr")
PER_VALIDATION = ("val_loss", "val_accuracy")
QUANTITIES = PER_ITERATION + PER_VALIDATION
DIRECTIONS = ("rises", "falls", "stays")  # the step's end against before it
BOUNDS = ("above", "below")  # the step's end against a number: `loss above 1.46`, `val_accuracy below 45%`
FINDING = "finding:"  # `expect = "finding training_in_eval_mode"`: the Diagnostics panel names it during the step
LABELS = {
    "loss": "loss",
    "twin_loss": "the twin's loss",
    "grad_norm": "gradient norm",
    "max_update_ratio": "largest update/weight ratio",
    "lr": "learning rate",
    "val_loss": "val loss",
    "val_accuracy": "val accuracy",
}


def named_finding(quantity: str) -> str | None:
    """The finding id a `finding:ID` quantity is about; None for a number."""
    return quantity.removeprefix(FINDING) if quantity.startswith(FINDING) else None


class ClaimError(ValueError):
    """An `expect = "..."` that does not parse."""


@dataclass(frozen=True)
class Claim:
    quantity: str  # one of QUANTITIES
    direction: str  # one of DIRECTIONS or BOUNDS
    bound: float | None = None  # for above/below

    @classmethod
    def parse(cls, text: str) -> Claim:
        words = text.split()
        if len(words) == 2 and words[0] in QUANTITIES and words[1] in DIRECTIONS:
            return cls(words[0], words[1])
        if len(words) == 2 and words[0] == "finding":
            return cls(FINDING + words[1], "named")
        if len(words) == 3 and words[0] in QUANTITIES and words[1] in BOUNDS:
            bound = _number(words[2])
            if bound is not None:
                return cls(words[0], words[1], bound)
        raise ClaimError(
            f'expect = "QUANTITY rises|falls|stays", "QUANTITY above|below NUMBER" (NUMBER may end in %) or '
            f'"finding ID" (the Diagnostics panel names it), '
            f"with a quantity among {', '.join(QUANTITIES)}; got {text!r}"
        )

    def __str__(self) -> str:
        if (finding := named_finding(self.quantity)) is not None:
            return f"finding {finding}"
        if self.bound is None:
            return f"{self.quantity} {self.direction}"
        return f"{self.quantity} {self.direction} {number(self.quantity, self.bound)}"


def _number(text: str) -> float | None:
    try:
        return float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        return None


@dataclass(frozen=True)
class Measure:
    """A quantity before a step and at its end, as the claims judge it."""

    quantity: str
    before: float | None
    after: float | None
    window: str  # how the numbers were taken, in words

    def direction(self) -> str | None:
        """rises, falls or stays; None when there is nothing to compare."""
        before, after = self.before, self.after
        if before is None or after is None or math.isnan(before):
            return None
        if math.isnan(after) or after == math.inf:
            return "rises"  # a loss that became NaN or inf went up, as far as a class is concerned
        if self.quantity == "val_accuracy":
            change = after - before
            return "rises" if change >= ACCURACY_POINTS else "falls" if change <= -ACCURACY_POINTS else "stays"
        if before <= 0:
            return "rises" if after > before else "falls" if after < before else "stays"
        ratio = after / before
        return "rises" if ratio >= 1 + RELATIVE_CHANGE else "falls" if ratio <= 1 - RELATIVE_CHANGE else "stays"

    def holds(self, claim: Claim) -> bool:
        if named_finding(claim.quantity) is not None:
            return bool(self.after)
        if claim.bound is None:
            return self.direction() == claim.direction
        after = self.after
        if after is None or math.isnan(after):
            return False
        return after > claim.bound if claim.direction == "above" else after < claim.bound

    def describe(self) -> str:
        """`loss, mean of the last 20 iterations: 0.6671 -> 3.2 (up 4.8x)`."""
        if (finding := named_finding(self.quantity)) is not None:
            if not self.after:
                return f"the Diagnostics panel did not name {finding}"
            return f"the Diagnostics panel named {finding} ({self.window})"
        label = f"{LABELS[self.quantity]}, {self.window}: "
        if self.before is None:
            return label + f"{number(self.quantity, self.after)}"
        text = f"{label}{number(self.quantity, self.before)} -> {number(self.quantity, self.after)}"
        change = self.change()
        return f"{text} ({change})" if change else text

    def change(self) -> str:
        before, after = self.before, self.after
        if before is None or after is None or not math.isfinite(before) or not math.isfinite(after):
            return ""
        if self.quantity == "val_accuracy":
            return f"{(after - before) * 100:+.1f} points"
        if before <= 0 or after <= 0:
            return ""
        ratio = after / before
        if 0.995 <= ratio <= 1.005:
            return "unchanged"
        if 0.9 < ratio < 1.1:  # "down 1x" says nothing: a small change in percent
            return f"{'up' if ratio > 1 else 'down'} {abs(ratio - 1):.1%}"
        word, factor = ("up", ratio) if ratio > 1 else ("down", 1 / ratio)
        return f"{word} more than 1000x" if factor > 1000 else f"{word} {factor:.2g}x"


def number(quantity: str, value: float | None) -> str:
    if value is None:
        return "none yet"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.1%}" if quantity == "val_accuracy" else f"{value:.4g}"


class StepMeter:
    """Every value a claim can be about, by iteration, fed with what the screen is fed."""

    def __init__(self) -> None:
        self._series: dict[str, tuple[list[float], list[float]]] = {q: ([], []) for q in QUANTITIES}
        self._findings: list[tuple[float, str]] = []  # (iteration, finding id)

    def add_loss(self, x: float, loss: float | None, twin_loss: float | None) -> None:
        self._add("loss", x, loss)
        self._add("twin_loss", x, twin_loss)

    def add_event(self, event: StageEvent) -> None:
        for finding in event.diagnostics:
            self._findings.append((event.iteration, finding.id))
        if event.error is not None:
            return
        metrics = event.metrics
        match event.stage:
            case "backward":
                self._add("grad_norm", event.iteration, event.grad_norm)
            case "step":
                self._add("max_update_ratio", event.iteration, metrics.get("max_update_ratio"))
                self._add("lr", event.iteration, metrics.get("lr"))
            case "validate":
                self._add("val_loss", event.iteration, metrics.get("val_loss"))
                self._add("val_accuracy", event.iteration, metrics.get("val_accuracy"))

    def add_events(self, events: Iterable[StageEvent]) -> None:
        for event in events:
            if event.stage == "loss":
                self.add_loss(*loss_point(event))
            self.add_event(event)

    def forget_after(self, iteration: float) -> None:
        """Stepped back: what came after `iteration` will be replayed."""
        for xs, values in self._series.values():
            keep = bisect_right(xs, iteration)
            del xs[keep:], values[keep:]
        self._findings = [(x, finding) for x, finding in self._findings if x <= iteration]

    def _add(self, quantity: str, x: float, value: object) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            xs, values = self._series[quantity]
            if xs and x < xs[-1]:  # a replay after stepping back: the new values replace the old
                self.forget_after(x - 1e-9)
            xs.append(float(x))
            values.append(float(value))

    def measure(self, quantity: str, start: int, end: int) -> Measure:
        """`quantity` before a step that began after `start` completed iterations and at its end,
        after `end` of them."""
        if (finding := named_finding(quantity)) is not None:
            at = [x for x, named in self._findings if named == finding and x > start]
            return Measure(quantity, None, float(len(at)), f"first at iteration {at[0]:g}" if at else "")
        xs, values = self._series[quantity]
        if quantity in PER_VALIDATION:
            before = _last(xs, values, start)
            during = bisect_right(xs, start)
            after = _last(xs, values, end) if bisect_right(xs, end) > during else None
            return Measure(quantity, before, after, "at the last validation")
        if quantity == "lr":
            return Measure(quantity, _last(xs, values, start), _last(xs, values, end), "at the step's end")
        steps = end - start
        if steps <= 0:  # a stage: inside the iteration after `start`
            return Measure(quantity, _last(xs, values, start), _last(xs, values, math.inf), "this stage")
        width = min(WINDOW, steps)
        before = _mean(xs, values, start - WINDOW, start)
        if before is None and steps >= 2:  # the run's first step: its own start against its end
            width = min(WINDOW, steps // 2)
            before = _mean(xs, values, start, start + width)
            window = f"mean of its first {width} iterations against its last {width}"
            return Measure(quantity, before, _mean(xs, values, end - width, end), window)
        after = _mean(xs, values, end - width, end)
        window = "this iteration" if width == 1 else f"mean of the last {width} iterations"
        return Measure(quantity, before, after, window)


def _last(xs: list[float], values: list[float], at: float) -> float | None:
    index = bisect_right(xs, at)
    return values[index - 1] if index else None


def _mean(xs: list[float], values: list[float], after: float, upto: float) -> float | None:
    """The mean of the values with after < x <= upto (inf or NaN counts as inf)."""
    chosen = values[bisect_right(xs, after) : bisect_right(xs, upto)]
    if not chosen:
        return None
    if any(not math.isfinite(v) for v in chosen):
        return math.inf
    return math.fsum(chosen) / len(chosen)
