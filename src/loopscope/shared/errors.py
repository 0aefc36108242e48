"""Errors that reach the user as one clear line, and where in the user's code they happened."""

from __future__ import annotations

import importlib.util
import traceback
from pathlib import Path


class UserError(Exception):
    """Bad arguments, a bad target file or a factory that failed: print the message, exit 2."""


def check_processes(processes: int, twin: bool) -> None:
    """What several processes (--nproc) cannot be combined with, said before anything starts."""
    if processes <= 1:
        return
    if twin:
        raise UserError("--twin runs in one process: it cannot be combined with --nproc")


def _library_dirs() -> tuple[str, ...]:
    dirs = [str(Path(__file__).resolve().parents[1])]  # the loopscope package
    spec = importlib.util.find_spec("torch")  # located without importing it
    if spec is not None and spec.origin:
        dirs.append(str(Path(spec.origin).resolve().parent))
    return tuple(dirs)


_LIBRARY_DIRS = _library_dirs()


def user_frame(exc: BaseException) -> str | None:
    """`file.py:12 in forward`: the innermost frame outside loopscope and torch, or None."""
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        path = str(Path(frame.filename).resolve())
        if not path.startswith(_LIBRARY_DIRS) and not frame.filename.startswith("<"):
            return f"{Path(frame.filename).name}:{frame.lineno} in {frame.name}"
    return None
