"""The diagnostics quality matrix: does every bug get named, and does a clean run stay quiet?

    python -m loopscope.devtools.quality [--budget 200] [--clean-iterations 1000] [--probe-every K] [--json]

Recall: each bug, on each scenario it applies to, runs from the start for at most `budget`
iterations; it counts as caught when a finding names it among its suspects, or a stage raises an
error explained at that stage. False alarms: each scenario runs clean for `clean-iterations`
iterations; any warning or error finding is a false alarm. With `--probe-every K` the runs go as the
app's run mode goes: whole quiet iterations, full statistics on every K-th only. With `--nproc N`
every run is DistributedDataParallel on N rank processes (the distributed bugs join the matrix),
and a finding counts once however many ranks raise it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sized
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

from loopscope.shared.events import StageEvent


@dataclass
class RecallRow:
    bug: str
    scenario: str
    caught: bool
    iteration: int | None
    finding: str | None
    how: str


def _events(stepper: Any, probe_every: int | None) -> Iterator[StageEvent]:
    """Every event of the run, in order: stage by stage, fully probed (`probe_every` None), or as the
    app runs (whole iterations, `quiet`, statistics only on every `probe_every`-th iteration; the
    losses of the others handed on in batches, as the app's engine hands them on per frame)."""
    if probe_every is None:
        while (event := stepper.step_stage()) is not None:
            yield event
        return
    stepper.quiet = True
    caught_up: list[StageEvent] = []
    stepper.on_event = caught_up.append
    while not stepper.finished and stepper.halted is None:
        stepper.probe = stepper.completed_iterations % probe_every == 0
        stepper.run_iteration()
        stepper.catch_up()
        yield from caught_up
        caught_up.clear()


def _rank_events(driver: Any) -> Iterator[StageEvent]:
    """Every rank's events, iteration by iteration, with the comparisons' findings."""
    made: list[StageEvent] = []
    driver.on_event = made.append
    while not driver.finished and driver.halted is None:
        driver.run_iteration()
        yield from made
        made.clear()


@contextmanager
def _ranks(scenario: str, seed: int, bugs: tuple[str, ...], nproc: int, overrides: tuple = ()) -> Iterator[Any]:
    from loopscope.engine.distributed.driver import DistributedDriver
    from loopscope.engine.distributed.launcher import free_port
    from loopscope.engine.distributed.rank import RankSpec

    spec = RankSpec(scenario, "cpu", seed, bugs, True, nproc, free_port(), overrides=overrides)
    driver = DistributedDriver(spec)
    try:
        yield driver
    finally:
        driver.close()


def recall_run(
    bug: str, scenario: str, budget: int, seed: int = 0, probe_every: int | None = None, nproc: int = 1
) -> RecallRow:
    from loopscope.engine.experiment import load_experiment
    from loopscope.engine.stepper import Stepper

    if nproc > 1:
        with _ranks(scenario, seed, (bug,), nproc) as driver:
            return _recall(bug, scenario, budget, driver, _rank_events(driver))
    stepper = Stepper(load_experiment(scenario, seed), bugs=[bug])
    return _recall(bug, scenario, budget, stepper, _events(stepper, probe_every))


def _recall(bug: str, scenario: str, budget: int, stepper: Any, events: Iterator[StageEvent]) -> RecallRow:
    for event in events:
        if stepper.completed_iterations > budget:
            break
        for finding in event.diagnostics:
            if bug in finding.suspects:
                return RecallRow(bug, scenario, True, event.iteration, finding.id, finding.message)
        if event.error is not None:
            return RecallRow(
                bug,
                scenario,
                True,
                event.iteration,
                f"error at {event.stage}",
                f"{event.error.type}: {event.error.message}",
            )
    return RecallRow(bug, scenario, False, None, None, "not named within the budget")


def clean_run(
    scenario: str, iterations: int, seed: int = 0, probe_every: int | None = None, nproc: int = 1
) -> list[tuple[int, str, str, str]]:
    """(iteration, severity, id, message) of every warning/error finding in a clean run."""
    from loopscope.engine.experiment import load_experiment
    from loopscope.engine.stepper import Stepper

    experiment = load_experiment(scenario, seed)
    # Long enough for `iterations`, and no early stop: detectors must stay quiet through
    # convergence and overfitting alike.
    epochs = iterations // max(len(cast(Sized, experiment.train_loader)), 1) + 1
    if nproc > 1:  # each rank reads 1/nproc of the batches an epoch
        overrides = (("epochs", epochs * nproc), ("early_stopping_patience", None))
        with _ranks(scenario, seed, (), nproc, overrides) as driver:
            return _alarms(iterations, driver, _rank_events(driver))
    experiment.epochs = epochs
    experiment.early_stopping_patience = None
    stepper = Stepper(experiment)
    return _alarms(iterations, stepper, _events(stepper, probe_every))


def _alarms(iterations: int, stepper: Any, events: Iterator[StageEvent]) -> list[tuple[int, str, str, str]]:
    alarms: list[tuple[int, str, str, str]] = []
    for event in events:
        if stepper.completed_iterations > iterations:
            break
        for finding in event.diagnostics:
            if finding.severity in ("warning", "error"):
                alarms.append((event.iteration, finding.severity, finding.id, finding.message))
    return alarms


def main(argv: list[str] | None = None) -> int:
    from loopscope.shared.bugs import BUGS, applicable
    from loopscope.shared.catalog import SCENARIOS

    parser = argparse.ArgumentParser(prog="python -m loopscope.devtools.quality", description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=int, default=200, help="iterations per bug run (default 200)")
    parser.add_argument("--clean-iterations", type=int, default=1000, help="iterations per clean run (default 1000)")
    parser.add_argument("--bug", action="append", help="only these bugs")
    parser.add_argument("--scenario", action="append", help="only these scenarios")
    parser.add_argument("--seed", type=int, default=0, help="seed for every run (default 0)")
    parser.add_argument(
        "--probe-every",
        type=int,
        metavar="K",
        help="run as the app runs (quiet iterations, full statistics every K-th); default: every stage probed",
    )
    parser.add_argument(
        "--nproc", type=int, default=1, metavar="N", help="every run as DDP on N rank processes (default 1: one)"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)  # small models: one thread is faster and steadier on a shared machine
    scenarios = [s for s in SCENARIOS.values() if not args.scenario or s.name in args.scenario]
    rows = []
    for bug in BUGS:
        if args.bug and bug.id not in args.bug:
            continue
        for info in scenarios:
            if bug.id in (applicable(info.features | {"distributed"}) if args.nproc > 1 else info.bugs):
                rows.append(recall_run(bug.id, info.name, args.budget, args.seed, args.probe_every, args.nproc))
                if not args.json:
                    r = rows[-1]
                    print(
                        f"{r.bug:<32} {r.scenario:<11} {'caught' if r.caught else 'MISSED':<7} "
                        f"{r.iteration if r.iteration is not None else '-':>5}  {r.finding or ''}",
                        flush=True,
                    )
    alarms = {}
    if args.clean_iterations > 0:
        for info in scenarios:
            alarms[info.name] = clean_run(info.name, args.clean_iterations, args.seed, args.probe_every, args.nproc)
            if not args.json:
                found = alarms[info.name]
                print(
                    f"clean {info.name:<11} {len(found)} false alarm(s) in {args.clean_iterations} iterations"
                    + "".join(f"\n    it {a[0]} {a[1]} {a[2]}: {a[3]}" for a in found),
                    flush=True,
                )
    caught = sum(r.caught for r in rows)
    false_alarms = sum(len(v) for v in alarms.values())
    if args.json:
        print(json.dumps({"recall": [r.__dict__ for r in rows], "false_alarms": alarms}, indent=2))
    else:
        print(f"recall {caught}/{len(rows)} ({caught / max(len(rows), 1):.0%}); false alarms {false_alarms}")
    return 0 if caught == len(rows) and false_alarms == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
