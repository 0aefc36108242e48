"""The loop a careful practitioner writes by hand: the reference the stepper must equal bitwise."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch

from loopscope.engine.experiment import Experiment, seed_everything


def default_forward(model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = batch
    return model(x), y


def plain_run(
    factory: Callable[[], Experiment],
    seed: int,
    iterations: int,
    forward: Callable[[torch.nn.Module, Any], tuple[torch.Tensor, torch.Tensor]] = default_forward,
    mistakes: frozenset[str] = frozenset(),
) -> tuple[list[float], dict[str, torch.Tensor], list[float]]:
    """Per-iteration losses, final parameters and validation losses of a hand-written loop.

    `mistakes` writes some classic bugs into this loop by hand, the way a person would.
    """
    seed_everything(seed)
    exp = factory()
    model, optimizer, loss_fn = exp.model, exp.optimizer, exp.loss_fn
    if "lr_too_high" in mistakes:
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * 100
    if "missing_activation" in mistakes:
        for i, module in enumerate(model):
            if isinstance(module, torch.nn.ReLU):
                model[i] = torch.nn.Identity()
    if mistakes & {"double_softmax", "target_shape_broadcast"}:
        clean_forward = forward

        def forward(m: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
            out, y = clean_forward(m, batch)
            if "double_softmax" in mistakes:
                out = out.softmax(dim=1)
            if "target_shape_broadcast" in mistakes:
                y = y.squeeze(1)
            return out, y

    k = exp.accumulation
    scaler = torch.amp.GradScaler("cpu") if exp.amp == "fp16" else None

    def autocast() -> contextlib.AbstractContextManager[object]:
        if exp.amp is None:
            return contextlib.nullcontext()
        return torch.autocast("cpu", dtype=torch.float16 if exp.amp == "fp16" else torch.bfloat16)

    losses: list[float] = []
    val_losses: list[float] = []
    best, bad_validations = math.inf, 0

    def validate() -> bool:
        nonlocal best, bad_validations
        if "validate_in_train_mode" not in mistakes:
            model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in exp.val_loader:
                with autocast():
                    out, y = forward(model, batch)
                    batch_loss = loss_fn(out, y)
                total += batch_loss.item() * len(y)
                count += len(y)
        model.train()
        val_losses.append(total / count)
        if val_losses[-1] < best:
            best, bad_validations = val_losses[-1], 0
        else:
            bad_validations += 1
        patience = exp.early_stopping_patience
        return patience is not None and bad_validations >= patience

    done = 0
    for _epoch in range(exp.epochs):
        batches = len(exp.train_loader)  # type: ignore[arg-type]
        for i, batch in enumerate(exp.train_loader):
            # With gradient accumulation: zero_grad and step once every k micro-batches, the
            # epoch's last group stepping however short it is.
            if i % k == 0 and "skip_zero_grad" not in mistakes:
                optimizer.zero_grad()
            with autocast():
                out, y = forward(model, batch)
                loss = loss_fn(out, y)
            losses.append(loss.item())
            backward_loss = loss / k if k > 1 else loss
            (scaler.scale(backward_loss) if scaler is not None else backward_loss).backward()
            if (i + 1) % k and i + 1 != batches:
                continue
            if scaler is not None and exp.clip_grad_norm is not None:
                scaler.unscale_(optimizer)
            if exp.clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), exp.clip_grad_norm)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            if exp.scheduler is not None and exp.scheduler_interval == "iteration":
                exp.scheduler.step()
            done += 1
            periodic = exp.validate_every and exp.val_loader is not None and done % exp.validate_every == 0
            if periodic and validate():
                return losses, _params(model), val_losses
            if done == iterations:
                return losses, _params(model), val_losses
        stop = exp.val_loader is not None and exp.validate_every is None and validate()
        if exp.scheduler is not None and exp.scheduler_interval == "epoch":
            exp.scheduler.step()
        if stop:
            break
    return losses, _params(model), val_losses


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}
