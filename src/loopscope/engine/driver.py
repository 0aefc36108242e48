"""What the engine's server needs from whatever drives the loop.

The `Stepper` drives a loop loopscope writes itself around an `experiment()` factory. A second
driver (DESIGN.md §8, script mode) will drive the user's own script, stopping at the stages torch's
hooks report. Both produce the same `StageEvent`s through an `EventRecorder`, so diagnostics,
history, traces and the screen work unchanged; the server talks to either through this interface.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

from loopscope.engine.diagnostics import Diagnostics
from loopscope.engine.pictures import PictureMaker
from loopscope.engine.recorder import EventRecorder
from loopscope.engine.state import LoopState
from loopscope.shared.events import StageError, StageEvent
from loopscope.shared.history import History
from loopscope.shared.protocol import SessionInfo
from loopscope.shared.vocab import Stage


class Driver(Protocol):
    """Runs a training loop stage by stage and reports each stage as a StageEvent."""

    history: History
    on_event: Callable[[StageEvent], None] | None
    probe: bool  # full statistics for the stages run next
    quiet: bool  # running: unprobed training stages make no events but the loss's
    sync_cuda: bool  # per-stage GPU sync (true durations) when stepping

    # ----- where the loop is -------------------------------------------------------------
    @property
    def iteration(self) -> int: ...
    @property
    def epoch(self) -> int: ...
    @property
    def completed_iterations(self) -> int: ...
    @property
    def finished(self) -> bool: ...
    @property
    def stop_reason(self) -> str | None: ...
    @property
    def halted(self) -> StageError | None: ...
    @property
    def at_boundary(self) -> bool: ...
    @property
    def active_bugs(self) -> tuple[str, ...]: ...
    @property
    def twin_enabled(self) -> bool: ...
    @property
    def diagnostics(self) -> Diagnostics | None: ...

    def next_stage(self) -> Stage | None: ...
    def iteration_stages(self) -> list[Stage]: ...
    def last_iteration_next(self) -> bool: ...
    def info(self) -> SessionInfo: ...

    # ----- moving on ---------------------------------------------------------------------
    def step_stage(self) -> StageEvent | None: ...
    def run_iteration(self) -> list[StageEvent]: ...
    def run_epoch(self) -> list[StageEvent]: ...
    def run(self, iterations: int | None = None, should_stop: Callable[[], bool] | None = None) -> int: ...
    def resume(self) -> None: ...
    def recording_warnings(self) -> AbstractContextManager[None]:
        """One recorder of user code's warnings for every stage run inside it."""

    def catch_up(self) -> None:
        """Hand on the events `quiet` iterations held back (to the history, diagnostics, on_event)."""

    # ----- control -----------------------------------------------------------------------
    def set_bug(self, bug_id: str, on: bool) -> bool: ...
    def set_twin(self, on: bool) -> None: ...
    def rewind(self) -> bool:
        """Step back one iteration (False beyond the kept window); `rewound_events` are then the
        training stages of the iteration the loop is back at, for the panels to show."""

    @property
    def rewound_events(self) -> tuple[StageEvent, ...]: ...
    @property
    def rewind_warning(self) -> str | None:
        """Set by `rewind` when the replay gave other numbers than the first run."""

    @property
    def rewind_window(self) -> int:
        """How many iterations back `rewind` can reach (0: it cannot)."""

    def picture_maker(self) -> PictureMaker | None:
        """Draws what the model has learned, where its inputs allow a picture."""


class DriverBase:
    """What every driver has: a LoopState it reads its position from, an EventRecorder it reports
    through, and the warnings user code raises, caught per stage."""

    state: LoopState
    recorder: EventRecorder
    history: History
    _caught: list[warnings.WarningMessage] | None  # see recording_warnings

    # ----- where the loop is (read-only: the state changes only by running) -------------------
    @property
    def iteration(self) -> int:
        return self.state.iteration

    @property
    def epoch(self) -> int:
        return self.state.epoch

    @property
    def completed_iterations(self) -> int:
        return self.state.completed_iterations

    @property
    def finished(self) -> bool:
        return self.state.finished

    @property
    def stop_reason(self) -> str | None:
        return self.state.stop_reason

    @property
    def halted(self) -> StageError | None:
        return self.state.halted

    @property
    def at_boundary(self) -> bool:
        """True between blocks: the next stage starts an iteration (or ends the epoch)."""
        return self.state.at_boundary

    # ----- how events go out ----------------------------------------------------------------
    @property
    def sync_cuda(self) -> bool:
        return self.recorder.sync_cuda

    @sync_cuda.setter
    def sync_cuda(self, on: bool) -> None:
        self.recorder.sync_cuda = on and self.recorder.device.type == "cuda"

    @property
    def on_event(self) -> Callable[[StageEvent], None] | None:
        return self.recorder.on_event

    @on_event.setter
    def on_event(self, callback: Callable[[StageEvent], None] | None) -> None:
        self.recorder.on_event = callback

    @property
    def diagnostics(self) -> Diagnostics | None:
        return self.recorder.diagnostics

    def catch_up(self) -> None:
        self.recorder.catch_up()

    # ----- running ----------------------------------------------------------------------------
    def _step_stage(self) -> StageEvent | None:
        """Run one stage: its event, or None when it ran `quiet` or training is over (`finished`)."""
        raise NotImplementedError

    @contextmanager
    def recording_warnings(self) -> Iterator[None]:
        """Record the warnings user code raises, for the stage that raised them to show. One
        recorder serves every stage inside it (entering one cost ~12 us): running, the engine
        holds one across a frame's iterations."""
        if self._caught is not None:
            yield
            return
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # a warning repeated every iteration shows every time
            self._caught = caught
            try:
                yield
            finally:
                self._caught = None

    def step_stage(self) -> StageEvent | None:
        """Run one stage; None once training is over (or when it ran `quiet`)."""
        with self.recording_warnings():
            return self._step_stage()

    def run_iteration(self) -> list[StageEvent]:
        """Run to the end of the current block: the rest of this iteration, or the epoch's end.
        Returns the events it made (running `quiet`, the loss's and few others)."""
        events = []
        state = self.state
        with self.recording_warnings():
            while not state.finished:
                event = self._step_stage()
                if event is not None:
                    events.append(event)
                if state.halted is not None or self.at_boundary:
                    break
        return events

    def run(self, iterations: int | None = None, should_stop: Callable[[], bool] | None = None) -> int:
        """Run `iterations` more training iterations (None: to the end); returns events produced.

        Events go to `on_event` and the history; `should_stop` is checked between stages.
        """
        target = None if iterations is None else self.state.completed_iterations + iterations
        produced = 0
        with self.recording_warnings():
            while not self.state.finished and self.state.halted is None:
                if target is not None and self.state.completed_iterations >= target and self.at_boundary:
                    break
                if should_stop is not None and should_stop():
                    break
                produced += self._advance()
        return produced

    def _advance(self) -> int:
        """Move the loop on by the smallest step `run` takes (a stage here); returns the events it made."""
        return 0 if self.step_stage() is None else 1
