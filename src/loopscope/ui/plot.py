"""The live loss plot: train, validation and the clean twin, downsampled to the widget's width."""

from __future__ import annotations

import math

from textual_plotext import PlotextPlot

from loopscope.history import Series
from loopscope.ui.model import ScreenModel, downsample


def _finite(points: list[tuple[float, float]], log: bool) -> tuple[list[float], list[float]]:
    # plotext raises on inf and NaN: keep them out of the axes (the diagnostics report them).
    xs, ys = [], []
    for x, y in points:
        if y is None or not math.isfinite(y) or (log and y <= 0):
            continue
        xs.append(x)
        ys.append(math.log10(y) if log else y)
    return xs, ys


def _series_points(series: Series) -> list[tuple[float, float]]:
    return [(p.x, p.mean) for p in series.points()]


class LossPlot(PlotextPlot):
    """Train loss, val loss and twin loss against the iteration."""

    log_scale = False

    def show(self, model: ScreenModel) -> None:
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        limit = max(20, 2 * self.size.width)
        label = "log10(loss)" if self.log_scale else "loss"
        plt.title(label)
        plt.xlabel("iteration")
        drawn = False
        for name, points, marker in (
            ("train", _series_points(model.loss), "braille"),
            ("clean twin", _series_points(model.twin_loss), "braille"),
            ("val", _series_points(model.val_loss), "hd"),
        ):
            xs, ys = _finite(points, self.log_scale)
            xs, ys = downsample(xs, ys, limit)
            if xs:
                plt.plot(xs, ys, label=name, marker=marker)
                drawn = True
        if not drawn:
            plt.title("loss (appears after the first loss stage)")
        self.refresh()
