"""Bounded memory over arbitrarily long runs: recent events in full, older numbers downsampled.

Torch-free, so the UI can keep the same structures on its side of the pipe.
"""

from __future__ import annotations

import math
from array import array
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from loopscope.shared.events import StageEvent


@dataclass(frozen=True, slots=True)
class SeriesPoint:
    """One bucket of a downsampled series: mean, min and max of the finite values in it."""

    x: float  # the bucket's last x (iteration)
    mean: float
    low: float
    high: float
    count: int
    nonfinite: int


class Series:
    """A numeric series that never holds more than `capacity` buckets.

    Each bucket covers `width` consecutive points; when the buckets fill up, neighbours merge and
    the width doubles. Adding a point is O(1) amortised; min/max keep spikes visible.
    """

    def __init__(self, capacity: int = 2048) -> None:
        if capacity < 2 or capacity % 2:
            raise ValueError("capacity must be an even number >= 2")
        self.capacity = capacity
        self.width = 1
        self.total_points = 0
        self._x = array("d")
        self._sum = array("d")
        self._low = array("d")
        self._high = array("d")
        self._count = array("q")  # points in the bucket, finite or not
        self._finite = array("q")

    def add(self, x: float, value: float | None) -> None:
        self.total_points += 1
        finite = value is not None and math.isfinite(value)
        number = value if value is not None and finite else 0.0
        if not self._count or self._count[-1] >= self.width:
            if len(self._count) == self.capacity:
                self._merge_pairs()
            self._x.append(x)
            self._sum.append(number)
            self._low.append(number if finite else math.inf)
            self._high.append(number if finite else -math.inf)
            self._count.append(1)
            self._finite.append(1 if finite else 0)
            return
        self._x[-1] = x
        self._count[-1] += 1
        if finite:
            self._sum[-1] += number
            self._low[-1] = min(self._low[-1], number)
            self._high[-1] = max(self._high[-1], number)
            self._finite[-1] += 1

    def _merge_pairs(self) -> None:
        def merged(values: array, combine) -> array:
            return array(values.typecode, (combine(values[i], values[i + 1]) for i in range(0, len(values), 2)))

        self._x = merged(self._x, lambda a, b: b)
        self._sum = merged(self._sum, lambda a, b: a + b)
        self._low = merged(self._low, min)
        self._high = merged(self._high, max)
        self._count = merged(self._count, lambda a, b: a + b)
        self._finite = merged(self._finite, lambda a, b: a + b)
        self.width *= 2

    def __len__(self) -> int:
        return len(self._count)

    def points(self) -> list[SeriesPoint]:
        """Buckets oldest first; a bucket with no finite value has NaN mean/min/max."""
        result = []
        for i in range(len(self._count)):
            finite = self._finite[i]
            mean = self._sum[i] / finite if finite else math.nan
            low = self._low[i] if finite else math.nan
            high = self._high[i] if finite else math.nan
            result.append(SeriesPoint(self._x[i], mean, low, high, self._count[i], self._count[i] - finite))
        return result

    def means(self) -> tuple[list[float], list[float]]:
        """x and mean of every bucket that holds a finite value, oldest first: what a plot draws.

        Much cheaper than `points()` (no object per bucket), and the UI calls it at every frame.
        """
        xs, ys = [], []
        for x, total, finite in zip(self._x, self._sum, self._finite):
            if finite:
                xs.append(x)
                ys.append(total / finite)
        return xs, ys

    def truncate(self, x: float) -> None:
        """Forget every bucket that ends after `x` (after a rewind, the future is rewritten)."""
        while self._x and self._x[-1] > x:
            self.total_points -= self._count[-1]
            for values in (self._x, self._sum, self._low, self._high, self._count, self._finite):
                values.pop()

    def last(self) -> float | None:
        if not self._count or not self._finite[-1]:
            return None
        return self._sum[-1] / self._finite[-1]

    def nbytes(self) -> int:
        return sum(
            a.itemsize * a.buffer_info()[1]
            for a in (self._x, self._sum, self._low, self._high, self._count, self._finite)
        )


SERIES_NAMES = ("loss", "grad_norm", "val_loss", "val_accuracy", "lr", "twin_loss")


class History:
    """The last `recent_iterations` iterations' events in full, plus downsampled series."""

    def __init__(self, recent_iterations: int = 200, capacity: int = 2048) -> None:
        self.recent_iterations = recent_iterations
        self._events: deque[StageEvent] = deque()
        self.series: dict[str, Series] = {name: Series(capacity) for name in SERIES_NAMES}
        self.event_count = 0

    def add(self, event: StageEvent) -> None:
        self.event_count += 1
        self._events.append(event)
        oldest_kept = event.iteration - self.recent_iterations
        while self._events and self._events[0].iteration <= oldest_kept:
            self._events.popleft()
        if event.stage == "loss" and event.error is None:
            x, loss, twin_loss = loss_point(event)
            self.series["loss"].add(x, loss)
            if twin_loss is not None:
                self.series["twin_loss"].add(x, twin_loss)
        elif event.stage == "backward" and event.error is None:
            self.series["grad_norm"].add(_position(event), event.grad_norm)
        elif event.stage == "step" and "lr" in event.metrics:
            self.series["lr"].add(event.iteration, event.metrics["lr"])
        elif event.stage == "validate" and event.error is None:
            self.series["val_loss"].add(event.iteration, event.metrics.get("val_loss"))
            if event.metrics.get("val_accuracy") is not None:
                self.series["val_accuracy"].add(event.iteration, event.metrics["val_accuracy"])

    def truncate(self, completed_iterations: int) -> None:
        """Drop what happened after this many iterations (the loop stepped back)."""
        while self._events and self._events[-1].iteration > completed_iterations:
            self._events.pop()
        for series in self.series.values():
            series.truncate(completed_iterations)

    def extend(self, events: Iterable[StageEvent]) -> None:
        for event in events:
            self.add(event)

    def recent(self) -> list[StageEvent]:
        return list(self._events)

    def last(self, stage: str | None = None) -> StageEvent | None:
        for event in reversed(self._events):
            if stage is None or event.stage == stage:
                return event
        return None


def loss_point(event: StageEvent) -> tuple[float, float | None, float | None]:
    """A loss event on the plot: (x, loss, twin loss). A summed loss is shown per example, on the
    scale of the validation loss beside it (the loss stage itself shows the loop's own number)."""
    examples = event.metrics.get("loss_summed_over", 1)
    loss = None if event.loss is None else event.loss / examples
    twin_loss = None if event.twin_loss is None else event.twin_loss / examples
    return _position(event), loss, twin_loss


def _position(event: StageEvent) -> float:
    """Where a point goes on the iteration axis: with gradient accumulation, micro-batch k of K
    sits at iteration - 1 + k/K, so the last one is at the iteration itself."""
    micro, count = event.metrics.get("micro_batch"), event.metrics.get("micro_batches")
    if micro is None or not count:
        return event.iteration
    return event.iteration - 1 + micro / count
