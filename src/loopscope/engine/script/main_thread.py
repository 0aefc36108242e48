"""The user's script runs on the process's main thread, as under `python script.py`.

Two reasons: `signal.signal` works only there (training scripts install handlers to checkpoint on
preemption), and torch's OpenMP pool runs elementwise ops slower for a second thread (measured on
the bench's wide MLP: Adam's step 2.9 ms on the main thread, 4.1-5.2 ms on a second one, ~40% on
the whole iteration). So while a script runs, loopscope's own side (the engine server, a trace)
moves to a second thread and asks the main thread to start the script.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_lent: list[queue.Queue[Callable[[], Any] | None]] = []  # the job queue, while the main thread is lent


def lend_main_thread(work: Callable[[], T]) -> T:
    """Run `work` on a second thread while this (the main) thread runs the scripts it starts;
    returns what `work` returned (or raises what it raised) once it and those scripts are done."""
    jobs: queue.Queue[Callable[[], Any] | None] = queue.Queue()
    outcome: dict[str, Any] = {}

    def side() -> None:
        try:
            outcome["value"] = work()
        except BaseException as exc:  # handed to the main thread, which raises it
            outcome["error"] = exc
        finally:
            jobs.put(None)

    _lent.append(jobs)
    threading.Thread(target=side, name="loopscope", daemon=True).start()
    try:
        while (job := jobs.get()) is not None:
            job()
    finally:
        _lent.remove(jobs)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def start_script(job: Callable[[], None]) -> None:
    """Run `job` on the main thread when it is lent to scripts, else on a thread of its own (a
    driver used directly, as tests do)."""
    if _lent and threading.current_thread() is not threading.main_thread():
        _lent[-1].put(job)
    else:
        threading.Thread(target=job, name="loopscope-script", daemon=True).start()
