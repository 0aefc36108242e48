"""The contract in the app: a script stepped by the app's engine process (what the app runs, the
script's output going to the log the Output panel follows) prints bitwise what `python script.py`
prints, for every kind of loop the script-mode fixtures hold."""

from __future__ import annotations

import queue
import time

import pytest

from loopscope.shared.protocol import Failed, SessionSpec, SetRunning, Update
from loopscope.ui.session import EngineSession
from tests.cli.test_script_mode import CLEAN, SCRIPTS, python_prints


@pytest.mark.parametrize("script", CLEAN)
def test_the_app_engine_runs_a_script_to_its_end_printing_what_python_prints(script, monkeypatch):
    path = str(SCRIPTS / script)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the engine process's torch threads, as python_prints'
    messages: queue.Queue = queue.Queue()
    session = EngineSession(SessionSpec(path, "cpu", 0, script=True, seed_given=False), messages.put)
    session.start()
    try:
        session.send(SetRunning(True))  # `r`, at full speed (no --speed given)
        deadline = time.monotonic() + 300
        while True:
            message = messages.get(timeout=max(1.0, deadline - time.monotonic()))
            assert not isinstance(message, Failed), message.message
            if isinstance(message, Update) and message.state.finished:
                assert message.state.halted is None
                break
        assert session.log_path is not None  # removed when the session stops
        with open(session.log_path, encoding="utf-8") as log:
            printed = log.read().splitlines()
    finally:
        session.stop()
    assert printed == python_prints(script)
