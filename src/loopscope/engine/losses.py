"""What kind of loss an experiment uses, whether it is a module (nn.CrossEntropyLoss) or a function
(F.cross_entropy): the diagnostics' references (the loss at initialisation, the accuracy threshold,
chance level) depend on the kind, not on how it was written."""

from __future__ import annotations

import functools
from typing import Any, Literal

from torch import nn
from torch.nn import functional as F

LossKind = Literal["cross_entropy", "nll", "bce_with_logits", "bce", "mse", "l1", "smooth_l1", "huber", "other"]

_MODULES: tuple[tuple[type[nn.Module], LossKind], ...] = (
    (nn.CrossEntropyLoss, "cross_entropy"),
    (nn.NLLLoss, "nll"),
    (nn.BCEWithLogitsLoss, "bce_with_logits"),
    (nn.BCELoss, "bce"),
    (nn.MSELoss, "mse"),
    (nn.L1Loss, "l1"),
    (nn.SmoothL1Loss, "smooth_l1"),
    (nn.HuberLoss, "huber"),
)
_FUNCTIONS: dict[Any, LossKind] = {
    F.cross_entropy: "cross_entropy",
    F.nll_loss: "nll",
    F.binary_cross_entropy_with_logits: "bce_with_logits",
    F.binary_cross_entropy: "bce",
    F.mse_loss: "mse",
    F.l1_loss: "l1",
    F.smooth_l1_loss: "smooth_l1",
    F.huber_loss: "huber",
}
# Losses whose outputs are compared with 0/1 targets directly (probabilities or scores in [0, 1]).
UNIT_INTERVAL_KINDS = ("bce", "mse", "l1", "smooth_l1", "huber")


def loss_kind(loss_fn: Any) -> LossKind:
    for cls, kind in _MODULES:
        if isinstance(loss_fn, cls):
            return kind
    while isinstance(loss_fn, functools.partial):  # F.cross_entropy with label_smoothing=..., say
        loss_fn = loss_fn.func
    return _FUNCTIONS.get(loss_fn, "other")


def loss_reduction(loss_fn: Any) -> str | None:
    """ "mean", "sum" or "none": how the loss folds a batch into one number, where that is known (a
    loss module's `reduction`, `functools.partial(F.mse_loss, reduction="sum")`, or "mean" for
    torch's own loss functions, their default). None where it is not: a model computing its own
    loss (loss_fn None), a lambda or a function of the user's."""
    reduction = getattr(loss_fn, "reduction", None)
    if isinstance(loss_fn, functools.partial):
        reduction = loss_fn.keywords.get("reduction", reduction)
    if reduction in ("mean", "sum", "none"):
        return reduction
    return "mean" if loss_fn is not None and loss_kind(loss_fn) != "other" else None
