"""The text panels: pipeline bar, loop code, tensors, gradients, diagnostics, epochs, status."""

from __future__ import annotations

import math

from rich.cells import cell_len
from rich.segment import Segment
from rich.style import Style
from rich.syntax import Syntax
from rich.text import Text
from textual.coordinate import Coordinate
from textual.geometry import Size
from textual.scroll_view import ScrollView
from textual.strip import Strip
from textual.widgets import DataTable, Static

from loopscope.shared.bugs import BUGS_BY_ID
from loopscope.shared.events import StageEvent
from loopscope.ui.loopcode import render_loop
from loopscope.ui.model import ScreenModel, observe

_SYNTAX = Syntax("", "python", theme="monokai", background_color="default")
HEALTHY_RATIO = (1e-4, 1e-2)  # around cs231n's 1e-3
TOLERABLE_RATIO = (1e-5, 1e-1)  # the diagnostics' thresholds


def fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    return f"{value:.{digits}g}"


def shape(dims: tuple[int, ...]) -> str:
    return "[" + ",".join(map(str, dims)) + "]"


class TextPanel(Static):
    """A Static that repaints only when its text changed, and asks for a new screen layout only when
    its size did. A layout pass costs the UI process tens of ms (it ran 12 times a second while
    training before this), and while training runs the engine process wants that CPU time."""

    _shown: object = None
    _size_key: object = None

    def update(self, content: object = "", *, layout: bool | None = None) -> None:
        if content == self._shown:
            return
        self._shown = content
        super().update(content, layout=bool(layout))
        if layout is None:
            size_key = self._size_now()
            if size_key is None or size_key != self._size_key:
                self.refresh(layout=True)
            self._size_key = size_key

    def _size_now(self) -> object:
        """The size the new text takes, wrapped as Textual will wrap it; None before the first layout."""
        width = self.content_region.width
        if width <= 0:
            return None
        if self.styles.width is not None and self.styles.width.is_auto:
            width = self.visual.get_optimal_width(self.styles, width)
        return width, self.visual.get_height(self.styles, width)


class PipelineBar(TextPanel):
    """The stages of one iteration, the one just run highlighted; epoch, iteration, device, state."""

    def show(self, model: ScreenModel) -> None:
        state, info = model.state, model.info
        text = Text(" ")
        if state is None or info is None:
            text.append("starting the engine (loading torch)...", style="italic")
            self.update(text)
            return
        current = model.last_event.stage if model.last_event else None
        mode = "running" if state.running else ("finished" if state.finished else "paused")
        if state.halted is not None:
            mode = "error"
        # The counters come first so a narrow terminal never cuts them off.
        # After an epoch's last stage the engine has moved on; show the epoch that stage belonged to.
        epoch = model.last_event.epoch if model.last_event and current in info.epoch_end_stages else state.epoch
        text.append(f"epoch {epoch}  iter {state.iteration}  {info.device}  {mode}", style="bold")
        if state.active_bugs:
            text.append(f"  {len(state.active_bugs)} bug{'s' if len(state.active_bugs) > 1 else ''} on",
                        style="bold red")
        memory = model.last_event.metrics if model.last_event else {}
        if "cuda_allocated_mb" in memory:
            text.append(f"  mem {memory['cuda_allocated_mb']:.0f}/{memory['cuda_peak_mb']:.0f} MB peak", style="bold")
        text.append(" | ", style="dim")
        groups = (list(state.iteration_stages), list(info.epoch_end_stages))
        here = next((g for g, stages in enumerate(groups) if current in stages), None)
        if here is None:
            here = 1 if state.next_stage in groups[1] and state.next_stage not in groups[0] else 0
        # Too long for one line, close up the arrows, then fold the group the loop is not in to a
        # count: a second line would push every panel down a row (and back up when it shrank).
        # When even that does not fit, it wraps in full.
        for folded, arrow in ((None, " > "), (None, ">"), (1 - here, " > "), (1 - here, ">"), (None, " > ")):
            line = text + self._stages(groups, current, state.next_stage, folded, arrow)
            if not self.content_region.width or cell_len(line.plain) <= self.content_region.width:
                break
        self.update(line)

    @staticmethod
    def _stages(groups: tuple[list[str], list[str]], current: str | None, next_stage: str | None,
                folded: int | None, arrow: str) -> Text:
        text = Text()
        for group, stages in enumerate(groups):
            if group and stages:
                text.append(" | epoch end: ", style="dim")
            if group == folded and stages:
                count = f"{len(stages)} stage{'s' if len(stages) > 1 else ''}"
                text.append(count if group else f"iteration: {count}", style="dim")
                continue
            for i, stage in enumerate(stages):
                if i:
                    text.append(arrow, style="dim")
                if stage == current:
                    text.append(f"[{stage}]", style="bold reverse")
                else:
                    text.append(stage, style="bold" if stage == next_stage else ("dim" if group else ""))
        return text


class CodePanel(TextPanel):
    """The loop as PyTorch code; the stage just run highlighted; active bugs as a diff."""

    def show(self, model: ScreenModel) -> int | None:
        """Render; returns the index of the first line of the stage just run, if shown."""
        if model.info is None or model.state is None:
            self.update("")
            return None
        current = model.last_event.stage if model.last_event else None
        current_line = None
        lines = render_loop(model.info.options, model.state.iteration_stages, model.state.active_bugs)
        text = Text(no_wrap=True)
        for index, line in enumerate(lines):
            marker = {"removed": "- ", "added": "+ "}.get(line.change, "  ")
            is_current = current is not None and line.stage == current and line.change != "removed"
            if is_current:
                marker = "> " if not line.change else marker
            if line.change == "removed":
                body = Text(line.text, style="red strike")
            else:
                body = _SYNTAX.highlight(line.text)
                body.rstrip()
                if line.change == "added":
                    body.stylize("bold on #1f3d1f")
            row = Text(marker, style="bold red" if line.change == "removed" else "bold green" if line.change else "bold")
            row.append_text(body)
            if is_current:
                row.stylize("reverse")
                if current_line is None:
                    current_line = index
            text.append_text(row)
            text.append("\n")
        self.update(text)
        return current_line


class TensorsPanel(DataTable):
    """Every tensor the stage just run touched."""

    def on_mount(self) -> None:
        self.cursor_type = "none"
        self.zebra_stripes = True

    COLUMNS = ("name", "shape", "dtype", "device", "mean", "std", "note")

    _rows: list[tuple] | None = None  # what the table shows; None before the first show

    def show(self, model: ScreenModel) -> None:
        rows = _tensor_rows(model.last_event)
        if self._rows is not None and [str(row[0]) for row in rows] == [str(row[0]) for row in self._rows]:
            # The same rows as last time (running, the same stage): repaint the changed cells only.
            for index, (row, old) in enumerate(zip(rows, self._rows)):
                for column in range(len(row)):
                    if row[column] != old[column]:
                        self.update_cell_at(Coordinate(index, column), row[column], update_width=True)
        else:
            # Columns rebuilt: widths fit this stage's rows, not the widest ever seen.
            self.clear(columns=True)
            self.add_columns(*self.COLUMNS)
            for row in rows:
                self.add_row(*row)
        self._rows = rows


def _tensor_rows(event: StageEvent | None) -> list[tuple]:
    if event is None:
        return []
    if event.error is not None:
        return [(Text(f"{event.stage} raised {event.error.type}", style="bold red"), "", "", "", "", "", "")]
    rows: list[tuple] = []
    for t in event.tensors:
        note = Text()
        if t.nan_count or t.inf_count:
            note.append(f"{t.nan_count} NaN {t.inf_count} Inf", style="bold red")
        elif t.module_type in ("ReLU", "ReLU6") and t.zero_fraction is not None:
            note.append(f"{t.zero_fraction:.0%} zeros", style="yellow" if t.zero_fraction >= 0.7 else "")
        name = f"{t.name} {t.module_type}" if t.module_type else t.name
        rows.append((name, shape(t.shape), t.dtype, t.device, fmt(t.mean), fmt(t.std), note))
    for key, value in _stage_facts(event):
        rows.append((Text(key, style="dim"), value, "", "", "", "", ""))
    return rows


def _stage_facts(event: StageEvent) -> list[tuple[str, str]]:
    m = event.metrics
    facts = []
    if event.loss is not None:
        facts.append(("loss", fmt(event.loss, 5)))
    if event.twin_loss is not None:
        facts.append(("clean twin loss", fmt(event.twin_loss, 5)))
    if "grads_before" in m and event.stage == "zero_grad":
        b, a = m["grads_before"], m["grads_after"]
        facts.append(("grads before", f"{b['nonzero']} with values, {b['none']} None"))
        facts.append(("grads after", f"{a['nonzero']} with values, {a['none']} None"))
    for key in ("lr", "val_loss", "val_accuracy", "norm_before", "best_val_loss", "without_improvement"):
        if key in m and m[key] is not None:
            facts.append((key.replace("_", " "), fmt(m[key], 4) if isinstance(m[key], float) else str(m[key])))
    if m.get("skipped"):
        facts.append(("skipped", "this line is missing from the loop (a bug)"))
    return facts


# A norm this small beside the largest is float32 round-off of a zero gradient: its digits differ
# from one CPU to the next, and as a number it would suggest a tiny real gradient.
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
        text.append(f"iteration {event.iteration}, global grad norm "
                    f"{fmt(grad_event.grad_norm if grad_event else None)}\n", style="dim")
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


class DiagnosticsPanel(TextPanel):
    """Findings, newest first, with the numbers, the suspects and the fix."""

    def show(self, model: ScreenModel) -> None:
        text = Text()
        if model.failure:
            text.append(f"ENGINE STOPPED: {model.failure}\nPress ctrl+r to restart it.\n\n", style="bold red")
        if model.checks is not None:
            text.append("Sanity checks:\n", style="bold")
            for check in model.checks:
                if check.skipped:
                    text.append(" SKIP ", style="dim")
                else:
                    text.append(" PASS " if check.passed else " FAIL ", style="green" if check.passed else "bold red")
                text.append(f"{check.title}: {check.message}\n")
            text.append("\n")
        state = model.state
        if state is not None and state.halted is not None:
            err = state.halted
            last = model.last_event
            where = f" in iteration {last.iteration}, stage {last.stage}" if last else ""
            text.append(f"ERROR{where}: {err.type}: {err.message}\n", style="bold red")
            if err.location:
                text.append(f"  {'' if err.location.startswith('in ') else 'at '}{err.location}\n")
            if err.hint:
                text.append(f"  {err.hint}\n", style="yellow")
            text.append("  Step on (space/n) to start the next iteration.\n\n", style="dim")
        if not model.findings and not text:
            self.update(Text("no findings yet", style="dim"))
            return
        icons = {"error": ("x ", "bold red"), "warning": ("! ", "yellow"), "info": ("i ", "cyan")}
        rank = {"error": 0, "warning": 1, "info": 2}
        # Errors first (they are usually the cause), then warnings; newest first within each.
        ordered = sorted(model.findings, key=lambda item: rank.get(item[1].severity, 3))
        for iteration, finding in ordered:
            icon, style = icons.get(finding.severity, ("  ", ""))
            text.append(icon, style=style)
            text.append(f"it {iteration}: {finding.message}\n")
            if finding.suspects:
                text.append(f"   suspects: {', '.join(finding.suspects)}\n", style="dim")
            if finding.fix:
                text.append(f"   fix: {finding.fix}\n", style="green")
        self.update(text)


class BugInfo(TextPanel):
    """The explanation of the bug under the cursor in the bug list."""

    def show_bug(self, bug_id: str | None) -> None:
        bug = BUGS_BY_ID.get(bug_id or "")
        if bug is None:
            self.update(Text("enter toggles the highlighted bug", style="dim"))
            return
        text = Text()
        text.append(f"{bug.title} (stage {bug.stage})\n", style="bold")
        text.append(f"You will see: {bug.symptom}\n")
        text.append(f"Why: {bug.why}\n", style="dim")
        text.append(f"Fix: {bug.fix}", style="green")
        self.update(text)


EPOCH_COLUMNS = (("epoch", 5), ("train loss", 10), ("val loss", 10), ("val acc", 7), ("observation", 0))


def epoch_line(values: tuple[str, ...]) -> str:
    """One row of the epochs table: fixed-width columns, so the header above lines up with it."""
    cells = [value.rjust(width) if width else value for value, (_, width) in zip(values, EPOCH_COLUMNS)]
    return "  ".join(cells)


EPOCHS_HEADER = epoch_line(tuple(name for name, _ in EPOCH_COLUMNS))


class EpochsPanel(ScrollView):
    """One line per planned epoch (blank until it runs): train loss, val loss, val acc, an observation.

    Every planned epoch (the latest MAX_ROWS of a longer run) has its line from the start, so the
    table keeps its height while training runs: a change of height makes Textual lay out the whole
    screen (~15 ms here). It draws only the lines in view, and repaints only the lines that changed:
    the running epoch's loss changes at every frame, and a DataTable repaints every row for that (~7 ms).
    The header stays on top when the rows scroll, and moves sideways with them.
    """

    MAX_ROWS = 100

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self._lines: list[tuple[str, Style | None]] = []  # (text, its style), the header first
        self._width = 0
        self._latest: int | None = None

    @property
    def plain(self) -> str:
        """The header and every row, as text (what scrolling through the table would show)."""
        return "\n".join(line for line, _ in self._lines)

    def show(self, model: ScreenModel) -> None:
        if model.info is None:
            return
        count = min(model.info.epochs, self.MAX_ROWS)
        latest = max(model.epochs, default=1)
        first = max(1, latest - count + 1)
        lines = [(EPOCHS_HEADER, HEADER_STYLE)] + [self._line(model, epoch) for epoch in range(first, first + count)]
        width = max(self._width, *(cell_len(line) for line, _ in lines))
        if len(lines) != len(self._lines) or width != self._width:  # rare: a new run, a longer observation
            self._width = width
            self.virtual_size = Size(width, len(lines))
            self.refresh()
        else:
            for y, (line, before) in enumerate(zip(lines, self._lines)):
                if line != before:
                    self.refresh_line(y)
        self._lines = lines
        if latest != self._latest:  # follow the epoch being run, but let the reader scroll within one
            self._latest = latest
            rows_in_view = self.scrollable_content_region.height - 1
            row = latest - first
            if rows_in_view > 0 and not self.scroll_y <= row < self.scroll_y + rows_in_view:
                self.scroll_to(y=max(0, row - rows_in_view + 1), animate=False)

    @staticmethod
    def _line(model: ScreenModel, epoch: int) -> tuple[str, Style | None]:
        row = model.epochs.get(epoch)
        if row is None:
            return epoch_line((str(epoch),)), PLANNED_STYLE
        accuracy = f"{row.val_accuracy:.1%}" if row.val_accuracy is not None else "-"
        return epoch_line((str(epoch), fmt(row.train_loss, 4), fmt(row.val_loss, 4), accuracy,
                           observe(model.epochs.get(epoch - 1), row))), None

    def refresh_line(self, y: int) -> None:
        # Line 0 is the header, drawn at the top whatever the scroll; row y sits at y - scroll_y.
        super().refresh_line(y if y else self.scroll_y)

    def render_line(self, y: int) -> Strip:
        scroll_x, scroll_y = self.scroll_offset
        index = y + scroll_y if y else 0
        style = self.rich_style
        if index >= len(self._lines):
            return Strip.blank(self.size.width, style)
        text, own_style = self._lines[index]
        strip = Strip([Segment(text, style + own_style if own_style else style)], cell_len(text))
        return strip.crop_extend(scroll_x, scroll_x + self.size.width, style)


PLANNED_STYLE = Style(dim=True)
HEADER_STYLE = Style(bold=True)


class StatusLine(TextPanel):
    """Run speed and notices."""

    def show(self, model: ScreenModel, speed_label: str, log_scale: bool) -> None:
        text = Text(" ")
        state = model.state
        if model.notice:
            text.append(model.notice + "  ", style="bold yellow")
        if state is not None:
            if state.finished:
                text.append(f"done: {state.stop_reason}  ", style="bold green")
            text.append(f"speed {speed_label}  ")
            text.append(f"twin {'on' if state.twin else 'off'}  ")
            text.append(f"loss axis {'log10' if log_scale else 'linear'}")
        self.update(text)
