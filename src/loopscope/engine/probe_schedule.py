"""When to compute full statistics while running: for the iterations the screen will show, but
never so often that they cost more than a few percent of training time."""

from __future__ import annotations

from loopscope.shared.protocol import DETAIL_SECONDS

PROBE_BUDGET = 0.01  # full statistics may cost at most ~1% of the run's time
# The run's first iterations are all probed: structural findings need two in a row (stale gradients
# show at the second backward), and at max speed the next probe came ~200 iterations later.
OPENING_PROBES = 2


class ProbeSchedule:
    """Learns what a probed iteration costs over an unprobed one and spaces probes to fit the budget."""

    def __init__(self, frame_seconds: float = DETAIL_SECONDS, budget: float = PROBE_BUDGET) -> None:
        self.frame_seconds = frame_seconds
        self.budget = budget
        self.last_probe = float("-inf")
        self.probed_seconds: float | None = None
        self.plain_seconds: float | None = None
        self._warm = False  # the first probed iteration pays one-off costs: it says nothing of the rest
        self._opening = OPENING_PROBES

    @property
    def interval(self) -> float:
        if self.probed_seconds is None or self.plain_seconds is None:
            return self.frame_seconds
        extra = max(0.0, self.probed_seconds - self.plain_seconds)
        return max(self.frame_seconds, extra / self.budget)

    def probe_next(self) -> None:
        """Probe the next iteration whatever the spacing (a bug went on or off)."""
        self.last_probe = float("-inf")

    def should_probe(self, now: float) -> bool:
        if self._opening:
            return True
        if self.probed_seconds is not None and self.plain_seconds is None:
            return False  # learn what an unprobed iteration costs before probing again
        since = now - self.last_probe
        # The interval is never under frame_seconds: most iterations are answered without it.
        return since >= self.frame_seconds and since >= self.interval

    def record(self, probed: bool, started: float, seconds: float) -> None:
        if probed:
            self._opening = max(0, self._opening - 1)
            self.last_probe = started
            if not self._warm:
                self._warm = True
                return
            self.probed_seconds = seconds if self.probed_seconds is None else 0.5 * self.probed_seconds + 0.5 * seconds
        else:
            self.plain_seconds = seconds if self.plain_seconds is None else 0.9 * self.plain_seconds + 0.1 * seconds
