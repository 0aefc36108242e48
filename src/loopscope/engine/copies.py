"""Working on the side without touching the run: copied optimizers and forked random generators."""

from __future__ import annotations

import copy
from contextlib import AbstractContextManager

import torch


def forked_rng(device: torch.device) -> AbstractContextManager:
    """Random draws inside leave every generator (the device's too) as they were."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def copy_optimizer(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The same kind of optimizer, with the same settings and state, over `model`'s parameters."""
    twin = type(optimizer)(model.parameters(), **optimizer.defaults)
    twin.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    return twin
