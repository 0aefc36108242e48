"""Snapshots at iteration boundaries, so the loop can step back and replay the same values.

A snapshot holds the model's parameters and buffers, the optimizer's and scheduler's state, every
random generator's state and the data position (the generator state when the epoch's loader
iterator was made, and how many batches it had given). Restoring re-creates the iterator from that
state and skips the consumed batches, so the same batches come out in the same order.
"""

from __future__ import annotations

import copy
import random
from collections import deque
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
    """The last `keep` iteration boundaries of a Stepper."""

    def __init__(self, keep: int = 200) -> None:
        self.keep = keep
        self.snapshots: deque[Snapshot] = deque(maxlen=keep)

    def take(self, stepper: Any) -> None:
        if self.keep <= 0:
            return
        if self.snapshots and self.snapshots[-1].completed_iterations == stepper.completed_iterations \
                and self.snapshots[-1].epoch == stepper.epoch:
            return  # already taken at this boundary
        exp = stepper.experiment
        self.snapshots.append(Snapshot(
            completed_iterations=stepper.completed_iterations,
            iteration=stepper.iteration,
            epoch=stepper.epoch,
            batches_this_epoch=stepper._batches_this_epoch if stepper._train_iter is not None else 0,
            epoch_rng=stepper._epoch_rng if stepper._train_iter is not None else None,
            rng=capture_rng(stepper.device),
            model={k: v.detach().clone() for k, v in stepper.model.state_dict().items()},
            optimizer=copy.deepcopy(exp.optimizer.state_dict()),
            scheduler=copy.deepcopy(exp.scheduler.state_dict()) if exp.scheduler is not None else None,
            counters={
                "best_val_loss": stepper.best_val_loss,
                "validations_without_improvement": stepper.validations_without_improvement,
                "last_val_loss": stepper._last_val_loss,
                "running_loss": float(stepper._running_loss),
            },
            bugs=frozenset(stepper.active_bugs),
        ))

    def target(self, stepper: Any) -> Snapshot | None:
        """The snapshot one iteration back from where the stepper is."""
        mid_iteration = not stepper.at_boundary or stepper.halted is not None
        wanted = stepper.completed_iterations if mid_iteration else stepper.completed_iterations - 1
        for snapshot in reversed(self.snapshots):
            if snapshot.completed_iterations <= wanted:
                return snapshot if snapshot.completed_iterations == wanted else None
        return None

    def restore(self, stepper: Any, snapshot: Snapshot) -> None:
        exp = stepper.experiment
        for bug_id in set(stepper.active_bugs) - snapshot.bugs:
            stepper.injector.set(bug_id, False)
        for bug_id in snapshot.bugs - set(stepper.active_bugs):
            stepper.injector.set(bug_id, True)
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
