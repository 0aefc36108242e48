"""A scripted demo's place in its script, and what its steps send to the engine (no Textual).

The app's arrow keys call `next`, `back`, `choose`; the narration bar draws `index`, `ran`,
`choices` and `before` (the revealed quantity's value before its step ran).
"""

from __future__ import annotations

from collections.abc import Callable

from loopscope.shared.demo import Demo
from loopscope.shared.protocol import RunIterations, SetBug, SetTwin, Step
from loopscope.shared.vocab import StepKind
from loopscope.ui.model import ScreenModel, metric


class DemoController:
    def __init__(self, demo: Demo, send: Callable[[object], None]) -> None:
        self.demo = demo
        self.send = send
        self.index = -1  # -1: the title card
        self.ran: set[int] = set()
        self.choices: dict[int, int] = {}
        self.before: dict[int, float | None] = {}
        self.scripted = True  # False: exploring freely, the script paused

    def next(self, model: ScreenModel) -> None:
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

    def _run(self, index: int, model: ScreenModel) -> None:
        step = self.demo.steps[index]
        self.ran.add(index)
        if step.reveal:
            self.before[index] = metric(model, step.reveal)
        model.notice = None
        match step.action:
            case "stage" | "iteration" | "epoch":
                self.send(Step(StepKind(step.action)))
            case "run":
                assert isinstance(step.argument, int)
                self.send(RunIterations(step.argument))
            case "bug on" | "bug off":
                self.send(SetBug(str(step.argument), step.action == "bug on"))
            case "twin on" | "twin off":
                self.send(SetTwin(step.action == "twin on"))
