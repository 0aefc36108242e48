"""Faults in user code, non-finite numbers, interrupts: explained at their stage, nothing lost."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time

import pytest

from loopscope.cli import main
from loopscope.shared.events import StageEvent
from loopscope.shared.protocol import Update
from tests.ui.helpers import make_app, press_and_wait, ready, text_of, wait_until

# factory -> (stage that fails, words the explanation must contain)
FAULTS = {
    "shape_mismatch": ("forward", "features but expects"),
    "dtype_mismatch": ("forward", "different dtypes"),
    "device_mismatch": ("forward", "different devices"),
    "dataset_key_error": ("load_batch", "Dataset's __getitem__"),
    "one_batch_generator": ("load_batch", "used up"),
    "empty_loader": ("load_batch", "no batches"),
    "non_scalar_loss": ("backward", "not a single number"),
}


@pytest.mark.parametrize("factory", list(FAULTS))
def test_each_fault_is_explained_at_its_stage_in_the_trace(factory, fixture_modules, capsys):
    stage, words = FAULTS[factory]
    assert main(["trace", f"faulty_experiments:{factory}", "--format", "jsonl"]) == 1
    captured = capsys.readouterr()
    records = [json.loads(line) for line in captured.out.splitlines()]
    failed = records[-1]
    assert failed["stage"] == stage and failed["error"] is not None
    explanation = f"{failed['error']['message']} {failed['error']['hint']}"
    assert words in explanation
    assert "Traceback" not in captured.err and f"stage {stage} failed" in captured.err


@pytest.mark.parametrize("factory", list(FAULTS))
async def test_each_fault_is_shown_in_the_app_which_keeps_running(factory, fixture_modules):
    stage, words = FAULTS[factory]
    app = make_app(f"faulty_experiments:{factory}")
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot)
        for _ in range(6):
            await press_and_wait(pilot, "n", lambda: app.model.last_event is not None)
            if app.model.state.halted is not None:
                break
        await wait_until(pilot, lambda: f"stage {stage}" in text_of(app, "#diagnostics"), timeout=15)
        await wait_until(pilot, lambda: words in text_of(app, "#diagnostics"), timeout=15)
        # Still alive: a bug can be switched on and the loop stepped on.
        app.toggle_bug("lr_too_high")
        await press_and_wait(pilot, "space", lambda: "lr_too_high" in app.model.state.active_bugs)
        assert app.is_running


def test_nan_and_inf_stay_valid_json_and_are_flagged(fixture_modules, capsys):
    assert main(["trace", "faulty_experiments:nan_loss", "-n", "3", "--format", "jsonl"]) == 0
    out = capsys.readouterr()
    records = [json.loads(line) for line in out.out.splitlines()]  # strict parser: no bare NaN
    loss = next(r for r in records if r["stage"] == "loss")
    assert loss["loss"] is None and "loss=nan" in loss["nonfinite"]
    assert any(d["id"] == "loss_not_finite" for r in records for d in r["diagnostics"])
    assert "error at iteration 1: the loss is nan" in out.err


async def test_nan_and_inf_never_reach_the_plot_scale():
    app = make_app("blobs")
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot)
        state = app.model.state
        bad = StageEvent(iteration=3, epoch=1, stage="loss", loss=math.inf)
        app.model.apply(
            Update(
                (bad,),
                ((1, 1, 0.7, None), (2, 1, math.nan, None), (3, 1, math.inf, math.inf), (4, 1, 0.6, None)),
                state,
            )
        )
        app.redraw(force=True)
        for log in (False, True):
            app.query_one("#plot").log_scale = log
            app.redraw(force=True)
            await pilot.pause(0.1)
        assert app.is_running  # plotext raises on inf: it never sees one


@pytest.mark.parametrize(
    ("sig", "code", "word"), [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")]
)
def test_ctrl_c_or_sigterm_leave_a_complete_trace_file(sig, code, word, tmp_path):
    path = tmp_path / "trace.jsonl"
    process = subprocess.Popen(
        [sys.executable, "-m", "loopscope", "trace", "spirals", "--format", "jsonl", "-o", str(path)],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while (not path.exists() or path.stat().st_size < 20000) and time.monotonic() < deadline:
        time.sleep(0.1)
    process.send_signal(sig)
    _, err = process.communicate(timeout=30)
    assert process.returncode == code and word in err and "Traceback" not in err
    lines = path.read_text().splitlines()
    assert lines and all(json.loads(line)["stage"] for line in lines)  # every line whole


async def test_resizing_while_running_keeps_the_layout_sane():
    app = make_app("spirals")
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot)
        await pilot.press("minus", "minus")  # 20 it/s: still running through every resize below
        await pilot.press("r")
        await wait_until(pilot, lambda: app.model.state.running or app.model.state.finished, timeout=30)

        def sane(width: int) -> bool:
            boxes = [app.query_one(f"#{name}-box").region for name in ("code", "tensors", "gradients", "plot")]
            overlapping = any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
            return not overlapping and app.screen.has_class("-narrow") == (width < 110)

        for size in ((80, 24), (150, 50), (60, 20), (120, 40)):
            await pilot.resize_terminal(*size)
            # Layout settles on the app's own clock; under load that can take a moment.
            await wait_until(pilot, lambda width=size[0]: sane(width), timeout=30)
        if app.model.state.running:
            await press_and_wait(pilot, "r", lambda: not app.model.state.running)


def test_a_long_headless_run_keeps_memory_flat():
    from loopscope.devtools.soak import soak

    readings = soak(iterations=20_000, checkpoints=(2_000, 20_000))
    growth = readings[20_000] - readings[2_000]
    assert growth < 30, readings  # MB: 18,000 more iterations must not keep adding memory
