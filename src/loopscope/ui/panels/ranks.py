"""Under --nproc: one row per rank, the numbers that should differ (which examples it holds, its
loss, its gradients before the all-reduce) beside those that must agree (the all-reduced norm, the
parameters after step)."""

from __future__ import annotations

import math

from rich.text import Text

from loopscope.shared.events import StageEvent
from loopscope.ui.model import ScreenModel
from loopscope.ui.panels.base import TextPanel, fmt

# 52 columns: half of a 120-column screen, less the borders and a scrollbar. "local" is the rank's
# gradient norm before the all-reduce, "reduced" the one every rank steps with; "comm" the
# all-reduces of its backward and their time.
RANK_COLUMNS = (("rank", 4), ("batch", 8), ("loss", 6), ("local", 6), ("reduced", 7), ("comm", 7), ("params", 8))
CAPTION = "‖g‖ local: before the all-reduce; reduced: after"


def ranks_line(values: tuple[str, ...]) -> str:
    return " ".join(value.rjust(width) for value, (_, width) in zip(values, RANK_COLUMNS))


RANKS_HEADER = ranks_line(tuple(name for name, _ in RANK_COLUMNS))


class RanksPanel(TextPanel):
    """Each rank's latest numbers; those from an earlier iteration than rank 0's are dimmed."""

    def show(self, model: ScreenModel) -> None:
        if not model.ranks:
            self.update(Text("each rank's numbers appear as its stages run", style="dim"))
            return
        now = model.last_event.iteration if model.last_event else 0
        text = Text(CAPTION + "\n", style="dim")
        text.append(RANKS_HEADER + "\n", style="bold")
        for rank in sorted(model.ranks):
            stages = model.ranks[rank]
            text.append(f"{rank:>4}")
            for value, event, width in _cells(stages):
                text.append(" ")
                stale = event is None or event.iteration != now
                text.append(value.rjust(width), style="dim" if stale else "")
            text.append("\n")
        text.append(_verdict(model))
        self.update(text)


def _cells(stages: dict[str, StageEvent]) -> list[tuple[str, StageEvent | None, int]]:
    load, loss, backward, step = (stages.get(name) for name in ("load_batch", "loss", "backward", "step"))
    widths = [width for _, width in RANK_COLUMNS[1:]]
    comm = "-"
    if backward is not None and "all_reduces" in backward.metrics:
        count = backward.metrics["all_reduces"]
        comm = f"{count}x{backward.metrics.get('comm_ms', 0.0):.1f}ms" if count else "no sync"
    values = [
        (_metric(load, "batch_fingerprint"), load),
        (_number(loss.loss if loss else None), loss),
        (_number(backward.metrics.get("local_grad_norm") if backward else None), backward),
        (_number(backward.grad_norm if backward else None), backward),
        (comm, backward),
        (_metric(step, "param_checksum"), step),
    ]
    return [(value, event, width) for (value, event), width in zip(values, widths)]


def _number(value: float | None) -> str:
    """At most 6 characters, the column's width: 0.4031, 2.9e-5 (a loss near 0 was 2.92e-05 and
    pushed the row onto a second line)."""
    text = fmt(value, 4)
    if len(text) <= 6 or value is None or not math.isfinite(value):
        return text
    shown = fmt(value, 3)
    if len(shown) <= 6:
        return shown
    mantissa, _, exponent = f"{value:.1e}".partition("e")
    return f"{mantissa}e{int(exponent)}"


def _metric(event: StageEvent | None, name: str) -> str:
    value = event.metrics.get(name) if event is not None else None
    return "-" if value is None else str(value)


def _verdict(model: ScreenModel) -> Text:
    """What the columns say together, for those who do not compare hex digits."""
    text = Text()
    sums = {e.metrics.get("param_checksum") for r in model.ranks if (e := model.ranks[r].get("step")) is not None}
    sums.discard(None)
    prints = {
        (e.iteration, e.metrics.get("batch_fingerprint"))
        for r in model.ranks
        if (e := model.ranks[r].get("load_batch")) is not None
    }
    if len(prints) == 1 and len(model.ranks) > 1:
        text.append("same examples on every rank; ", style="bold yellow")
    elif prints:
        text.append("own examples per rank; ", style="green")
    if len(sums) == 1:
        text.append("parameters equal", style="green")
    elif len(sums) > 1:
        text.append("parameters DIFFER", style="bold red")
    norms = {
        (e.iteration, e.metrics.get("batchnorm_checksum"))
        for r in model.ranks
        if (e := model.ranks[r].get("forward")) is not None and "batchnorm_checksum" in e.metrics
    }
    if len(norms) == 1 and len(model.ranks) > 1:
        text.append("\nBatchNorm statistics shared", style="green")
    elif len(norms) > 1 and len({iteration for iteration, _ in norms}) == 1:  # one forward, other statistics
        text.append("\nBatchNorm statistics per rank", style="bold yellow")
    return text
