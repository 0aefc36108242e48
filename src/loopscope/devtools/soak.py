"""A long headless run that reports resident memory along the way (the soak test).

    python -m loopscope.devtools.soak [--iterations 100000] [--target blobs]

Runs the stepper as the app does in run mode: full statistics on every 100th iteration (what the
screen would show), the loss and the diagnostics on every one.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sized
from typing import cast


def resident_mb() -> float:
    """Current resident set size of this process, from /proc (Linux)."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def soak(
    iterations: int = 100_000,
    checkpoints: tuple[int, ...] = (1_000, 10_000, 100_000),
    target: str = "blobs",
    probe_every: int = 100,
    report=None,
) -> dict[int, float]:
    """Resident MB after each checkpoint's number of iterations."""
    import torch

    from loopscope.engine.experiment import load_experiment
    from loopscope.engine.stepper import Stepper

    torch.set_num_threads(1)
    experiment = load_experiment(target, 0)
    experiment.epochs = iterations // max(len(cast(Sized, experiment.train_loader)), 1) + 1
    experiment.early_stopping_patience = None
    stepper = Stepper(experiment)
    readings: dict[int, float] = {}
    pending = sorted(c for c in checkpoints if c <= iterations)
    while pending and not stepper.finished and stepper.halted is None:
        if stepper.at_boundary:
            stepper.probe = stepper.completed_iterations % probe_every == 0
        stepper.run_iteration()
        if stepper.completed_iterations >= pending[0] and stepper.at_boundary:
            readings[pending.pop(0)] = resident_mb()
            if report:
                report(stepper.completed_iterations, readings)
    return readings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loopscope.devtools.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=100_000)
    parser.add_argument("--target", default="blobs")
    args = parser.parse_args(argv)
    started = time.monotonic()
    checkpoints = tuple(c for c in (1_000, 10_000, 100_000, 1_000_000) if c <= args.iterations)

    def report(done: int, readings: dict[int, float]) -> None:
        print(
            f"{done:>9} iterations  {readings[max(readings)]:8.1f} MB resident  ({time.monotonic() - started:.0f} s)",
            flush=True,
        )

    readings = soak(args.iterations, checkpoints, args.target, report=report)
    first, last = readings[min(readings)], readings[max(readings)]
    print(f"growth from {min(readings)} to {max(readings)} iterations: {last - first:+.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
