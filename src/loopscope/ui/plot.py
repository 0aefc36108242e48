"""The live loss plot: train, validation and the clean twin, downsampled to the widget's width."""

from __future__ import annotations

import math

from textual_plotext import PlotextPlot

from loopscope.shared.history import Series
from loopscope.shared.vocab import PictureKind
from loopscope.ui.model import ScreenModel, downsample


def plot_points(series: Series, width: int, log: bool = False) -> tuple[list[float], list[float]]:
    """What the loss plot draws of a series: at most ~2 points per column, as plotext's cost grows
    with every point. Infinite means stay out (plotext raises on them; the diagnostics report them)."""
    xs, ys = [], []
    for x, y in zip(*series.means()):
        if math.isfinite(y) and (y > 0 or not log):
            xs.append(x)
            ys.append(math.log10(y) if log else y)
    return downsample(xs, ys, max(20, 2 * width))


class LossPlot(PlotextPlot):
    """Train loss, val loss and twin loss against the iteration."""

    log_scale = False

    def show(self, model: ScreenModel) -> None:
        plt = self.plt
        plt.clear_data()  # not clear_figure: that rebuilds the figure (deep copies), ~1 ms a frame
        label = "log10(loss)" if self.log_scale else "loss"
        plt.title(label)
        plt.xlabel("iteration")
        drawn = False
        for name, series, marker in (
            ("train", model.loss, "braille"),
            ("clean twin", model.twin_loss, "braille"),
            ("val", model.val_loss, "hd"),
        ):
            xs, ys = plot_points(series, self.size.width, self.log_scale)
            if xs:
                plt.plot(xs, ys, label=name, marker=marker)
                drawn = True
        if not drawn:
            plt.title("loss (appears after the first loss stage)")
        self.refresh()


CLASS_COLOURS = ("cyan", "orange", "magenta", "green", "red", "blue", "yellow", "white", "gray", "violet")


class PicturePlot(PlotextPlot):
    """The decision boundary (2-D classifiers) or predictions against targets (1-D regression)."""

    def show(self, model: ScreenModel) -> None:
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        picture = model.picture
        if picture is None:
            plt.title("picture: appears after the next batch (2-D classifiers and 1-D regressions only)")
            self.refresh()
            return
        plt.xlim(*picture.x_range)
        plt.ylim(*picture.y_range)
        if picture.kind == PictureKind.BOUNDARY:
            plt.title(f"decision boundary at iteration {picture.iteration} (dots: the model, O: examples)")
            self._boundary(picture)
        else:
            plt.title(f"predictions (line) vs targets (dots) at iteration {picture.iteration}")
            xs, ys = zip(*picture.points) if picture.points else ((), ())
            plt.scatter(list(xs), list(ys), marker="dot", color="gray")
            cx, cy = zip(*picture.curve)
            plt.plot(list(cx), list(cy), marker="braille", color="red")
        self.refresh()

    def _boundary(self, picture) -> None:
        plt = self.plt
        rows, columns = len(picture.grid), len(picture.grid[0]) if picture.grid else 0
        (x0, x1), (y0, y1) = picture.x_range, picture.y_range
        by_class: dict[int, tuple[list[float], list[float]]] = {}
        for r, row in enumerate(picture.grid):
            for c, label in enumerate(row):
                xs, ys = by_class.setdefault(label, ([], []))
                xs.append(x0 + (x1 - x0) * c / max(columns - 1, 1))
                ys.append(y0 + (y1 - y0) * r / max(rows - 1, 1))
        for label, (xs, ys) in sorted(by_class.items()):
            plt.scatter(xs, ys, marker="dot", color=CLASS_COLOURS[label % len(CLASS_COLOURS)])
        points: dict[int, tuple[list[float], list[float]]] = {}
        for x, y, label in picture.points:
            xs, ys = points.setdefault(int(label), ([], []))
            xs.append(x)
            ys.append(y)
        for label, (xs, ys) in sorted(points.items()):
            plt.scatter(xs, ys, marker="O", color=CLASS_COLOURS[label % len(CLASS_COLOURS)])
