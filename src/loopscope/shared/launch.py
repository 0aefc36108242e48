"""The one place a process crosses into the engine: by name, so that nothing on the UI's side
imports the engine (or torch). The engine process unpickles `run_engine` and only then imports
`loopscope.engine.entry`."""

from __future__ import annotations

import importlib
from typing import Any

ENGINE_ENTRY = "loopscope.engine.entry"


def run_engine(conn: Any, spec: Any, log_path: str | None) -> None:
    """The engine process's (or, in tests, thread's) target."""
    importlib.import_module(ENGINE_ENTRY).engine_entry(conn, spec, log_path)
