"""Snapshots at iteration boundaries, so the loop can step back and replay the same values.

A snapshot holds the model's parameters and buffers, the optimizer's and scheduler's state, every
random generator's state and the data position (the generator state when the epoch's loader
iterator was made, and how many batches it had given). Restoring re-creates the iterator from that
state and skips the consumed batches, so the same batches come out in the same order.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


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


@dataclass
class Snapshot:
    completed_iterations: int
    iteration: int
    epoch: int
    batches_this_epoch: int
    epoch_rng: tuple[Any, ...] | None
    rng: tuple[Any, ...]
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any] | None
    counters: dict[str, Any]
    bugs: frozenset[str]


class Rewinder:
    """Boundaries of the last `keep` iterations: full snapshots every few iterations, replay between.

    Copying the model and optimizer at every boundary would slow a fast run down badly (Adam's
    state alone is twice the model), so snapshots are spaced to cost at most ~1% of the training
    time; stepping back to a boundary between two snapshots restores the earlier one and replays the
    iterations in between, which the loop's determinism makes exact. After a wait (a person stepping
    by hand, a paused run) the boundary gets its snapshot whatever the spacing: its cost is hidden
    in the wait, and the wait is not counted as training time.
    """

    BUDGET = 0.01
    WAIT_SECONDS = 0.05  # a gap this much longer than the training in it was spent waiting

    def __init__(self, keep: int = 200, clock: Callable[[], float] = time.perf_counter) -> None:
        self.keep = keep
        self.clock = clock  # `loopscope bench` stops it while the plain loop has its turn
        self.snapshots: deque[Snapshot] = deque()
        self.bug_log: dict[int, frozenset[str]] = {}  # completed iterations -> bugs active then
        self._cost = 0.0  # seconds a snapshot costs, smoothed
        self._unpaid: float | None = None  # the last snapshot's copy time, until its aftermath is known
        self._training = None  # seconds of training between boundaries, smoothed (none after a snapshot)
        self._last_boundary_time: float | None = None
        self.furthest = 0  # the most iterations ever completed: the window is the last `keep` of them

    @property
    def interval(self) -> int:
        if not self._training:
            return 2  # leaves an iteration without a snapshot before it, to measure the rest by
        return max(1, math.ceil(self._cost / (self.BUDGET * self._training)))

    def take(self, stepper: Any, training_seconds: float) -> None:
        """At a boundary, after `training_seconds` of stages since the last one."""
        if self.keep <= 0:
            return
        now = self.clock()
        waited = (self._last_boundary_time is None
                  or now - self._last_boundary_time > 2 * training_seconds + self.WAIT_SECONDS)
        self._last_boundary_time = now
        if self._unpaid is not None:
            # The iteration after a snapshot runs slower: the copy pushed the model and optimizer
            # out of the CPU caches (measured on the wide MLP: as much again as the copy itself).
            # That is the snapshot's cost too, unless a wait came between.
            slower = training_seconds - self._training if not waited and self._training is not None else 0.0
            cost = self._unpaid + max(0.0, slower)
            self._cost = cost if not self._cost else 0.8 * self._cost + 0.2 * cost
            self._unpaid = None
        elif not waited:  # only iterations without a snapshot before them say what one normally takes
            self._training = (training_seconds if self._training is None
                              else 0.8 * self._training + 0.2 * training_seconds)
        done = stepper.completed_iterations
        self.furthest = max(self.furthest, done)
        self._log_bugs(done, frozenset(stepper.active_bugs))
        last = self.snapshots[-1] if self.snapshots else None
        if last is not None and last.completed_iterations == done and last.epoch == stepper.epoch:
            return  # already taken at this boundary
        if last is not None and not waited and done - last.completed_iterations < self.interval:
            return
        started = time.perf_counter()
        # Keep one snapshot at or before the oldest boundary still in the window; one that falls
        # out lends its memory to the new one (fresh memory cost page faults: ~130 an iteration).
        dropped = None
        while len(self.snapshots) > 1 and self.snapshots[1].completed_iterations <= self.furthest - self.keep:
            dropped = self.snapshots.popleft()
        self.snapshots.append(self._snapshot(stepper, reuse=dropped))
        self._unpaid = time.perf_counter() - started

    def _log_bugs(self, done: int, bugs: frozenset[str]) -> None:
        """The bugs on at each boundary a replay can pass: every one from the oldest snapshot on,
        which may lie before the window (a replay from it passes them all)."""
        self.bug_log[done] = bugs
        oldest = self.snapshots[0].completed_iterations if self.snapshots else done
        # Keys are in order (a replay starts at a kept snapshot and rewrites keys already there),
        # so pruning stops at the first one still needed instead of scanning them all.
        while (first := next(iter(self.bug_log))) < oldest:
            del self.bug_log[first]

    def _snapshot(self, stepper: Any, reuse: Snapshot | None = None) -> Snapshot:
        exp = stepper.experiment
        return Snapshot(
            completed_iterations=stepper.completed_iterations,
            iteration=stepper.iteration,
            epoch=stepper.epoch,
            batches_this_epoch=stepper._batches_this_epoch if stepper._train_iter is not None else 0,
            epoch_rng=stepper._epoch_rng if stepper._train_iter is not None else None,
            rng=capture_rng(stepper.device),
            model=copy_into(stepper.model.state_dict(), reuse.model if reuse else None),
            optimizer=copy_into(exp.optimizer.state_dict(), reuse.optimizer if reuse else None),
            scheduler=copy.deepcopy(exp.scheduler.state_dict()) if exp.scheduler is not None else None,
            counters={
                "best_val_loss": stepper.best_val_loss,
                "validations_without_improvement": stepper.validations_without_improvement,
                "last_val_loss": stepper._last_val_loss,
                "running_loss": float(stepper._running_loss),
            },
            bugs=frozenset(stepper.active_bugs),
        )

    def target(self, stepper: Any) -> tuple[Snapshot, int] | None:
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

    def restore(self, stepper: Any, snapshot: Snapshot) -> None:
        exp = stepper.experiment
        _switch_bugs(stepper, snapshot.bugs)
        stepper.model.load_state_dict(snapshot.model)
        exp.optimizer.load_state_dict(copy.deepcopy(snapshot.optimizer))
        if snapshot.scheduler is not None:
            exp.scheduler.load_state_dict(copy.deepcopy(snapshot.scheduler))
        stepper._train_iter = None
        stepper._epoch_rng = snapshot.epoch_rng
        if snapshot.epoch_rng is not None:
            restore_rng(snapshot.epoch_rng)
            stepper._train_iter = iter(exp.train_loader)
            for _ in range(snapshot.batches_this_epoch):
                next(stepper._train_iter)
        restore_rng(snapshot.rng)
        stepper.completed_iterations = snapshot.completed_iterations
        stepper.iteration = snapshot.iteration
        stepper.epoch = snapshot.epoch
        stepper._batches_this_epoch = snapshot.batches_this_epoch
        stepper.best_val_loss = snapshot.counters["best_val_loss"]
        stepper.validations_without_improvement = snapshot.counters["validations_without_improvement"]
        stepper._last_val_loss = snapshot.counters["last_val_loss"]
        stepper._running_loss = snapshot.counters["running_loss"]
        stepper.halted = None
        stepper.finished = False
        stepper.stop_reason = None
        stepper._epoch_ending = False
        stepper._prefetched = None
        stepper._queue.clear()
        # Snapshots after this point describe a future that is no longer coming.
        while self.snapshots and self.snapshots[-1].completed_iterations > snapshot.completed_iterations:
            self.snapshots.pop()
        self._last_boundary_time = None

    def set_bugs_for(self, stepper: Any, completed: int) -> None:
        """During a replay: the bugs that were on when this iteration began the first time."""
        bugs = self.bug_log.get(completed)
        if bugs is not None:
            _switch_bugs(stepper, bugs)


def copy_into(value: Any, old: Any) -> Any:
    """A deep copy of `value` that copies each tensor into the matching tensor of `old` (same place
    in the structure, same shape, dtype and device) instead of allocating it afresh."""
    if isinstance(value, torch.Tensor):
        if (isinstance(old, torch.Tensor) and old.shape == value.shape and old.dtype == value.dtype
                and old.device == value.device and old.layout == value.layout == torch.strided):
            return old.copy_(value.detach())
        return value.detach().clone()
    if isinstance(value, dict):  # a state_dict's OrderedDict too: load_state_dict takes a plain dict
        olds = old if isinstance(old, dict) else {}
        return {key: copy_into(item, olds.get(key)) for key, item in value.items()}
    if type(value) in (list, tuple):
        olds = old if type(old) is type(value) and len(old) == len(value) else [None] * len(value)
        return type(value)(copy_into(item, previous) for item, previous in zip(value, olds))
    return copy.deepcopy(value)


def _switch_bugs(stepper: Any, bugs: frozenset[str]) -> None:
    """Exactly `bugs` on, as they were at that boundary."""
    for bug_id in set(stepper.active_bugs) - bugs:
        stepper.injector.set(bug_id, False)
    for bug_id in bugs - set(stepper.active_bugs):
        stepper.injector.set(bug_id, True)
