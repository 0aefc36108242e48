"""What detectors may know besides the events: a small read-only view of the run, never the driver."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class DiagnosticContext:
    """Facts about the run that events do not carry."""

    loss_name: str  # the loss function's class name, e.g. "CrossEntropyLoss"
    features: frozenset[str]  # what the experiment is made of (`engine.features`)
    scheduler_interval: str  # "epoch" or "iteration"
    classes: int | None  # out_features of the model's last Linear layer, if any
    has_trainable_params: Callable[[], bool]
    # Karpathy's batch-mixing probe on the current batch: (row, other rows reached) or None.
    batch_mixing: Callable[[], tuple[int, int] | None]
