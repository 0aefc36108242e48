"""The diagnostics' findings, and the highlighted bug's card."""

from __future__ import annotations

from rich.text import Text

from loopscope.shared.bugs import BUGS_BY_ID
from loopscope.ui.model import ScreenModel
from loopscope.ui.panels.base import TextPanel

# How each severity is marked, wherever findings appear.
SEVERITY_MARKS = {"error": ("x", "bold red"), "warning": ("!", "yellow"), "info": ("i", "cyan")}
DIAGNOSTICS_KEY = "d"


def finding_counts(model: ScreenModel) -> Text:
    """`x 1 error  ! 2 warnings`: what the header says of the findings, at every width."""
    text = Text()
    for severity, count in model.finding_counts().items():
        mark, style = SEVERITY_MARKS[severity]
        text.append(f"  {mark} {count} {severity}{'s' if count > 1 else ''}", style=style)
    return text


class FindingLine(TextPanel):
    """The newest of the most severe findings on one line, for a screen too narrow to show the
    Diagnostics panel beside the code."""

    def show(self, model: ScreenModel) -> None:
        headline = model.headline_finding()
        self.set_class(headline is not None, "-found")
        if headline is None:
            self.update("")
            return
        iteration, finding = headline
        mark, style = SEVERITY_MARKS[finding.severity]
        key = Text(f"  {DIAGNOSTICS_KEY}: diagnostics", style="dim")
        text = Text(f" {mark} ", style=style).append(f"it {iteration}: {finding.message}")
        room = (self.content_region.width or self.app.size.width) - key.cell_len
        text.truncate(max(room, 10), overflow="ellipsis", pad=True)
        self.update(text + key)


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
            if model.checks_running is not None:
                text.append(f" ...  {model.checks_running - len(model.checks)} more running\n", style="dim")
            elif model.checks_note:
                text.append(model.checks_note + "\n", style="dim italic")
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
            if model.info is not None and model.info.world_size > 1:
                text.append(
                    "  Every rank was stopped: the others would wait for this one in the next all-reduce. "
                    "ctrl+r starts the run again.\n\n",
                    style="dim",
                )
            elif model.info is not None and "script" in model.info.options:  # a script cannot go on past it
                text.append("  The script stopped here; ctrl+r runs it afresh.\n\n", style="dim")
            else:
                text.append("  Step on (space/n) to start the next iteration.\n\n", style="dim")
        if not model.findings and not text:
            self.update(Text("no findings yet", style="dim"))
            return
        rank = {"error": 0, "warning": 1, "info": 2}
        # Errors first (they are usually the cause), then warnings; newest first within each.
        ordered = sorted(model.findings, key=lambda item: rank.get(item[1].severity, 3))
        for iteration, finding in ordered:
            mark, style = SEVERITY_MARKS.get(finding.severity, (" ", ""))
            text.append(f"{mark} ", style=style)
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
