"""SVG screenshots of each shipped demo at its key step, for the docs and for slides.

    python -m loopscope.ui.demo_shots [--out docs/demos] [--size 120x40]

Each demo is played in the real app (an in-process engine, the demo's own seed) up to its key
step: the first step that claims what a bug does, or, in a demo without a bug, its last step that
shows something. Questions are answered correctly, as a room that paid attention would.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from loopscope.shared.demo import Demo, load_demo, shipped_demos
from loopscope.shared.protocol import SessionSpec
from loopscope.ui.app import LoopscopeApp

SPEED = 100.0  # every iteration probed, as at a lecture's speed, and quick enough for six demos


def key_step(demo: Demo) -> int:
    """The index of the step whose screen tells the demo's story."""
    bug_on = False
    for index, step in enumerate(demo.steps):
        bug_on = bug_on or step.action == "bug on" or bool(demo.bugs)
        if bug_on and step.expect:
            return index
    showing = [index for index, step in enumerate(demo.steps) if step.shows]
    return showing[-1] if showing else len(demo.steps) - 1


async def shoot(demo: Demo, out: Path, size: tuple[int, int]) -> Path:
    key = key_step(demo)
    spec = SessionSpec(demo.target, "cpu", demo.seed, demo.bugs, demo.twin, speed=SPEED)
    app = LoopscopeApp(spec, in_process=True, demo=demo)
    async with app.run_test(size=size) as pilot:
        while app.model.info is None:
            await pilot.pause(0.05)
        script = app.demo
        assert script is not None
        for index, step in enumerate(demo.steps[: key + 1]):
            await pilot.press("right")
            if step.ask:
                await pilot.press(str(step.options.index(step.answer or "") + 1), "right")
            while script.busy is not None or index not in script.ran:
                await pilot.pause(0.05)
        await pilot.pause(0.5)  # the frame clock draws what the last message brought
        name = f"{Path(demo.path).stem}.svg"
        app.save_screenshot(filename=name, path=str(out))
    return out / name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/demos", help="folder for the SVGs (default: docs/demos)")
    parser.add_argument("--size", default="120x40", help="terminal size, COLUMNSxROWS (default: 120x40)")
    parser.add_argument("names", nargs="*", help="demos to shoot (default: every shipped demo)")
    args = parser.parse_args(argv)
    columns, rows = (int(n) for n in args.size.split("x"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.names or list(shipped_demos()):
        demo = load_demo(name)
        path = asyncio.run(shoot(demo, out, (columns, rows)))
        print(f"{path}: step {key_step(demo) + 1} of {len(demo.steps)} of {demo.title!r}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
