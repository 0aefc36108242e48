"""The engine's driver for `loopscope run --nproc N`: the coordinator of N rank processes.

Every command goes to every rank, so they move together a stage (or an iteration) at a time. The
loop's position is rank 0's; every rank's events go out tagged with their rank, with the findings
only the ranks side by side show (RankComparison) added. A rank that raises or dies ends the run:
the others would wait for it in the next all-reduce, so they are stopped, never left hanging.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from loopscope.engine.distributed.compare import RankComparison
from loopscope.engine.distributed.launcher import RankGroup
from loopscope.engine.distributed.rank import RankSpec, RankState
from loopscope.engine.pictures import PictureMaker
from loopscope.shared.errors import UserError
from loopscope.shared.events import StageError, StageEvent
from loopscope.shared.history import History
from loopscope.shared.protocol import SessionInfo
from loopscope.shared.vocab import Stage

ONE_PROCESS = "runs in one process: start without --nproc for it"


class DistributedDriver:
    """Drives N ranks of DDP as one loop (the engine server's Driver)."""

    def __init__(
        self,
        spec: RankSpec,
        on_event: Callable[[StageEvent], None] | None = None,
        local_ranks: int | None = None,
        remote_ranks: int = 0,
        listen: tuple[str, int] | None = None,
    ) -> None:
        self.history = History()  # rank 0's loop
        self.on_event = on_event
        self.probe = True
        self.quiet = False  # unused: ranks make every event, the comparisons read every batch
        self.sync_cuda = False
        self.diagnostics = None  # each rank judges its own loop; the comparisons are the coordinator's
        local = spec.world_size - remote_ranks if local_ranks is None else local_ranks
        self.group = RankGroup(spec, local, remote_ranks, listen)
        self.group.start()  # UserError when a rank cannot start
        self.world_size = spec.world_size
        self.comparison = RankComparison(self.group.world_size)
        self._info: SessionInfo = dataclasses.replace(self.group.info, world_size=spec.world_size)
        first = self.group.states[0]
        assert first is not None
        self._state: RankState = first
        self._over: str | None = None  # why the run ended early: a rank's error or death
        self._error: StageError | None = None  # and that error, as the screen shows a stage's
        self._raised_by: dict[str, int | None] = {}  # each finding id, and the rank that raised it first

    # ----- where the loop is (rank 0's) ----------------------------------------------------
    @property
    def iteration(self) -> int:
        return self._state.iteration

    @property
    def epoch(self) -> int:
        return self._state.epoch

    @property
    def completed_iterations(self) -> int:
        return self._state.completed_iterations

    @property
    def finished(self) -> bool:
        return self._over is not None or self._state.finished

    @property
    def stop_reason(self) -> str | None:
        return self._over or self._state.stop_reason

    @property
    def halted(self) -> StageError | None:
        return self._error if self._over is not None else self._state.halted

    @property
    def at_boundary(self) -> bool:
        return self._state.at_boundary

    @property
    def active_bugs(self) -> tuple[str, ...]:
        return self._state.active_bugs

    @property
    def twin_enabled(self) -> bool:
        return False

    def next_stage(self) -> Stage | None:
        return None if self.finished else self._state.next_stage

    def iteration_stages(self) -> list[Stage]:
        return list(self._state.iteration_stages)

    def last_iteration_next(self) -> bool:
        return self._state.last_iteration_next

    def info(self) -> SessionInfo:
        return self._info

    # ----- moving on (all ranks together) --------------------------------------------------
    def step_stage(self) -> StageEvent | None:
        events = self._turn(("stage", self.probe))
        return next((e for e in events if not e.rank), None)

    def run_iteration(self) -> list[StageEvent]:
        return self._turn(("iteration", self.probe))

    def run_epoch(self) -> list[StageEvent]:
        return self._turn(("epoch", self.probe))

    def run(self, iterations: int | None = None, should_stop: Callable[[], bool] | None = None) -> int:
        target = None if iterations is None else self.completed_iterations + iterations
        produced = 0
        while not self.finished and self.halted is None:
            if target is not None and self.completed_iterations >= target and self.at_boundary:
                break
            if should_stop is not None and should_stop():
                break
            produced += len(self.run_iteration())
        return produced

    def resume(self) -> None:
        """A rank's error ends the run (see the module's doc): nothing to resume."""

    @contextmanager
    def recording_warnings(self) -> Iterator[None]:
        yield  # each rank records its own

    def catch_up(self) -> None:
        """Ranks hold nothing back: every turn's events are handed on as it ends."""

    def _turn(self, command: tuple[Any, ...]) -> list[StageEvent]:
        if self._over is not None:
            return []
        turn = self.group.turn(command)
        answered = [state for state in turn.states if state is not None]
        if answered:  # rank 0's, unless it could not answer (stopped waiting for a failed rank)
            self._state = answered[0]
        events = self._with_comparisons(turn.events)
        failed = next((e for e in events if e.error is not None), None)
        if turn.failure or failed is not None:
            self._end(self.group.died, failed, turn.failure)
        for event in events:
            if not event.rank:
                self.history.add(event)
            if self.on_event is not None:
                self.on_event(event)
        return events

    def _with_comparisons(self, events: list[StageEvent]) -> list[StageEvent]:
        """Each event with the comparisons' findings it raised; a finding one rank raised already
        is not repeated for the next (every rank sees the same stale gradients)."""
        out = []
        for event in self.comparison.annotate(events):
            first = tuple(f for f in event.diagnostics if self._raised_by.setdefault(f.id, event.rank) == event.rank)
            out.append(event if first == event.diagnostics else dataclasses.replace(event, diagnostics=first))
        return out

    def _end(self, died: str | None, failed: StageEvent | None, failure: str | None) -> None:
        """Stop every rank: one failed, and the others cannot go on without it. The cause is a
        rank that died (the others' collectives then fail), else the error a rank raised (the
        others are then stopped waiting for it), else why the launcher stopped them."""
        why = []
        if died:
            why.append(died)
            if failed is not None:
                why.append(f"rank {failed.rank}'s {failed.stage} failed without it")
            self._error = StageError("RankDied", died)
        elif failed is not None and failed.error is not None:
            error = failed.error
            why.append(f"rank {failed.rank} failed at {failed.stage}: {error.type}: {error.message}")
            self._error = dataclasses.replace(error, message=f"rank {failed.rank}: {error.message}")
        else:
            why.append(failure or "a rank stopped answering")
            self._error = StageError("RankFailure", why[0])
        self._over = "; ".join(why) + "; every rank was stopped"
        self.group.close()

    # ----- control -----------------------------------------------------------------------
    def set_bug(self, bug_id: str, on: bool) -> bool:
        if bug_id not in self._info.applicable_bugs:
            raise UserError(f"{bug_id} does not apply here: {self._info.bug_reasons.get(bug_id, 'see loopscope bugs')}")
        before = self.active_bugs
        self._turn(("bug", bug_id, on))
        return before != self.active_bugs

    def set_twin(self, on: bool) -> None:
        if on:
            raise UserError(f"the clean twin {ONE_PROCESS}")

    def rewind(self) -> bool:
        raise UserError(f"stepping back {ONE_PROCESS}")

    @property
    def rewound_events(self) -> tuple[StageEvent, ...]:
        return ()

    @property
    def rewind_warning(self) -> str | None:
        return None

    @property
    def rewind_window(self) -> int:
        return 0

    def picture_maker(self) -> PictureMaker | None:
        return None  # the model lives in the rank processes

    def check_subject(self) -> Any:
        raise UserError(f"the sanity checks {ONE_PROCESS} (loopscope check TARGET)")

    def close(self) -> None:
        self.group.close()
