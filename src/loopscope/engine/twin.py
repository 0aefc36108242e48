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
from loopscope.engine.epoch_end import autocast_for, grad_scaler_for


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
        accumulation: int = 1,
    ) -> None:
        self.model, self.optimizer = copy_model_and_optimizer(model, optimizer)
        self.loss_fn = loss_fn
        self.clip_grad_norm = clip_grad_norm
        self.device = device
        self.amp = amp
        self.accumulation = accumulation
        self.scaler = grad_scaler_for(amp, device)
        self._unstepped = False  # gradients accumulated since the last step

    def iterate(
        self,
        inputs: Any,
        targets: Any,
        state: tuple[torch.Tensor, torch.Tensor | None],
        key: str | None = None,
        micro_batch: int = 1,
    ) -> float:
        """One clean micro-batch (a whole iteration without accumulation); returns its loss.

        The step for a group of micro-batches runs when the next group starts: the twin cannot
        know whether the main loop's loader has another micro-batch, and stepping late changes
        nothing it computes."""
        with forked_rng(self.device), torch.enable_grad():
            torch.set_rng_state(state[0])
            if state[1] is not None:
                torch.cuda.set_rng_state(state[1], self.device)
            if micro_batch == 1:
                self._step()
                self.optimizer.zero_grad()
            self.model.train()
            with autocast_for(self.amp, self.device):
                _, loss = model_loss(self.model, self.loss_fn, inputs, targets, key)
            scaled = loss / self.accumulation if self.accumulation > 1 else loss
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            self._unstepped = True
            if self.accumulation == 1:
                self._step()
        return loss.detach().float().item()

    def _step(self) -> None:
        if not self._unstepped:
            return
        self._unstepped = False
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
