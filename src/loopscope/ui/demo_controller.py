"""A scripted demo's place in its script, and what its steps send to the engine (no Textual).

The app's arrow keys call `next`, `back`, `choose`, and every engine message goes through
`observe`; the narration bar draws `index`, `ran`, `choices`, `busy` and `results` (a step's
reveal, measured once when it finished and kept: going back shows what the room saw).
"""

from __future__ import annotations

from collections.abc import Callable

from loopscope.shared.claims import Measure, StepMeter
from loopscope.shared.demo import Demo
from loopscope.shared.protocol import Ready, Rewound, RunIterations, SetBug, SetTwin, Step, Update
from loopscope.shared.vocab import StepKind
from loopscope.ui.model import ScreenModel


class DemoController:
    def __init__(self, demo: Demo, send: Callable[[object], int | None]) -> None:
        self.demo = demo
        self.send = send  # returns the command's number, None when it could not be sent
        self.index = -1  # -1: the title card
        self.ran: set[int] = set()
        self.choices: dict[int, int] = {}
        self.results: dict[int, tuple[Measure, ...]] = {}
        self.scripted = True  # False: exploring freely, the script paused
        self.meter = StepMeter()
        # The step under way: (its index, its command's number, iterations completed when it began).
        self._running: tuple[int, int, int] | None = None

    @property
    def busy(self) -> int | None:
        """The index of the step still running, if one is."""
        return None if self._running is None else self._running[0]

    def next(self, model: ScreenModel) -> None:
        if self._running is not None:
            return  # a step runs to its end before the script moves on
        steps = self.demo.steps
        if self.index >= 0 and self.index not in self.ran:
            self._run(self.index, model)  # a question was on screen: now it runs
        elif self.index < len(steps) - 1:
            self.index += 1
            if not steps[self.index].ask and self.index not in self.ran:
                self._run(self.index, model)
        model.version += 1

    def back(self, model: ScreenModel) -> None:
        # Back in the script: the narration, not the loop (what ran stays run).
        self.index = max(-1, self.index - 1)
        model.version += 1

    def toggle(self, model: ScreenModel) -> None:
        self.scripted = not self.scripted
        model.version += 1

    def choose(self, option: int, model: ScreenModel) -> None:
        step = self.demo.steps[self.index] if self.index >= 0 else None
        if step is not None and step.ask and option < len(step.options) and self.index not in self.ran:
            self.choices[self.index] = option
            model.version += 1

    def observe(self, message: object, model: ScreenModel) -> None:
        """Every engine message, after the screen's model has taken it in."""
        match message:
            case Update(events=events, losses=losses):
                for x, _, loss, twin_loss in losses:
                    self.meter.add_loss(x, loss, twin_loss)
                for event in events:
                    self.meter.add_event(event)
            case Rewound(completed_iterations=done):
                self.meter.forget_after(done)
            case Ready():  # a fresh engine (ctrl+r): a step under way is gone, and so is its loop
                self._running, self.meter = None, StepMeter()
        self._finish_if_done(model)

    def _run(self, index: int, model: ScreenModel) -> None:
        step = self.demo.steps[index]
        self.ran.add(index)
        model.notice = None
        start = model.state.completed_iterations if model.state is not None else 0
        command: object | None = None
        match step.action:
            case "stage" | "iteration" | "epoch":
                command = Step(StepKind(step.action))
            case "run":
                assert isinstance(step.argument, int)
                command = RunIterations(step.argument)
            case "bug on" | "bug off":
                command = SetBug(str(step.argument), step.action == "bug on")
            case "twin on" | "twin off":
                command = SetTwin(step.action == "twin on")
        number = self.send(command) if command is not None else None
        if number is not None:
            self._running = (index, number, start)
        else:
            self._finished(index, start, start)

    def _finish_if_done(self, model: ScreenModel) -> None:
        state = model.state
        if self._running is None or state is None:
            return
        index, number, start = self._running
        if state.handled >= number and not state.running:
            self._running = None
            self._finished(index, start, state.completed_iterations)
            model.version += 1

    def _finished(self, index: int, start: int, end: int) -> None:
        self.results[index] = tuple(self.meter.measure(q, start, end) for q in self.demo.steps[index].shows)
