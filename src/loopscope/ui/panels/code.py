"""The loop code, the current stage's line marked, active bugs as a diff."""

from __future__ import annotations

import functools
from pathlib import Path

from rich.syntax import Syntax
from rich.text import Text

from loopscope.shared.loopcode import render_loop
from loopscope.shared.vocab import Change
from loopscope.ui.model import ScreenModel
from loopscope.ui.panels.base import TextPanel

_SYNTAX = Syntax("", "python", theme="monokai", background_color="default")


class CodePanel(TextPanel):
    """The loop as PyTorch code; the stage just run highlighted; active bugs as a diff."""

    def show(self, model: ScreenModel) -> int | None:
        """Render; returns the index of the first line of the stage just run, if shown."""
        if model.info is None or model.state is None:
            self.update("")
            return None
        script = model.info.options.get("script")
        if isinstance(script, str):
            return self._show_script(Path(script), model)
        current = model.last_event.stage if model.last_event else None
        current_line = None
        lines = render_loop(model.info.options, model.state.iteration_stages, model.state.active_bugs)
        text = Text(no_wrap=True)
        for index, line in enumerate(lines):
            marker = {Change.REMOVED: "- ", Change.ADDED: "+ "}.get(line.change, "  ")
            is_current = current is not None and line.stage == current and line.change != Change.REMOVED
            if is_current:
                marker = "> " if not line.change else marker
            if line.change == Change.REMOVED:
                body = Text(line.text, style="red strike")
            else:
                body = _SYNTAX.highlight(line.text)
                body.rstrip()
                if line.change == Change.ADDED:
                    body.stylize("bold on #1f3d1f")
            row = Text(
                marker, style="bold red" if line.change == Change.REMOVED else "bold green" if line.change else "bold"
            )
            row.append_text(body)
            if is_current:
                row.stylize("reverse")
                if current_line is None:
                    current_line = index
            text.append_text(row)
            text.append("\n")
        self.update(text)
        return current_line

    def _show_script(self, script: Path, model: ScreenModel) -> int | None:
        """Script mode: the user's own file (the one the stage's call came from), its line marked."""
        where = model.last_event.code_line if model.last_event else None
        path, marked = script, None
        if isinstance(where, dict) and "file" in where:
            path, marked = script.parent / str(where["file"]), int(where["line"])
        source = _read(path)
        text = Text(no_wrap=True)
        text.append(f"  # {path.name}\n", style="dim")
        for number, line in enumerate(source, start=1):
            is_current = number == marked
            row = Text("> " if is_current else "  ", style="bold")
            body = _SYNTAX.highlight(line)
            body.rstrip()
            row.append_text(body)
            if is_current:
                row.stylize("reverse")
            text.append_text(row)
            text.append("\n")
        self.update(text)
        return marked  # the header line comes first: line N is at index N


@functools.lru_cache(maxsize=8)
def _read(path: Path) -> tuple[str, ...]:
    try:
        return tuple(path.read_text(encoding="utf-8").splitlines())
    except OSError as exc:
        return (f"# cannot read {path}: {exc.strerror}",)
