"""The command palette (ctrl+p): every action, and a toggle for every bug, by name."""

from __future__ import annotations

from functools import partial
from typing import Protocol, cast

from textual.command import DiscoveryHit, Hit, Hits, Provider

from loopscope.shared.bugs import BUGS_BY_ID
from loopscope.ui.model import ScreenModel


class PaletteHost(Protocol):
    """What the palette needs of the app: the screen model, and a way to switch a bug."""

    model: ScreenModel

    def toggle_bug(self, bug_id: str) -> None: ...


ACTIONS = (
    ("Step one stage", "step_stage", "space"),
    ("Run to the end of the iteration", "step_iteration", "n"),
    ("Run to the end of the epoch", "step_epoch", "e"),
    ("Run / pause", "toggle_run", "r"),
    ("Step back one iteration", "rewind", "b"),
    ("Faster", "faster", "+"),
    ("Slower", "slower", "-"),
    ("Clean twin on/off", "toggle_twin", "t"),
    ("Sanity checks", "checks", "c"),
    ("Loss plot: linear/log", "toggle_log", "l"),
    ("Save the screen as SVG", "save_svg", "s"),
    ("Plot: loss / picture of the model", "toggle_picture", "p"),
    ("Restart the engine", "restart_engine", "ctrl+r"),
    ("Help", "help", "?"),
    ("Quit", "quit", "q"),
)


class LoopCommands(Provider):
    """Actions and bug toggles."""

    async def discover(self) -> Hits:
        """Shown before anything is typed: every action, with its key."""
        for title, action, key in ACTIONS:
            yield DiscoveryHit(title, partial(self.app.run_action, action), help=f"key: {key}")

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for title, action, key in ACTIONS:
            score = matcher.match(title)
            if score > 0:
                yield Hit(score, matcher.highlight(title), partial(self.app.run_action, action), help=f"key: {key}")
        app = cast(PaletteHost, self.app)
        active = set(app.model.state.active_bugs) if app.model.state else set()
        applicable = app.model.info.applicable_bugs if app.model.info else ()
        for bug_id in applicable:
            title = f"{'Turn off' if bug_id in active else 'Turn on'} bug: {bug_id} ({BUGS_BY_ID[bug_id].title})"
            score = matcher.match(title)
            if score > 0:
                yield Hit(
                    score, matcher.highlight(title), partial(app.toggle_bug, bug_id), help=BUGS_BY_ID[bug_id].symptom
                )
