"""What the user's script prints (script mode), followed from the engine process's log."""

from __future__ import annotations

import os

from textual.widgets import Log

READ_AT_MOST = 64 * 1024  # per frame: a script printing in a tight loop cannot stall the screen


class OutputPanel(Log):
    """The tail of the script's output, scrollable; the newest lines in view."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(max_lines=2000, auto_scroll=True, **kwargs)  # type: ignore[arg-type]
        self._offset = 0
        self._partial = ""

    def follow(self, path: str | None) -> None:
        """Show what was written to `path` since the last call."""
        if path is None:
            return
        try:
            with open(path, "rb") as log:
                if os.fstat(log.fileno()).st_size < self._offset:  # a restarted engine's new log
                    self._offset, self._partial = 0, ""
                log.seek(self._offset)
                data = log.read(READ_AT_MOST)
        except OSError:
            return
        if not data:
            return
        self._offset += len(data)
        text = self._partial + data.decode("utf-8", errors="replace")
        *lines, self._partial = text.split("\n")
        if lines:
            self.write_lines(lines)
