"""The trace's JSON is a contract (scripts read it): its records keep their keys, their order and
their value types. The shapes in trace_shapes.json were written by the code before the engine
redesign; a change to the format must change that file on purpose."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli.trace_shapes import distinct_shapes

GOLDEN = json.loads((Path(__file__).parent / "trace_shapes.json").read_text())


@pytest.mark.parametrize("name", sorted(GOLDEN["runs"]))
def test_trace_records_keep_their_shape(name):
    result = subprocess.run(
        [sys.executable, "-m", "loopscope", *GOLDEN["runs"][name]], capture_output=True, text=True, timeout=300
    )
    assert result.stdout, result.stderr[-2000:]
    assert distinct_shapes(result.stdout) == GOLDEN["shapes"][name]


def test_the_shape_sees_a_renamed_key():
    record = json.dumps({"iteration": 1, "stage": "loss", "loss": 0.5})
    renamed = json.dumps({"iteration": 1, "stage": "loss", "losses": 0.5})
    assert distinct_shapes(record) != distinct_shapes(renamed)


def test_factory_mode_records_each_stages_line_of_the_loop_the_code_panel_shows():
    result = subprocess.run(
        [sys.executable, "-m", "loopscope", "trace", "amp", "-n", "1", "--format", "jsonl"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    records = [json.loads(line) for line in result.stdout.splitlines()]
    lines = {r["stage"]: r["code_line"] for r in records}
    assert {r["code_line"]["file"] for r in records} == {"<loopscope loop>"}
    # amp scales the loss for backward and steps through the scaler: the loop's own lines say so.
    assert lines["backward"]["text"] == "scaler.scale(loss).backward()"
    assert lines["unscale"]["text"] == "scaler.unscale_(optimizer)"
    assert lines["step"]["text"] == "scaler.step(optimizer)"
    assert lines["zero_grad"]["text"] == "optimizer.zero_grad()"  # not the `if i % K == 0:` above it
    assert lines["forward"]["line"] < lines["loss"]["line"] < lines["backward"]["line"] < lines["step"]["line"]
