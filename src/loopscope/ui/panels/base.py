"""Shared by the panels: number formats and a Static that repaints only on change."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, cast

from textual.visual import VisualType
from textual.widgets import Static

if TYPE_CHECKING:
    from textual.css.styles import RulesMap


def fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    return f"{value:.{digits}g}"


def shape(dims: tuple[int, ...]) -> str:
    return "[" + ",".join(map(str, dims)) + "]"


class TextPanel(Static):
    """A Static that repaints only when its text changed, and asks for a new screen layout only when
    its size did. A layout pass costs the UI process tens of ms (it ran 12 times a second while
    training before this), and while training runs the engine process wants that CPU time."""

    _shown: object = None
    _size_key: object = None

    def update(self, content: VisualType = "", *, layout: bool | None = None) -> None:
        if content == self._shown:
            return
        self._shown = content
        super().update(content, layout=bool(layout))
        if layout is None:
            size_key = self._size_now()
            if size_key is None or size_key != self._size_key:
                self.refresh(layout=True)
            self._size_key = size_key

    def _size_now(self) -> object:
        """The size the new text takes, wrapped as Textual will wrap it; None before the first layout."""
        width = self.content_region.width
        if width <= 0:
            return None
        if self.styles.width is not None and self.styles.width.is_auto:
            width = self.visual.get_optimal_width(cast("RulesMap", self.styles), width)
        return width, self.visual.get_height(cast("RulesMap", self.styles), width)
