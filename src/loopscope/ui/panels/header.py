"""The pipeline bar on top and the status line under the panels."""

from __future__ import annotations

from collections.abc import Sequence

from rich.cells import cell_len
from rich.text import Text

from loopscope.ui.model import ScreenModel
from loopscope.ui.panels.base import TextPanel
from loopscope.ui.panels.findings import finding_counts


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
        text.append(f"epoch {epoch}  iter {state.iteration}", style="bold")
        last = model.last_event.metrics if model.last_event else {}
        if "micro_batch" in last:  # gradient accumulation: where in the iteration's micro-batches
            text.append(f"  micro-batch {last['micro_batch']}/{last.get('micro_batches')}", style="bold")
        ranks = f"  {info.world_size} ranks" if info.world_size > 1 else ""
        text.append(f"  {info.device}{ranks}  {mode}", style="bold")
        if state.active_bugs:
            text.append(
                f"  {len(state.active_bugs)} bug{'s' if len(state.active_bugs) > 1 else ''} on", style="bold red"
            )
        text.append(finding_counts(model))
        memory = model.last_event.metrics if model.last_event else {}
        if "cuda_allocated_mb" in memory:
            text.append(f"  mem {memory['cuda_allocated_mb']:.0f}/{memory['cuda_peak_mb']:.0f} MB peak", style="bold")
        groups = (list(state.iteration_stages), list(info.epoch_end_stages))
        here = next((g for g, stages in enumerate(groups) if current in stages), None)
        if here is None:
            here = 1 if state.next_stage in groups[1] and state.next_stage not in groups[0] else 0
        # Too long for one line, close up the arrows, then fold the group the loop is not in to a
        # count: a second line would push every panel down a row (and back up when it shrank).
        # When even that does not fit, the stages get a line of their own, folded the same way to
        # fit it: two lines, never three (a narrow screen with findings counted wrapped to three).
        width = self.content_region.width
        folds = ((None, " > "), (None, ">"), (1 - here, " > "), (1 - here, ">"))
        separator = Text(" | ", style="dim")
        for folded, arrow in folds:
            line = text + separator + self._stages(groups, current, state.next_stage, folded, arrow)
            if not width or cell_len(line.plain) <= width:
                self.update(line)
                return
        for folded, arrow in folds:
            stages = Text(" ") + self._stages(groups, current, state.next_stage, folded, arrow)
            if cell_len(stages.plain) <= width:
                break
        self.update(Text("\n").join([text, stages]))

    @staticmethod
    def _stages(
        groups: tuple[Sequence[str], Sequence[str]],
        current: str | None,
        next_stage: str | None,
        folded: int | None,
        arrow: str,
    ) -> Text:
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


class StatusLine(TextPanel):
    """Run speed and notices."""

    def show(self, model: ScreenModel, speed_label: str, log_scale: bool) -> None:
        text = Text(" ")
        state = model.state
        if model.notice:
            text.append(model.notice + "  ", style="bold yellow")
        if state is not None:
            if state.finished:
                text.append(f"done: {state.stop_reason}  ", style="bold red" if state.halted else "bold green")
                if not model.notice:
                    text.append("(ctrl+r: again)  ", style="dim")
            text.append(f"speed {speed_label}  ")
            text.append(f"twin {'on' if state.twin else 'off'}  ")
            text.append(f"loss axis {'log10' if log_scale else 'linear'}")
        self.update(text)
