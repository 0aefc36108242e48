"""From what a stage did to the StageEvent everyone sees: the part every driver shares.

A driver runs a stage however it runs it (the stepper calls the stage's code; a script driver
would be called by torch's hooks), fills a `StageRecord` and hands it here. The recorder times
it, adds the CUDA memory figures, asks the diagnostics, keeps the event in the history and passes
it on: so panels, traces, the plot and the diagnostics work the same whatever drove the loop.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import torch

from loopscope.engine.diagnostics import Diagnostics
from loopscope.shared.events import LayerStat, StageError, StageEvent, TensorStat
from loopscope.shared.history import History
from loopscope.shared.metrics import StageMetrics
from loopscope.shared.vocab import ITERATION_STAGES, Stage

# Running unprobed (`quiet`), an iteration's training stages make no event: nothing of them is
# shown, and the per-stage bookkeeping cost more than a small model's step; the loss's event is
# held and handed on in a batch (EventRecorder.hold). The scheduler's (the learning rate changes),
# the epoch's stages, errors, warnings and skipped fp16 steps make theirs at once.
QUIET_STAGES = frozenset(ITERATION_STAGES) - {Stage.SCHEDULER}


def quiet_stage(stage: Stage, record: StageRecord) -> bool:
    """Whether this stage, run unprobed while running, makes no event of its own (see QUIET_STAGES)."""
    return stage in QUIET_STAGES and "warnings" not in record.metrics and not record.metrics.get("step_skipped")


def warning_lines(caught: list[warnings.WarningMessage]) -> list[str]:
    """The warnings a stage raised, as its event shows them: each first line once, sorted."""
    return sorted({str(w.message).splitlines()[0][:300] for w in caught})


# Quiet events held before they are handed on (see EventRecorder.hold). The app hands them on at
# every frame and a probed iteration at once, so this only bounds memory; handed on in bigger
# batches they cost less each (the code stays in the CPU caches): on the bench's mlp the run's
# bookkeeping was 30 us an iteration at 64, 26 at 256, 21 at 1,024 (issue 17).
HELD_AT_MOST = 1024


@dataclass(slots=True)
class StageRecord:
    """Mutable scratch for the event a stage is building."""

    tensors: list[TensorStat] = field(default_factory=list)
    loss: float | None = None
    grad_norm: float | None = None
    layers: list[LayerStat] = field(default_factory=list)
    metrics: StageMetrics = field(default_factory=lambda: cast(StageMetrics, {}))
    twin_loss: float | None = None


# A plain iteration's loss, held: (value, shape, the examples a summed loss adds up or None).
PlainLoss = tuple[float, torch.Size, int | None]


def plain_loss_record(note: PlainLoss) -> StageRecord:
    """The loss stage's record of a plain iteration, as `LoopBody.note_loss` fills it."""
    value, shape, summed_over = note
    return StageRecord(loss=value, metrics=_plain_loss_metrics(shape, summed_over))


def _plain_loss_metrics(shape: torch.Size, summed_over: int | None) -> StageMetrics:
    metrics = cast(StageMetrics, {"loss_shape": list(shape)})
    if summed_over is not None:
        metrics["loss_summed_over"] = summed_over
    metrics["running_loss_holds_graph"] = False  # no bug on: the running loss is a float
    return metrics


class EventRecorder:
    """Turns stage records into StageEvents and hands them on."""

    def __init__(
        self,
        device: torch.device,
        history: History,
        diagnostics: Diagnostics | None,
        on_event: Callable[[StageEvent], None] | None = None,
        sync_cuda: bool = True,
    ) -> None:
        self.device = device
        self._device_name, self._on_cuda = str(device), device.type == "cuda"  # every event carries them
        self.history = history
        self.diagnostics = diagnostics
        self.on_event = on_event
        self.sync_cuda = sync_cuda and device.type == "cuda"  # stepping: true per-stage durations
        # Events held back (see hold): (stage, record or a plain loss's figures, iteration, epoch, bugs,
        # ms). The stepper's fast path appends to it itself, a call less per iteration (issue 17).
        self.held: list[tuple[Stage, StageRecord | PlainLoss, int, int, tuple[str, ...], float]] = []

    def elapsed_ms(self, start: float) -> float:
        """Milliseconds since `start`, the GPU's queued work included when stepping."""
        if self.sync_cuda:
            torch.cuda.synchronize(self.device)
        return (time.perf_counter() - start) * 1000.0

    def hold(
        self, stage: Stage, record: StageRecord, iteration: int, epoch: int, bugs: tuple[str, ...], duration_ms: float
    ) -> None:
        """`emit` later, at `catch_up`: running, the losses of unprobed iterations are handed on in
        batches. Made one by one between a small model's stages, events, history and diagnostics
        cost ~3x what they cost in a batch (the training pushes their code out of the CPU caches)."""
        held = self.held
        held.append((stage, record, iteration, epoch, bugs, duration_ms))
        if len(held) >= HELD_AT_MOST:
            self.catch_up()

    def catch_up(self) -> None:
        """Emit the held events, in order."""
        held, self.held = self.held, []
        device, hand_on = self._device_name, self._hand_on
        for stage, record, iteration, epoch, bugs, duration_ms in held:
            if isinstance(record, tuple):  # a plain iteration's loss: its event straight from the figures
                value, shape, summed_over = record
                metrics = _plain_loss_metrics(shape, summed_over)
                if self._on_cuda:
                    self._note_cuda_memory(metrics)
                # Positional: a fifth cheaper than by keyword, at thousands of events a second.
                hand_on(
                    StageEvent(
                        iteration, epoch, stage, bugs, (), value, None, (), metrics, (), None, duration_ms, device
                    )
                )
            else:
                self.emit(stage, record, iteration=iteration, epoch=epoch, bugs=bugs, duration_ms=duration_ms)

    def emit(
        self,
        stage: Stage,
        record: StageRecord,
        *,
        iteration: int,
        epoch: int,
        bugs: tuple[str, ...],
        duration_ms: float,
        error: StageError | None = None,
        code_line: Any = None,
    ) -> StageEvent:
        if self.held:  # in order: what was held comes first
            self.catch_up()
        if self._on_cuda:
            self._note_cuda_memory(record.metrics)
        return self._hand_on(
            StageEvent(
                iteration=iteration,
                epoch=epoch,
                stage=stage,
                tensors=tuple(record.tensors),
                loss=record.loss,
                grad_norm=record.grad_norm,
                layers=tuple(record.layers),
                metrics=record.metrics,  # the record is the stage's own: no copy needed
                error=error,
                duration_ms=duration_ms,
                device=self._device_name,
                bugs=bugs,
                twin_loss=record.twin_loss,
                code_line=code_line,
            )
        )

    def _note_cuda_memory(self, metrics: StageMetrics) -> None:
        metrics["cuda_allocated_mb"] = torch.cuda.memory_allocated(self.device) / 2**20
        metrics["cuda_peak_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20

    def _hand_on(self, event: StageEvent) -> StageEvent:
        """To the diagnostics (which may add findings), the history and `on_event`."""
        if self.diagnostics is not None:
            findings = self.diagnostics.observe(event)
            if findings:
                event = dataclasses.replace(event, diagnostics=tuple(findings))
        self.history.add(event)
        if self.on_event is not None:
            self.on_event(event)
        return event
