"""Fuzzing the command line and experiment files: always one clear line, never a traceback."""

from __future__ import annotations

import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loopscope.cli import main

TOKENS = [
    "blobs",
    "spirals",
    "nosuch",
    "nosuch.py",
    "x:y",
    ":",
    "pkg.mod:",
    "-",
    "--",
    "--bug",
    "skip_zero_grad",
    "double_softmax",
    "zero_init",
    "bogus_bug",
    "--device",
    "cpu",
    "cuda",
    "cuda:7",
    "mps",
    "tpu",
    "--seed",
    "-1",
    "0",
    "7",
    "99999999999999999999999",
    "abc",
    "--format",
    "jsonl",
    "table",
    "xml",
    "-n",
    "--json",
    "--twin",
    "--fast",
    "-o",
    "/nonexistent/dir/out.jsonl",
    "",
    " ",
    "ü",
    "--help-me",
]


def run(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own exits (--help) and ours
        code = exc.code
    return code, capsys.readouterr().err


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(command=st.sampled_from(["trace", "scenarios", "bugs"]), rest=st.lists(st.sampled_from(TOKENS), max_size=6))
def test_any_argument_soup_gets_a_clear_answer(command, rest, capsys, tmp_path, monkeypatch):
    # `-o` followed by any token writes a file of that name: keep those out of the checkout.
    monkeypatch.chdir(tmp_path)
    # The trailing -n 1 keeps any valid trace short (argparse keeps the last value).
    argv = [command, *rest] + (["-n", "1"] if command == "trace" else [])
    code, err = run(argv, capsys)
    assert code in (0, 1, 2)
    assert "Traceback" not in err
    if code == 2:
        assert len(err.strip().splitlines()) == 1 and "error" in err


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=string.printable, max_size=200))
def test_any_experiment_file_gets_a_clear_answer(text, tmp_path, capsys):
    path = tmp_path / "user_experiment.py"
    path.write_text(text)
    code, err = run(["trace", str(path), "-n", "1"], capsys)
    assert code in (0, 1, 2) and "Traceback" not in err
    if code == 2:
        assert len(err.strip().splitlines()) == 1


BROKEN_FILES = {
    "needs_arguments.py": ("def experiment(a, b):\n    pass\n", "missing 2 required positional arguments"),
    "not_callable.py": ("experiment = 5\n", "experiment must be a function"),
    "negative_epochs.py": (
        "import torch\nfrom loopscope import Experiment\n"
        "def experiment():\n    m = torch.nn.Linear(2, 1)\n"
        "    return Experiment(model=m, loss_fn=torch.nn.MSELoss(), optimizer=torch.optim.SGD(m.parameters(), 0.1),"
        " train_loader=[], epochs=-3)\n",
        "epochs must be a whole number >= 1",
    ),
    "returns_none.py": ("def experiment():\n    return None\n", "got NoneType"),
}


def test_broken_experiment_files_each_get_one_line(tmp_path, capsys):
    for name, (text, expected) in BROKEN_FILES.items():
        path = tmp_path / name
        path.write_text(text)
        code, err = run(["trace", str(path)], capsys)
        assert code == 2, name
        assert expected in err and len(err.strip().splitlines()) == 1, (name, err)
    # Without experiment() a file is a script, run as written: its error shows where it happened.
    for name, text, expected in (
        ("import_error.py", "import no_such_package_here\n", "No module named 'no_such_package_here'"),
        ("raises_at_import.py", "raise RuntimeError('boom')\n", "RuntimeError: boom (raises_at_import.py:1"),
    ):
        path = tmp_path / name
        path.write_text(text)
        code, err = run(["trace", str(path)], capsys)
        assert code == 1 and expected in err, (name, err)
        assert "data loader" not in err  # no stage's hint: the error is the script's own code
    code, err = run(["trace", str(tmp_path)], capsys)  # a folder, not a file
    assert code == 2 and "error" in err
