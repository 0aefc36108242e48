"""The sanity checks on a script: what the script showed loopscope (its model, its optimizer, its
loss and the batches it trained on) rebuilt as an experiment over copies, so the same four checks
factory mode runs can run on it while the script waits at a stage.

A batch is the model's own call, replayed: `model(x)` with the loss's target beside it, or, for a
model computing its own loss, `model(x, targets)` / `model(**batch)` as the script called it.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch
from torch import nn

from loopscope.engine.batches import map_tensors
from loopscope.engine.copies import copy_model_and_optimizer
from loopscope.shared.errors import UserError

OWN_LOSS = object()  # the loss came out of the model (nanoGPT, HuggingFace)
KEPT_BATCHES = 8  # as many as the checks use (checks.BASELINE_BATCHES)
# The bugs the factory's loop can carry into the checks' copies (the others live in the script's hooks).
CHECKABLE_BUGS = ("skip_zero_grad", "missing_step", "lr_too_high", "lr_too_low", "double_softmax")


class CheckMaterial:
    """Collects, as the script trains, what the checks need; says what is missing otherwise."""

    def __init__(self) -> None:
        self.batches: deque[Any] = deque(maxlen=KEPT_BATCHES)
        self.loss_fn: Any = None
        self.why_not: str | None = "the script has not computed a training loss yet: step past its first loss"
        self.amp: str | None = None  # the autocast the script computed its loss under, as Experiment.amp

    def saw_loss(
        self,
        forward: tuple[nn.Module, tuple[Any, ...], dict[str, Any]] | None,
        target: Any,
        loss_fn: Any,
        loss: Any = None,
    ) -> None:
        if forward is None:
            self.why_not = "the loss was computed without a model call loopscope saw"
            return
        _, args, kwargs = forward
        self.amp = autocast_now(loss.device) if isinstance(loss, torch.Tensor) else None
        if loss_fn is OWN_LOSS:
            batch = map_tensors(
                dict(kwargs) if kwargs and not args else tuple(args[:2]) if len(args) >= 2 else None,
                torch.Tensor.detach,
            )
            if batch is None:
                self.why_not = "the model computes its own loss from inputs loopscope cannot replay"
                return
            self.loss_fn = None
        elif loss_fn is None:
            self.why_not = "the script's loss call passes more than (output, target): it cannot be replayed"
            return
        elif len(args) != 1 or kwargs or not isinstance(target, torch.Tensor):
            self.why_not = "the model takes more than one input tensor: its calls cannot be replayed"
            return
        else:
            batch = map_tensors((args[0], target), torch.Tensor.detach)
            self.loss_fn = loss_fn
        self.batches.append(batch)
        self.why_not = None

    def subject(
        self,
        models: list[nn.Module],
        optimizers: list[torch.optim.Optimizer],
        optimizer_count: int,
        completed_iterations: int,
        bugs: list[str],
    ) -> Any:
        from loopscope.engine.experiment import Experiment, steps_with_closure
        from loopscope.engine.stepper import Stepper

        prefix = "the sanity checks cannot run on this script: "
        if len(models) > 1 or optimizer_count > 1:
            raise UserError(
                prefix + f"it trains {len(models)} models with {optimizer_count} optimizers; "
                "they need one model and one optimizer"
            )
        if self.why_not is not None or not models or not optimizers or not self.batches:
            raise UserError(prefix + (self.why_not or "it has not run a training step yet"))
        if steps_with_closure(optimizers[0]):
            raise UserError(
                prefix + f"{type(optimizers[0]).__name__}.step() needs a closure; the checks' loop steps without one"
            )
        model, optimizer = copy_model_and_optimizer(models[0], optimizers[0])
        optimizer.__dict__.pop("step", None)  # a wrapper on the script's optimizer (a scheduler's) would step it
        try:
            parameter = next(model.parameters())
        except StopIteration:
            raise UserError(prefix + "the model has no parameters") from None
        experiment = Experiment(
            model=model,
            loss_fn=self.loss_fn,
            optimizer=optimizer,
            train_loader=list(self.batches),
            epochs=1,
            amp=self.amp,  # the checks compute as the script does
        )
        stepper = Stepper(experiment, parameter.device, probe=False, diagnose=False, bugs=bugs)
        stepper.state.completed_iterations = completed_iterations  # the initial-loss check asks
        return stepper


def autocast_now(device: torch.device) -> str | None:
    """The autocast in force on `device`'s kind, as Experiment.amp names it ("bf16", "fp16"), or None."""
    kind = device.type
    try:
        if not torch.is_autocast_enabled(kind):
            return None
        dtype = torch.get_autocast_dtype(kind)
    except (TypeError, AttributeError, RuntimeError):  # torch before 2.4 asks per device kind
        return None
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype)
