"""Scripted lecture demos: a TOML file of steps, each with a line of narration (torch-free).

title = "Forgetting zero_grad"
scenario = "blobs"              # a built-in scenario, or a .py file next to the demo
seed = 0                        # optional
bugs = []                       # optional: bugs on from the start
twin = false                    # optional

[[step]]
do = "run 20"                   # stage | iteration | epoch | run N | bug on ID | bug off ID
say = "A healthy start."        #   | twin on | twin off | pause
ask = "Bigger or smaller?"      # optional: predict, then reveal
options = ["bigger", "smaller"]
answer = "bigger"
reveal = "grad_norm"            # optional: loss | twin_loss | grad_norm | max_update_ratio | lr | val_loss | val_accuracy
explain = "Stale gradients add up."
expect = "grad_norm rises"      # optional: what the step claims, one or a list ("QUANTITY rises|falls|stays",
                                #   "QUANTITY above|below N"), checked by `loopscope demo --verify` over a
                                #   window and shown as the reveal (instead of reveal =)
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from loopscope.shared.bugs import BUGS_BY_ID
from loopscope.shared.catalog import SCENARIOS
from loopscope.shared.claims import QUANTITIES, Claim, ClaimError

ACTIONS = ("stage", "iteration", "epoch", "run", "bug on", "bug off", "twin on", "twin off", "pause")
REVEALS = QUANTITIES
TOP_KEYS = {"title", "scenario", "seed", "bugs", "twin", "step", "description"}
STEP_KEYS = {"do", "say", "ask", "options", "answer", "reveal", "explain", "expect"}
MAX_RUN = 100_000
TRAINING_ACTIONS = ("stage", "iteration", "epoch", "run")


class DemoError(Exception):
    """A demo file that cannot be played: `file:line: what is wrong`."""


@dataclass(frozen=True)
class DemoStep:
    action: str  # one of ACTIONS
    argument: str | int | None
    say: str
    line: int
    ask: str | None = None
    options: tuple[str, ...] = ()
    answer: str | None = None
    reveal: str | None = None  # a quantity shown before -> after the step, when it makes no claim
    explain: str | None = None
    expect: tuple[Claim, ...] = ()

    @property
    def shows(self) -> tuple[str, ...]:
        """The quantities the step reveals once it has run: its claims', or its reveal."""
        return tuple(claim.quantity for claim in self.expect) or ((self.reveal,) if self.reveal else ())


@dataclass(frozen=True)
class Demo:
    title: str
    target: str
    seed: int
    bugs: tuple[str, ...]
    twin: bool
    steps: tuple[DemoStep, ...]
    path: str
    description: str = ""


def shipped_demos() -> dict[str, Path]:
    """The demos that come with loopscope, by name (`02_forgetting_zero_grad`): inside the package
    when installed from a wheel, the repository's demos/ folder in a checkout."""
    import importlib.resources

    for folder in (
        Path(str(importlib.resources.files("loopscope"))) / "demos",
        Path(__file__).resolve().parents[3] / "demos",
    ):
        if folder.is_dir():
            return {path.stem: path for path in sorted(folder.glob("*.toml"))}
    return {}


def find_demo(name: str) -> Path:
    """A demo file by path, by name (`02_forgetting_zero_grad`), by its name without the number
    (`forgetting_zero_grad`) or by its number (`02`, `2`)."""
    if Path(name).is_file():
        return Path(name)
    demos = shipped_demos()
    for stem, path in demos.items():
        number, _, rest = stem.partition("_")
        if name in (stem, rest) or (name.isdigit() and number.isdigit() and int(name) == int(number)):
            return path
    if name.endswith(".toml") or "/" in name:
        raise DemoError(f"no such demo file: {name}")
    raise DemoError(f"no demo named {name!r}; `loopscope demo --list` lists them ({', '.join(demos) or 'none found'})")


def load_demo(path: str | Path) -> Demo:
    """Parse and check a demo file (or a shipped demo's name); every problem is a DemoError naming
    the file and line."""
    path = find_demo(str(path))
    if not path.is_file():
        raise DemoError(f"no such demo file: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r"line (\d+)", str(exc))
        line = match.group(1) if match else "?"
        raise DemoError(f"{path}:{line}: not valid TOML: {exc}") from exc
    step_lines = [i + 1 for i, row in enumerate(text.splitlines()) if row.strip() == "[[step]]"]

    def fail(message: str, line: int = 1) -> DemoError:
        return DemoError(f"{path}:{line}: {message}")

    unknown = set(data) - TOP_KEYS
    if unknown:
        raise fail(f"unknown key(s) {', '.join(sorted(unknown))}; expected {', '.join(sorted(TOP_KEYS))}")
    title = data.get("title")
    if not isinstance(title, str) or not title.strip():
        raise fail('the demo needs a title = "..."')
    target = data.get("scenario")
    if not isinstance(target, str) or not target:
        raise fail('the demo needs a scenario = "blobs" (a built-in scenario or a .py file)')
    if target not in SCENARIOS:
        candidate = path.parent / target
        if not candidate.is_file():
            raise fail(f"scenario {target!r} is neither a built-in scenario ({', '.join(SCENARIOS)}) nor a file")
        target = str(candidate)
    seed = data.get("seed", 0)
    if not isinstance(seed, int) or seed < 0:
        raise fail(f"seed must be a whole number >= 0, got {seed!r}")
    bugs = data.get("bugs", [])
    if not isinstance(bugs, list) or not all(isinstance(b, str) for b in bugs):
        raise fail("bugs must be a list of bug ids")
    for bug in bugs:
        _check_bug(bug, target, fail, 1)
    twin = data.get("twin", False)
    if not isinstance(twin, bool):
        raise fail("twin must be true or false")
    raw_steps = data.get("step")
    if not isinstance(raw_steps, list) or not raw_steps:
        raise fail("the demo needs at least one [[step]]")
    steps = []
    for index, raw in enumerate(raw_steps):
        line = step_lines[index] if index < len(step_lines) else 1
        steps.append(_parse_step(raw, index + 1, line, target, fail))
    return Demo(
        title.strip(), target, seed, tuple(bugs), twin, tuple(steps), str(path), str(data.get("description", ""))
    )


def _check_bug(bug: str, target: str, fail, line: int) -> None:
    if bug not in BUGS_BY_ID:
        raise fail(f"unknown bug {bug!r} (see `loopscope bugs`)", line)
    if target in SCENARIOS and bug not in SCENARIOS[target].bugs:
        raise fail(f"bug {bug!r} does not apply to scenario {target!r}", line)


def _parse_step(raw: object, number: int, line: int, target: str, fail) -> DemoStep:
    if not isinstance(raw, dict):
        raise fail(f"step {number} must be a table", line)
    unknown = set(raw) - STEP_KEYS
    if unknown:
        raise fail(
            f"step {number}: unknown key(s) {', '.join(sorted(unknown))}; expected {', '.join(sorted(STEP_KEYS))}", line
        )
    do = raw.get("do")
    say = raw.get("say")
    if not isinstance(do, str):
        raise fail(f'step {number}: needs do = "..." (one of: {", ".join(ACTIONS)})', line)
    if not isinstance(say, str) or not say.strip():
        raise fail(f'step {number}: needs a line of narration, say = "..."', line)
    words = do.split()
    action: str | None = None
    argument: int | str | None = None
    if len(words) == 1 and words[0] in ("stage", "iteration", "epoch", "pause"):
        action = words[0]
    elif len(words) == 2 and words[0] == "run":
        if not words[1].isdigit() or not 1 <= int(words[1]) <= MAX_RUN:
            raise fail(f"step {number}: `run N` needs N between 1 and {MAX_RUN}, got {words[1]!r}", line)
        action, argument = "run", int(words[1])
    elif len(words) == 3 and words[0] == "bug" and words[1] in ("on", "off"):
        _check_bug(words[2], target, fail, line)
        action, argument = f"bug {words[1]}", words[2]
    elif len(words) == 2 and words[0] == "twin" and words[1] in ("on", "off"):
        action = f"twin {words[1]}"
    if action is None:
        raise fail(
            f"step {number}: cannot do {do!r}; expected one of: stage, iteration, epoch, run N, "
            "bug on ID, bug off ID, twin on, twin off, pause",
            line,
        )
    ask, options, answer = raw.get("ask"), raw.get("options", []), raw.get("answer")
    reveal, explain = raw.get("reveal"), raw.get("explain")
    if ask is not None:
        if not isinstance(options, list) or not 2 <= len(options) <= 4 or not all(isinstance(o, str) for o in options):
            raise fail(f'step {number}: a question needs 2 to 4 options = ["...", ...]', line)
        if answer not in options:
            raise fail(f"step {number}: answer must be one of the options, got {answer!r}", line)
    elif options or answer is not None:
        raise fail(f'step {number}: options and answer need a question, ask = "..."', line)
    if reveal is not None and reveal not in REVEALS:
        raise fail(f"step {number}: reveal must be one of {', '.join(REVEALS)}, got {reveal!r}", line)
    expect = raw.get("expect", [])
    expect = [expect] if isinstance(expect, str) else expect
    if not isinstance(expect, list) or not all(isinstance(text, str) for text in expect):
        raise fail(f'step {number}: expect = "QUANTITY rises|falls|stays", or a list of them', line)
    try:
        claims = tuple(Claim.parse(text) for text in expect)
    except ClaimError as exc:
        raise fail(f"step {number}: {exc}", line) from exc
    if claims:
        if action not in TRAINING_ACTIONS:
            raise fail(
                f"step {number}: only a step that trains ({', '.join(TRAINING_ACTIONS)}) can expect a change", line
            )
        if reveal is not None:
            raise fail(f"step {number}: a step that expects shows what it expects; drop reveal", line)
    return DemoStep(action, argument, say.strip(), line, ask, tuple(options), answer, reveal, explain, claims)
