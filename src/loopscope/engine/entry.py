"""Entry point for the engine process: imports the engine (and torch) only once running there."""

from __future__ import annotations

import multiprocessing
import os
import sys
from typing import Any

from loopscope.shared.lifeline import exit_when_orphaned


def engine_entry(conn: Any, spec: Any, log_path: str | None) -> None:
    if log_path is not None:
        # Whatever the user's code or torch prints must not land on top of the app's screen.
        log = os.open(log_path, os.O_WRONLY | os.O_APPEND)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        # Line by line: the app's Output panel follows the log as a script prints.
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
        app = multiprocessing.parent_process()
        if app is not None and app.pid is not None:
            exit_when_orphaned(app.pid)  # an app killed outright must not leave a training engine behind
    from loopscope.engine.allocator import tune_allocator
    from loopscope.engine.server import engine_process_main

    tune_allocator()

    engine_process_main(conn, spec)
