"""The UI's handle on an engine: a child process (the app) or a thread (tests), same protocol.

Torch-free: the UI process talks to the engine only through picklable messages.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import tempfile
import threading
from collections.abc import Callable
from contextlib import contextmanager, suppress
from typing import Any

from loopscope.shared.launch import run_engine
from loopscope.shared.protocol import Failed, SessionSpec, Shutdown


class EngineSession:
    """Starts the engine and delivers everything it sends to `on_message` (from a reader thread)."""

    def __init__(self, spec: SessionSpec, on_message: Callable[[Any], None], in_process: bool = False) -> None:
        self.spec = spec
        self.on_message = on_message
        self.in_process = in_process
        self._conn: Any = None
        self._worker: Any = None
        self._reader: threading.Thread | None = None
        self.alive = False
        self.sent = 0  # commands sent: the engine's state counts those it has handled
        self.log_path: str | None = None  # the engine process's stdout/stderr go here, not over the screen

    def start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        ui_end, engine_end = ctx.Pipe(duplex=True)
        self._conn = ui_end
        if self.in_process:
            self._worker = threading.Thread(target=run_engine, args=(engine_end, self.spec, None), daemon=True)
            self._worker.start()
        else:
            fd, self.log_path = tempfile.mkstemp(prefix="loopscope-engine-", suffix=".log")
            os.close(fd)
            # Daemonic unless it starts rank processes of its own, which a daemonic process may not;
            # either way it ends with the app (its lifeline), and `stop` kills it if it must.
            self._worker = ctx.Process(
                target=run_engine,
                args=(engine_end, self.spec, self.log_path),
                daemon=self.spec.nproc * self.spec.nnodes <= 1,
            )
            with _real_std_streams():
                self._worker.start()
        if not self.in_process:
            engine_end.close()  # only the child holds it now, so its death closes the pipe
        self.alive = True
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            self.on_message(message)
        if self.alive:
            self.alive = False
            code = getattr(self._worker, "exitcode", None)
            if code is None and self._worker is not None and hasattr(self._worker, "join"):
                self._worker.join(1.0)
                code = getattr(self._worker, "exitcode", None)
            why = f"exit code {code}" if code is not None else "the connection closed"
            last_words = self._last_log_line()
            self.on_message(
                Failed(f"the engine process stopped ({why})" + (f": {last_words}" if last_words else ""), fatal=True)
            )

    def _last_log_line(self) -> str | None:
        if not self.log_path:
            return None
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as log:
                lines = [line.strip() for line in log if line.strip()]
        except OSError:
            return None
        return lines[-1][:300] if lines else None

    def send(self, command: Any) -> bool:
        if not self.alive:
            return False
        try:
            self._conn.send(command)
            self.sent += 1
            return True
        except (OSError, BrokenPipeError):
            return False

    def stop(self, timeout: float = 2.0) -> None:
        """Ask the engine to quit; kill it if it does not (a hung user dataset, say)."""
        was_alive, self.alive = self.alive, False
        if was_alive:
            with suppress(OSError, BrokenPipeError):
                self._conn.send(Shutdown())
        if self._worker is not None and self.in_process:
            self._worker.join(timeout)  # a thread cannot be killed: it ends on the Shutdown
        elif self._worker is not None and self._worker.pid is not None:
            self._worker.join(timeout)
            if self._worker.is_alive():
                self._worker.kill()
                self._worker.join(1.0)
        # The reader ends at EOF once the engine's end is closed; close ours only after that. An fd
        # closed under a thread blocked reading it stays read by that thread, and the next pipe
        # opened gets the same number: the next session's messages went to the old reader.
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(timeout)
        if self._reader is None or not self._reader.is_alive():
            with suppress(OSError):
                self._conn.close()
        if self.log_path:
            with suppress(OSError):
                os.remove(self.log_path)
            self.log_path = None


@contextmanager
def _real_std_streams():
    """Textual replaces sys.stdout/stderr while it runs; multiprocessing needs real file
    descriptors to start its helper processes."""
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved
