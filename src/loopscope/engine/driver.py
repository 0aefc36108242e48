"""What the engine's server needs from whatever drives the loop.

The `Stepper` drives a loop loopscope writes itself around an `experiment()` factory. A second
driver (DESIGN.md §8, script mode) will drive the user's own script, stopping at the stages torch's
hooks report. Both produce the same `StageEvent`s through an `EventRecorder`, so diagnostics,
history, traces and the screen work unchanged; the server talks to either through this interface.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from loopscope.engine.diagnostics import Diagnostics
from loopscope.shared.events import StageError, StageEvent
from loopscope.shared.history import History
from loopscope.engine.pictures import PictureMaker
from loopscope.shared.protocol import SessionInfo
from loopscope.shared.vocab import Stage


class Driver(Protocol):
    """Runs a training loop stage by stage and reports each stage as a StageEvent."""

    history: History
    on_event: Callable[[StageEvent], None] | None
    probe: bool  # full statistics for the stages run next
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

    # ----- control -----------------------------------------------------------------------
    def set_bug(self, bug_id: str, on: bool) -> bool: ...
    def set_twin(self, on: bool) -> None: ...
    def rewind(self) -> bool:
        """Step back one iteration (False beyond the kept window); `rewound_events` are then the
        training stages of the iteration the loop is back at, for the panels to show."""
    @property
    def rewound_events(self) -> tuple[StageEvent, ...]: ...
    @property
    def rewind_window(self) -> int:
        """How many iterations back `rewind` can reach (0: it cannot)."""
    def picture_maker(self) -> PictureMaker | None:
        """Draws what the model has learned, where its inputs allow a picture."""

