"""The demo's narration bar: the step's words, a question to commit to, then the answer and what
the loop actually did."""

from __future__ import annotations

from rich.text import Text

from loopscope.shared.claims import Measure
from loopscope.shared.demo import DemoStep
from loopscope.ui.demo_controller import DemoController
from loopscope.ui.model import ScreenModel
from loopscope.ui.panels import TextPanel


class NarrationBar(TextPanel):
    """Where the presenter's script speaks."""

    def show(self, script: DemoController, model: ScreenModel) -> None:
        demo, index, ran = script.demo, script.index, script.ran
        choice = script.choices.get(index)
        text = Text()
        if not script.scripted:
            text.append(f"{demo.title}: exploring freely. ", style="bold")
            text.append("escape returns to the script.", style="dim")
            self.update(text)
            return
        total = len(demo.steps)
        if index < 0:
            text.append(f"{demo.title}\n", style="bold")
            if demo.description:
                text.append(demo.description + "\n")
            text.append(
                f"{total} steps. right arrow or space: next  left arrow: back  escape: explore freely", style="dim"
            )
            self.update(text)
            return
        step = demo.steps[index]
        text.append(f"Step {index + 1}/{total}  ", style="bold reverse")
        text.append(f" {step.say}\n")
        if step.ask and index not in ran:
            self._question(text, step, choice)
        elif index == script.busy:
            text.append("running...\n", style="bold yellow")
        elif index in ran:
            self._reveal(text, step, choice, script.results.get(index, ()))
        if index == script.busy:
            text.append("the step runs to its end before the script goes on", style="dim")
        elif index == total - 1 and index in ran:
            text.append("The end of this demo. escape: explore freely  q: quit", style="dim")
        else:
            text.append("right arrow or space: " + ("run this step" if index not in ran else "next"), style="dim")
        self.update(text)

    @staticmethod
    def _question(text: Text, step: DemoStep, choice: int | None) -> None:
        text.append(f"Predict: {step.ask}\n", style="bold yellow")
        for number, option in enumerate(step.options, 1):
            picked = choice == number - 1
            text.append(f"  {number}) {option}", style="bold reverse" if picked else "")
        keys = f"keys 1-{len(step.options)}"
        text.append(f"\n  Commit to an answer ({keys} record the room's choice), then run the step.\n", style="dim")

    @staticmethod
    def _reveal(text: Text, step: DemoStep, choice: int | None, measures: tuple[Measure, ...]) -> None:
        if step.ask:
            right = choice is not None and step.options[choice] == step.answer
            verdict = "" if choice is None else (" (the room got it)" if right else " (not what the room said)")
            text.append(f"Answer: {step.answer}{verdict}\n", style="bold green")
        for number, measure in enumerate(measures):
            text.append(f"{'What the loop did: ' if number == 0 else '                   '}{measure.describe()}\n")
        if step.explain:
            text.append(step.explain + "\n", style="italic")
