"""Pictures of what the model has learned: a decision boundary over 2-D inputs, or the fitted
curve over 1-D inputs. Computed on a copy in eval mode with the RNG forked: the run is untouched."""

from __future__ import annotations

import copy
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from loopscope.engine.batches import call_model, primary_output
from loopscope.engine.copies import forked_rng
from loopscope.shared.protocol import Picture
from loopscope.shared.vocab import PictureKind, Task

GRID_COLUMNS, GRID_ROWS, CURVE_POINTS = 60, 24, 120


def picture_kind(inputs: Any, task: Task | None) -> PictureKind | None:
    if not isinstance(inputs, torch.Tensor) or inputs.dim() != 2 or not inputs.is_floating_point():
        return None
    if inputs.shape[1] == 2 and task in (Task.CLASSIFICATION, Task.BINARY):
        return PictureKind.BOUNDARY
    if inputs.shape[1] == 1 and task == Task.REGRESSION:
        return PictureKind.CURVE
    return None


class PictureMaker:
    """Keeps a sample of recent training rows and draws the model over their range."""

    def __init__(
        self,
        model: torch.nn.Module,
        device: torch.device,
        task: Task | None,
        prepare_batch: Callable[[Any, Any], tuple[Any, Any]],
        current_batch: Callable[[], tuple[Any, Any]],
        iteration: Callable[[], int],
    ) -> None:
        self.model, self.device, self.task = model, device, task
        self.prepare_batch = prepare_batch  # the data pipeline as the loop runs it (bugs included)
        self.current_batch = current_batch  # the iteration's clean (inputs, targets)
        self.iteration = iteration
        self.rows: deque[tuple[float, ...]] = deque(maxlen=300)
        self._seen_iteration = -1

    def remember_batch(self) -> None:
        x, y = self.current_batch()
        iteration = self.iteration()
        if iteration == self._seen_iteration or picture_kind(x, self.task) is None:
            return
        self._seen_iteration = iteration
        x = x.detach().cpu()
        if not isinstance(y, torch.Tensor):
            return
        y = y.detach().cpu().reshape(x.shape[0], -1)[:, 0].float()
        for features, target in zip(x.tolist(), y.tolist()):
            self.rows.append((*features, target))

    def unavailable(self) -> str | None:
        """Why no picture can be drawn of this model; None while one can (or no batch was seen yet)."""
        batch = self.current_batch()
        inputs = batch[0] if batch is not None else None
        if inputs is None or picture_kind(inputs, self.task) is not None:
            return None
        what = (
            f"its inputs have shape {list(inputs.shape)}"
            if isinstance(inputs, torch.Tensor)
            else f"its inputs are a {type(inputs).__name__}"
        )
        return (
            f"No picture for this model: {what}. A picture needs inputs of 2 numbers per example "
            "(a classifier's decision boundary) or 1 (a regression's fitted curve), as in spirals and regression."
        )

    def make(self) -> Picture | None:
        kind = picture_kind(self.current_batch()[0], self.task)
        if kind is None or not self.rows:
            return None
        columns = list(zip(*self.rows))
        model = copy.deepcopy(self.model).eval()
        with torch.no_grad(), forked_rng(self.device):
            if kind == PictureKind.BOUNDARY:
                return self._boundary(model, columns)
            return self._curve(model, columns)

    def _run(self, model: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        prepared, _ = self.prepare_batch(inputs.to(self.device), None)
        return primary_output(call_model(model, prepared)).detach().float().cpu()

    @staticmethod
    def _padded(values: tuple[float, ...]) -> tuple[float, float]:
        low, high = min(values), max(values)
        pad = (high - low) * 0.08 or 1.0
        return low - pad, high + pad

    def _boundary(self, model: torch.nn.Module, columns: list[tuple[float, ...]]) -> Picture:
        x_range, y_range = self._padded(columns[0]), self._padded(columns[1])
        xs = torch.linspace(*x_range, GRID_COLUMNS)
        ys = torch.linspace(*y_range, GRID_ROWS)
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        inputs = torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=1)
        out = self._run(model, inputs)
        classes = out.argmax(dim=1) if out.dim() == 2 and out.shape[1] > 1 else (out.reshape(-1) > 0).long()
        grid = tuple(tuple(row) for row in classes.reshape(GRID_ROWS, GRID_COLUMNS).tolist())
        points = tuple((a, b, round(c)) for a, b, c in zip(*columns))
        return Picture(PictureKind.BOUNDARY, self.iteration(), x_range, y_range, grid=grid, points=points)

    def _curve(self, model: torch.nn.Module, columns: list[tuple[float, ...]]) -> Picture:
        x_range = self._padded(columns[0])
        xs = torch.linspace(*x_range, CURVE_POINTS).unsqueeze(1)
        predictions = self._run(model, xs).reshape(-1).tolist()
        y_range = self._padded(tuple(columns[1]) + tuple(predictions))
        curve = tuple(zip(xs.reshape(-1).tolist(), predictions))
        return Picture(
            PictureKind.CURVE,
            self.iteration(),
            x_range,
            y_range,
            curve=curve,
            points=tuple(zip(columns[0], columns[1])),
        )
