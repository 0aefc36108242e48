"""Scripted demos: every shipped demo is valid, bad files say where, and a demo plays in the app."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loopscope.cli import main
from loopscope.shared.demo import load_demo
from loopscope.shared.protocol import SessionSpec
from loopscope.ui.app import LoopscopeApp
from tests.ui.helpers import expect_text, ready, text_of, wait_until

DEMOS = sorted((Path(__file__).resolve().parents[2] / "demos").glob("*.toml"))


def test_at_least_six_valid_demos_two_with_questions(capsys):
    assert len(DEMOS) >= 6
    for path in DEMOS:
        assert main(["demo", str(path), "--check"]) == 0, path
    assert capsys.readouterr().out.count(": ok: ") == len(DEMOS)
    with_questions = [p for p in DEMOS if any(step.ask for step in load_demo(p).steps)]
    assert len(with_questions) >= 2


def test_demo_list_names_every_shipped_demo_and_a_name_or_number_plays_it(capsys):
    import tomllib

    assert main(["demo", "--list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed] == [path.stem for path in DEMOS]
    assert "Forgetting optimizer.zero_grad() (scenario blobs, 7 steps)" in listed[1]
    for name in ("02_forgetting_zero_grad", "forgetting_zero_grad", "2", "02"):
        assert main(["demo", name, "--check"]) == 0, name
    assert capsys.readouterr().out.count("'Forgetting optimizer.zero_grad()'") == 4
    assert main(["demo"]) == 2  # no demo named: the list, on stderr, says what there is
    assert "which demo?" in capsys.readouterr().err
    assert main(["demo", "forgeting", "--check"]) == 2
    assert "no demo named 'forgeting'; `loopscope demo --list` lists them" in capsys.readouterr().err
    # The wheel carries them: pyproject puts demos/ into the package (checked in an installed wheel
    # by hand: shipped_demos() finds site-packages/loopscope/demos first).
    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    assert pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["force-include"] == {"demos": "loopscope/demos"}


BAD = {
    "no title": ('scenario = "blobs"\n[[step]]\ndo = "stage"\nsay = "x"\n', ":1: the demo needs a title"),
    "bad toml": ('title = "x"\nscenario = blobs\n', ":2: not valid TOML"),
    "unknown action": (
        'title = "x"\nscenario = "blobs"\n\n[[step]]\ndo = "stage"\nsay = "a"\n\n[[step]]\ndo = "jump"\nsay = "b"\n',
        ":8: step 2: cannot do 'jump'",
    ),
    "bug not for scenario": (
        'title = "x"\nscenario = "blobs"\n[[step]]\ndo = "bug on double_softmax"\nsay = "a"\n',
        ":3: bug 'double_softmax' does not apply to scenario 'blobs'",
    ),
    "answer not an option": (
        'title = "x"\nscenario = "blobs"\n[[step]]\ndo = "stage"\nsay = "a"\nask = "?"\n'
        'options = ["a", "b"]\nanswer = "c"\n',
        "answer must be one of the options",
    ),
    "typo in a key": ('title = "x"\nscenario = "blobs"\n[[step]]\ndo = "stage"\nsya = "a"\n', "unknown key(s) sya"),
    "run out of range": (
        'title = "x"\nscenario = "blobs"\n[[step]]\ndo = "run 0"\nsay = "a"\n',
        "`run N` needs N between 1",
    ),
    "no steps": ('title = "x"\nscenario = "blobs"\n', "needs at least one [[step]]"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_demo_files_name_the_line_and_exit_2(case, tmp_path, capsys):
    text, expected = BAD[case]
    path = tmp_path / "demo.toml"
    path.write_text(text)
    assert main(["demo", str(path), "--check"]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=string.printable, max_size=300))
def test_any_demo_text_gets_a_clear_answer(text, tmp_path, capsys):
    path = tmp_path / "fuzz.toml"
    path.write_text(text)
    try:
        code = main(["demo", str(path), "--check"])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code in (0, 2) and "Traceback" not in err


async def test_a_demo_plays_predicts_reveals_goes_back_and_lets_you_explore():
    demo = load_demo(DEMOS[1])  # forgetting zero_grad
    app = LoopscopeApp(SessionSpec(demo.target, "cpu", demo.seed, demo.bugs, demo.twin), in_process=True, demo=demo)
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot)
        await expect_text(pilot, "#narration", demo.title)
        await pilot.press("right")
        await wait_until(pilot, lambda: app.model.state.completed_iterations == 30)
        await expect_text(pilot, "#narration", "Step 1/7")
        await pilot.press("right", "right")
        await wait_until(pilot, lambda: "skip_zero_grad" in app.model.state.active_bugs and app.model.state.twin)
        await pilot.press("right")  # the question comes first; nothing runs yet
        await pilot.pause(0.2)
        await expect_text(pilot, "#narration", "Predict:")
        assert app.model.state.completed_iterations == 30
        await pilot.press("1")  # the room says "larger"
        await pilot.press("space")  # now it runs
        await wait_until(pilot, lambda: app.model.state.completed_iterations == 31)
        shown = text_of(app, "#narration")
        assert "Answer: larger (the room got it)" in shown and "What the loop did: gradient norm" in shown
        await pilot.press("left")
        await expect_text(pilot, "#narration", "Step 3/7")
        await pilot.press("escape")  # leave the script: space steps a stage again
        await expect_text(pilot, "#narration", "exploring freely")
        await pilot.press("space")
        await wait_until(pilot, lambda: app.model.state.iteration == 32)
        await pilot.press("escape")
        await expect_text(pilot, "#narration", "Step 3/7")
