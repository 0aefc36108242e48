"""The help screen: what each stage does and what each key does."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Markdown

from loopscope.shared.vocab import STAGE_DESCRIPTIONS

KEYS = (
    ("space", "run one stage"),
    ("n", "run to the end of the iteration"),
    ("e", "run to the end of the epoch"),
    ("r", "run continuously / pause"),
    ("+ / -", "run faster / slower (1, 2, 5, 20, 100 iterations a second, max)"),
    ("m", "max speed, and back to the speed before"),
    ("b", "step back one iteration (then step forward to replay the very same values)"),
    ("t", "clean twin on/off (trains a correct copy beside a bug)"),
    ("c", "sanity checks on a copy of the model"),
    ("d", "jump to the Diagnostics panel (the findings, with their numbers and fixes)"),
    ("l", "loss plot: linear / log10 axis"),
    ("p", "plot panel: loss / picture (decision boundary, or predictions vs targets)"),
    ("s", "save the screen as an SVG (for slides)"),
    ("right / left", "in a demo: next step / back"),
    ("1-4", "in a demo: record the room's answer to a question"),
    ("escape", "in a demo: leave the script to explore freely, and come back"),
    ("enter", "in the bug list: switch the highlighted bug on/off"),
    ("tab", "move between panels"),
    ("ctrl+p", "command palette: every action by name"),
    ("ctrl+r", "restart the engine (after a crash or a hang)"),
    ("?", "this help"),
    ("q", "quit"),
)


def help_markdown() -> str:
    stages = "\n".join(f"| `{name}` | {text} |" for name, text in STAGE_DESCRIPTIONS.items())
    keys = "\n".join(f"| `{key}` | {text} |" for key, text in KEYS)
    return f"""# loopscope

A real PyTorch training loop, one stage at a time. (`escape`, `?` or `q` closes this help.)

## The stages

| stage | what it does |
| --- | --- |
{stages}

## Keys

| key | action |
| --- | --- |
{keys}

Bugs change the loop from the next stage; the code panel shows the change as a diff (red: the
correct line, struck out; green: the buggy one). Diagnostics name what they see, with numbers.

With `--nproc N` every key moves all N ranks together and the panels show rank 0. The Ranks
table (above the gradients) has one row per rank: `batch`, a fingerprint of the examples it
loaded (different on every rank when the data is split); its `loss`; its gradient norm before
DDP's all-reduce (`local`) and after it (`reduced`, the same on every rank); the all-reduces of its
backward and their time (`comm`); and `params`, a checksum of its parameters after `step`, equal
on every rank while they train one model.

Press `escape`, `?` or `q` to close this help.
"""


class HelpScreen(ModalScreen[None]):
    """Stages and keys."""

    BINDINGS = [
        Binding("escape", "dismiss", "close"),
        Binding("question_mark", "dismiss", "close", show=False),
        Binding("q", "dismiss", "close", show=False),
    ]
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll { width: 90%; max-width: 100; height: 90%; border: thick $accent; background: $surface; }
    """

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help-scroll"):
            yield Markdown(help_markdown())

    def on_mount(self) -> None:
        self.query_one("#help-scroll").focus()  # arrows and page keys scroll at once

    async def action_dismiss(self, result: None = None) -> None:
        self.dismiss(None)
