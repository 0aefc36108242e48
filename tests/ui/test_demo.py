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
    "a claim that does not parse": (
        'title = "x"\nscenario = "blobs"\n[[step]]\ndo = "run 5"\nsay = "a"\nexpect = "loss wanders"\n',
        ':3: step 1: expect = "QUANTITY rises|falls|stays"',
    ),
    "a claim on a step that does not train": (
        'title = "x"\nscenario = "blobs"\n[[step]]\ndo = "twin on"\nsay = "a"\nexpect = "loss falls"\n',
        "only a step that trains (stage, iteration, epoch, run) can expect a change",
    ),
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


# Demo 02's steps, with a first run short enough to play at 5 iterations a second.
ZERO_GRAD_DEMO = DEMOS[1].read_text().replace('do = "run 200"', 'do = "run 20"')


async def test_a_demo_plays_predicts_reveals_goes_back_and_lets_you_explore(tmp_path):
    (tmp_path / "demo.toml").write_text(ZERO_GRAD_DEMO)
    demo = load_demo(tmp_path / "demo.toml")
    spec = SessionSpec(demo.target, "cpu", demo.seed, demo.bugs, demo.twin, speed=5.0)
    app = LoopscopeApp(spec, in_process=True, demo=demo)
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot)
        await expect_text(pilot, "#narration", demo.title)
        assert app.query_one("#plot").size.height >= 8  # the narration does not squeeze the loss plot
        await pilot.press("right")  # step 1: run 20, 4 s at this speed
        await wait_until(pilot, lambda: app.model.state.running)
        await expect_text(pilot, "#narration", "running...")
        await pilot.press("right", "right")  # too early: the step runs to its end first
        await pilot.pause(0.2)
        assert "Step 1/7" in text_of(app, "#narration") and not app.model.state.active_bugs
        await wait_until(pilot, lambda: "What the loop did" in text_of(app, "#narration"))
        assert app.model.state.completed_iterations == 20
        first_reveal = text_of(app, "#narration")
        assert "loss, mean of its first 10 iterations against its last 10:" in first_reveal
        for _ in range(2):  # twin on, bug on: each waits for the one before
            await pilot.press("right")
            await pilot.pause(0.3)
        await wait_until(pilot, lambda: "skip_zero_grad" in app.model.state.active_bugs and app.model.state.twin)
        await pilot.press("right")  # the question comes first; nothing runs yet
        await pilot.pause(0.2)
        await expect_text(pilot, "#narration", "Predict:")
        await expect_text(pilot, "#narration", "keys 1-3")  # as many keys as options
        assert app.model.state.completed_iterations == 20
        await pilot.press("1")  # the room says "larger"
        await pilot.press("space")  # now it runs
        await wait_until(pilot, lambda: "Answer:" in text_of(app, "#narration"))
        assert app.model.state.completed_iterations == 21
        shown = text_of(app, "#narration")
        assert "Answer: larger (the room got it)" in shown
        assert "What the loop did: gradient norm, this iteration:" in shown
        assert "the Diagnostics panel named stale_gradients" in shown, shown
        await pilot.press("left", "left", "left")
        await expect_text(pilot, "#narration", "Step 1/7")
        assert text_of(app, "#narration") == first_reveal  # recorded, not recomputed from the loop now
        await pilot.press("right", "right")
        await expect_text(pilot, "#narration", "Step 3/7")
        await pilot.press("escape")  # leave the script: space steps a stage again
        await expect_text(pilot, "#narration", "exploring freely")
        await pilot.press("space")
        await wait_until(pilot, lambda: app.model.state.iteration == 22)
        await pilot.press("escape")
        await expect_text(pilot, "#narration", "Step 3/7")


@pytest.mark.parametrize("path", DEMOS, ids=lambda path: path.stem)
def test_every_shipped_demo_says_only_what_its_loop_does_on_seeds_0_1_2(path, capsys):
    """`loopscope demo NAME --verify`: every claim a step makes (`expect = ...`) holds, over its
    window, on each seed; the report shows the numbers the narration will show."""
    assert main(["demo", path.stem, "--verify", "--device", "cpu"]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert out.rstrip().endswith("every claim held")
    claims = sum(len(step.expect) for step in load_demo(path).steps)
    assert claims >= 1 and out.count(" ok\n") == 3 * sum(1 for step in load_demo(path).steps if step.expect)


def test_a_claim_the_loop_contradicts_fails_verify_with_the_step_and_the_numbers(tmp_path, capsys):
    (tmp_path / "wrong.toml").write_text(
        'title = "A healthy loop, narrated wrong"\nscenario = "blobs"\n\n'
        '[[step]]\ndo = "run 200"\nsay = "The loss wanders off."\nexpect = "loss rises"\n\n'
        '[[step]]\ndo = "run 10"\nsay = "And stays low."\nexpect = "loss below 100"\n'
    )
    assert main(["demo", str(tmp_path / "wrong.toml"), "--verify", "--seed", "3", "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "seeds 3\nseed 3:" in out  # --seed plays the demo on that seed (in the app, too)
    failing = next(line for line in out.splitlines() if "FAILS" in line)
    assert failing.startswith("  step 1 (run 200) claims loss rises: loss, mean of its first 20 iterations against")
    assert "FAILS: loss rises (it falls)" in failing and " -> " in failing
    assert "step 2 (run 10) claims loss below 100:" in out and out.rstrip().endswith("1 claim(s) did not hold")


async def test_a_restarted_engine_never_leaves_the_script_waiting_for_its_step(tmp_path):
    (tmp_path / "demo.toml").write_text(ZERO_GRAD_DEMO)
    demo = load_demo(tmp_path / "demo.toml")
    app = LoopscopeApp(SessionSpec(demo.target, "cpu", demo.seed, speed=5.0), in_process=True, demo=demo)
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot)
        await pilot.press("right")  # step 1 runs (4 s at this speed)...
        await wait_until(pilot, lambda: app.model.state.running)
        await pilot.press("ctrl+r")  # ...and the engine is restarted under it
        await wait_until(pilot, lambda: app.model.info is not None and app.demo.busy is None)
        await pilot.press("right")  # the script goes on
        await expect_text(pilot, "#narration", "Step 2/7")
