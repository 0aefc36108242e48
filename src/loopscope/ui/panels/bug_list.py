"""The bug switches."""

from __future__ import annotations

from rich.segment import Segment
from textual.strip import Strip
from textual.widgets import SelectionList
from textual.widgets.option_list import OptionDoesNotExist


class BugList(SelectionList[str]):
    """A SelectionList whose box holds an X only while the bug is on: the stock one draws an X
    for on and off alike, told apart by colour only, which a projector washes out."""

    def render_line(self, y: int) -> Strip:
        strip = super().render_line(y)
        try:
            bug = self.get_option_at_index(self.scroll_offset.y + y).value
        except OptionDoesNotExist:
            return strip
        segments = list(strip)
        if bug in self.selected or len(segments) < 2:
            return strip
        box = segments[1]  # after the box's left edge: the X
        segments[1] = Segment(" " * len(box.text), box.style, box.control)
        return Strip(segments, strip.cell_length)
