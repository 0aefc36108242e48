"""What the screen shows, built from the engine's messages (no Textual, no torch)."""

from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass

from loopscope.shared.events import CheckResult, Finding, StageEvent
from loopscope.shared.history import Series
from loopscope.shared.protocol import (
    DEFAULT_HISTORY,
    Checks,
    EngineState,
    Failed,
    NoPicture,
    Picture,
    Ready,
    Rewound,
    SessionInfo,
    Update,
)
from loopscope.shared.vocab import Severity

MAX_EPOCHS_KEPT = 1000
SEVERITIES: tuple[Severity, ...] = ("error", "warning", "info")  # most severe first


@dataclass
class EpochRow:
    epoch: int
    loss_sum: float = 0.0
    loss_count: int = 0
    val_loss: float | None = None
    val_accuracy: float | None = None

    @property
    def train_loss(self) -> float | None:
        return self.loss_sum / self.loss_count if self.loss_count else None


def observe(previous: EpochRow | None, row: EpochRow) -> str:
    """A few words on how this epoch went compared with the last. Short: at 120 columns the
    epochs table has 16 columns left for it ("loss falling, accuracy rising" was cut off)."""
    if row.train_loss is None:
        return ""
    if previous is None or previous.train_loss is None:
        return "first epoch"
    falling = row.train_loss < previous.train_loss
    if row.val_loss is not None and previous.val_loss is not None and falling and row.val_loss > previous.val_loss:
        return "overfitting?"  # val loss rising while train loss falls: the columns beside it show it
    words = "loss ↓" if falling else "loss ↑"
    if row.val_accuracy is not None and previous.val_accuracy is not None:
        change = row.val_accuracy - previous.val_accuracy
        words += "  acc ↑" if change > 0 else ("  acc ↓" if change < 0 else "  acc =")
    return words


class ScreenModel:
    """Everything the widgets render; `apply` folds in one engine message."""

    def __init__(self, history: int = DEFAULT_HISTORY) -> None:
        self.info: SessionInfo | None = None
        # The losses `b` can undo, to take them out of their epoch's mean again.
        self._recent_losses: deque[tuple[float, int, float]] = deque(maxlen=history + 1)
        self.state: EngineState | None = None
        self.last_event: StageEvent | None = None
        self.last_by_stage: dict[str, StageEvent] = {}
        # Under --nproc: each rank's latest event of each stage (the panels show rank 0's loop).
        self.ranks: dict[int, dict[str, StageEvent]] = {}
        self.findings: deque[tuple[int, Finding]] = deque(maxlen=100)
        self.loss = Series(4096)
        self.twin_loss = Series(4096)
        self.val_loss = Series(4096)
        self.epochs: dict[int, EpochRow] = {}
        self.checks: tuple[CheckResult, ...] | None = None
        self.checks_running: int | None = None  # how many checks there are, while they run
        self.checks_note = ""  # what the checks cannot see
        self.picture: Picture | None = None
        self.no_picture: str | None = None  # why the model gets none
        self.failure: str | None = None  # the engine stopped or could not start
        self.notice: str | None = None  # a command it could not carry out
        self.version = 0  # bumped on every change: the screen redraws when it moves

    def finding_counts(self) -> dict[str, int]:
        """How many findings of each severity are listed, most severe first."""
        counts = Counter(finding.severity for _, finding in self.findings)
        return {severity: counts[severity] for severity in SEVERITIES if counts[severity]}

    def headline_finding(self) -> tuple[int, Finding] | None:
        """The newest of the most severe findings: the one line a narrow screen has room for."""
        for severity in SEVERITIES:
            for iteration, finding in self.findings:  # newest first
                if finding.severity == severity:
                    return iteration, finding
        return None

    def apply(self, message: object) -> None:
        self.version += 1
        match message:
            case Ready(info=info, state=state):
                self.info, self.state, self.failure = info, state, None
            case Update():
                self._update(message)
            case Checks(results=results, done=False, total=total):
                self.checks, self.checks_running = results, total
                self.notice = f"sanity checks: {len(results)} of {total} done..."
            case Checks(results=results, blind_spots=note):
                self.checks, self.checks_running, self.checks_note = results, None, note
                self.notice = "sanity checks done: the results are in the Diagnostics panel"
            case Picture():
                self.picture, self.no_picture = message, None
            case NoPicture(reason=reason):
                self.picture, self.no_picture = None, reason
            case Rewound():
                self._rewound(message)
            case Failed(message=text, fatal=True):
                self.failure = text
            case Failed(message=text):
                self.notice = text

    def _rewound(self, message: Rewound) -> None:
        """Forget what happened after the point the loop stepped back to; the replay rewrites it."""
        done = message.completed_iterations
        for series in (self.loss, self.twin_loss, self.val_loss):
            series.truncate(done)
        while self._recent_losses and self._recent_losses[-1][0] > done:
            _, epoch, loss = self._recent_losses.pop()
            if epoch in self.epochs:  # the epoch's mean loses the undone iterations, keeps the rest
                self.epochs[epoch].loss_sum -= loss
                self.epochs[epoch].loss_count -= 1
        for epoch in [e for e in self.epochs if e > message.epoch]:
            del self.epochs[epoch]
        row = self.epochs.get(message.epoch)
        if row is not None and self.info is not None and "validate" in self.info.epoch_end_stages:
            # Back inside this epoch: its validation (at its last iteration) runs again.
            row.val_loss = row.val_accuracy = None
            self.val_loss.truncate(done - 0.5)
        if row is not None and not row.loss_count and row.val_loss is None:
            del self.epochs[message.epoch]
        self.last_event = None
        self.last_by_stage.clear()
        for event in message.events:  # the iteration it is back at the end of, as first seen
            self.last_event = event
            self.last_by_stage[event.stage] = event
        self.notice = f"stepped back to the end of iteration {message.completed_iterations}"

    def _update(self, update: Update) -> None:
        self.state = update.state
        for iteration, epoch, loss, twin in update.losses:
            self.loss.add(iteration, loss)
            if twin is not None:
                self.twin_loss.add(iteration, twin)
            row = self.epochs.setdefault(epoch, EpochRow(epoch))
            if loss is not None and math.isfinite(loss):
                row.loss_sum += loss
                row.loss_count += 1
                self._recent_losses.append((iteration, epoch, loss))
        while len(self.epochs) > MAX_EPOCHS_KEPT:  # bounded over arbitrarily long runs
            del self.epochs[min(self.epochs)]
        for event in update.events:
            for finding in event.diagnostics:
                self.findings.appendleft((event.iteration, finding))
            if event.rank is not None:
                self.ranks.setdefault(event.rank, {})[event.stage] = event
                if event.rank and event.error is None:
                    continue  # another rank's: its numbers are in the Ranks table; its error shows at its stage
            self.last_event = event
            self.last_by_stage[event.stage] = event
            if event.stage == "validate" and event.error is None:
                row = self.epochs.setdefault(event.epoch, EpochRow(event.epoch))
                row.val_loss = event.metrics.get("val_loss")
                row.val_accuracy = event.metrics.get("val_accuracy")
                if row.val_loss is not None:
                    self.val_loss.add(event.iteration, row.val_loss)


def downsample(xs: list[float], ys: list[float], limit: int) -> tuple[list[float], list[float]]:
    """At most `limit` points (bucket means): plotext's cost grows with every point it draws."""
    if len(xs) <= limit or limit < 1:
        return xs, ys
    size = math.ceil(len(xs) / limit)
    out_x, out_y = [], []
    for i in range(0, len(xs), size):
        chunk_x, chunk_y = xs[i : i + size], ys[i : i + size]
        # At the bucket's middle (its last x shifted the whole line right: the plot began at 3.0),
        # except at the ends: the line spans the run, from its first point to its latest.
        middle = sum(chunk_x) / len(chunk_x)
        out_x.append(chunk_x[0] if i == 0 else chunk_x[-1] if i + size >= len(xs) else middle)
        out_y.append(sum(chunk_y) / len(chunk_y))
    return out_x, out_y
