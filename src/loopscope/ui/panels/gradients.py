"""Per-parameter gradient norms and update/weight ratios, as bars."""

from __future__ import annotations

import math

from rich.text import Text

from loopscope.ui.model import ScreenModel
from loopscope.ui.panels.base import TextPanel, fmt

HEALTHY_RATIO = (1e-4, 1e-2)  # around cs231n's 1e-3
TOLERABLE_RATIO = (1e-5, 1e-1)  # the diagnostics' thresholds

ROUNDOFF = 1e-6


class GradientsPanel(TextPanel):
    """Per-parameter gradient norms as bars, with the update/weight ratio coloured by health."""

    def show(self, model: ScreenModel) -> None:
        event = model.last_by_stage.get("step") or model.last_by_stage.get("backward")
        text = Text()
        if event is None or not event.layers:
            self.update(Text("gradients appear after backward", style="dim"))
            return
        layers = event.layers
        largest = max((layer.grad_norm or 0.0) for layer in layers) or 1.0
        width = max(len(layer.name) for layer in layers)
        bar_width = 18
        grad_event = model.last_by_stage.get("backward")
        text.append(
            f"iteration {event.iteration}, global grad norm {fmt(grad_event.grad_norm if grad_event else None)}\n",
            style="dim",
        )
        for layer in layers:
            norm = layer.grad_norm
            if norm is None:
                bar, value = "", "None"
            elif 0 < norm < ROUNDOFF * largest:
                bar, value = "", "~0"  # zero in exact arithmetic (a bias before BatchNorm, say)
            else:
                filled = 0 if not math.isfinite(norm) else max(1 if norm > 0 else 0, round(bar_width * norm / largest))
                bar, value = "#" * filled, fmt(norm)
            text.append(f"{layer.name:<{width}} ")
            text.append(f"{bar:<{bar_width}}", style="cyan")
            text.append(f" {value:>8}")
            if layer.update_ratio is not None:
                text.append("  upd/w ")
                text.append(f"{layer.update_ratio:.1e}", style=_ratio_style(layer.update_ratio))
            text.append("\n")
        self.update(text)


def _ratio_style(ratio: float) -> str:
    if not math.isfinite(ratio):
        return "bold red"
    if HEALTHY_RATIO[0] <= ratio <= HEALTHY_RATIO[1]:
        return "green"
    if TOLERABLE_RATIO[0] <= ratio <= TOLERABLE_RATIO[1]:
        return "yellow"
    return "bold red"
