"""The loopscope app: a live training loop, stage by stage, in the terminal.

The engine runs in its own process and streams immutable snapshots; this process only renders
them (at most ~20 frames a second) and sends commands back. It never imports torch.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

from textual import on
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Container, Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import Footer, SelectionList
from textual.widgets.selection_list import Selection

from loopscope.shared.bugs import BUGS
from loopscope.shared.demo import Demo
from loopscope.shared.lifeline import ORPHAN_CHECK_SECONDS, input_closed
from loopscope.shared.protocol import (
    FRAME_SECONDS,
    RUN_SPEEDS,
    Checks,
    Failed,
    Rewind,
    RunChecks,
    SessionSpec,
    SetBug,
    SetPicture,
    SetRunning,
    SetSpeed,
    SetTwin,
    Step,
    running_rates,
)
from loopscope.shared.vocab import StepKind
from loopscope.ui.commands import LoopCommands
from loopscope.ui.demo_controller import DemoController
from loopscope.ui.model import ScreenModel
from loopscope.ui.narration import NarrationBar
from loopscope.ui.panels import (
    DIAGNOSTICS_KEY,
    BugInfo,
    BugList,
    CodePanel,
    DiagnosticsPanel,
    EpochsPanel,
    FindingLine,
    GradientsPanel,
    OutputPanel,
    PipelineBar,
    RanksPanel,
    StatusLine,
    TensorsPanel,
)
from loopscope.ui.panels.tensors import tensors_title
from loopscope.ui.plot import (
    LossPlot,
    PictureNote,
    PicturePlot,
    loss_legend,
    loss_title,
    picture_note,
    picture_title,
)
from loopscope.ui.session import EngineSession

BUSY_WARNING_SECONDS = 3.0  # silence from the engine this long means a slow or stuck stage
NARROW_WIDTH = 110
EXIT_GRACE_SECONDS = 3.0


class EngineMessage(Message):
    """Something the engine sent (posted from the session's reader thread)."""

    def __init__(self, payload: Any) -> None:
        super().__init__()
        self.payload = payload


SVG_DIR = "loopscope-shots"  # where `s` saves the screen, created on first use (--svg-dir)


class LoopscopeApp(App[None]):
    """Step through a real training loop."""

    TITLE = "loopscope"
    CSS_PATH = str(Path(__file__).parent / "app.tcss")  # absolute: subclasses elsewhere find it too
    AUTO_FOCUS = "#code-box"  # on a narrow screen the loop code is what a learner needs first
    COMMANDS = App.COMMANDS | {LoopCommands}
    # Priority: the keys mean the same thing whichever panel has focus.
    # In footer order: help, quit and the findings first, so that even an 80-column footer, which
    # cuts the rest, says where everything is and how to leave; ctrl+p and `s` are in the help.
    BINDINGS = [
        Binding("question_mark", "help", "help", key_display="?", priority=True),
        Binding("q", "quit", "quit", priority=True),
        Binding(DIAGNOSTICS_KEY, "show_diagnostics", "diagnostics", priority=True),
        # Demo mode only (check_action lets the keys through to the panels otherwise); before the
        # stepping keys, so that in a demo space means next, and the footer says so first.
        Binding("right,space", "demo_next", "next", key_display="→", priority=True),
        Binding("left", "demo_back", "back", key_display="←", priority=True),
        Binding("escape", "demo_toggle", "script/explore"),
        *(Binding(str(n), f"demo_choose({n - 1})", show=False, priority=True) for n in range(1, 5)),
        Binding("space", "step_stage", "stage", priority=True),
        Binding("n", "step_iteration", "iteration", priority=True),
        Binding("e", "step_epoch", "epoch", priority=True),
        Binding("r", "toggle_run", "run/pause", priority=True),
        Binding("plus,equals_sign", "faster", "faster", key_display="+", priority=True),
        Binding("minus", "slower", "slower", key_display="-", priority=True),
        Binding("m", "max_speed", "max", priority=True),
        Binding("t", "toggle_twin", "twin", priority=True),
        Binding("c", "checks", "checks", priority=True),
        Binding("l", "toggle_log", "log", priority=True),
        Binding("b", "rewind", "back", priority=True),
        Binding("p", "toggle_picture", "picture", priority=True),
        Binding("s", "save_svg", "save svg", show=False, priority=True),
        Binding("ctrl+r", "restart_engine", "restart", show=False, priority=True),
    ]

    def __init__(
        self, spec: SessionSpec, in_process: bool = False, demo: Demo | None = None, svg_dir: str = SVG_DIR
    ) -> None:
        super().__init__()
        self.spec = spec
        self.svg_dir = svg_dir
        self.in_process = in_process
        self.demo = DemoController(demo, self.send) if demo is not None else None
        self.showing_picture = False
        self.model = ScreenModel(self.spec.history)
        self.session: EngineSession | None = None
        self.speed_index = RUN_SPEEDS.index(spec.speed) if spec.speed in RUN_SPEEDS else len(RUN_SPEEDS) - 1
        self._speed_before_max: int | None = None
        self._drawn_version = -1
        self._panel_keys: dict[str, object] = {}
        self._last_panels = 0.0
        self._last_plot = 0.0
        self._bug_list_version: tuple[str, ...] | None = None
        self._awaiting_since: float | None = None  # a command sent, no answer yet
        self._busy_shown = 0
        self._checks_pending = False

    # ----- layout ------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield PipelineBar(id="pipeline")
        if self.demo is not None:
            yield NarrationBar(id="narration")
        with Container(id="main"):
            for box_id, title, box_type, make_children in self._panels():
                with box_type(id=box_id, classes="panel") as box:
                    box.border_title = title
                    yield from make_children()
        yield FindingLine(id="finding")
        yield StatusLine(id="status")
        yield Footer(compact=True, show_command_palette=False)

    @staticmethod
    def _panels() -> tuple:
        """(container id, title, container type, children) for each panel, in grid order."""
        return (
            ("code-box", "Loop code", VerticalScroll, lambda: [CodePanel(id="code")]),
            ("tensors-box", tensors_title(), Vertical, lambda: [TensorsPanel(id="tensors")]),
            (
                "gradients-box",
                "Gradients",
                VerticalScroll,
                lambda: [RanksPanel(id="ranks"), GradientsPanel(id="gradients")],
            ),
            (
                "plot-box",
                loss_title(False),
                Vertical,
                lambda: [LossPlot(id="plot"), PicturePlot(id="picture"), PictureNote(id="picture-note")],
            ),
            ("diagnostics-box", "Diagnostics", VerticalScroll, lambda: [DiagnosticsPanel(id="diagnostics")]),
            ("epochs-box", "Epochs", Vertical, lambda: [EpochsPanel(id="epochs"), OutputPanel(id="output")]),
            (
                "bugs-box",
                "Bugs (enter: on/off)",
                Vertical,
                lambda: [BugList(id="bug-list"), BugInfo(id="bug-info")],
            ),
        )

    def on_mount(self) -> None:
        self.query_one(PicturePlot).display = False
        self.query_one(PictureNote).display = False
        self.screen.set_class(self.demo is not None, "-demo")
        self.query_one(OutputPanel).display = False
        self.query_one(RanksPanel).display = False
        self._apply_width(self.size.width)
        self.redraw(force=True)
        self.set_interval(FRAME_SECONDS, self.redraw)
        # The first frame is on screen before the engine has even imported torch.
        self.call_after_refresh(self.start_engine)
        if self.is_web:
            self._lifeline = self.set_interval(ORPHAN_CHECK_SECONDS, self._leave_if_the_server_is_gone)

    def _leave_if_the_server_is_gone(self) -> None:
        """In the browser view our input is the server's pipe: closed, the server died (even by
        SIGKILL) and nobody will ever see this app again, so it ends, and its engine with it."""
        if not input_closed():
            return
        self._lifeline.stop()
        last_resort = threading.Timer(EXIT_GRACE_SECONDS, os._exit, (0,))  # should exiting hang on the dead pipe
        last_resort.daemon = True
        last_resort.start()
        if self.session is not None:
            self.session.stop(timeout=1.0)
        self.exit()

    def on_resize(self, event: Any) -> None:
        self._apply_width(event.size.width)
        self.query_one(FindingLine).show(self.model)  # cut to the new width

    def _apply_width(self, width: int) -> None:
        self.screen.set_class(width < NARROW_WIDTH, "-narrow")

    # ----- engine ------------------------------------------------------------------------
    def start_engine(self) -> None:
        self.session = EngineSession(self.spec, self._from_engine, in_process=self.in_process)
        self.session.start()

    def _from_engine(self, payload: Any) -> None:
        # Called on the reader thread: post_message is thread-safe and never blocks.
        self.post_message(EngineMessage(payload))

    @on(EngineMessage)
    def _engine_message(self, message: EngineMessage) -> None:
        waiting_notice = self.model.notice
        self.model.apply(message.payload)
        if self.demo is not None:
            self.demo.observe(message.payload, self.model)
        if isinstance(message.payload, Failed) or (isinstance(message.payload, Checks) and message.payload.done):
            self._checks_pending = False
        running = self.model.state is not None and self.model.state.running
        # The answer is here: no longer waiting, before any redraw counts the wait again (it
        # said "the engine has not answered for 7 s" over the answer of slow sanity checks).
        self._awaiting_since = time.monotonic() if running or self._checks_pending else None
        if self._busy_shown:
            self._busy_shown = 0
            if self.model.notice is waiting_notice:  # the answer did not bring a notice of its own
                self.model.notice = None
        if not running:
            self.redraw()  # a step's result shows at once; while running, the frame clock paces redraws

    def send(self, command: Any) -> int | None:
        """Sends a command; returns its number (the engine's state counts those handled)."""
        if self.session is None or not self.session.send(command):
            self.model.notice = "the engine is not running: press ctrl+r to restart it"
            self.model.version += 1
            return None
        if self._awaiting_since is None:
            self._awaiting_since = time.monotonic()
        return self.session.sent

    def _check_busy(self) -> None:
        """The engine runs the user's code: if it goes quiet, say so and offer the way out."""
        if self._awaiting_since is None or self.model.info is None:
            return
        quiet = int(time.monotonic() - self._awaiting_since)
        if quiet != self._busy_shown and (self._checks_pending or quiet >= BUSY_WARNING_SECONDS):
            self._busy_shown = quiet
            if self._checks_pending:
                total, done = self.model.checks_running, len(self.model.checks or ())
                so_far = f" ({done} of {total} done)" if total else ""
                self.model.notice = f"running the sanity checks on a copy of the model{so_far}... {quiet} s"
            else:
                self.model.notice = (
                    f"the engine has not answered for {quiet} s (a slow or stuck stage in the "
                    "experiment's code?): wait, or press ctrl+r to restart it"
                )
            self.model.version += 1

    def _finished(self) -> bool:
        """True (and says so) when the run is over and a step would do nothing."""
        state = self.model.state
        if state is None or not state.finished:
            return False
        # The status line already says why ("done: early stop: ..."): the notice does not repeat it.
        self.model.notice = "the run is over: ctrl+r starts it again"
        self.model.version += 1
        return True

    def on_unmount(self) -> None:
        if self.session is not None:
            self.session.stop()

    # ----- drawing -----------------------------------------------------------------------
    def redraw(self, force: bool = False) -> None:
        if not self.is_running:  # shutting down: the frame clock can tick after the panels are gone
            return
        self._check_busy()
        model = self.model
        if model.info is not None and "script" in model.info.options and self.session is not None:
            self.query_one(OutputPanel).follow(self.session.log_path)  # prints come between engine messages
        if model.version == self._drawn_version and not force:
            return
        if force:
            self._panel_keys.clear()
        self._drawn_version = model.version
        self.query_one(PipelineBar).show(model)
        self.query_one(FindingLine).show(model)  # with the header's count, never a frame apart
        # Each panel redraws only when what it shows has changed: a redraw costs the UI process
        # CPU time that, on a small machine, the engine process would rather have.
        event = model.last_event
        state = model.state
        running = state is not None and state.running
        now = time.monotonic()
        _, detail_seconds, plot_seconds = running_rates(RUN_SPEEDS[self.speed_index])
        if running and not force and now - self._last_panels < detail_seconds:
            # While running, the detail panels and the plot follow at their own pace; the counters move
            # with each of the engine's frames (10 a second, 4 at max speed).
            self.query_one(StatusLine).show(model, self.speed_label, self.query_one(LossPlot).log_scale)
            return
        self._last_panels = now
        if self._changed(
            "code",
            (
                event.stage if event else None,
                str(event.code_line) if event else None,  # script mode: the line, not only the stage
                state and state.active_bugs,
                state and state.iteration_stages,
                model.info is None,
            ),
        ):
            self._show_code()
        if self._changed("tensors", id(event)):
            self.query_one(TensorsPanel).show(model)
        if self._changed(
            "ranks", (model.info is None, *(id(e) for stages in model.ranks.values() for e in stages.values()))
        ):
            self._show_ranks()
        if self._changed("gradients", (id(model.last_by_stage.get("step")), id(model.last_by_stage.get("backward")))):
            self.query_one(GradientsPanel).show(model)
        diagnostics_key = (
            len(model.findings),
            model.findings[0][0] if model.findings else None,
            model.failure,
            id(model.checks),
            state and state.halted,
            id(event) if state and state.halted else None,
        )
        if self._changed("diagnostics", diagnostics_key):
            self.query_one(DiagnosticsPanel).show(model)
        self._show_epochs_or_output()
        self.query_one(StatusLine).show(model, self.speed_label, self.query_one(LossPlot).log_scale)
        if self.demo is not None:
            self.query_one(NarrationBar).show(self.demo, model)
        if not running or force or now - self._last_plot >= plot_seconds:
            self._last_plot = now
            self._show_plot()
        self._sync_bug_list()

    def _show_plot(self) -> None:
        model, box = self.model, self.query_one("#plot-box")
        if not self.showing_picture:
            plot = self.query_one(LossPlot)
            titles = (loss_title(plot.log_scale), loss_legend(model))
            if self._changed("plot-titles", titles):  # setting one parses markup and repaints the box
                box.border_title, box.border_subtitle = titles
            plot.show(model)
            return
        note = picture_note(model)
        self.query_one(PictureNote).display = note is not None
        self.query_one(PicturePlot).display = note is None
        titles = (picture_title(model.picture), "")
        if self._changed("plot-titles", titles):
            box.border_title, box.border_subtitle = titles
        if note is None:
            self.query_one(PicturePlot).show(model)
        else:
            self.query_one(PictureNote).show(model)

    def _show_epochs_or_output(self) -> None:
        """Script mode shows the script's own output where factory mode shows its epochs."""
        model = self.model
        script = model.info is not None and "script" in model.info.options
        output = self.query_one(OutputPanel)
        if script and not output.display:
            output.display, self.query_one(EpochsPanel).display = True, False
            self.query_one("#epochs-box").border_title = "Output (your script)"
        if not script:
            self.query_one(EpochsPanel).show(model)

    def _changed(self, panel: str, key: object) -> bool:
        if self._panel_keys.get(panel, object()) == key:
            return False
        self._panel_keys[panel] = key
        return True

    def _show_ranks(self) -> None:
        info = self.model.info
        ranks = self.query_one(RanksPanel)
        several = info is not None and info.world_size > 1
        if several != ranks.display:
            ranks.display = several
            box = self.query_one("#gradients-box")
            box.border_title = f"Ranks ({info.world_size}) · Gradients (rank 0)" if several and info else "Gradients"
        if several:
            ranks.show(self.model)

    def _show_code(self) -> None:
        line = self.query_one(CodePanel).show(self.model)
        if line is not None:
            box = self.query_one("#code-box")
            # Keep the line just run in view, with some context above it.
            if not box.scrollable_content_region.height or not (
                box.scroll_y <= line < box.scroll_y + box.scrollable_content_region.height - 1
            ):
                box.scroll_to(y=max(0, line - 3), animate=False)

    def on_descendant_focus(self, event: Any) -> None:
        bug_list = self.query_one("#bug-list", SelectionList)
        if event.widget is bug_list and bug_list.highlighted is None and bug_list.option_count:
            bug_list.highlighted = 0

    def _sync_bug_list(self) -> None:
        info, state = self.model.info, self.model.state
        if info is None or state is None:
            return
        key = (*info.applicable_bugs, "|", *state.active_bugs)
        if key == self._bug_list_version:
            return
        self._bug_list_version = key
        bug_list = self.query_one("#bug-list", SelectionList)
        highlighted = bug_list.highlighted
        bug_list.clear_options()
        for bug in BUGS:
            applies = bug.id in info.applicable_bugs
            label = bug.id if applies else f"{bug.id} ({info.bug_reasons.get(bug.id, 'does not apply')})"
            if bug.id in state.active_bugs:
                label += "  ON"
            bug_list.add_option(Selection(label, bug.id, bug.id in state.active_bugs, disabled=not applies))
        if highlighted is not None:
            bug_list.highlighted = highlighted

    @property
    def speed_label(self) -> str:
        speed = RUN_SPEEDS[self.speed_index]
        return "max" if speed is None else f"{speed:g} it/s"

    # ----- bugs --------------------------------------------------------------------------
    @on(SelectionList.SelectionToggled, "#bug-list")
    def _bug_toggled(self, event: SelectionList.SelectionToggled) -> None:
        bug_id = event.selection.value
        self.send(SetBug(bug_id, bug_id in event.selection_list.selected))

    @on(SelectionList.SelectionHighlighted, "#bug-list")
    def _bug_highlighted(self, event: SelectionList.SelectionHighlighted) -> None:
        self.query_one(BugInfo).show_bug(event.selection.value)

    def toggle_bug(self, bug_id: str) -> None:
        active = self.model.state.active_bugs if self.model.state else ()
        self.send(SetBug(bug_id, bug_id not in active))

    # ----- actions: one key, one thing ---------------------------------------------------
    def _step(self, kind: StepKind) -> None:
        if self._finished():
            return
        self.model.notice = None
        self.model.checks = None  # the checks described the state before this step
        self.send(Step(kind))

    def action_step_stage(self) -> None:
        self._step(StepKind.STAGE)

    def action_step_iteration(self) -> None:
        self._step(StepKind.ITERATION)

    def action_step_epoch(self) -> None:
        self._step(StepKind.EPOCH)

    def action_toggle_run(self) -> None:
        running = self.model.state is not None and self.model.state.running
        if not running and self._finished():
            return
        if not running:
            self.model.notice = None  # like a step: what it said was about the state before the run
        self.model.checks = None
        self.send(SetRunning(not running))

    def action_faster(self) -> None:
        self._set_speed(min(self.speed_index + 1, len(RUN_SPEEDS) - 1))

    def action_slower(self) -> None:
        self._set_speed(max(self.speed_index - 1, 0))

    def action_max_speed(self) -> None:
        """Max speed, and back to the speed before it."""
        top = len(RUN_SPEEDS) - 1
        if self.speed_index == top and self._speed_before_max is not None:
            self._set_speed(self._speed_before_max)
        elif self.speed_index != top:
            before = self.speed_index
            self._set_speed(top)
            self._speed_before_max = before

    def _set_speed(self, index: int) -> None:
        self.speed_index, self._speed_before_max = index, None
        self.send(SetSpeed(RUN_SPEEDS[index]))
        self.model.version += 1

    def action_toggle_twin(self) -> None:
        twin = self.model.state is not None and self.model.state.twin
        self.send(SetTwin(not twin))

    def action_checks(self) -> None:
        self.model.notice = "running the sanity checks on a copy of the model..."
        self.model.version += 1
        self._checks_pending = True
        self._busy_shown = 0
        self.send(RunChecks())

    def action_toggle_log(self) -> None:
        plot = self.query_one(LossPlot)
        plot.log_scale = not plot.log_scale
        self.redraw(force=True)

    def action_show_diagnostics(self) -> None:
        """Bring the Diagnostics panel into view (on a narrow screen, to the top) and focus it."""
        box = self.query_one("#diagnostics-box")
        box.focus()
        box.scroll_visible(top=True, animate=False)

    def action_rewind(self) -> None:
        """Step back one iteration: parameters, optimizer, random state and data position restored."""
        self.model.checks = None
        self.send(Rewind())

    def action_toggle_picture(self) -> None:
        """Switch the plot panel between the loss and a picture of what the model has learned."""
        self.showing_picture = not self.showing_picture
        self.query_one(LossPlot).display = not self.showing_picture
        self.query_one(PicturePlot).display = self.query_one(PictureNote).display = False
        self.send(SetPicture(self.showing_picture))
        self.redraw(force=True)

    def action_help(self) -> None:
        from loopscope.ui.help import HelpScreen  # imported on first use: a faster first frame

        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    # ----- demo mode -----------------------------------------------------------------------
    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "step_stage" and self.demo is not None and self.demo.scripted:
            return False  # space is the script's next
        if action.startswith("demo_"):
            if self.demo is None:
                return False
            if action != "demo_toggle" and not self.demo.scripted:
                return False
        return True

    def action_demo_next(self) -> None:
        if self.demo is not None and self.model.info is not None:
            self.demo.next(self.model)

    def action_demo_back(self) -> None:
        if self.demo is not None:
            self.demo.back(self.model)

    def action_demo_toggle(self) -> None:
        if self.demo is not None:
            self.demo.toggle(self.model)
            self.refresh_bindings()  # space changes meaning: the footer follows

    def action_demo_choose(self, option: int) -> None:
        if self.demo is not None:
            self.demo.choose(option, self.model)

    def action_save_svg(self) -> None:
        """The screen as an SVG, for slides."""
        folder = Path(self.svg_dir).expanduser().resolve()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = self.save_screenshot(path=str(folder), filename=f"loopscope-{time.strftime('%Y%m%d-%H%M%S')}.svg")
        except OSError as exc:  # a folder that cannot be written: say so, the app goes on
            self.model.notice = f"could not save the screen in {folder}: {exc.strerror or exc}"
        else:
            self.model.notice = f"saved {path}"
        self.model.version += 1

    def action_restart_engine(self) -> None:
        if self.session is not None:
            self.session.stop(timeout=1.0)
        self.model = ScreenModel(self.spec.history)
        self._bug_list_version = None
        self._awaiting_since, self._busy_shown, self._checks_pending = None, 0, False
        self.redraw(force=True)
        self.start_engine()
