"""The app, driven for real with Pilot: every key, what the widgets show, errors and crashes."""

from __future__ import annotations

import html
import itertools
import re
import time

import pytest

from loopscope.shared.protocol import Checks
from loopscope.ui.app import EngineMessage
from loopscope.ui.help import HelpScreen
from loopscope.ui.model import EpochRow, observe
from tests.conftest import FIXTURES
from tests.ui.helpers import expect_text, make_app, press_and_wait, ready, text_of, wait_until

SIZE = (120, 40)


def state(app):
    return app.model.state


def screen_text(app) -> str:
    """The whole screen as the compositor draws it (the text of an SVG screenshot)."""
    fragments = re.findall(r"<text[^>]*>(.*?)</text>", app.export_screenshot(), re.S)
    return html.unescape("".join(fragments)).replace("\xa0", " ")


async def test_first_frame_appears_before_the_engine_is_ready(fixture_modules):
    import gated_experiment  # the engine thread imports this same module: the events are shared

    app = make_app("gated_experiment:experiment")
    async with app.run_test(size=SIZE) as pilot:
        try:
            # The engine is held inside the experiment's factory, so it cannot be ready yet:
            # whatever the screen shows now was drawn before the engine was ready.
            await wait_until(pilot, gated_experiment.entered.is_set)
            assert app.model.info is None
            screen = screen_text(app)
            assert "starting the engine (loading torch)..." in screen and "Loop code" in screen, screen
        finally:
            gated_experiment.release.set()
        await ready(pilot)
        await expect_text(pilot, "#pipeline", "epoch 1  iter 0")
        assert "starting the engine" not in screen_text(app)


async def test_space_n_and_e_step_a_stage_an_iteration_and_an_epoch():
    app = make_app("spirals")
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await press_and_wait(pilot, "space", lambda: state(app).iteration == 1)
        await expect_text(pilot, "#pipeline", "[load_batch]")
        assert "inputs" in str(app.query_one("#tensors").get_row_at(0)[0])
        await press_and_wait(pilot, "n", lambda: state(app).completed_iterations == 1)
        await expect_text(pilot, "#pipeline", "[step]")
        await expect_text(pilot, "#pipeline", "iter 1")
        await expect_text(pilot, "#gradients", "0.weight")
        await expect_text(pilot, "#gradients", "upd/w")
        await press_and_wait(pilot, "e", lambda: state(app).epoch == 2)
        header, *epochs = text_of(app, "#epochs").splitlines()
        assert header.split()[:3] == ["epoch", "train", "loss"]
        assert len(epochs) == app.model.info.epochs  # every planned epoch has its line from the start
        assert "%" in epochs[0] and "first epoch" in epochs[0]  # the epoch just run: val accuracy and a note
        assert epochs[1].strip() == "2"  # the next one is still blank
        await expect_text(pilot, "#code", "> ")  # the line of the stage just run is marked


async def test_r_runs_and_pauses_and_plus_minus_change_speed():
    app = make_app("blobs")
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("minus")
        await expect_text(pilot, "#status", "speed 100 it/s")
        await press_and_wait(pilot, "r", lambda: state(app).running and state(app).completed_iterations > 20)
        await expect_text(pilot, "#pipeline", "running")
        await press_and_wait(pilot, "r", lambda: not state(app).running)
        stopped_at = state(app).completed_iterations
        assert stopped_at < 400
        await pilot.pause(0.3)
        assert state(app).completed_iterations == stopped_at
        await pilot.press("plus")
        await expect_text(pilot, "#status", "speed max")
        await press_and_wait(pilot, "r", lambda: state(app).finished)  # max speed: to the end
        await expect_text(pilot, "#status", "done: finished 5 epochs")
        assert all("loss" in line for line in text_of(app, "#epochs").splitlines()[2:])  # epochs 2-5 observed
        await pilot.press("n")
        await expect_text(pilot, "#status", "the run is over")


async def test_t_twin_c_checks_l_log_and_help():
    app = make_app("spirals", bugs=("lr_too_high",))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await press_and_wait(pilot, "t", lambda: state(app).twin)
        await expect_text(pilot, "#status", "twin on")
        await press_and_wait(pilot, "n", lambda: state(app).completed_iterations == 1)
        assert app.model.last_by_stage["loss"].twin_loss is not None
        await press_and_wait(pilot, "c", lambda: app.model.checks is not None)
        await expect_text(pilot, "#diagnostics", "Sanity checks")
        await expect_text(pilot, "#status", "sanity checks done")  # not "running the sanity checks..." on
        await pilot.press("l")
        await expect_text(pilot, "#status", "loss axis log10")
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)


async def test_checks_show_each_result_as_it_ends_and_say_what_they_cannot_see():
    from loopscope.shared.protocol import RunIterations

    app = make_app("blobs", bugs=("skip_zero_grad",))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        app.send(RunIterations(100))
        await wait_until(pilot, lambda: state(app).completed_iterations == 100 and not state(app).running)
        seen = []
        apply = app.model.apply

        def recording(message):
            apply(message)
            if isinstance(message, Checks):
                seen.append((len(message.results), message.done, app.model.notice))

        app.model.apply = recording
        await press_and_wait(pilot, "c", lambda: seen and seen[-1][1])
        assert [(n, done) for n, done, _ in seen] == [(1, False), (2, False), (3, False), (4, True)]
        assert seen[0][2] == "sanity checks: 1 of 4 done..."
        await expect_text(pilot, "#diagnostics", "Every check passed with skip_zero_grad on: that bug is out of their")
        await expect_text(pilot, "#diagnostics", "What these checks do not test")


async def test_bugs_toggle_from_the_list_and_show_as_a_diff():
    app = make_app("blobs")
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await wait_until(pilot, lambda: app.query_one("#bug-list").option_count > 0)
        bug_list = app.query_one("#bug-list")
        bug_list.focus()
        bug_list.highlighted = 0  # skip_zero_grad
        await pilot.pause(0.1)
        await expect_text(pilot, "#bug-info", "zero_grad() is never called")
        await press_and_wait(pilot, "enter", lambda: "skip_zero_grad" in state(app).active_bugs)
        await expect_text(pilot, "#code", "- ")
        await expect_text(pilot, "#pipeline", "1 bug on")
        await press_and_wait(pilot, "n", lambda: state(app).completed_iterations == 1)
        await press_and_wait(pilot, "n", lambda: any(f.id == "stale_gradients" for _, f in app.model.findings))
        await expect_text(pilot, "#diagnostics", "skip_zero_grad")
        await press_and_wait(pilot, "enter", lambda: state(app).active_bugs == ())


async def test_an_error_in_the_users_model_is_shown_and_the_app_keeps_running():
    app = make_app(str(FIXTURES / "shape_mismatch.py"))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await press_and_wait(pilot, "n", lambda: state(app).halted is not None)
        shown = text_of(app, "#diagnostics")
        assert "ERROR in iteration 1, stage forward: RuntimeError" in shown and "10 features but expects 7" in shown
        await expect_text(pilot, "#pipeline", "error")
        await press_and_wait(pilot, "n", lambda: state(app).iteration == 2)  # steps on to the next iteration
        await expect_text(pilot, "#diagnostics", "ERROR in iteration 2")
        assert app.is_running


async def test_q_quits():
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("q")
        await pilot.pause(0.2)
        assert not app.is_running


async def test_an_engine_process_that_dies_is_explained_and_can_be_restarted():
    app = make_app(str(FIXTURES / "crashing_experiment.py"), in_process=False)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await press_and_wait(pilot, "n", lambda: state(app).completed_iterations == 1)
        await press_and_wait(pilot, "n", lambda: app.model.failure is not None)
        await expect_text(pilot, "#diagnostics", "ENGINE STOPPED")
        await expect_text(pilot, "#diagnostics", "exit code 3")
        await pilot.press("ctrl+r")
        await ready(pilot)
        assert app.model.failure is None and state(app).iteration == 0


async def test_narrow_terminal_uses_one_scrolling_column():
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot)
        assert app.screen.has_class("-narrow")
        code, tensors = app.query_one("#code-box"), app.query_one("#tensors-box")
        assert code.region.x == tensors.region.x  # stacked, not side by side
        assert not code.region.overlaps(tensors.region)


async def test_a_hung_dataset_is_reported_and_ctrl_r_restarts_the_engine():
    app = make_app(str(FIXTURES / "hanging_experiment.py"), in_process=False)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await press_and_wait(pilot, "n", lambda: state(app).completed_iterations == 1)
        await press_and_wait(pilot, "n", lambda: state(app).completed_iterations == 2)
        await pilot.press("n")  # the third example never arrives
        await wait_until(pilot, lambda: "has not answered" in text_of(app, "#status"), timeout=20)
        await pilot.press("question_mark")  # the app itself stays responsive
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        await pilot.press("ctrl+r")
        await ready(pilot)
        assert state(app).iteration == 0
        await wait_until(pilot, lambda: "has not answered" not in text_of(app, "#status"))


async def test_a_click_switches_a_bug():
    app = make_app("blobs")
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await wait_until(pilot, lambda: app.query_one("#bug-list").option_count > 0)
        bug_list = app.query_one("#bug-list")
        await pilot.click("#bug-list", offset=(4, 0))  # the first row: skip_zero_grad
        await wait_until(pilot, lambda: "skip_zero_grad" in state(app).active_bugs)
        assert bug_list.selected == ["skip_zero_grad"]


async def test_p_switches_the_plot_to_a_picture_of_the_model_with_its_legend():
    app = make_app("spirals")
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("n", "n")
        await wait_until(pilot, lambda: state(app).completed_iterations == 2)
        await pilot.press("p")  # paused: the picture comes at once, not after the next batch
        await wait_until(pilot, lambda: app.model.picture is not None)
        await pilot.pause(0.2)
        assert app.query_one("#picture").display and not app.query_one("#plot").display
        assert app.model.picture.kind == "boundary"
        assert app.query_one("#plot-box").border_title == "Picture: decision boundary at iteration 2 (p: loss)"
        # The legend fits the half-screen panel (plotext drops a title wider than the plot).
        assert "dots: the model's class  O: examples" in screen_text(app)
        await pilot.press("p")
        assert app.query_one("#plot").display


async def test_a_model_without_a_picture_says_why_in_the_panel():
    app = make_app("blobs")  # 10 features: no plane to draw
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("p")
        await expect_text(pilot, "#picture-note", "appears after the next batch")
        await pilot.press("n")
        await expect_text(pilot, "#picture-note", "No picture for this model: its inputs have shape [10, 10].")
        assert not app.query_one("#picture").display


async def test_the_loss_plot_draws_train_and_validation_on_every_row_it_has():
    app = make_app("spirals")
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await press_and_wait(pilot, "e", lambda: app.model.val_loss.total_points >= 1)
        await pilot.pause(0.3)
        plot = app.query_one("#plot")
        drawn = plot.render()  # the plot as the screen gets it: text with colour spans
        rows = [line for line in drawn.plain.splitlines() if "┤" in line]
        assert len(rows) >= 6, drawn.plain  # no title row taken from the lines: the border names the plot
        assert app.query_one("#plot-box").border_title == "Loss (p: picture)"
        colours = {str(span.style.color.name) for span in drawn.spans if getattr(span.style, "color", None)}
        assert len({c for c in colours if c.startswith("color(")}) >= 2, colours  # train, val: a colour each
        assert "•" in drawn.plain  # the validation point, marked: one point is no line


async def test_s_saves_the_screen_as_svg_in_its_own_folder_and_says_where(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    app = make_app("blobs")
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("s")
        await wait_until(pilot, lambda: list(tmp_path.glob("loopscope-shots/loopscope-*.svg")))
        saved = list(tmp_path.glob("loopscope-shots/loopscope-*.svg"))
        assert len(saved) == 1 and "<svg" in saved[0].read_text()[:500]
        assert not list(tmp_path.glob("*.svg"))  # nothing lands in the folder the app was started from
        assert app.model.notice == f"saved {saved[0]}"  # the absolute path, to find it from anywhere


async def test_s_into_a_folder_that_cannot_be_made_says_so_and_the_app_goes_on(tmp_path):
    from loopscope.shared.protocol import SessionSpec
    from loopscope.ui.app import LoopscopeApp

    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    app = LoopscopeApp(SessionSpec("blobs", "cpu"), in_process=True, svg_dir=str(blocked / "shots"))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await press_and_wait(pilot, "s", lambda: "could not save the screen" in (app.model.notice or ""))
        await press_and_wait(pilot, "space", lambda: state(app).iteration == 1)


async def test_b_steps_back_and_the_replay_shows_the_same_values():
    app = make_app("spirals")
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        losses = {}
        for n in range(1, 6):
            await press_and_wait(pilot, "n", lambda n=n: state(app).completed_iterations == n)
            losses[n] = app.model.last_by_stage["loss"].loss
        await press_and_wait(pilot, "b", lambda: state(app).completed_iterations == 4)
        await press_and_wait(pilot, "b", lambda: state(app).completed_iterations == 3)
        await expect_text(pilot, "#status", "stepped back to the end of iteration 3")
        for n in (4, 5):
            await press_and_wait(pilot, "n", lambda n=n: state(app).completed_iterations == n)
            assert app.model.last_by_stage["loss"].loss == losses[n]  # bitwise the same
        assert app.model.loss.total_points == 5  # the plot forgot the undone iterations


async def test_after_b_the_panels_show_the_iteration_it_is_back_at():
    app = make_app("spirals")
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        gradients = {}
        for n in range(1, 4):
            await press_and_wait(pilot, "n", lambda n=n: state(app).completed_iterations == n)
            await expect_text(pilot, "#gradients", f"iteration {n}, global grad norm")
            gradients[n] = text_of(app, "#gradients")
        await press_and_wait(pilot, "b", lambda: state(app).completed_iterations == 2)
        await expect_text(pilot, "#gradients", "iteration 2, global grad norm")
        assert text_of(app, "#gradients") == gradients[2]  # not "gradients appear after backward"
        assert app.model.last_by_stage["loss"].iteration == 2


async def test_the_epochs_observation_fits_the_table_at_120_columns():
    app = make_app("spirals")
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        for epoch in (2, 3, 4):
            await press_and_wait(pilot, "e", lambda epoch=epoch: state(app).epoch == epoch)
        table = app.query_one("#epochs")
        await wait_until(pilot, lambda: "%" in text_of(app, "#epochs").splitlines()[3])
        rows = text_of(app, "#epochs").splitlines()[2:4]  # epochs 2 and 3: compared with the one before
        visible = table.scrollable_content_region.width
        for row in rows:
            assert ("loss ↓" in row or "loss ↑" in row or "overfitting?" in row) and len(row.rstrip()) <= visible


async def test_slow_sanity_checks_still_end_with_their_done_notice():
    app = make_app(str(FIXTURES / "slow_experiment.py"), in_process=False)  # checks take seconds
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("c")
        await expect_text(pilot, "#status", "running the sanity checks on a copy of the model")
        await wait_until(pilot, lambda: app.model.checks is not None and app.model.checks_running is None)
        await expect_text(pilot, "#status", "sanity checks done")
        # The answer can land just as the wait's count is due to go up (7 s, last shown 6): the
        # redraw it causes must not count the wait again ("the engine has not answered for 7 s").
        app.model.notice = "running the sanity checks on a copy of the model... 6 s"
        app._awaiting_since, app._busy_shown, app._checks_pending = time.monotonic() - 7.05, 6, True
        app._engine_message(EngineMessage(Checks(app.model.checks)))  # at once: no frame tick between
        await expect_text(pilot, "#status", "sanity checks done")


async def test_b_takes_the_undone_iterations_out_of_the_epochs_mean_and_keeps_the_rest():
    app = make_app("spirals")  # 23 iterations an epoch, validated at its end
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await press_and_wait(pilot, "e", lambda: state(app).epoch == 2)
        first_epoch = (app.model.epochs[1].train_loss, app.model.epochs[1].val_loss)
        means = {}
        for n in range(24, 29):
            await press_and_wait(pilot, "n", lambda n=n: state(app).completed_iterations == n)
            means[n] = app.model.epochs[2].train_loss
        for n in (27, 26):
            await press_and_wait(pilot, "b", lambda n=n: state(app).completed_iterations == n)
        assert app.model.epochs[2].train_loss == pytest.approx(means[26], rel=1e-9)  # not the whole row gone
        assert (app.model.epochs[1].train_loss, app.model.epochs[1].val_loss) == first_epoch
        for n in (27, 28):
            await press_and_wait(pilot, "n", lambda n=n: state(app).completed_iterations == n)
        assert app.model.epochs[2].train_loss == pytest.approx(means[28], rel=1e-9)
        for n in range(27, 21, -1):  # back into the first epoch, before its validation
            await press_and_wait(pilot, "b", lambda n=n: state(app).completed_iterations == n)
        assert 2 not in app.model.epochs and app.model.epochs[1].val_loss is None
        await press_and_wait(pilot, "e", lambda: state(app).epoch == 2)
        assert (app.model.epochs[1].train_loss, app.model.epochs[1].val_loss) == pytest.approx(first_epoch)
        assert app.model.val_loss.total_points == 1  # validated again, not twice


def test_epoch_observations_compare_with_the_epoch_before():
    before = EpochRow(1, loss_sum=2.0, loss_count=2, val_accuracy=0.9, val_loss=0.5)
    assert observe(before, EpochRow(2, loss_sum=1.0, loss_count=2, val_accuracy=0.9, val_loss=0.4)) == "loss ↓  acc ="
    assert observe(before, EpochRow(2, loss_sum=3.0, loss_count=2, val_accuracy=0.8, val_loss=0.6)) == "loss ↑  acc ↓"
    assert observe(before, EpochRow(2, loss_sum=1.0, loss_count=2, val_accuracy=0.95, val_loss=0.7)) == "overfitting?"
    assert observe(None, before) == "first epoch"


async def test_running_on_after_b_clears_its_notice():
    app = make_app("spirals")
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await press_and_wait(pilot, "n", lambda: state(app).completed_iterations == 1)
        await press_and_wait(pilot, "b", lambda: state(app).completed_iterations == 0)
        await expect_text(pilot, "#status", "stepped back to the end of iteration 0")
        await press_and_wait(pilot, "r", lambda: state(app).completed_iterations > 5)
        await wait_until(pilot, lambda: "stepped back" not in text_of(app, "#status"))  # it spoke of before the run


async def test_b_beyond_the_kept_history_says_so():
    from loopscope.shared.protocol import SessionSpec
    from loopscope.ui.app import LoopscopeApp

    app = LoopscopeApp(SessionSpec("blobs", "cpu", history=1), in_process=True)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await press_and_wait(pilot, "n", lambda: state(app).completed_iterations == 1)
        await press_and_wait(pilot, "n", lambda: state(app).completed_iterations == 2)
        await press_and_wait(pilot, "b", lambda: state(app).completed_iterations == 1)
        await press_and_wait(pilot, "b", lambda: "cannot step back further" in text_of(app, "#status"))
        assert state(app).completed_iterations == 1


async def test_a_frame_tick_while_the_app_shuts_down_draws_nothing():
    # The frame clock can tick after quitting has removed the panels; that tick used to raise
    # NoMatches, which Textual prints as a traceback over the terminal on the way out.
    app = make_app("blobs")
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await press_and_wait(pilot, "n", lambda: state(app).completed_iterations == 1)
        app.model.version += 1
        app.redraw()
        assert app._drawn_version == app.model.version  # while the app is up, something new is drawn at once
    assert not app.is_running and not app.query("#pipeline")  # shut down: the panels are gone
    app.model.version += 1  # something new to draw
    app.redraw()
    app.redraw(force=True)
    assert app._drawn_version == app.model.version - 1  # the ticks drew nothing (and raised nothing)


async def test_a_gradient_that_is_zero_but_for_round_off_shows_as_zero():
    # digits: each conv's bias feeds a BatchNorm, which subtracts it again: its gradient is zero in
    # exact arithmetic and ~1e-8 in float32, with digits that differ from one CPU to the next.
    app = make_app("digits")
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await press_and_wait(pilot, "n", lambda: state(app).completed_iterations == 1)
        await expect_text(pilot, "#gradients", "global grad norm")
        lines = {line.split()[0]: line for line in text_of(app, "#gradients").splitlines()[1:] if line.strip()}
        assert lines["0.bias"].split()[1] == "~0" and "#" not in lines["0.bias"]
        assert "#" in lines["0.weight"] and "#" in lines["4.weight"]  # real gradients keep their bars


async def test_a_long_pipeline_folds_the_other_group_instead_of_wrapping():
    # spirals: seven stages an iteration (clip_grad too) and four at the epoch's end.
    app = make_app("spirals")
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await press_and_wait(pilot, "n", lambda: state(app).completed_iterations == 1)
        await expect_text(pilot, "#pipeline", "clip_grad>[step] | epoch end: 4 stages")
        await wait_until(pilot, lambda: app.query_one("#pipeline").size.height == 1)  # one line on screen
        await press_and_wait(pilot, "e", lambda: state(app).epoch == 2)
        await expect_text(pilot, "#pipeline", "iteration: 7 stages | epoch end: validate")
        await wait_until(pilot, lambda: app.query_one("#pipeline").size.height == 1)


async def test_the_amp_scenario_shows_micro_batches_the_scaler_and_its_bug():
    app = make_app("amp")
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        for _ in range(6):  # load_batch zero_grad forward loss backward load_batch
            await press_and_wait(pilot, "space", lambda: True)
        await wait_until(pilot, lambda: app.model.last_event is not None and app.model.last_event.stage == "load_batch")
        await expect_text(pilot, "#pipeline", "micro-batch 2/4")
        for line in ("K = 4", "scaler.scale(loss).backward()", "scaler.unscale_(optimizer)", "loss = loss / K"):
            await expect_text(pilot, "#code", line)
        await press_and_wait(pilot, "n", lambda: state(app).completed_iterations == 1)
        await expect_text(pilot, "#pipeline", "[step]")
        assert "micro-batch" not in text_of(app, "#pipeline")  # the step is the whole iteration's
        bug_list = app.query_one("#bug-list")
        await wait_until(pilot, lambda: bug_list.option_count > 0)
        ids = [bug_list.get_option_at_index(i).value for i in range(bug_list.option_count)]
        bug_list.focus()
        bug_list.highlighted = ids.index("clip_before_unscale")
        await press_and_wait(pilot, "enter", lambda: "clip_before_unscale" in state(app).active_bugs)
        await press_and_wait(pilot, "n", lambda: any(f.id == "clip_before_unscale" for _, f in app.model.findings))
        await expect_text(pilot, "#diagnostics", "loss scale 65536")


async def test_a_script_steps_through_its_own_lines_and_b_says_it_needs_a_factory():
    from loopscope.shared.protocol import SessionSpec
    from loopscope.ui.app import LoopscopeApp

    script = str(FIXTURES / "scripts" / "nanogpt_style.py")
    app = LoopscopeApp(SessionSpec(script, "cpu", 0, script=True, seed_given=False), in_process=True)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        bug_list = app.query_one("#bug-list")
        await wait_until(pilot, lambda: bug_list.option_count > 0)
        labels = {str(bug_list.get_option_at_index(i).prompt) for i in range(bug_list.option_count)}
        assert {"missing_step", "missing_backward (needs an experiment() factory)"} <= labels
        marked = {1: "logits, loss = model(X, Y)", 3: "scaler.scale(loss).backward()"}
        for presses, line in ((1, marked[1]), (2, marked[3])):
            for _ in range(presses):
                await pilot.press("space")
            await expect_text(pilot, "#code", "> ")
            await wait_until(
                pilot,
                lambda line=line: any(
                    row.startswith(">") and line in row for row in text_of(app, "#code").splitlines()
                ),
            )
        await press_and_wait(pilot, "n", lambda: state(app).completed_iterations == 1)
        await expect_text(pilot, "#pipeline", "[step]")
        await press_and_wait(pilot, "b", lambda: "needs an experiment() factory" in (app.model.notice or ""))
        # c: the four checks on copies of the script's model, optimizer and batches, while it waits.
        await press_and_wait(pilot, "c", lambda: app.model.checks is not None)
        await expect_text(pilot, "#diagnostics", "Sanity checks")
        # After one iteration the initial loss is no longer the initial loss; the other three run.
        # (The checks arrive one by one: the first of them can be on screen before the last has run.)
        await wait_until(pilot, lambda: len(app.model.checks or ()) == 4)
        assert [c.id for c in app.model.checks if c.skipped] == ["init_loss"]
        await press_and_wait(pilot, "r", lambda: state(app).finished)
        await expect_text(pilot, "#status", "the script finished")
        assert state(app).completed_iterations == 12


async def test_a_scripts_prints_show_in_the_output_panel_as_python_prints_them():
    import subprocess
    import sys

    from loopscope.shared.protocol import SessionSpec
    from loopscope.ui.app import LoopscopeApp

    # Clipping, torch.save checkpoints, early stopping and a SIGTERM handler (main thread only).
    script = str(FIXTURES / "scripts" / "checkpoint_early_stop.py")
    plain = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=120)
    assert plain.returncode == 0, plain.stderr
    spec = SessionSpec(script, "cpu", 0, script=True, seed_given=False)
    app = LoopscopeApp(spec, in_process=False)  # a real engine process: its output goes to the log
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        assert app.query_one("#epochs-box").border_title == "Output (your script)"
        # The script prints its loss after optimizer.step(): the line comes as the next stage runs.
        await press_and_wait(pilot, "n", lambda: state(app).completed_iterations == 1)
        await press_and_wait(pilot, "space", lambda: state(app).iteration == 2)
        output = app.query_one("#output")
        await wait_until(pilot, lambda: any(line.startswith("loss ") for line in output.lines))
        await press_and_wait(pilot, "r", lambda: state(app).finished)
        await expect_text(pilot, "#status", "the script finished")
        expected = plain.stdout.splitlines()  # every loss to 10 decimals, the early stop included
        await wait_until(pilot, lambda: [line for line in output.lines if line] == expected)


async def test_at_max_speed_the_plot_and_the_panels_redraw_once_a_second_and_catch_up_on_stop(monkeypatch):
    """At max speed the plot and the detail panels redraw at most every MAX_SPEED_DETAIL_SECONDS:
    their redraws were what the UI process took from the engine's threads (issue 17). Once the run
    stops the screen shows the last loss at once. A lower bound on the spacing holds however loaded
    the machine: load only spaces frames further."""
    from loopscope.shared.protocol import MAX_SPEED_DETAIL_SECONDS
    from loopscope.ui.panels.gradients import GradientsPanel
    from loopscope.ui.plot import LossPlot

    plots = []  # (when, running, the last iteration drawn)
    gradients = []  # (when, running)
    show_plot, show_gradients = LossPlot.show, GradientsPanel.show

    def recorded_plot(self, model):
        running = bool(model.state and model.state.running)
        # When: the frame's own clock (its start), so the time the other panels took does not count.
        plots.append((self.app._last_plot, running, max(model.loss.means()[0], default=0)))
        return show_plot(self, model)

    def recorded_gradients(self, model):
        gradients.append((self.app._last_panels, bool(model.state and model.state.running)))
        return show_gradients(self, model)

    monkeypatch.setattr(LossPlot, "show", recorded_plot)
    monkeypatch.setattr(GradientsPanel, "show", recorded_gradients)
    app = make_app("loopscope.scenarios.bench_models:mlp_experiment")  # long enough to run for seconds
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("r")
        await wait_until(pilot, lambda: sum(running for _, running, _ in plots) >= 4)
        await press_and_wait(pilot, "r", lambda: not state(app).running)
        await wait_until(pilot, lambda: plots[-1][1:] == (False, state(app).completed_iterations))
    for shown in (plots, gradients):
        while_running = [when for when, running, *_ in shown if running]
        assert len(while_running) >= 2, shown
        gaps = [later - earlier for earlier, later in itertools.pairwise(while_running)]
        assert min(gaps) >= MAX_SPEED_DETAIL_SECONDS, gaps
    drawn = [x for _, running, x in plots if running]
    assert drawn == sorted(drawn) and drawn[-1] > drawn[0]  # and it follows the run


async def test_a_paced_run_shows_each_of_its_iterations_in_the_panels(monkeypatch):
    """A paced run (a lecture's slow run) keeps the fast panel rate: at 2 it/s the gradients panel
    shows every iteration, where the once-a-second rate of max speed would skip every other."""
    from loopscope.shared.protocol import SessionSpec
    from loopscope.ui.app import LoopscopeApp
    from loopscope.ui.panels.gradients import GradientsPanel

    shown = set()
    show = GradientsPanel.show

    def recorded(self, model):
        event = model.last_by_stage.get("step")
        if event is not None and model.state and model.state.running:
            shown.add(event.iteration)
        return show(self, model)

    monkeypatch.setattr(GradientsPanel, "show", recorded)
    app = LoopscopeApp(SessionSpec("blobs", "cpu", 0, speed=2.0), in_process=True)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await expect_text(pilot, "#status", "2 it/s")
        await pilot.press("r")
        await wait_until(pilot, lambda: state(app).completed_iterations >= 7)
        await press_and_wait(pilot, "r", lambda: not state(app).running)
    run = set(range(2, 7))  # the first and last could fall either side of the presses
    assert len(run & shown) >= 4, sorted(shown)


async def test_a_repaint_without_new_loss_data_reuses_the_plots_last_build():
    """A plotext build is the screen's costliest draw (~5 ms): a repaint the plot's data did not cause
    (the epochs table scrolling to a new epoch repainted the whole screen) draws the last build
    again; new data, the log axis and a new size build it anew, and the screen shows them."""
    from loopscope.ui.plot import LossPlot

    app = make_app("blobs")
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await press_and_wait(pilot, "n", lambda: state(app).iteration == 1)
        plot = app.query_one(LossPlot)
        builds = []
        build = plot.plt._build_matrix  # what every build of the figure runs, however it is turned into text
        plot.plt._build_matrix = lambda: builds.append(1) or build()  # type: ignore[method-assign]

        for _ in range(3):
            app.screen.refresh(repaint=True)
            plot.refresh()
            await pilot.pause()
        assert builds == []
        drawn = screen_text(app)
        assert "iteration" in drawn  # the plot's axis label: the plot is on the screen

        await press_and_wait(pilot, "l", lambda: len(builds) == 1)
        assert "log10" in screen_text(app)
        await pilot.resize_terminal(110, 40)
        await wait_until(pilot, lambda: len(builds) == 2)
