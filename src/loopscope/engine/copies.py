"""Working on the side without touching the run: copies of the model with its optimizer, and
forked random generators."""

from __future__ import annotations

import copy
from contextlib import AbstractContextManager

import torch

from loopscope.shared.errors import UserError


def forked_rng(device: torch.device) -> AbstractContextManager:
    """Random draws inside leave every generator (the device's too) as they were."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def copy_model_and_optimizer(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """Copies of both, made in one deepcopy so that every copied parameter is the one the copied
    optimizer steps: parameter groups, per-group settings and state follow whatever the optimizer.
    (Rebuilding an optimizer from its `defaults` fails on AdamW in torch 2.13 and loses groups.)
    A model that cannot be copied is one line for the user, and the run is left as it was."""
    try:
        return copy.deepcopy((model, optimizer))
    except Exception as exc:
        raise UserError(f"cannot copy the model and optimizer: {type(exc).__name__}: {exc}") from exc
