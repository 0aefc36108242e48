"""Driving the real app in tests: wait for the engine instead of sleeping a fixed time."""

from __future__ import annotations

import time
from collections.abc import Callable

from loopscope.shared.protocol import SessionSpec
from loopscope.ui.app import LoopscopeApp


def make_app(
    target: str = "blobs", bugs: tuple[str, ...] = (), twin: bool = False, in_process: bool = True
) -> LoopscopeApp:
    return LoopscopeApp(SessionSpec(target, "cpu", 0, bugs, twin), in_process=in_process)


async def wait_until(pilot, condition: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the app")
        await pilot.pause(0.05)
    await pilot.pause(0.1)  # let the next frame draw it


async def ready(pilot) -> None:
    await wait_until(pilot, lambda: pilot.app.model.info is not None)


async def press_and_wait(pilot, key: str, condition: Callable[[], bool]) -> None:
    await pilot.press(key)
    await wait_until(pilot, condition)


def text_of(app, selector: str) -> str:
    widget = app.query_one(selector)
    if hasattr(widget, "plain"):  # a panel that draws line by line keeps its text
        return widget.plain
    rendered = widget.render()
    return getattr(rendered, "plain", str(rendered))


async def expect_text(pilot, selector: str, text: str, timeout: float = 15.0) -> None:
    """Wait until the widget shows `text`: the screen redraws on its own clock, not on the key."""
    await wait_until(pilot, lambda: text in text_of(pilot.app, selector), timeout)
