"""`loopscope bench`: it runs and reports every figure DESIGN names (no assertions on speed)."""

import json

from loopscope import bench
from loopscope.cli import main


def test_bench_pieces_report_sane_figures():
    row = bench.compare("mlp", iterations=5, rounds=1)
    assert set(row) == {"name", "plain_ms", "stepper_ms", "ratio"} and row["plain_ms"] > 0 and row["ratio"] > 0
    assert bench.plot_render_ms(1000) > 0
    assert bench.history_memory_mb(20_000) < 5  # bounded: buckets merge, recent events are capped


def test_bench_json_has_the_design_fields(monkeypatch, capsys):
    # The full run takes a minute; the fields and wiring are what this checks.
    monkeypatch.setattr(bench, "app_throughput", lambda seconds: {
        "plain_its": 1.0, "app_its": 1.0, "ratio": 1.0, "first_frame_ms": 1.0})
    monkeypatch.setattr(bench, "compare", lambda name, iterations, rounds, device: {
        "name": name, "plain_ms": 1.0, "stepper_ms": 1.0, "ratio": 1.0})
    assert main(["bench", "--json", "--quick"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in result["models"]] == ["mlp", "wide_mlp", "cnn"]
    assert set(result["plot_render_ms"]) == {"1000", "100000", "1000000"}
    assert {"history_memory_mb", "app", "first_frame_ms"} <= set(result)
    assert set(result["app"]) == {"plain_its", "app_its", "ratio"}
