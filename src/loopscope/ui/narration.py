"""The demo's narration bar: the step's words, a question to commit to, then the answer and what
the loop actually did."""

from __future__ import annotations

import math

from rich.text import Text

from loopscope.shared.demo import DemoStep
from loopscope.ui.demo_controller import DemoController
from loopscope.ui.model import ScreenModel, metric
from loopscope.ui.panels import TextPanel

REVEAL_LABELS = {
    "loss": "loss",
    "grad_norm": "gradient norm",
    "val_loss": "val loss",
    "val_accuracy": "val accuracy",
    "lr": "learning rate",
    "max_update_ratio": "largest update/weight ratio",
}


def _fmt(name: str, value: float | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.1%}" if name == "val_accuracy" else f"{value:.4g}"


class NarrationBar(TextPanel):
    """Where the presenter's script speaks."""

    def show(self, script: DemoController, model: ScreenModel) -> None:
        demo, index, ran, before = script.demo, script.index, script.ran, script.before
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
        elif index in ran:
            self._reveal(text, step, index, choice, before, model)
        if index == total - 1 and index in ran:
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
        text.append("\n  Commit to an answer (keys 1-4 record the room's choice), then run the step.\n", style="dim")

    @staticmethod
    def _reveal(
        text: Text, step: DemoStep, index: int, choice: int | None, before: dict[int, float | None], model: ScreenModel
    ) -> None:
        if step.ask:
            right = choice is not None and step.options[choice] == step.answer
            verdict = "" if choice is None else (" (the room got it)" if right else " (not what the room said)")
            text.append(f"Answer: {step.answer}{verdict}\n", style="bold green")
        if step.reveal:
            after = metric(model, step.reveal)
            label = REVEAL_LABELS[step.reveal]
            start = before.get(index)
            text.append(f"What the loop did: {label} {_fmt(step.reveal, start)} -> {_fmt(step.reveal, after)}")
            if start and after is not None and math.isfinite(start) and math.isfinite(after):
                text.append(f" ({after / start:.2g}x)")
            text.append("\n")
        if step.explain:
            text.append(step.explain + "\n", style="italic")
