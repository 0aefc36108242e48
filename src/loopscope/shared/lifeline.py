"""Processes that end when whoever started them is gone.

The browser view's server starts an app per page and each app an engine; a server killed by a
signal (SIGKILL included) cannot clean up after itself, so each process watches its own lifeline:
the app its input pipe, the engine its parent.
"""

from __future__ import annotations

import os
import select
import threading

ORPHAN_CHECK_SECONDS = 0.5


def input_closed(fd: int = 0) -> bool:
    """Whether every writer of the pipe `fd` reads from has gone. poll() reports the hang-up
    without consuming anything, so the reader (Textual's input thread) loses no byte."""
    watcher = select.poll()
    watcher.register(fd, 0)  # no events asked: POLLHUP is always reported
    return any(events & (select.POLLHUP | select.POLLERR | select.POLLNVAL) for _, events in watcher.poll(0))


def exit_when_orphaned(parent_pid: int, check_seconds: float = ORPHAN_CHECK_SECONDS) -> threading.Thread:
    """Ends this process once `parent_pid` is no longer its parent (the parent died and the process
    was handed to init). A thread, so that it works while the main thread is stuck in user code."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            threading.Event().wait(check_seconds)
        os._exit(0)  # nobody is left to read anything this process would say

    watcher = threading.Thread(target=watch, name="loopscope-lifeline", daemon=True)
    watcher.start()
    return watcher
