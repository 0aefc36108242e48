"""Script mode: the user's own training script, run as written under `loopscope trace`. The
contract: with no bug on, the script computes bitwise what `python script.py` computes; its own
printed losses (10 decimals) are the proof."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import FIXTURES

SCRIPTS = FIXTURES / "scripts"
CLEAN = [
    "tutorial_loop.py",
    "nanogpt_style.py",
    "lbfgs_closure.py",
    "gan.py",
    "mnist_functions.py",
    "fp16_scaler.py",
    "hf_style.py",
    "checkpoint_early_stop.py",
    "ema_whole_model_save.py",
]


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    # One torch thread, as the in-process trace has (tests/conftest.py): a different thread count
    # changes the last bits of a reduction, which is not what the contract is about.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=SCRIPTS.parent.parent.parent,
        env=env,
    )


@functools.cache
def python_prints(script: str) -> list[str]:
    """What `python script.py` prints, one torch thread (run once per test session)."""
    plain = run(str(SCRIPTS / script))  # in a process of its own
    assert plain.returncode == 0, plain.stderr
    return plain.stdout.splitlines()


def trace(capsys, *args: str) -> tuple[int, str, str]:
    """`loopscope trace` in this process: (exit code, stdout, stderr)."""
    from loopscope.cli.main import main

    code = main(["trace", *args])
    out, err = capsys.readouterr()
    return code, out, err


def script_lines(stderr: str) -> list[str]:
    """What the script itself printed (loopscope's own lines start with 'loopscope:')."""
    return [line for line in stderr.splitlines() if not line.startswith("loopscope:")]


@pytest.mark.parametrize("script", CLEAN)
def test_a_script_computes_bitwise_what_python_computes_and_raises_no_finding(capsys, script):
    code, out, err = trace(capsys, str(SCRIPTS / script), "--format", "jsonl")
    assert code == 0, err
    assert script_lines(err) == python_prints(script)  # the losses, to the last digit
    records = [json.loads(line) for line in out.splitlines()]  # JSON lines, whatever it prints
    assert records and all(r["code_line"]["file"] == script for r in records)
    said = [line for line in err.splitlines() if line.startswith("loopscope: ")]
    assert not any(" warning at " in line or " error at " in line for line in said), said
    assert "(the script finished)" in said[0]


def test_stages_come_in_the_scripts_order_with_its_own_lines(capsys):
    code, out, _ = trace(capsys, str(SCRIPTS / "nanogpt_style.py"), "-n", "2", "--format", "jsonl")
    records = [json.loads(line) for line in out.splitlines()]
    first = [r for r in records if r["iteration"] == 1]
    # Four micro-batches (the model's own loss shown at its forward's line), then the update;
    # zero_grad after the step belongs to the iteration that stepped.
    stages = ["forward", "loss", "backward"] * 4 + ["unscale", "clip_grad", "step", "zero_grad"]
    assert code == 0 and [r["stage"] for r in first] == stages
    texts = {r["stage"]: r["code_line"]["text"] for r in first}
    assert texts["backward"] == "scaler.scale(loss).backward()"
    assert texts["step"] == "scaler.step(optimizer)"
    assert texts["zero_grad"] == "optimizer.zero_grad(set_to_none=True)"
    assert [r["metrics"].get("micro_batch") for r in first if r["stage"] == "backward"] == [None, 2, 3, 4]
    assert {r["iteration"] for r in records} == {1, 2}  # -n 2 ends the script after its second step


def test_an_ema_copy_is_validated_and_the_users_modules_carry_no_hooks_of_ours(capsys):
    """The script deep-copies its model (an EMA), pickles the whole model and prints torch's hook
    counts: with loopscope watching, every module call is seen without a hook on any module."""
    code, out, err = trace(capsys, str(SCRIPTS / "ema_whole_model_save.py"), "--format", "jsonl")
    assert code == 0, err
    assert "global module hooks 0, model hooks 0" in script_lines(err)
    records = [json.loads(line) for line in out.splitlines()]
    validations = [r for r in records if r["stage"] == "validate"]
    assert [r["iteration"] for r in validations[:2]] == [8, 8]  # the EMA's, then the restored copy's
    assert validations[0]["code_line"]["text"] == "val = F.cross_entropy(ema(x[128:]), y[128:])"
    assert validations[0]["metrics"]["model_training"] is False


def test_torch_save_is_a_checkpoint_stage_at_its_line_and_the_script_keeps_the_main_thread(capsys):
    # The script installs a SIGTERM handler: signal.signal raises anywhere but on the main thread.
    code, out, err = trace(capsys, str(SCRIPTS / "checkpoint_early_stop.py"), "--format", "jsonl")
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    saves = [r for r in records if r["stage"] == "checkpoint"]
    assert len(saves) == 2  # the two epochs whose validation loss improved
    assert {r["code_line"]["text"] for r in saves} == {
        'torch.save(model.state_dict(), os.path.join(folder, "best.pt"))'
    }
    assert all(r["metrics"]["saved_tensors"] == 6 and r["metrics"]["path"].endswith("best.pt") for r in saves)
    stages = [r["stage"] for r in records]
    assert stages.index("checkpoint") == stages.index("validate") + 1  # validated, then saved
    assert "early stop after epoch 4" in err
    # ReduceLROnPlateau steps its own way (step(metrics)): still a scheduler stage, at its line.
    plateau = [r for r in records if r["stage"] == "scheduler"]
    assert {r["code_line"]["text"] for r in plateau} == {"plateau.step(val_loss)"} and len(plateau) == 5
    assert [(r["metrics"]["lr_before"], r["metrics"]["lr"]) for r in plateau][1:3] == [(0.01, 0.01), (0.01, 0.005)]


def test_arguments_after_the_double_dash_are_the_scripts(capsys):
    code, _, err = trace(capsys, str(SCRIPTS / "tutorial_loop.py"), "--format", "jsonl", "--", "1")
    assert code == 0
    assert "12 iterations completed, epoch 1" in err  # one epoch of 12 batches, not two


@pytest.mark.parametrize("script", ["tutorial_loop.py", "nanogpt_style.py", "lbfgs_closure.py", "gan.py"])
def test_skip_zero_grad_is_named_at_iteration_2_in_any_loop_shape(capsys, script):
    _, _, err = trace(capsys, str(SCRIPTS / script), "-n", "3", "--bug", "skip_zero_grad")
    assert "loopscope: error at iteration 2: step() ran on" in err, err


def test_an_exception_in_the_script_is_shown_at_its_stage_with_its_line(capsys):
    code, out, err = trace(capsys, str(SCRIPTS / "raises_at_5.py"), "--format", "jsonl")
    assert code == 1
    last = json.loads(out.splitlines()[-1])
    assert (last["stage"], last["iteration"]) == ("forward", 5)
    assert "mat1 and mat2 shapes cannot be multiplied" in last["error"]["message"]
    assert last["error"]["location"].startswith("raises_at_5.py:11")
    assert "stage forward failed at iteration 5" in err


def test_a_bug_that_needs_a_factory_says_so_in_one_line(capsys):
    code, _, err = trace(capsys, str(SCRIPTS / "gan.py"), "--bug", "missing_backward")
    assert code == 2
    assert err.strip().count("\n") == 0 and "cannot be applied to a script" in err


@pytest.mark.parametrize(
    ("bug", "finding"),
    [
        ("validate_in_train_mode", "validation ran with the model in training mode"),
        ("validate_with_grad", "validation outputs require grad"),
        ("double_softmax", "received rows that already sum to 1"),
    ],
)
def test_hooks_apply_the_script_mode_bugs_and_the_diagnostics_name_them(capsys, bug, finding):
    code, _, err = trace(capsys, str(SCRIPTS / "tutorial_loop.py"), "--bug", bug, "--", "1")
    assert code == 0 and finding in err and f"[suspects: {bug}" in err, err


@pytest.mark.parametrize("script", ["tutorial_loop.py", "nanogpt_style.py", "fp16_scaler.py", "lbfgs_closure.py"])
def test_missing_step_leaves_the_parameters_unchanged_and_is_named(capsys, script):
    code, out, err = trace(capsys, str(SCRIPTS / script), "-n", "6", "--format", "jsonl", "--bug", "missing_step")
    records = [json.loads(line) for line in out.splitlines()]
    steps = [r for r in records if r["stage"] == "step"]
    assert code == 0 and len({r["iteration"] for r in steps}) == 6  # still six iterations, each a left-out step
    assert all(r["metrics"]["skipped"] for r in steps)
    assert all(layer["update_norm"] == 0 for r in steps for layer in r["layers"])
    assert "step() changed no parameter" in err and "[suspects: missing_step" in err, err


def test_a_scaled_learning_rate_is_restored_after_every_step(capsys):
    def lrs_and_losses(*bugs: str) -> tuple[list[float], list[float]]:
        _, out, _ = trace(capsys, str(SCRIPTS / "hf_style.py"), "--format", "jsonl", *bugs)
        records = [json.loads(line) for line in out.splitlines()]
        return [r["metrics"]["lr"] for r in records if r["stage"] == "step"], [
            r["loss"] for r in records if r["stage"] == "loss"
        ]

    clean_lrs, clean_losses = lrs_and_losses()
    buggy_lrs, buggy_losses = lrs_and_losses("--bug", "lr_too_high")
    assert buggy_lrs == clean_lrs  # the script's own warmup, untouched: the bug scales each step only
    assert buggy_losses[0] == clean_losses[0] and buggy_losses[-1] != clean_losses[-1]


def test_missing_step_switched_on_and_off_while_a_script_runs():
    from loopscope.engine.script.driver import ScriptDriver

    # The tutorial's StepLR wrapped optimizer.step before the bug goes on: both wrappers must hold.
    driver = ScriptDriver(SCRIPTS / "tutorial_loop.py", ["1"])
    try:
        driver.run(2)
        driver.set_bug("missing_step", True)
        driver.run(2)
        driver.set_bug("missing_step", False)
        driver.run(2)
    finally:
        driver.close()
    steps = [e for e in driver.history.recent() if e.stage == "step"]
    assert [e.metrics.get("skipped", False) for e in steps] == [False, False, True, True, False, False]
    assert [e.bugs for e in steps][2:4] == [("missing_step",)] * 2
