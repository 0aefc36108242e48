"""The plots draw plotext's figure straight from its matrices: exactly what plotext's own escape-code
round trip (PlotextPlot.render) shows, on every theme and kind of plot the app draws."""

from __future__ import annotations

import io
import math

import pytest
from rich.console import Console
from textual.app import App, ComposeResult
from textual_plotext import PlotextPlot

from loopscope.ui.plot import FastPlotextPlot, LossPlot, PicturePlot


def _as_terminal_sees_it(renderable: object) -> str:
    console = Console(width=200, force_terminal=True, color_system="truecolor", record=True, file=io.StringIO())
    console.print(renderable, end="")
    return console.export_text(styles=True)


class _Plots(App[None]):
    def compose(self) -> ComposeResult:
        yield LossPlot(id="loss")
        yield PicturePlot(id="picture")


def _loss_lines(plot: PlotextPlot) -> None:
    xs = list(range(200))
    plot.plt.plot(xs, [math.exp(-x / 60) + 0.05 * math.sin(x) for x in xs], marker="braille", color="cyan")
    plot.plt.plot(xs, [math.exp(-x / 50) for x in xs], marker="braille", color="green")
    plot.plt.scatter(xs[::40], [0.5] * 5, marker="•", color="orange")
    plot.plt.xlabel("iteration")


def _boundary(plot: PlotextPlot) -> None:
    colours = ("cyan", "orange", "magenta", "red")
    for label, colour in enumerate(colours):
        cells = [(x, y) for x in range(20) for y in range(10) if (x // 5 + y // 5) % 4 == label]
        plot.plt.scatter([x for x, _ in cells], [y for _, y in cells], marker="dot", color=colour)
    plot.plt.scatter([3, 8, 15], [2, 7, 4], marker="O", color="white")
    plot.plt.title("dots: the model's class  O: examples")


@pytest.mark.parametrize("theme", ["textual-dark", "textual-light", "nord"])
@pytest.mark.parametrize(("plot_id", "draw"), [("loss", _loss_lines), ("picture", _boundary)])
async def test_a_plot_looks_exactly_as_plotexts_own_rendering_draws_it(theme, plot_id, draw):
    app = _Plots()
    async with app.run_test(size=(90, 40)) as pilot:
        app.theme = theme
        plot = app.query_one(f"#{plot_id}", PlotextPlot)
        draw(plot)
        await pilot.pause()
        ours, plotexts = FastPlotextPlot.render(plot), PlotextPlot.render(plot)
        assert plot.size.width > 40 and plot.size.height > 10
        assert _as_terminal_sees_it(ours) == _as_terminal_sees_it(plotexts)
        assert "iteration" in str(ours) or "examples" in str(ours)  # a real plot, not two empty ones
