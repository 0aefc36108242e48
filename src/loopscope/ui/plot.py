"""The live loss plot: train, validation and the clean twin, downsampled to the widget's width."""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import plotext._utility as plotext_utility
from rich.style import Style
from rich.text import Text
from textual.app import RenderResult
from textual_plotext import PlotextPlot

from loopscope.shared.history import Series
from loopscope.shared.protocol import Picture
from loopscope.shared.vocab import PictureKind
from loopscope.ui.model import ScreenModel, downsample
from loopscope.ui.panels.base import TextPanel


def plot_points(series: Series, width: int, log: bool = False) -> tuple[list[float], list[float]]:
    """What the loss plot draws of a series: at most ~2 points per column, as plotext's cost grows
    with every point. Infinite means stay out (plotext raises on them; the diagnostics report them)."""
    xs, ys = [], []
    for x, y in zip(*series.means()):
        if math.isfinite(y) and (y > 0 or not log):
            xs.append(x)
            ys.append(math.log10(y) if log else y)
    return downsample(xs, ys, max(20, 2 * width))


# (name, ScreenModel series, plotext's colour, the same colour as Textual names it, the mark). Validation
# comes once an epoch: its points are dots, never a line drawn across the epoch between them, which
# covered the training line it crossed.
LOSS_LINES = (
    ("train", "loss", "cyan", "ansi_cyan", "━━"),
    ("clean twin", "twin_loss", "green", "ansi_green", "━━"),
    ("val", "val_loss", "orange", "ansi_yellow", "•"),  # plotext's orange is the terminal's yellow
)


def loss_legend(model: ScreenModel) -> str:
    """The lines' legend, for the panel's bottom border: plotext draws its legend over the plot's
    top-left corner, which is where a falling loss starts."""
    return "  ".join(
        f"[{legend}]{mark}[/] {name}"
        for name, attribute, _, legend, mark in LOSS_LINES
        if getattr(model, attribute).total_points
    )


@lru_cache(maxsize=256)
def _cell_style(colours: tuple[Any, Any, Any]) -> Style | None:
    """The style Text.from_ansi gives plotext's escape codes for (foreground, style, background)."""
    codes = plotext_utility.colors_to_ansi(*colours)
    spans = Text.from_ansi(codes + "x").spans
    return spans[0].style if spans else None  # type: ignore[return-value]


def _style_of(foreground: Any, style: Any, background: Any) -> Style | None:
    def hashable(colour: Any) -> Any:
        return tuple(colour) if isinstance(colour, list) else colour  # an RGB colour may be a list

    return _cell_style((hashable(foreground), hashable(style), hashable(background)))


def plotext_text(figure: Any) -> Text:
    """What `Text.from_ansi(figure.build())` returns, straight from plotext's character and colour
    matrices: plotext writes every cell's escape codes into one string and rich parses them back,
    which took a third or more of a build (a 58x12 loss plot of 116 points: 4.3 -> 2.9 ms; 200x50:
    26 -> 11 ms)."""
    figure._set_sizes()
    figure._build_matrix()
    matrix = figure.monitor.matrix
    text = Text()
    for row in reversed(range(matrix.rows)):
        markers, foregrounds, styles, backgrounds = (
            matrix.marker[row],
            matrix.fullground[row],
            matrix.style[row],
            matrix.background[row],
        )
        start, end = 0, len(markers)
        for col in range(1, end + 1):  # one span for each run of cells with the same colours
            if (
                col == end
                or foregrounds[col] != foregrounds[start]
                or styles[col] != styles[start]
                or backgrounds[col] != backgrounds[start]
            ):
                text.append(
                    "".join(markers[start:col]), _style_of(foregrounds[start], styles[start], backgrounds[start])
                )
                start = col
        text.append("\n")  # as from_ansi keeps plotext's last newline
    return text


class FastPlotextPlot(PlotextPlot):
    """PlotextPlot, less the round trip through escape codes (see plotext_text)."""

    def render(self) -> RenderResult:
        figure: Any = self._plot
        monitor = getattr(figure, "monitor", None)
        if monitor is None or getattr(monitor, "fast_plot", False) or not hasattr(monitor, "matrix"):
            return super().render()  # a plotext this was not written for: its own way
        # As PlotextPlot.render sets up the figure before it builds.
        figure.plotsize(self.size.width, self.size.height)
        figure._set_size(self.size.width, self.size.height)
        figure.theme(self._get_plotext_theme_name(self.app.theme))
        return plotext_text(figure)


class LossPlot(FastPlotextPlot):
    """Train loss, val loss and twin loss against the iteration. The panel's border says what the
    plot is (and the axis scale), so the plot keeps every row for the lines."""

    log_scale = False
    _drawn = 0  # how many times show() gave the plot new data
    _built: tuple[object, RenderResult] | None = None  # the last build, and what it was built from

    def render(self) -> RenderResult:
        # A repaint that new data did not cause (a panel scrolled, the screen's own refresh) reuses
        # the last build: a plotext build is ~5 ms, the screen's costliest draw, and while a run
        # goes on every epoch scrolled the epochs table once, which repainted the whole screen.
        key = (self._drawn, self.size, self.app.theme)
        if self._built is None or self._built[0] != key:
            self._built = (key, super().render())
        return self._built[1]

    def show(self, model: ScreenModel) -> None:
        self._drawn += 1
        plt = self.plt
        plt.clear_data()  # not clear_figure: that rebuilds the figure (deep copies), ~1 ms a frame
        plt.title("")
        plt.xlabel("iteration")
        drawn = False
        for _, attribute, colour, _, mark in LOSS_LINES:
            xs, ys = plot_points(getattr(model, attribute), self.size.width, self.log_scale)
            if xs:
                if mark == "•":
                    plt.scatter(xs, ys, marker=mark, color=colour)
                else:
                    plt.plot(xs, ys, marker="braille", color=colour)
                drawn = True
        if not drawn:
            plt.title("no loss yet")
        self.refresh()


def fitting(title: str, width: int) -> str:
    """The title, or its first words that fit: plotext leaves out a title that does not."""
    while len(title) > width - 2 and "  " in title:
        title = title.rsplit("  ", 1)[0]
    return title if len(title) <= width - 2 else ""


CLASS_COLOURS = ("cyan", "orange", "magenta", "green", "red", "blue", "yellow", "white", "gray", "violet")


def loss_title(log_scale: bool) -> str:
    return "Loss, log10 axis (p: picture)" if log_scale else "Loss (p: picture)"


def picture_title(picture: Picture | None) -> str:
    """What the picture panel's border says: what is drawn, and when."""
    if picture is None:
        return "Picture (p: loss)"
    what = "decision boundary" if picture.kind == PictureKind.BOUNDARY else "fitted curve"
    return f"Picture: {what} at iteration {picture.iteration} (p: loss)"


def picture_note(model: ScreenModel) -> str | None:
    """The words shown instead of a picture, when there is none to draw."""
    if model.no_picture is not None:
        return model.no_picture
    if model.picture is None:
        return "The picture appears after the next batch (for 2-D classifiers and 1-D regressions)."
    return None


class PictureNote(TextPanel):
    """Where the picture would be: why there is none (yet)."""

    def show(self, model: ScreenModel) -> None:
        self.update(Text(picture_note(model) or "", style="italic"))


class PicturePlot(FastPlotextPlot):
    """The decision boundary (2-D classifiers) or predictions against targets (1-D regression)."""

    def show(self, model: ScreenModel) -> None:
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        picture = model.picture
        if picture is None:
            self.refresh()
            return
        plt.xlim(*picture.x_range)
        plt.ylim(*picture.y_range)
        # A legend short enough for a half-screen panel: plotext drops a title wider than the plot.
        # Just shown, the widget has no size yet: half the screen is what a grid cell gets.
        width = self.size.width or self.app.size.width // 2
        if picture.kind == PictureKind.BOUNDARY:
            plt.title(fitting("dots: the model's class  O: examples", width))
            self._boundary(picture)
        else:
            plt.title(fitting("line: the model  dots: examples", width))
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
