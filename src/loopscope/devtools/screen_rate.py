"""Training speed as a user sees it: `loopscope run` in a real terminal (tmux), run mode at full
speed, its rate read off the screen's own `iter N` counter, against the same model trained by a
plain loop in the same terminal. The two take turns (plain first and last), each a fresh process
given a warm-up before it is counted, and each app round is compared with the plain rounds on both
sides of it.

    python -m loopscope.devtools.screen_rate [--model adam_mlp] [--seconds 10] [--rounds 3] [--json]

`loopscope bench` measures the same thing headless (the app's state rather than its screen); this is
the check against the screen itself, as issue 17 first measured it. It needs tmux.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MODELS = ("adam_mlp", "mlp", "wide_mlp")
WARM_UP_SECONDS = 2.0
_COUNTER = re.compile(r"\biter (\d+)\b")


class Terminal:
    """A detached tmux session of a fixed size, killed on exit whatever happened."""

    def __init__(self, width: int = 120, height: int = 40) -> None:
        self.name = f"loopscope-rate-{os.getpid()}"
        self.size = (str(width), str(height))

    def __enter__(self) -> Terminal:
        subprocess.run(["tmux", "kill-session", "-t", self.name], capture_output=True)
        width, height = self.size
        self._tmux("new-session", "-d", "-s", self.name, "-x", width, "-y", height, "bash --norc --noprofile")
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.name], capture_output=True)

    def _tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", *args], capture_output=True, text=True, check=True).stdout

    def type(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", self.name, *keys)

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-t", self.name)

    def wait_for(self, pattern: str, timeout: float = 90.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            found = re.search(pattern, screen)
            if found:
                return found
            if time.monotonic() > deadline:
                raise RuntimeError(f"{pattern!r} never appeared; the terminal shows:\n{screen}")
            time.sleep(0.1)


def _iteration_on_screen(terminal: Terminal) -> tuple[int, float]:
    screen, read_at = terminal.screen(), time.perf_counter()
    found = _COUNTER.search(screen)
    if found is None:
        raise RuntimeError(f"no `iter N` on the screen:\n{screen}")
    return int(found.group(1)), read_at


def app_rate(terminal: Terminal, model: str, seconds: float) -> float:
    """Iterations a second that the app's screen counts over `seconds`, once it has run for a warm-up."""
    loopscope = str(Path(sys.executable).parent / "loopscope")
    target = f"loopscope.scenarios.bench_models:{model}_experiment"
    terminal.type("clear; " + f"{loopscope} run {target} --speed max; echo APP-EXIT=$?", "Enter")
    terminal.wait_for(r"\biter 0\b.*paused")
    terminal.type("r")
    terminal.wait_for(r"running")
    time.sleep(WARM_UP_SECONDS)
    first, began = _iteration_on_screen(terminal)
    time.sleep(seconds)
    last, ended = _iteration_on_screen(terminal)
    terminal.type("q")
    exit_code = terminal.wait_for(r"APP-EXIT=(\d+)").group(1)
    if exit_code != "0":
        raise RuntimeError(f"the app exited with {exit_code}")
    return (last - first) / (ended - began)


def plain_rate(terminal: Terminal, model: str, seconds: float) -> float:
    """Iterations a second of the hand-written loop on the same model, run in the same terminal."""
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "rate.json"
        command = f"{sys.executable} -m loopscope.devtools.screen_rate --plain {model} --seconds {seconds} --out {out}"
        terminal.type("clear; " + command + "; echo PLAIN-EXIT=$?", "Enter")
        # Waits on the file, not the screen: a tmux capture is a process, and ten a second took
        # the plain loop's CPU (the app's round is counted without one, so the ratio read high).
        # The screen is looked at every 5 s only, in case the loop died before writing its file.
        deadline, look_at = time.monotonic() + seconds + 120, time.monotonic() + 5
        while not out.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
            if time.monotonic() > look_at:
                if "PLAIN-EXIT" in terminal.screen():
                    break
                look_at = time.monotonic() + 5
        exit_code = terminal.wait_for(r"PLAIN-EXIT=(\d+)", timeout=30).group(1)
        if exit_code != "0":
            raise RuntimeError(f"the plain loop exited with {exit_code}:\n{terminal.screen()}")
        return float(json.loads(out.read_text())["rate"])


def _run_plain(model: str, seconds: float, out: Path) -> None:
    import torch

    from loopscope.engine.allocator import tune_allocator
    from loopscope.engine.plainloop import plain_iterations_for
    from loopscope.scenarios.bench_models import reference_experiment

    # As the app's engine process does (and bench's plain loop): measured here, the allocator alone
    # made the engine ~5-8% faster than an untuned plain loop, which hid loopscope's own cost.
    tune_allocator()
    torch.manual_seed(0)  # as `loopscope run` seeds before building the experiment
    done, took = plain_iterations_for(reference_experiment(model), torch.device("cpu"), seconds, WARM_UP_SECONDS)
    out.write_text(json.dumps({"rate": done / took}))


def measure(model: str = "adam_mlp", seconds: float = 10.0, rounds: int = 3, report=None) -> dict[str, Any]:
    """Plain and app rounds in turns, the plain loop first and last; the ratio is the median of each
    app round's rate against the plain rounds on either side of it (on times, so a drift cancels)."""
    say = report or (lambda line: None)
    plain_rates: list[float] = []
    app_rates: list[float] = []
    with Terminal() as terminal:
        plain_rates.append(plain_rate(terminal, model, seconds))
        say(f"plain loop: {plain_rates[-1]:.0f} it/s")
        for _ in range(rounds):
            app_rates.append(app_rate(terminal, model, seconds))
            say(f"app, counted on its screen: {app_rates[-1]:.0f} it/s")
            plain_rates.append(plain_rate(terminal, model, seconds))
            say(f"plain loop: {plain_rates[-1]:.0f} it/s")
    ratios = [app * (1 / before + 1 / after) / 2 for app, before, after in zip(app_rates, plain_rates, plain_rates[1:])]
    return {
        "model": model,
        "seconds": seconds,
        "plain_its": [round(rate, 1) for rate in plain_rates],
        "app_its": [round(rate, 1) for rate in app_rates],
        "rounds": [round(ratio, 3) for ratio in ratios],
        "ratio": round(statistics.median(ratios), 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loopscope.devtools.screen_rate",
        description="Run mode's training speed counted on the app's screen in tmux, against a plain loop "
        "in the same terminal.",
    )
    parser.add_argument(
        "--model",
        choices=MODELS,
        default="adam_mlp",
        help="a bench reference model (default: "
        "adam_mlp, the 64-256-256-10 MLP with Adam of issue 17, ~1 ms an iteration)",
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="counted seconds a round (default: 10)")
    parser.add_argument("--rounds", type=int, default=3, help="app rounds, each between two plain ones (default: 3)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--plain", choices=MODELS, help=argparse.SUPPRESS)  # one plain round, in the terminal
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.plain:
        _run_plain(args.plain, args.seconds, args.out)
        return 0
    if shutil.which("tmux") is None:
        print("screen_rate needs tmux (apt install tmux)", file=sys.stderr)
        return 2
    result = measure(args.model, args.seconds, args.rounds, report=lambda line: print(line, file=sys.stderr))
    if args.json:
        print(json.dumps(result))
    else:
        rounds = ", ".join(f"{ratio:.2f}" for ratio in result["rounds"])
        print(
            f"{args.model} in the app, counted on its screen: {result['ratio']:.2f}x a plain loop in the same "
            f"terminal (rounds {rounds}; {statistics.median(result['app_its']):.0f} vs "
            f"{statistics.median(result['plain_its']):.0f} it/s)  (target >= 0.90x: "
            f"{'ok' if result['ratio'] >= 0.90 else 'MISSED'})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
