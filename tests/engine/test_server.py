"""The engine behind the app, driven through its session as the UI drives it."""

from __future__ import annotations

import queue
import threading
import time

from loopscope.shared.protocol import (
    MAX_SPEED_FRAME_SECONDS,
    Ready,
    RunIterations,
    SessionSpec,
    SetRunning,
    Step,
    Update,
)
from loopscope.ui.session import EngineSession


def _run_and_collect(command: object, bugs: tuple[str, ...] = ()) -> tuple[list, int]:
    """Send `command` to a fresh blobs engine; (every event until it pauses, completed iterations)."""
    messages: queue.Queue = queue.Queue()
    session = EngineSession(SessionSpec("blobs", "cpu", bugs=bugs), messages.put, in_process=True)
    session.start()
    events = []
    try:
        while not isinstance(messages.get(timeout=60), Ready):
            pass
        session.send(command)
        while True:
            message = messages.get(timeout=120)
            if isinstance(message, Update):
                events.extend(message.events)
                if not message.state.running and message.state.completed_iterations > 0:
                    return events, message.state.completed_iterations
    finally:
        session.stop()


def _probed_iterations(events: list) -> list[int]:
    return [e.iteration for e in events if e.stage == "backward" and e.layers]


def test_a_run_to_the_end_probes_the_last_iteration_so_the_panels_end_on_it():
    events, completed = _run_and_collect(SetRunning(True))
    assert completed == 400  # blobs: 5 epochs of 80 batches
    probed = _probed_iterations(events)
    assert probed[-1] == 400 and len(probed) < 100  # the rest stays sampled at the panels' rate


def test_a_run_at_max_speed_names_a_missing_zero_grad_at_its_second_iteration():
    # The first two iterations are probed: stale gradients show at the second backward. Before,
    # the next probe after the first came a frame later, ~200 iterations into blobs.
    events, _ = _run_and_collect(SetRunning(True), bugs=("skip_zero_grad",))
    named = [e.iteration for e in events for finding in e.diagnostics if finding.id == "stale_gradients"]
    assert named and named[0] == 2
    assert _probed_iterations(events)[:2] == [1, 2]


def test_run_n_probes_the_iteration_it_stops_at():
    events, completed = _run_and_collect(RunIterations(37))
    assert completed == 37 and _probed_iterations(events)[-1] == 37


def test_sessions_stopped_with_a_message_in_flight_never_take_the_next_ones_messages(monkeypatch):
    # stop() used to close the pipe under the reader thread; the next session's pipe reused the
    # number, and the old reader ate its messages (2-3 sessions in 40 lost theirs, readers crashed).
    crashed = []
    monkeypatch.setattr(threading, "excepthook", lambda args: crashed.append(args.exc_value))
    for _ in range(30):
        messages: queue.Queue = queue.Queue()
        session = EngineSession(SessionSpec("blobs", "cpu"), messages.put, in_process=True)
        session.start()
        while not isinstance(messages.get(timeout=10), Ready):
            pass
        session.send(Step("iteration"))
        while not isinstance(messages.get(timeout=10), Update):
            pass
        session.send(Step("iteration"))  # in flight while stopping
        session.stop()
    assert crashed == []


def test_a_step_back_that_replays_other_numbers_is_told_to_the_screen(fixture_modules, monkeypatch):
    from loopscope.shared.protocol import Failed, Rewind, Rewound
    from loopscope.shared.vocab import StepKind

    monkeypatch.setattr("loopscope.engine.rewind.Rewinder.BUDGET", 1e-9)  # snapshots far apart: a replay
    messages: queue.Queue = queue.Queue()
    session = EngineSession(SessionSpec("third_party_models:stateful_lm", "cpu"), messages.put, in_process=True)
    session.start()
    try:
        while not isinstance(messages.get(timeout=60), Ready):
            pass
        session.send(RunIterations(6))
        while not (isinstance(m := messages.get(timeout=60), Update) and not m.state.running):
            pass
        session.send(Rewind())
        answers = []
        while not any(isinstance(a, Rewound) for a in answers) or not any(isinstance(a, Failed) for a in answers):
            answers.append(messages.get(timeout=60))
        notice = next(a for a in answers if isinstance(a, Failed))
        assert not notice.fatal and "cannot restore" in notice.message
        session.send(Step(StepKind.ITERATION))
    finally:
        session.stop()


def test_at_max_speed_the_engine_sends_its_news_4_times_a_second():
    """Issue 17: at max speed each message wakes the UI process, whose CPU time on 2 cores costs
    training about twice over; so the counters move at 4 frames a second there, not 10. Every
    running Update was sent between `began` and `ended`, at least MAX_SPEED_FRAME_SECONDS apart
    (a loaded machine only spaces them further)."""
    messages: queue.Queue = queue.Queue()
    session = EngineSession(
        SessionSpec("loopscope.scenarios.bench_models:mlp_experiment", "cpu"), messages.put, in_process=True
    )
    session.start()
    try:
        while not isinstance(messages.get(timeout=60), Ready):
            pass
        began = time.monotonic()
        session.send(SetRunning(True))
        time.sleep(2.0)
        session.send(SetRunning(False))
        running = []
        while True:
            message = messages.get(timeout=60)
            if isinstance(message, Update):
                if not message.state.running:
                    break
                running.append(message.state.completed_iterations)
        ended = time.monotonic()
    finally:
        session.stop()
    assert running == sorted(running) and running[-1] > running[0]  # the counters moved
    assert len(running) <= (ended - began) / MAX_SPEED_FRAME_SECONDS + 1, (len(running), ended - began)
