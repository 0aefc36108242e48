"""The loop a careful practitioner writes by hand: the reference the stepper must equal bitwise."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from loopscope.experiment import Experiment, seed_everything


def default_forward(model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = batch
    return model(x), y


def plain_run(
    factory: Callable[[], Experiment],
    seed: int,
    iterations: int,
    forward: Callable[[torch.nn.Module, Any], tuple[torch.Tensor, torch.Tensor]] = default_forward,
) -> tuple[list[float], dict[str, torch.Tensor], list[float]]:
    """Per-iteration losses, final parameters and validation losses of a hand-written loop."""
    seed_everything(seed)
    exp = factory()
    model, optimizer, loss_fn = exp.model, exp.optimizer, exp.loss_fn
    losses: list[float] = []
    val_losses: list[float] = []
    best, bad_validations = math.inf, 0

    def validate() -> bool:
        nonlocal best, bad_validations
        model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in exp.val_loader:
                out, y = forward(model, batch)
                total += loss_fn(out, y).item() * len(y)
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
        for batch in exp.train_loader:
            optimizer.zero_grad()
            out, y = forward(model, batch)
            loss = loss_fn(out, y)
            loss.backward()
            if exp.clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), exp.clip_grad_norm)
            optimizer.step()
            if exp.scheduler is not None and exp.scheduler_interval == "iteration":
                exp.scheduler.step()
            losses.append(loss.item())
            done += 1
            if exp.validate_every and exp.val_loader is not None and done % exp.validate_every == 0:
                if validate():
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
