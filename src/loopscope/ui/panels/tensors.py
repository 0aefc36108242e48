"""The tensors the last stage touched, and its facts."""

from __future__ import annotations

from rich.text import Text
from textual.coordinate import Coordinate
from textual.widget import Widget
from textual.widgets import DataTable

from loopscope.shared.events import StageEvent
from loopscope.ui.model import ScreenModel
from loopscope.ui.panels.base import fmt, shape


def tensors_title(shared_dtype: str | None = None) -> str:
    return f"Tensors (this stage{f', all {shared_dtype}' if shared_dtype else ''})"


class TensorsPanel(DataTable):
    """Every tensor the stage just run touched."""

    def on_mount(self) -> None:
        self.cursor_type = "none"
        self.zebra_stripes = True

    COLUMNS = ("name", "shape", "dtype", "device", "mean", "std", "note")

    _rows: list[tuple] | None = None  # what the table shows; None before the first show
    _columns: tuple[str, ...] = ()
    _title = ""

    def show(self, model: ScreenModel) -> None:
        event = model.last_event
        run_device = model.info.device if model.info is not None else None
        # The header names the run's device: a column repeating it on every row would push the
        # note column (NaN counts, dead ReLUs) out of a half-screen panel.
        columns: tuple[str, ...] = self.COLUMNS
        tensors = event.tensors if event is not None else ()
        if all(t.device == run_device for t in tensors):
            columns = tuple(c for c in columns if c != "device")
        # One dtype for every row goes into the title, for the same reason.
        dtypes = {t.dtype for t in tensors}
        shared_dtype = dtypes.pop() if len(dtypes) == 1 else None
        if shared_dtype is not None:
            columns = tuple(c for c in columns if c != "dtype")
        if not tensors:  # a stage that touched no tensor (step, scheduler): its facts only
            columns = ("name", "value")
        title = tensors_title(shared_dtype)
        if isinstance(self.parent, Widget) and title != self._title:  # each set repaints the box
            self.parent.border_title = self._title = title
        rows = [_only(row, columns) for row in _tensor_rows(event)]
        same = columns == self._columns and self._rows is not None
        if same and [str(row[0]) for row in rows] == [str(row[0]) for row in self._rows or ()]:
            # The same rows as last time (running, the same stage): repaint the changed cells only.
            for index, (row, old) in enumerate(zip(rows, self._rows or ())):
                for column in range(len(row)):
                    if row[column] != old[column]:
                        self.update_cell_at(Coordinate(index, column), row[column], update_width=True)
        else:
            # Columns rebuilt: widths fit this stage's rows, not the widest ever seen.
            self.clear(columns=True)
            self.add_columns(*columns)
            for row in rows:
                self.add_row(*row)
        self._rows, self._columns = rows, columns


def _only(row: tuple, columns: tuple[str, ...]) -> tuple:
    if columns == ("name", "value"):
        return row[:2]  # a fact's key and value
    return tuple(cell for name, cell in zip(TensorsPanel.COLUMNS, row) if name in columns)


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
            facts.append((key.replace("_", " "), _fact(key, m[key])))
    if m.get("skipped"):
        facts.append(("skipped", "this line is missing from the loop (a bug)"))
    return facts


def _fact(key: str, value: object) -> str:
    if key == "val_accuracy" and isinstance(value, float):
        return f"{value:.1%}"  # as the Epochs panel and the narration write it
    return fmt(value, 4) if isinstance(value, float) else str(value)


# A norm this small beside the largest is float32 round-off of a zero gradient: its digits differ
# from one CPU to the next, and as a number it would suggest a tiny real gradient.
