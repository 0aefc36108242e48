"""`loopscope trace`, `scenarios` and argument handling, as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from loopscope.cli import main

TRACE_FIELDS = {
    "iteration",
    "epoch",
    "stage",
    "bugs",
    "tensors",
    "loss",
    "grad_norm",
    "layers",
    "metrics",
    "diagnostics",
    "error",
    "duration_ms",
}


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The real console entry point, in a fresh interpreter."""
    return subprocess.run(
        [sys.executable, "-m", "loopscope", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_trace_table_shows_every_stage_and_the_loss_falls(capsys):
    assert main(["trace", "blobs", "--iterations", "300", "--format", "table"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:4] == ["iter", "epoch", "stage", "ms"]
    rows = [line.split(None, 3) for line in out[1:]]
    assert [r[2] for r in rows[:6]] == ["load_batch", "zero_grad", "forward", "loss", "backward", "step"]
    assert "inputs [10,10] float32 cpu" in out[1] and "grad norm" in out[5]
    # A row is: iter, epoch, stage, ms, then what happened ("loss 0.6931  (output ...)").
    losses = [float(line.split()[5]) for line in out[1:] if line.split()[2] == "loss"]
    assert len(losses) == 300
    first, last = sum(losses[:50]) / 50, sum(losses[-50:]) / 50
    assert last < 0.5 * first
    assert sum(1 for line in out if line.split()[2] == "validate") == 3


def test_trace_jsonl_writes_every_design_field_to_a_file(tmp_path, capsys):
    path = tmp_path / "trace.jsonl"
    assert main(["trace", "spirals", "-n", "25", "--format", "jsonl", "-o", str(path)]) == 0
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert all(r.keys() >= TRACE_FIELDS for r in records)
    assert records[0]["stage"] == "load_batch" and records[0]["tensors"][0]["shape"] == [32, 2]
    backward = next(r for r in records if r["stage"] == "backward")
    assert backward["grad_norm"] > 0 and backward["layers"][0]["name"] == "0.weight"
    step = next(r for r in records if r["stage"] == "step")
    assert all(layer["update_ratio"] is not None for layer in step["layers"])
    validate = next(r for r in records if r["stage"] == "validate")
    assert {"val_loss", "val_accuracy"} <= validate["metrics"].keys()
    stages = {r["stage"] for r in records}
    assert {"clip_grad", "scheduler", "checkpoint", "early_stop"} <= stages
    assert "stage records to" in capsys.readouterr().err


def test_user_file_and_module_factory_targets(fixtures, monkeypatch, capsys):
    assert main(["trace", str(fixtures / "dict_rnn_experiment.py"), "-n", "3", "--format", "jsonl"]) == 0
    first = json.loads(capsys.readouterr().out.splitlines()[0])
    assert [t["name"] for t in first["tensors"]] == ["inputs.series", "inputs.mask", "targets"]
    monkeypatch.syspath_prepend(str(fixtures))
    assert main(["trace", "tuple_experiment:experiment", "-n", "2", "--format", "jsonl"]) == 0
    first = json.loads(capsys.readouterr().out.splitlines()[0])
    assert [t["name"] for t in first["tensors"]] == ["inputs[0]", "inputs[1]", "targets"]


def test_a_stage_error_ends_the_trace_with_a_readable_message(fixtures):
    result = run_cli("trace", str(fixtures / "shape_mismatch.py"), "--format", "jsonl")
    assert result.returncode == 1
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert records[-1]["stage"] == "forward"
    assert records[-1]["error"]["type"] == "RuntimeError"
    assert "Traceback" not in result.stderr
    assert "stage forward failed at iteration 1" in result.stderr
    assert "hint:" in result.stderr


BAD_FILES = {
    "missing": (None, "no such file"),
    "syntax.py": ("def experiment(:\n", "syntax.py:1: SyntaxError"),
    "raises.py": (
        "def experiment():\n    raise ValueError('no data here')\n",
        "raised ValueError: no data here (raises.py:2 in experiment)",
    ),
    "wrong_type.py": ("def experiment():\n    return {'model': 1}\n", "must return a loopscope.Experiment, got dict"),
    "bad_fields.py": (
        "from loopscope import Experiment\ndef experiment():\n"
        "    return Experiment(model=1, loss_fn=None, optimizer=2, train_loader=3)\n",
        "model must be a torch.nn.Module",
    ),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_targets_are_one_line_and_exit_2(name, tmp_path, capsys):
    text, expected = BAD_FILES[name]
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    assert main(["trace", str(path)]) == 2
    err = capsys.readouterr().err
    assert expected in err
    assert err.count("\n") == 1 and err.startswith("loopscope: error: ")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["trace", "moons"], "unknown target 'moons'"),
        (["trace", "nosuchmodule:factory"], "cannot import 'nosuchmodule'"),
        (["trace", "blobs", "--device", "tpu"], "expected one of auto|cpu|cuda|cuda:N|mps"),
        (["trace", "blobs", "--iterations", "0"], "must be at least 1"),
        (["trace", "blobs", "--iterations", "many"], "expected a whole number"),
        (["trace", "blobs", "--format", "xml"], "invalid choice"),
        (["trace", "blobs", "--seed", "-3"], "must be between 0"),
        (["frobnicate"], "unknown target 'frobnicate'"),
        (["trase"], "did you mean `loopscope trace`?"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(args, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        code = main(args)
        raise SystemExit(code)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1


def test_asking_for_cuda_without_it_is_a_clear_error(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["trace", "blobs", "--device", "cuda", "-n", "1"]) == 2
    assert "CUDA is not available here" in capsys.readouterr().err


def test_scenarios_lists_the_builtins(capsys):
    assert main(["scenarios"]) == 0
    out = capsys.readouterr().out
    names = [line.split()[0] for line in out.splitlines() if not line.startswith(" ")]
    assert names == ["blobs", "spirals", "regression", "digits", "amp"]
    assert "(default)" in out.splitlines()[0]
    assert main(["scenarios", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} == {"blobs", "spirals", "regression", "digits", "amp"}
    assert all({"name", "description", "task", "bugs"} <= r.keys() for r in rows)


def test_console_script_help_and_python_m(tmp_path):
    result = run_cli("--help")
    assert result.returncode == 0 and "trace" in result.stdout and "load_batch" in result.stdout
    result = run_cli("trace", "digits", "-n", "2", "--format", "jsonl", "--seed", "4")
    assert result.returncode == 0
    assert len(result.stdout.splitlines()) == 12
    assert json.loads(result.stdout.splitlines()[0])["tensors"][0]["shape"] == [32, 1, 8, 8]


def test_the_users_prints_go_to_stderr_so_jsonl_stays_parseable(fixtures):
    result = run_cli("trace", str(fixtures / "chatty_experiment.py"), "-n", "3", "--format", "jsonl")
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in result.stdout.splitlines()]  # every line is JSON
    assert len(records) == 18 and records[0]["stage"] == "load_batch"
    assert "forward on (8, 4)" in result.stderr and "number of parameters: 10" in result.stderr


def test_check_json_stays_parseable_when_the_experiment_prints(fixtures):
    result = run_cli("check", str(fixtures / "chatty_experiment.py"), "--json")
    assert [r["id"] for r in json.loads(result.stdout)] == [
        "init_loss",
        "overfit_batch",
        "input_baseline",
        "batch_mixing",
    ]
    assert "importing the chatty experiment" in result.stderr


def test_the_seed_comes_before_the_users_file_is_imported(fixtures):
    runs = [
        run_cli("trace", str(fixtures / "chatty_experiment.py"), "-n", "2", "--format", "jsonl", "--seed", "4")
        for _ in range(2)
    ]
    losses = [[json.loads(line)["loss"] for line in run.stdout.splitlines()] for run in runs]
    assert losses[0] == losses[1]  # the projection drawn at import is the same both times


def test_a_model_unrolled_in_python_keeps_trace_lines_small(fixture_modules, capsys):
    assert main(["trace", "third_party_models:unrolled_lm", "-n", "1", "--format", "jsonl"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines and max(len(line) for line in lines) < 16_000
    forward = next(json.loads(line) for line in lines if json.loads(line)["stage"] == "forward")
    names = [t["name"] for t in forward["tensors"]]
    assert "cell[0]" in names and "cell#100[0]" in names and "cell#50[0]" not in names  # first and last call
    batch = next(json.loads(line) for line in lines if json.loads(line)["stage"] == "load_batch")
    assert len(batch["metrics"]["class_counts"]) == 12 and "others" in batch["metrics"]["class_counts"]


@pytest.mark.parametrize(
    ("factory", "said"), [("lbfgs", "LBFGS.step() needs a closure"), ("two_optimizers", "2 optimizers")]
)
def test_loops_factory_mode_cannot_step_are_one_line_pointing_to_script_mode(fixture_modules, capsys, factory, said):
    assert main(["trace", f"third_party_models:{factory}", "-n", "1"]) == 2
    err = capsys.readouterr().err
    assert said in err and "script mode" in err and "Traceback" not in err and err.count("\n") == 1


def test_a_file_without_experiment_is_run_as_a_script(tmp_path, capsys):
    path = tmp_path / "no_factory.py"
    path.write_text("x = 1\n")
    assert main(["trace", str(path)]) == 0
    err = capsys.readouterr().err
    assert "(the script finished)" in err and "the script ran no training stage" in err
