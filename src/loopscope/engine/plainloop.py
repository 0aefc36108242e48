"""The reference: the loop a user writes by hand, timed iteration by iteration.

`loopscope bench` times the stepper against it, and the engine runs it on its own objects when the
bench asks for the app's reference rate (`TimePlainLoop`): it lives in the engine so that the
engine never depends on the command-line tools.
"""

from __future__ import annotations

import time

import torch

from loopscope.engine.experiment import Experiment


class PlainLoop:
    """The loop a user writes by hand, one timed iteration per `step()`, keeping its place in the data."""

    def __init__(self, experiment: Experiment, device: torch.device) -> None:
        self.experiment, self.device = experiment, device
        self.model = experiment.model.to(device)
        self._batches = iter(experiment.train_loader)

    def step(self) -> float:
        exp, device = self.experiment, self.device
        start = time.perf_counter()
        try:
            x, y = next(self._batches)
        except StopIteration:
            self._batches = iter(exp.train_loader)
            x, y = next(self._batches)
        x, y = x.to(device), y.to(device)
        exp.optimizer.zero_grad()
        assert exp.loss_fn is not None  # the reference models have a loss function
        loss = exp.loss_fn(self.model(x), y)
        loss.backward()
        exp.optimizer.step()
        loss.item()  # the plain loop reads its loss too (for a progress print)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start


def plain_iterations_for(
    experiment: Experiment, device: torch.device, seconds: float, warm_up: float = 0.0
) -> tuple[int, float]:
    """(iterations, the seconds they took) of a plain loop run for `seconds` after `warm_up` seconds
    uncounted (the app's reference, see TimePlainLoop)."""
    loop = PlainLoop(experiment, device)
    began = time.perf_counter()
    while time.perf_counter() - began < warm_up:
        loop.step()
    done, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        loop.step()
        done += 1
    return done, time.perf_counter() - began
