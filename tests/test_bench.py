"""`loopscope bench`: it runs and reports every figure DESIGN names (no assertions on speed)."""

import json
import queue

from loopscope.cli import bench
from loopscope.cli import main
from loopscope.shared.protocol import PlainLoopTimed, Ready, SessionSpec, TimePlainLoop, Update
from loopscope.ui.session import EngineSession


def test_bench_pieces_report_sane_figures():
    row = bench.compare("mlp", iterations=5, rounds=1)
    assert set(row) == {"name", "batch", "plain_ms", "stepper_ms", "ratio"} and row["plain_ms"] > 0 and row["ratio"] > 0
    assert bench.plot_render_ms(1000) > 0
    assert bench.history_memory_mb(20_000) < 5  # bounded: buckets merge, recent events are capped


def test_app_throughput_runs_the_real_app_beside_the_plain_loop():
    result = bench.app_throughput("mlp", seconds=2.0, rounds=2)
    assert len(result["rounds"]) == 2 and all(r > 0 for r in result["rounds"])
    assert result["app_its"] > 0 and result["plain_its"] > 0 and result["first_frame_ms"] > 0


def _next(messages: queue.Queue, kind: type):
    while True:
        message = messages.get(timeout=60)
        if isinstance(message, kind):
            return message


def test_the_engine_times_the_plain_loop_on_its_own_model_and_keeps_its_place():
    # The app's reference loop runs on the engine's own objects (see TimePlainLoop).
    messages: queue.Queue = queue.Queue()
    session = EngineSession(SessionSpec("loopscope.cli.bench:mlp_experiment", "cpu"), messages.put, in_process=True)
    session.start()
    try:
        _next(messages, Ready)
        session.send(TimePlainLoop(0.3))
        timed = _next(messages, PlainLoopTimed)
        assert timed.iterations > 0 and timed.seconds >= 0.3
        assert _next(messages, Update).state.completed_iterations == 0  # not counted as loopscope's iterations
    finally:
        session.stop()


def test_bench_json_has_the_design_fields(monkeypatch, capsys):
    # The full run takes a minute; the fields and wiring are what this checks (the pieces run above).
    monkeypatch.setattr(bench, "plot_render_ms", lambda points: 1.0)
    monkeypatch.setattr(bench, "history_memory_mb", lambda: 1.0)
    monkeypatch.setattr(bench, "app_throughput", lambda seconds, rounds, device: {
        "plain_its": 1.0, "app_its": 1.0, "ratio": 1.0, "rounds": [1.0], "first_frame_ms": 1.0})
    monkeypatch.setattr(bench, "compare", lambda name, iterations, rounds, device, batch: {
        "name": name, "batch": batch, "plain_ms": 1.0, "stepper_ms": 1.0, "ratio": 1.0})
    assert main(["bench", "--json", "--quick"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert [m["name"] for m in result["models"]] == ["mlp", "wide_mlp", "cnn"]
    assert set(result["plot_render_ms"]) == {"1000", "100000", "1000000"}
    assert {"history_memory_mb", "app", "first_frame_ms"} <= set(result)
    assert set(result["app"]) == {"plain_its", "app_its", "ratio", "rounds"}
    assert {m["batch"] for m in result["models"]} == {64}  # the CPU reference batch
    assert "measuring stepper vs plain loop: cnn at batch 64 on cpu..." in captured.err  # progress, off stdout
    assert main(["bench", "--quick"]) == 0
    table = capsys.readouterr().out
    assert "ratios are rough" in table  # a quick run's verdicts are not the figures to judge by
    assert "1.00x the plain loop's rate, the median of 1 rounds" in table
