"""The clean twin: a copy of model and optimizer taken when a bug is switched on, trained on the
same batches with the correct loop, so the plot can show what the bug costs.

It draws random numbers from a forked RNG set to the main run's state before its forward pass:
same dropout masks, and the main run's random stream is untouched.
"""

from __future__ import annotations

from typing import Any

import torch

from loopscope.engine.batches import model_loss
from loopscope.engine.copies import copy_model_and_optimizer, forked_rng
from loopscope.engine.epoch_end import autocast_for


def rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


class CleanTwin:
    """A correct loop running beside the buggy one."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: Any,
        clip_grad_norm: float | None,
        device: torch.device,
        amp: str | None = None,
    ) -> None:
        self.model, self.optimizer = copy_model_and_optimizer(model, optimizer)
        self.loss_fn = loss_fn
        self.clip_grad_norm = clip_grad_norm
        self.device = device
        self.amp = amp

    def iterate(
        self, inputs: Any, targets: Any, state: tuple[torch.Tensor, torch.Tensor | None], key: str | None = None
    ) -> float:
        """One clean iteration on this batch; returns the twin's loss (before its step)."""
        with forked_rng(self.device), torch.enable_grad():
            torch.set_rng_state(state[0])
            if state[1] is not None:
                torch.cuda.set_rng_state(state[1], self.device)
            self.model.train()
            self.optimizer.zero_grad()
            with autocast_for(self.amp, self.device):
                _, loss = model_loss(self.model, self.loss_fn, inputs, targets, key)
            loss.backward()
            if self.clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad_norm)
            self.optimizer.step()
        return loss.detach().float().item()
