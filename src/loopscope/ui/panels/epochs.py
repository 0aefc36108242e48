"""One line per epoch: train and val loss, accuracy, an observation."""

from __future__ import annotations

from typing import Any

from rich.cells import cell_len
from rich.segment import Segment
from rich.style import Style
from textual.geometry import Size
from textual.scroll_view import ScrollView
from textual.strip import Strip

from loopscope.ui.model import ScreenModel, observe
from loopscope.ui.panels.base import fmt

EPOCH_COLUMNS = (("epoch", 5), ("train loss", 10), ("val loss", 10), ("val acc", 7), ("observation", 0))


def epoch_line(values: tuple[str, ...]) -> str:
    """One row of the epochs table: fixed-width columns, so the header above lines up with it."""
    cells = [value.rjust(width) if width else value for value, (_, width) in zip(values, EPOCH_COLUMNS)]
    return "  ".join(cells)


EPOCHS_HEADER = epoch_line(tuple(name for name, _ in EPOCH_COLUMNS))


class EpochsPanel(ScrollView):
    """One line per planned epoch (blank until it runs): train loss, val loss, val acc, an observation.

    Every planned epoch (the latest MAX_ROWS of a longer run) has its line from the start, so the
    table keeps its height while training runs: a change of height makes Textual lay out the whole
    screen (~15 ms here). It draws only the lines in view, and repaints only the lines that changed:
    the running epoch's loss changes at every frame, and a DataTable repaints every row for that (~7 ms).
    The header stays on top when the rows scroll, and moves sideways with them.
    """

    MAX_ROWS = 100

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._lines: list[tuple[str, Style | None]] = []  # (text, its style), the header first
        self._width = 0
        self._latest: int | None = None

    @property
    def plain(self) -> str:
        """The header and every row, as text (what scrolling through the table would show)."""
        return "\n".join(line for line, _ in self._lines)

    def show(self, model: ScreenModel) -> None:
        if model.info is None:
            return
        count = min(model.info.epochs, self.MAX_ROWS)
        latest = max(model.epochs, default=1)
        first = max(1, latest - count + 1)
        lines = [(EPOCHS_HEADER, HEADER_STYLE)] + [self._line(model, epoch) for epoch in range(first, first + count)]
        width = max(self._width, *(cell_len(line) for line, _ in lines))
        if len(lines) != len(self._lines) or width != self._width:  # rare: a new run, a longer observation
            self._width = width
            self.virtual_size = Size(width, len(lines))
            self.refresh()
        else:
            for y, (line, before) in enumerate(zip(lines, self._lines)):
                if line != before:
                    self.refresh_line(y)
        self._lines = lines
        if latest != self._latest:  # follow the epoch being run, but let the reader scroll within one
            self._latest = latest
            rows_in_view = self.scrollable_content_region.height - 1
            row = latest - first
            if rows_in_view > 0 and not self.scroll_y <= row < self.scroll_y + rows_in_view:
                self.scroll_to(y=max(0, row - rows_in_view + 1), animate=False)

    @staticmethod
    def _line(model: ScreenModel, epoch: int) -> tuple[str, Style | None]:
        row = model.epochs.get(epoch)
        if row is None:
            return epoch_line((str(epoch),)), PLANNED_STYLE
        accuracy = f"{row.val_accuracy:.1%}" if row.val_accuracy is not None else "-"
        return epoch_line(
            (
                str(epoch),
                fmt(row.train_loss, 4),
                fmt(row.val_loss, 4),
                accuracy,
                observe(model.epochs.get(epoch - 1), row),
            )
        ), None

    def refresh_line(self, y: int) -> None:
        # Line 0 is the header, drawn at the top whatever the scroll; row y sits at y - scroll_y.
        super().refresh_line(y if y else int(self.scroll_y))

    def render_line(self, y: int) -> Strip:
        scroll_x, scroll_y = self.scroll_offset
        index = y + scroll_y if y else 0
        style = self.rich_style
        if index >= len(self._lines):
            return Strip.blank(self.size.width, style)
        text, own_style = self._lines[index]
        strip = Strip([Segment(text, style + own_style if own_style else style)], cell_len(text))
        return strip.crop_extend(scroll_x, scroll_x + self.size.width, style)


PLANNED_STYLE = Style(dim=True)
HEADER_STYLE = Style(bold=True)
