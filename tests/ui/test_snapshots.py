"""Snapshots of what a user sees: the main screen at 120x40 and 80x24, a bug's diff, the help.

Nothing time-dependent is on these screens (no durations, no it/s), and every number comes from a
seeded run, so they are stable. Update with `pytest tests/ui/test_snapshots.py --snapshot-update`
after looking at the new SVGs.
"""

from __future__ import annotations

from tests.ui.helpers import make_app, ready, wait_until


async def _settle(pilot) -> None:
    pilot.app.redraw(force=True)
    await pilot.pause(0.2)


def _stepped(iterations: int, stages: int = 0):
    async def run_before(pilot) -> None:
        app = pilot.app
        await ready(pilot)
        for n in range(1, iterations + 1):
            await pilot.press("n")
            await wait_until(pilot, lambda n=n: app.model.state.completed_iterations == n)
        for _ in range(stages):
            seen = app.model.version
            await pilot.press("space")
            await wait_until(pilot, lambda seen=seen: app.model.version > seen)
        await _settle(pilot)

    return run_before


class TestMainScreen:
    def test_spirals_at_120x40(self, snap_compare):
        assert snap_compare(make_app("spirals"), terminal_size=(120, 40), run_before=_stepped(3, stages=3))

    def test_blobs_at_80x24(self, snap_compare):
        assert snap_compare(make_app("blobs"), terminal_size=(80, 24), run_before=_stepped(2, stages=2))


class TestBugDiff:
    def test_double_softmax_diff_and_finding(self, snap_compare):
        app = make_app("digits", bugs=("double_softmax",))
        assert snap_compare(app, terminal_size=(120, 40), run_before=_stepped(1, stages=3))


class TestHelp:
    def test_help_screen(self, snap_compare):
        async def run_before(pilot) -> None:
            await ready(pilot)
            await pilot.press("question_mark")
            await pilot.pause(0.3)

        assert snap_compare(make_app("blobs"), terminal_size=(100, 40), run_before=run_before)
