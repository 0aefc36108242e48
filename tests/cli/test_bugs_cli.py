"""`loopscope bugs`, `check`, `--bug` and `--twin` as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from loopscope.cli import main
from loopscope.shared.bugs import BUGS


def test_bugs_lists_the_catalog_and_explains_one(capsys):
    assert main(["bugs"]) == 0
    out = capsys.readouterr().out
    assert all(bug.id in out for bug in BUGS)
    assert main(["bugs", "skip_zero_grad"]) == 0
    out = capsys.readouterr().out
    assert "- optimizer.zero_grad()" in out and "What you will see:" in out and "Fix:" in out


def test_bugs_json_has_the_design_fields(capsys):
    assert main(["bugs", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == len(BUGS)
    assert all({"id", "title", "stage", "symptom", "why", "fix"} <= row.keys() for row in rows)


def test_scenarios_say_which_bugs_apply(capsys):
    assert main(["scenarios", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert "double_softmax" in rows["digits"]["bugs"] and "double_softmax" not in rows["blobs"]["bugs"]
    assert "target_shape_broadcast" in rows["regression"]["bugs"]


def test_trace_with_a_bug_records_it_and_its_findings(capsys):
    assert main(["trace", "blobs", "--bug", "skip_zero_grad", "-n", "3", "--format", "jsonl"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert all(r["bugs"] == ["skip_zero_grad"] for r in records)
    findings = [d for r in records for d in r["diagnostics"]]
    assert any(d["id"] == "stale_gradients" and "skip_zero_grad" in d["suspects"] for d in findings)
    assert all({"id", "severity", "message", "suspects"} <= d.keys() for d in findings)


def test_trace_twin_writes_the_clean_twins_loss(capsys):
    assert main(["trace", "spirals", "--bug", "lr_too_high", "--twin", "-n", "4", "--format", "jsonl"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    losses = [r for r in records if r["stage"] == "loss"]
    assert all(r["twin_loss"] is not None for r in losses)
    assert losses[-1]["twin_loss"] != losses[-1]["loss"]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["trace", "blobs", "--bug", "skip_zerograd"], "did you mean skip_zero_grad?"),
        (["trace", "blobs", "--bug", "double_softmax"], "does not apply to this experiment"),
        (["bugs", "nope"], "unknown bug 'nope'"),
        (["check", "blobs", "--bug", "nope"], "unknown bug"),
    ],
)
def test_bad_bug_ids_are_one_line_and_exit_2(args, expected, capsys):
    try:
        code = main(args)
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1


def test_check_exit_codes(capsys):
    assert main(["check", "regression"]) == 0
    out = capsys.readouterr().out
    assert out.count("PASS") == 4 and "What these checks do not test" in out
    assert main(["check", "blobs", "--bug", "view_instead_of_permute", "--json"]) == 1
    rows = {r["id"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["batch_mixing"]["passed"] is False and "9 other input row(s)" in rows["batch_mixing"]["message"]


def test_bugs_for_a_target_says_which_apply_and_what_the_others_need(fixtures, capsys):
    assert main(["bugs", "--for", str(fixtures / "adamw_groups_experiment.py")]) == 0
    out = capsys.readouterr().out
    assert "bugs apply to" in out and "  skip_zero_grad\n" in out
    assert "dropout_too_high" in out and "needs dropout" in out  # the model has no dropout
    assert main(["bugs", "--for", "spirals", "--json"]) == 0
    rows = {row["id"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["double_softmax"]["applies"] and rows["target_shape_broadcast"]["missing"]
    assert main(["bugs", "--for", "nosuch.py"]) == 2


@pytest.mark.parametrize(("argv", "meant"), [(["bug", "skip_zero_grad"], "bugs"), (["trac", "blobs"], "trace")])
def test_a_misspelt_command_is_named_with_the_one_meant(capsys, argv, meant):
    from loopscope.cli.main import main

    with pytest.raises(SystemExit) as ended:
        main(argv)
    assert ended.value.code == 2
    assert f"unknown command {argv[0]!r}; did you mean `loopscope {meant}`?" in capsys.readouterr().err


def test_run_and_demo_take_a_folder_for_screenshots():
    from loopscope.cli.main import build_parser

    parser = build_parser()
    assert parser.parse_args(["run", "blobs"]).svg_dir == "loopscope-shots"
    assert parser.parse_args(["run", "blobs", "--svg-dir", "/tmp/shots"]).svg_dir == "/tmp/shots"
    assert parser.parse_args(["demo", "demos/01.toml", "--svg-dir", "slides"]).svg_dir == "slides"


def test_check_prints_each_result_as_its_check_ends():
    """`loopscope check` in a real process: the first result is on the terminal while the other
    checks still run (before, all four came at once after up to a minute of blank screen)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "loopscope", "check", "spirals"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first = process.stdout.readline()
        still_running = process.poll() is None
        rest, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert first.startswith("PASS  loss at initialisation")
    assert still_running, "the first line came only when every check was done"
    assert rest.count("PASS") == 3 and "running 4 sanity checks on copies of the model..." in err


def test_a_distributed_bug_names_the_scenarios_it_applies_to_under_nproc(capsys):
    assert main(["bugs", "accumulation_without_no_sync"]) == 0
    out = capsys.readouterr().out
    # Only the scenario that accumulates gradients, and only as several processes.
    assert out.rstrip().endswith("built-in scenarios: amp (--nproc 2)")
    assert "several processes" in out
