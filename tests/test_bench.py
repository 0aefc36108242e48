"""`loopscope bench`: it runs and reports every figure DESIGN names (no assertions on speed)."""

import json
import math
import queue
import statistics
import subprocess
import time

import pytest

from loopscope.cli import bench, main
from loopscope.shared.protocol import PlainLoopTimed, Ready, SessionSpec, TimePlainLoop, Update
from loopscope.ui.session import EngineSession

# Rounding: compare() rounds each figure to 0.001 (ms, or the ratio itself).
HALF_UNIT = 0.0005


def test_compare_reports_a_ratio_consistent_with_its_times():
    row = bench.compare("mlp", iterations=5, rounds=1)
    assert set(row) == {"name", "batch", "plain_ms", "stepper_ms", "ratio"}
    assert (row["name"], row["batch"]) == ("mlp", bench.BATCH)
    plain, ours = row["plain_ms"], row["stepper_ms"]
    assert 0 < plain < math.inf and 0 < ours < math.inf
    # One round: the ratio is the stepper's time over the plain loop's, up to each figure's rounding.
    low = (ours - HALF_UNIT) / (plain + HALF_UNIT) - HALF_UNIT
    high = (ours + HALF_UNIT) / (plain - HALF_UNIT) + HALF_UNIT
    assert low <= row["ratio"] <= high, row


def test_compare_takes_turns_and_reports_the_median_of_its_chunks(monkeypatch):
    # Scripted per-iteration seconds instead of clocks: 10 warm-up pairs, then 3 chunks of 2 pairs.
    # Per chunk, plain 1, 2, 4 ms and stepper 2, 2.2, 12 ms: ratios 2, 1.1, 3.
    plain = iter([0.001] * 10 + [0.001, 0.001, 0.002, 0.002, 0.004, 0.004])
    ours = iter([0.001] * 10 + [0.002, 0.002, 0.0022, 0.0022, 0.012, 0.012])
    turns = []
    monkeypatch.setattr(bench.PlainLoop, "step", lambda self: turns.append("plain") or next(plain))
    monkeypatch.setattr(
        bench, "_stepper_iteration", lambda stepper, schedule, clock: turns.append("stepper") or next(ours)
    )
    row = bench.compare("mlp", iterations=6, rounds=3)
    assert turns == ["plain", "stepper"] * 16  # iteration by iteration, the plain loop first
    # Each figure is the median over the chunks; the ratio is the median of the chunks' own
    # ratios (2.0), not the ratio of the median times (2.2 / 2 = 1.1).
    assert row == {"name": "mlp", "batch": bench.BATCH, "plain_ms": 2.0, "stepper_ms": 2.2, "ratio": 2.0}


def test_script_mode_is_timed_against_the_same_script_run_as_written():
    row = bench.script_compare(iterations=5, rounds=1)
    assert set(row) == {"name", "plain_ms", "script_ms", "ratio"}
    plain, ours = row["plain_ms"], row["script_ms"]
    assert 0 < plain < math.inf and 0 < ours < math.inf
    assert abs(row["ratio"] - ours / plain) <= 0.01 * row["ratio"] + HALF_UNIT  # one round: its own ratio


def test_plot_render_times_the_downsampled_plot_of_the_whole_history(monkeypatch):
    from textual_plotext.plot import Plot

    import loopscope.ui.plot as plot_module

    assert 0 < bench.plot_render_ms(1000) < math.inf
    plotted, draw, text_of = [], Plot.plot, plot_module.plotext_text

    def recording_plot(figure, xs, ys, **kwargs):
        plotted.append((list(xs), list(ys)))
        return draw(figure, xs, ys, **kwargs)

    def slow_text(figure):  # a build known to take at least 50 ms: the figure must include it
        time.sleep(0.05)
        return text_of(figure)

    monkeypatch.setattr(Plot, "plot", recording_plot)
    monkeypatch.setattr(plot_module, "plotext_text", slow_text)
    assert bench.plot_render_ms(100_000, width=60) >= 50
    ((xs, ys),) = plotted
    assert len(xs) <= 2 * 60  # downsampled to the plot's width, as the app draws it
    assert xs[0] < 1000 and xs[-1] == 99_999  # the whole history, not its start or its end
    assert ys[0] > ys[-1] > 0  # the falling 1/sqrt(i) curve


def test_history_memory_is_measured_and_stays_bounded():
    few, many, twice_as_many = (bench.history_memory_mb(n) for n in (100, 20_000, 40_000))
    assert 0 < few < many < 5  # the history's memory is what is traced
    assert twice_as_many < 1.5 * many  # bounded: buckets merge, recent events are capped


def test_app_throughput_runs_the_real_app_beside_the_plain_loop():
    result = bench.app_throughput("mlp", seconds=2.0, rounds=2)
    assert set(result) == {"plain_its", "app_its", "ratio", "rounds", "first_frame_ms"}
    assert len(result["rounds"]) == 2 and all(0 < r < math.inf for r in result["rounds"])
    assert 0 < result["app_its"] < math.inf and 0 < result["plain_its"] < math.inf
    assert 0 < result["first_frame_ms"] < math.inf
    # The ratio is the median of the rounds (of two, their mean), each rounded to 0.001.
    assert result["ratio"] == pytest.approx(statistics.mean(result["rounds"]), abs=3 * HALF_UNIT)


def test_app_throughput_brackets_each_app_round_with_the_plain_rounds_around_it(monkeypatch):
    # What the app probe measured, scripted: the plain loop slows down halfway.
    measured = {"first_frame_ms": 123.456, "app_rates": [90.0, 50.0], "plain_rates": [100.0, 100.0, 50.0]}
    calls = []

    def probe(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, 0, stdout="engine log line\n" + json.dumps(measured), stderr="")

    monkeypatch.setattr(subprocess, "run", probe)
    result = bench.app_throughput("mlp", seconds=3.0, rounds=2, device="cpu")
    assert calls[0][-5:] == ["mlp", "1.5", "2", "cpu", str(bench.APP_WARM_UP_SECONDS)]  # seconds split between rounds
    # Round 1: 90 against 100 and 100 = 0.9; round 2: 50 against 100 and 50, on times: 50 * (1/100 + 1/50) / 2.
    assert result == {
        "plain_its": 100.0,
        "app_its": 70.0,
        "ratio": 0.825,
        "rounds": [0.9, 0.75],
        "first_frame_ms": 123.5,
    }


def _next(messages: queue.Queue, kind: type):
    while True:
        message = messages.get(timeout=60)
        if isinstance(message, kind):
            return message


def test_the_plain_loops_warm_up_runs_iterations_it_does_not_count(monkeypatch):
    import torch

    from loopscope.engine import plainloop
    from loopscope.scenarios.bench_models import reference_experiment

    steps = []
    monkeypatch.setattr(plainloop.PlainLoop, "step", lambda loop: steps.append(1) or 0.0)
    experiment = reference_experiment("mlp")
    cpu = torch.device("cpu")
    counted, seconds = plainloop.plain_iterations_for(experiment, cpu, 0.05, warm_up=0.05)
    assert 0 < counted < len(steps)  # some ran in the warm-up, uncounted
    assert seconds >= 0.05
    steps.clear()
    counted, _ = plainloop.plain_iterations_for(experiment, cpu, 0.05)
    assert counted == len(steps)  # no warm-up: every step counted


def test_the_engine_times_the_plain_loop_on_its_own_model_and_keeps_its_place():
    # The app's reference loop runs on the engine's own objects (see TimePlainLoop).
    messages: queue.Queue = queue.Queue()
    session = EngineSession(
        SessionSpec("loopscope.scenarios.bench_models:mlp_experiment", "cpu"), messages.put, in_process=True
    )
    session.start()
    try:
        _next(messages, Ready)
        session.send(TimePlainLoop(0.3))
        timed = _next(messages, PlainLoopTimed)
        assert timed.iterations > 0 and timed.seconds >= 0.3
        session.send(TimePlainLoop(0.3, warm_up=0.2))  # as bench's rounds: a warm-up, then counted
        assert _next(messages, PlainLoopTimed).iterations > 0
        assert _next(messages, Update).state.completed_iterations == 0  # not counted as loopscope's iterations
    finally:
        session.stop()


def test_bench_json_has_the_design_fields(monkeypatch, capsys):
    # The full run takes a minute; the fields and wiring are what this checks (the pieces run above).
    monkeypatch.setattr(bench, "plot_render_ms", lambda points: 1.0)
    monkeypatch.setattr(bench, "history_memory_mb", lambda: 1.0)
    monkeypatch.setattr(
        bench,
        "app_throughput",
        lambda name, seconds, rounds, device: {
            "plain_its": 1.0,
            "app_its": 1.0,
            "ratio": 1.0,
            "rounds": [1.0],
            "first_frame_ms": 1.0,
        },
    )
    monkeypatch.setattr(
        bench,
        "compare",
        lambda name, iterations, rounds, device, batch: {
            "name": name,
            "batch": batch,
            "plain_ms": 1.0,
            "stepper_ms": 1.0,
            "ratio": 1.0,
        },
    )
    monkeypatch.setattr(
        bench,
        "script_compare",
        lambda iterations, rounds: {"name": "wide_mlp", "plain_ms": 1.0, "script_ms": 1.05, "ratio": 1.05},
    )
    assert main(["bench", "--json", "--quick"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert [m["name"] for m in result["models"]] == ["mlp", "wide_mlp", "cnn"]
    assert set(result["plot_render_ms"]) == {"1000", "100000", "1000000"}
    assert {"history_memory_mb", "app", "first_frame_ms"} <= set(result)
    assert list(result["app"]) == ["adam_mlp", "wide_mlp"]  # a small model and a wide one
    assert all(set(app) == {"plain_its", "app_its", "ratio", "rounds"} for app in result["app"].values())
    assert {m["batch"] for m in result["models"]} == {64}  # the CPU reference batch
    assert "measuring stepper vs plain loop: cnn at batch 64 on cpu..." in captured.err  # progress, off stdout
    assert main(["bench", "--quick"]) == 0
    table = capsys.readouterr().out
    assert "ratios are rough" in table  # a quick run's verdicts are not the figures to judge by
    assert "1.00x the plain loop's rate, the median of 1 rounds" in table
    assert "in the app (adam_mlp," in table and "in the app (wide_mlp," in table
    model_rows = [line for line in table.splitlines() if line.split()[:1] in (["mlp"], ["wide_mlp"], ["cnn"])]
    assert len(model_rows) == 3 and all(line.endswith("<= 1.05 ok") for line in model_rows)  # every model judged
    assert "under loopscope 1.050 ms/it, ratio 1.050  (target <= 1.10: ok)" in table


def test_screen_rate_counts_the_apps_own_screen_in_tmux_against_a_plain_loop_in_the_same_terminal():
    import shutil

    from loopscope.devtools import screen_rate

    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    result = screen_rate.measure("mlp", seconds=1.0, rounds=1)
    assert len(result["plain_its"]) == 2 and len(result["app_its"]) == 1
    assert all(0 < rate < math.inf for rate in result["plain_its"] + result["app_its"])
    app, (before, after) = result["app_its"][0], result["plain_its"]
    # The rates are rounded to 0.1 it/s, a slow round's to a few parts in a thousand.
    assert result["rounds"] == [pytest.approx(app * (1 / before + 1 / after) / 2, rel=0.01)]
    # The terminal is gone, and with it the app and its engine.
    sessions = subprocess.run(["tmux", "list-sessions"], capture_output=True, text=True).stdout
    assert "loopscope-rate" not in sessions
    left = subprocess.run(["pgrep", "-f", "bench_models:mlp_experiment"], capture_output=True, text=True).stdout
    assert left == ""
