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
