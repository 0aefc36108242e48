"""Where the loop is: every counter and position, in one object that saves and loads whole.

A hand-written loop keeps these in local variables (`epoch`, the loader's iterator, `best`, ...).
Here they are fields of `LoopState`, so a rewind saves and restores all of them by
`state_dict()` / `load_state_dict()`, in torch's style: a counter added here is remembered by the
rewinder without anyone touching the rewinder.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any

from loopscope.shared.events import StageError
from loopscope.shared.vocab import Stage

# Fields that hold live objects (an iterator, a batch fetched early): they describe this process's
# progress through the data, and the saved loader position stands for them in `state_dict()`.
_LIVE = {"live": True}


@dataclass
class LoopState:
    """Every counter and position of the training loop."""

    epoch: int = 1  # 1-based
    iteration: int = 0  # iterations started
    completed_iterations: int = 0
    # The loader position: how many batches this epoch's iterator gave, and every generator's state
    # when it was made (re-made from that state, it gives the same batches in the same order).
    batches_this_epoch: int = 0
    epoch_rng: tuple[Any, ...] | None = None
    # Gradient accumulation: the micro-batch this iteration is at (1-based), and whether the loader
    # ran out inside an iteration (the iterator is not asked again: some cannot say END twice).
    micro_batch: int = 1
    loader_exhausted: bool = False
    queue: deque[Stage] = field(default_factory=deque)  # stages left in the current block
    iteration_last_stage: Stage = Stage.STEP  # fixed when an iteration starts
    epoch_ending: bool = False  # running the epoch-end block
    finished: bool = False
    stop_reason: str | None = None
    halted: StageError | None = None  # a stage raised; the loop waits for resume()
    best_val_loss: float = math.inf
    validations_without_improvement: int = 0
    last_val_loss: float | None = None
    running_loss: Any = 0.0  # what the loop accumulates for its epoch report (a tensor under one bug)
    train_iter: Iterator[Any] | None = field(default=None, metadata=_LIVE)
    # (seconds the fetch took, the batch or END, the exception): a batch fetched early to learn
    # whether the epoch is over, at exactly the point where a plain loop's next() would run.
    prefetched: tuple[float, Any, BaseException | None] | None = field(default=None, metadata=_LIVE)

    @property
    def at_boundary(self) -> bool:
        """Between blocks: the next stage starts an iteration (or ends the epoch)."""
        return not self.queue

    @property
    def loader_open(self) -> bool:
        return self.train_iter is not None

    def state_dict(self) -> dict[str, Any]:
        """Every field but the live ones, as plain values (the loader's position stands for them)."""
        state = {f.name: getattr(self, f.name) for f in fields(self) if not f.metadata.get("live")}
        state["queue"] = list(self.queue)
        # Under `loss_accumulates_graph` it is a tensor holding a graph: its value is what counts.
        running = self.running_loss
        state["running_loss"] = float(running.detach()) if hasattr(running, "detach") else float(running)
        if not self.loader_open:  # between epochs: the next epoch makes a fresh iterator
            state["batches_this_epoch"], state["epoch_rng"], state["loader_exhausted"] = 0, None, False
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Back to a saved state; live fields are cleared (the owner re-opens the loader)."""
        for f in fields(self):
            if f.metadata.get("live"):
                setattr(self, f.name, None)
            elif f.name == "queue":
                self.queue = deque(state["queue"])
            else:
                setattr(self, f.name, state[f.name])

    def halt(self, error: StageError) -> None:
        """A stage raised: nothing more of its block runs."""
        self.halted = error
        self.queue.clear()

    def finish(self, reason: str) -> None:
        self.finished = True
        self.stop_reason = reason
        self.queue.clear()
