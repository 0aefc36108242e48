"""Snapshots at iteration boundaries, so the loop can step back and replay the same values.

A snapshot is a copy of the driver's `state_dict()`: the model's parameters and buffers, the
optimizer's and scheduler's state, every random generator's state, the bugs on, and the loop's
`LoopState` with its data position (the generator state when the epoch's loader iterator was made,
and how many batches it had given). Restoring re-creates the iterator from that state and skips the
consumed batches, so the same batches come out in the same order.
"""

from __future__ import annotations

import copy
import math
import random
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from loopscope.shared.events import StageEvent
from loopscope.shared.history import History
from loopscope.shared.vocab import Stage


def capture_rng(device: torch.device) -> tuple[Any, ...]:
    cuda = torch.cuda.get_rng_state_all() if device.type == "cuda" else None
    return torch.get_rng_state(), cuda, random.getstate(), np.random.get_state()


def restore_rng(state: tuple[Any, ...]) -> None:
    torch_state, cuda, python_state, numpy_state = state
    torch.set_rng_state(torch_state)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
    random.setstate(python_state)
    np.random.set_state(numpy_state)


class Rewindable(Protocol):
    """What the rewinder needs of a driver: where it is, and its whole state in torch's style."""

    @property
    def completed_iterations(self) -> int: ...
    @property
    def epoch(self) -> int: ...
    @property
    def at_boundary(self) -> bool: ...
    @property
    def halted(self) -> object | None: ...
    @property
    def finished(self) -> bool: ...
    @property
    def active_bugs(self) -> tuple[str, ...]: ...

    history: History
    probe: bool

    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    def iteration_stages(self) -> list[Stage]: ...
    def run_iteration(self) -> list[StageEvent]: ...
    def switch_bugs(self, bugs: Iterable[str]) -> None: ...
    def quietly(self) -> AbstractContextManager[None]: ...


WAIT_SECONDS = 0.05  # a gap this much longer than the training in it was spent waiting


@dataclass
class Snapshot:
    completed_iterations: int
    epoch: int
    state: dict[str, Any]  # the driver's state_dict(), copied


class Rewinder:
    """Boundaries of the last `keep` iterations: full snapshots every few iterations, replay between.

    Copying the model and optimizer at every boundary would slow a fast run down badly (Adam's
    state alone is twice the model), so snapshots are spaced to cost ~0.25% of the training time
    (up to 1% where that keeps a step back's replay short, see `interval`); stepping back to a
    boundary between two snapshots restores the earlier one and replays the iterations in between,
    which the loop's determinism makes exact. After a wait (a person stepping by hand, a paused
    run) the boundary gets its snapshot whatever the spacing: its cost is hidden in the wait, and
    the wait is not counted as training time.
    """

    # The cost a snapshot is charged (its copy, and the next iteration's slowdown from the caches it
    # pushed out) misses the slowdown of the iterations after that: measured on the bench's small
    # MLP, snapshots at a 0.5% budget cost 0.9-1.9% of the run (issue 17). Half that budget keeps
    # the real cost near half a percent; a step back there replays at most ~0.16 s.
    BUDGET = 0.0025
    # Stepping back replays up to a spacing's worth of iterations: where that would take longer
    # than this, snapshots come closer, up to MAX_BUDGET (a keypress should not wait seconds).
    MAX_REPLAY_SECONDS = 0.25
    MAX_BUDGET = 0.01

    def __init__(self, keep: int = 200, clock: Callable[[], float] = time.perf_counter) -> None:
        self.keep = keep
        self.clock = clock  # `loopscope bench` stops it while the plain loop has its turn
        self.snapshots: deque[Snapshot] = deque()
        self.bug_log: dict[int, frozenset[str]] = {}  # completed iterations -> bugs active then
        self._cost = 0.0  # seconds a snapshot costs, smoothed
        self._unpaid: float | None = None  # the last snapshot's copy time, until its aftermath is known
        self._training: float | None = None  # seconds of training between boundaries, smoothed (none after a snapshot)
        self._last_boundary_time: float | None = None
        self._bugs: tuple[tuple[str, ...], frozenset[str]] = ((), frozenset())  # the last bugs seen, as a set
        self._next_due = 0  # the first boundary where a snapshot may be due (see take)
        # A driver running plain iterations (no bug on) without a pause may pass the boundaries
        # before this one without calling `take`, and hand them over at once (`passed_quietly`).
        self.quiet_until = 0
        self._between_seconds, self._between_count = 0.0, 0  # training since the last decision
        self.furthest = 0  # the most iterations ever completed: the window is the last `keep` of them
        # (iteration, micro-batch) -> (loss, bugs): see step_back
        self.first_losses: dict[tuple[int, int], tuple[float | None, tuple[str, ...]]] = {}
        self.mismatch: str | None = None  # what the last step back's replay found different

    @property
    def interval(self) -> int:
        if not self._training:
            return 2  # leaves an iteration without a snapshot before it, to measure the rest by
        spacing = math.ceil(self._cost / (self.BUDGET * self._training))
        if spacing * self._training > self.MAX_REPLAY_SECONDS:
            spacing = max(
                math.ceil(self.MAX_REPLAY_SECONDS / self._training),
                math.ceil(self._cost / (self.MAX_BUDGET * self._training)),
            )
        return max(1, spacing)

    def passed_quietly(self, boundaries: int, last: int, training_seconds: float) -> None:
        """The `boundaries` boundaries up to `last` went by without `take`, as `quiet_until` allows:
        no bug was on at any of them, none came after a wait, and the stages between them took
        `training_seconds` in all. Recorded as `take`'s quick case records each (issue 17: a call
        per boundary cost ~4 us of a small model's 0.45 ms step)."""
        if self.keep <= 0 or not boundaries:
            return
        no_bugs: frozenset[str] = frozenset()
        for done in range(last - boundaries + 1, last + 1):
            self.bug_log[done] = no_bugs
        self.furthest = max(self.furthest, last)
        self._between_seconds += training_seconds
        self._between_count += boundaries

    def take(self, stepper: Rewindable, training_seconds: float, gap: float | None = None) -> None:
        """At a boundary, after `training_seconds` of stages since the last one. `gap`: the time
        since those stages ended, from a driver that passed the boundary before quietly (then
        the time of that boundary is not known here)."""
        if self.keep <= 0:
            self.quiet_until = sys.maxsize
            return
        now = self.clock()
        last_time, self._last_boundary_time = self._last_boundary_time, now
        if gap is not None and last_time is not None:
            last_time = now - gap - training_seconds
        waited = last_time is None or now - last_time > 2 * training_seconds + WAIT_SECONDS
        done = stepper.completed_iterations
        bugs = stepper.active_bugs
        if bugs != self._bugs[0]:
            self._bugs = bugs, frozenset(bugs)
        self.bug_log[done] = self._bugs[1]
        self.furthest = max(self.furthest, done)
        if not waited and done < self._next_due:
            # Most boundaries of a run: only the sums the next spacing is learnt from. Each line
            # here costs a small model's run several times what it costs alone (issue 17).
            self._between_seconds += training_seconds
            self._between_count += 1
            return
        self._decide(stepper, done, training_seconds, waited)

    def _decide(self, stepper: Rewindable, done: int, training_seconds: float, waited: bool) -> None:
        """At a boundary where a snapshot may be due: learn the costs, and take it if it is."""
        if self._unpaid is not None:
            # The iteration after a snapshot runs slower: the copy pushed the model and optimizer
            # out of the CPU caches (measured on the wide MLP: as much again as the copy itself).
            # That is the snapshot's cost too, unless a wait came between.
            slower = training_seconds - self._training if not waited and self._training is not None else 0.0
            cost = self._unpaid + max(0.0, slower)
            self._cost = cost if not self._cost else 0.8 * self._cost + 0.2 * cost
            self._unpaid = None
        elif not waited:  # only iterations without a snapshot before them say what one normally takes
            self._between_seconds += training_seconds
            self._between_count += 1
        if self._between_count:
            mean = self._between_seconds / self._between_count
            self._training = mean if self._training is None else 0.5 * (self._training + mean)
            self._between_seconds, self._between_count = 0.0, 0
        last = self.snapshots[-1] if self.snapshots else None
        self._next_due = self.quiet_until = done + 1
        if last is not None and last.completed_iterations == done and last.epoch == stepper.epoch:
            return  # already taken at this boundary
        if last is not None and not waited and done - last.completed_iterations < self.interval:
            self._next_due = self.quiet_until = last.completed_iterations + self.interval
            return
        started = time.perf_counter()
        # Keep one snapshot at or before the oldest boundary still in the window; one that falls
        # out lends its memory to the new one (fresh memory cost page faults: ~130 an iteration).
        dropped = None
        while len(self.snapshots) > 1 and self.snapshots[1].completed_iterations <= self.furthest - self.keep:
            dropped = self.snapshots.popleft()
        self.snapshots.append(self._snapshot(stepper, reuse=dropped))
        self._unpaid = time.perf_counter() - started
        self._prune_bug_log()

    def _prune_bug_log(self) -> None:
        """The bugs on at each boundary a replay can pass are kept from the oldest snapshot on,
        which may lie before the window (a replay from it passes them all)."""
        oldest = self.snapshots[0].completed_iterations
        # Keys are in order (a replay starts at a kept snapshot and rewrites keys already there),
        # so pruning stops at the first one still needed instead of scanning them all.
        while (first := next(iter(self.bug_log))) < oldest:
            del self.bug_log[first]

    def _snapshot(self, stepper: Rewindable, reuse: Snapshot | None = None) -> Snapshot:
        return Snapshot(
            completed_iterations=stepper.completed_iterations,
            epoch=stepper.epoch,
            state=copy_into(stepper.state_dict(), reuse.state if reuse else None),
        )

    def target(self, stepper: Rewindable) -> tuple[Snapshot, int] | None:
        """(the snapshot to restore, the boundary to replay up to), one iteration back from here."""
        mid_iteration = not stepper.at_boundary or stepper.halted is not None
        wanted = stepper.completed_iterations if mid_iteration else stepper.completed_iterations - 1
        self.furthest = max(self.furthest, stepper.completed_iterations)
        if wanted < 0 or wanted < self.furthest - self.keep:
            return None
        for snapshot in reversed(self.snapshots):
            if snapshot.completed_iterations <= wanted:
                return snapshot, wanted
        return None

    def restore(self, stepper: Rewindable, snapshot: Snapshot) -> None:
        stepper.load_state_dict(snapshot.state)
        # Snapshots after this point describe a future that is no longer coming.
        while self.snapshots and self.snapshots[-1].completed_iterations > snapshot.completed_iterations:
            self.snapshots.pop()
        self._last_boundary_time = None
        self.quiet_until = 0

    def step_back(self, driver: Rewindable) -> tuple[StageEvent, ...] | None:
        """One iteration back: restore the snapshot before it and replay up to it. Returns the
        training stages of the iteration the loop is back at the end of (None beyond the window):
        as first recorded when those were probed, else as the replay probed them."""
        found = self.target(driver)
        if found is None:
            return None
        snapshot, wanted = found
        stages = set(driver.iteration_stages())
        recent = driver.history.recent()
        recorded = tuple(e for e in recent if e.iteration == wanted and e.stage in stages)
        # The losses first seen after the snapshot: the replay, and the iterations run again after
        # it, must give them back exactly, unless the bugs differ by then.
        self.first_losses = {
            _loss_key(e): (e.loss, e.bugs)
            for e in recent
            if e.stage == Stage.LOSS and e.error is None and e.iteration > snapshot.completed_iterations
        }
        self.restore(driver, snapshot)
        driver.history.truncate(snapshot.completed_iterations)
        replayed: list[StageEvent] = []
        replayed_losses: list[StageEvent] = []
        if wanted > snapshot.completed_iterations:
            replayed = [e for e in self._replay(driver, wanted, replayed_losses) if e.stage in stages]
        self.mismatch = next((message for e in replayed_losses if (message := self.replay_differs(e))), None)
        # Run mode records most iterations without statistics; the replay probes the last one.
        probed = any(e.layers for e in recorded)
        return recorded if probed or not replayed else tuple(replayed)

    def _replay(self, driver: Rewindable, completed: int, losses: list[StageEvent]) -> list[StageEvent]:
        """Run again, quietly, from a snapshot to the boundary wanted: same code, same numbers.
        Returns the events of the last block run, probed (probes never change the numbers); the
        loss events of every replayed iteration go to `losses`."""
        last: list[StageEvent] = []
        with driver.quietly():
            while driver.completed_iterations < completed and not driver.finished and driver.halted is None:
                if driver.at_boundary:
                    self._switch_bugs_as_at(driver, driver.completed_iterations)
                driver.probe = driver.completed_iterations == completed - 1
                last = driver.run_iteration()
                losses.extend(e for e in last if e.stage == Stage.LOSS and e.error is None)
            # The bugs that were on when the next iteration began the first time, as a snapshot
            # taken at this boundary would have restored them.
            self._switch_bugs_as_at(driver, driver.completed_iterations)
        return last

    def replay_differs(self, event: StageEvent) -> str | None:
        """After a step back: if this loss event's iteration, run again with the same bugs, gave
        another loss than the first time, what to tell the user (state loopscope cannot restore)."""
        if not self.first_losses:  # no step back to check (asked every iteration)
            return None
        iteration, loss = event.iteration, event.loss
        first = self.first_losses.get(_loss_key(event))
        if first is None or first[1] != event.bugs or loss is None or first[0] is None:
            return None
        if loss == first[0] or (math.isnan(loss) and math.isnan(first[0])):
            return None
        return (
            f"after stepping back, iteration {iteration} gave loss {loss:.7g} where it first gave {first[0]:.7g}: "
            "the experiment keeps state loopscope cannot restore (an RNN hidden state carried on the model "
            "between batches, say), so the numbers after a step back are not the ones first seen"
        )

    def _switch_bugs_as_at(self, driver: Rewindable, completed: int) -> None:
        bugs = self.bug_log.get(completed)
        if bugs is not None:
            driver.switch_bugs(bugs)


def _loss_key(event: StageEvent) -> tuple[int, int]:
    """A loss event's place: its iteration, and its micro-batch under gradient accumulation."""
    return event.iteration, event.metrics.get("micro_batch", 1)


_IMMUTABLE = (int, float, bool, str, bytes, type(None), frozenset)
_IMMUTABLE_TYPES = frozenset(_IMMUTABLE)


def copy_into(value: Any, old: Any) -> Any:
    """A deep copy of `value` that copies each tensor into the matching tensor of `old` (same place
    in the structure, same shape, dtype and device) instead of allocating it afresh."""
    if isinstance(value, _IMMUTABLE):
        return value
    if type(value) is tuple and _IMMUTABLE_TYPES.issuperset(map(type, value)):
        return value  # Python's random state: 625 ints, which one by one cost 0.8 ms a snapshot
    if isinstance(value, torch.Tensor):
        if (
            isinstance(old, torch.Tensor)
            and old.shape == value.shape
            and old.dtype == value.dtype
            and old.device == value.device
            and old.layout == value.layout == torch.strided
        ):
            return old.copy_(value.detach())
        return value.detach().clone()
    if isinstance(value, dict):  # a state_dict's OrderedDict too: load_state_dict takes a plain dict
        old_items = old if isinstance(old, dict) else {}
        return {key: copy_into(item, old_items.get(key)) for key, item in value.items()}
    if type(value) in (list, tuple):
        old_values = old if type(old) is type(value) and len(old) == len(value) else [None] * len(value)
        return type(value)(copy_into(item, previous) for item, previous in zip(value, old_values))
    return copy.deepcopy(value)
