"""What detectors may know besides the events: a small read-only view of the run, never the driver."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from loopscope.engine.losses import LossKind
from loopscope.shared.events import StageEvent
from loopscope.shared.vocab import Task


@dataclass(frozen=True)
class ForwardFlow:
    """The data flow of the last probed forward pass, seen by tensor identity."""

    fed_by: dict[str, str | None] = field(default_factory=dict)  # module -> the module whose output it was given
    input_zeros: dict[str, float] = field(default_factory=dict)  # dropout module -> zero fraction of its input


@dataclass(frozen=True)
class DiagnosticContext:
    """Facts about the run that events do not carry."""

    loss_kind: LossKind  # cross_entropy, nll, bce_with_logits, ...: module or function alike
    task: Task | None
    features: frozenset[str]  # what the experiment is made of (`engine.features`)
    scheduler_interval: str  # "epoch" or "iteration"
    classes: int | None  # out_features of the model's last Linear layer, if any
    has_trainable_params: Callable[[], bool]
    # Karpathy's batch-mixing probe on the current batch: (row, other rows reached) or None.
    batch_mixing: Callable[[], tuple[int, int] | None]
    forward_flow: Callable[[], ForwardFlow] = ForwardFlow
    # After a step back: what to say if this iteration's loss (with these bugs) differs from the
    # first time it ran; None while it agrees, or when nothing was stepped back over.
    replay_differs: Callable[[StageEvent], str | None] = lambda _: None
