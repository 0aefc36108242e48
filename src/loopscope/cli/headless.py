"""The headless commands: `trace` (every stage as a JSON line or a table row) and `check`
(the sanity checks). They run the engine in this process; torch loads only when they run."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from typing import TYPE_CHECKING, Any, TextIO

from loopscope.cli.codes import EXIT_CLAIM_FAILED, EXIT_OK, EXIT_STAGE_ERROR
from loopscope.cli.trace import TraceWriter
from loopscope.shared.errors import UserError, check_processes
from loopscope.shared.nodes import parse_endpoint

if TYPE_CHECKING:
    from loopscope.engine.stepper import Stepper
    from loopscope.shared.demo import Demo
    from loopscope.shared.events import CheckResult, Finding, StageEvent


def _users_prints_to_stderr() -> contextlib.AbstractContextManager[object]:
    """While the user's code runs, its prints go to stderr: stdout carries the machine-readable
    output (JSON lines, `check --json`) and must stay parseable line by line."""
    return contextlib.redirect_stdout(sys.stderr)


def _open_output(path: str | None) -> TextIO:
    """The trace's destination: standard output unless `-o FILE`."""
    if not path:
        return sys.stdout
    try:
        return open(path, "w", encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror}") from exc


CHECK_TITLE_WIDTH = 26  # the longest check title, "input-independent baseline", so the columns line up


def check_command(args: argparse.Namespace) -> int:
    """`loopscope check`: Karpathy's sanity checks, pass/fail with the numbers."""
    from loopscope.engine.checks import CHECKS, blind_spots, run_checks
    from loopscope.engine.devices import resolve_device
    from loopscope.engine.experiment import load_experiment
    from loopscope.engine.stepper import Stepper

    out = sys.stdout  # the results; the user's prints, if any, go to stderr
    device = resolve_device(args.device)

    def ended(result: CheckResult) -> None:  # each line as its check ends: they take seconds each
        if not args.json:
            verdict = "SKIP" if result.skipped else ("PASS" if result.passed else "FAIL")
            print(f"{verdict}  {result.title:<{CHECK_TITLE_WIDTH}}  {result.message}", file=out, flush=True)

    if not args.json:
        print(f"running {len(CHECKS)} sanity checks on copies of the model...", file=sys.stderr, flush=True)
    with _users_prints_to_stderr():
        stepper = Stepper(load_experiment(args.target, args.seed), device, bugs=args.bug, diagnose=False)
        results = run_checks(stepper, on_result=ended)
    if args.json:
        print(json.dumps([r.__dict__ for r in results], indent=2))
    else:
        print(f"\n{blind_spots(results, tuple(args.bug))}")
    return EXIT_OK if all(r.passed for r in results) else EXIT_STAGE_ERROR


def verify_demo_command(demo: Demo, seeds: tuple[int, ...], device: str) -> int:
    """`loopscope demo NAME --verify`: every step on every seed, printed as it finishes; exit 1
    when a claim does not hold (or the loop raised)."""
    from loopscope.engine.demo_player import play

    failures = 0
    claims = sum(len(step.expect) for step in demo.steps)
    print(f"{demo.title} ({demo.path}): {len(demo.steps)} steps, {claims} claims, seeds {', '.join(map(str, seeds))}")
    out = sys.stdout  # the report; the user's prints, if any, go to stderr
    for seed in seeds:
        print(f"seed {seed}:", flush=True)
        with _users_prints_to_stderr():
            for result in play(demo, seed, device):
                print(f"  {result.line()}", file=out, flush=True)
                failures += len(result.failed_claims) or result.error is not None
    print(f"{failures} claim(s) did not hold" if failures else "every claim held")
    return EXIT_CLAIM_FAILED if failures else EXIT_OK


def trace_command(args: argparse.Namespace, note: str | None = None) -> int:
    """`loopscope trace`: run headless and write what every stage did."""
    # Imported here so `--help`, `scenarios` and argument errors answer before torch loads.
    from loopscope.engine.devices import resolve_device
    from loopscope.engine.experiment import load_experiment
    from loopscope.engine.script.target import is_script
    from loopscope.engine.stepper import Stepper

    processes = getattr(args, "nproc", 1) * getattr(args, "nnodes", 1)
    script = is_script(args.target, getattr(args, "script", False))
    check_processes(processes, getattr(args, "twin", False))
    if processes > 1:
        return _trace_distributed(args, note, script)
    if script:
        return _trace_script(args, note)
    device = resolve_device(args.device)
    with _users_prints_to_stderr():
        experiment = load_experiment(args.target, 0 if args.seed is None else args.seed)
        stepper = Stepper(experiment, device, probe=not args.fast, sync_cuda=True, bugs=args.bug, twin=args.twin)
    return _write_trace(stepper, args, note)


def _trace_script(args: argparse.Namespace, note: str | None) -> int:
    """`loopscope trace script.py [-- ARGS]`: the user's own script, run as written."""
    from loopscope.engine.experiment import seed_everything
    from loopscope.engine.script.driver import ScriptDriver
    from loopscope.engine.script.main_thread import lend_main_thread

    if args.twin:
        raise UserError("--twin needs an experiment() factory: a script cannot be run twice from one state")
    if args.seed is not None:  # a script seeds itself; --seed only when asked for
        seed_everything(args.seed)
    driver = ScriptDriver(args.target, list(args.script_args), probe=not args.fast, bugs=args.bug)

    def write() -> int:
        try:
            return _write_trace(driver, args, note)
        finally:
            driver.close()

    code = lend_main_thread(write)
    if not driver.history.event_count:
        sys.stderr.write(
            "loopscope: the script ran no training stage (no model forward, backward or optimizer step); "
            "a file defining experiment() runs in factory mode\n"
        )
    return code


def _trace_distributed(args: argparse.Namespace, note: str | None, script: bool = False) -> int:
    """`loopscope trace TARGET --nproc N`: N ranks of DDP, moved iteration by iteration together;
    every rank's records, in rank order within each turn."""
    from loopscope.engine.distributed.compare import RankComparison
    from loopscope.engine.distributed.launcher import rank_group

    host, port = rendezvous(args)
    spec = _rank_spec(args, host, port, script, probe=not args.fast)
    if note:
        sys.stderr.write(f"loopscope: {note}\n")
    where = f"node {args.node_rank} of {args.nnodes}, " if args.nnodes > 1 else ""
    sys.stderr.write(
        f"loopscope: starting {args.nproc} rank{'s' if args.nproc > 1 else ''} ({where}world size "
        f"{spec.world_size}, torch.distributed at {host}:{port})\n"
    )
    out = _open_output(args.output)
    writer = TraceWriter(out, args.format, ranks=True)
    comparison = RankComparison(args.nproc)
    on_ranks: dict[str, tuple[int, Finding, list[int]]] = {}  # each rank's own findings: first seen, ranks
    done = 0
    failure = halted = None
    try:
        with rank_group(spec, args.nproc) as group:
            while args.iterations is None or done < args.iterations:
                turn = group.turn("iteration")
                events = comparison.annotate(turn.events)
                for event in events:
                    for finding in event.diagnostics:
                        own = finding.id not in comparison.raised  # the comparisons' are listed apart
                        if own and finding.severity != "info" and finding.id != "stage_error":
                            seen = on_ranks.setdefault(finding.id, (event.iteration, finding, []))
                            if event.rank is not None and event.rank not in seen[2]:
                                seen[2].append(event.rank)
                    writer.write(event)
                failure = turn.failure
                halted = next((e for e in events if e.error is not None), None)
                done = max(done, turn.completed_iterations)
                if failure or halted or turn.finished:
                    break
    finally:
        out.flush()
        if out is not sys.stdout:
            out.close()
    ranks = (
        f"ranks {spec.first_rank}-{spec.first_rank + args.nproc - 1}" if args.nproc > 1 else f"rank {spec.first_rank}"
    )
    summary = (
        f"loopscope: {ranks} of {spec.world_size}, {done} iteration{'' if done == 1 else 's'} completed, "
        f"{writer.count} stage records"
    )
    sys.stderr.write(summary + "\n")
    for iteration, finding, ranks_seen in sorted(on_ranks.values(), key=lambda item: item[0]):
        which = f" on rank{'s' if len(ranks_seen) > 1 else ''} {', '.join(map(str, sorted(ranks_seen)))}"
        sys.stderr.write(_finding_line(iteration, finding, which))
    for iteration, finding in sorted(comparison.raised.values(), key=lambda item: item[0]):
        sys.stderr.write(_finding_line(iteration, finding))
    if "ranks_diverged" not in comparison.raised and done and args.nproc > 1:
        on = "this node's ranks" if args.nnodes > 1 else "every rank"
        sys.stderr.write(f"loopscope: parameters bitwise equal on {on} after every step\n")
        if comparison.batchnorm_compared and "batchnorm_statistics_per_rank" not in comparison.raised:
            sys.stderr.write(f"loopscope: BatchNorm statistics bitwise equal on {on} after every forward\n")
    if failure:  # first: a rank that died is why the others' collectives failed
        sys.stderr.write(f"loopscope: {failure}\n")
    if halted is not None and halted.error is not None:
        err = halted.error
        sys.stderr.write(
            f"loopscope: rank {halted.rank}: stage {halted.stage} failed at iteration {halted.iteration}: "
            f"{err.type}: {err.message}\n"
        )
    return EXIT_STAGE_ERROR if (failure or halted) else EXIT_OK


def _rank_spec(args: argparse.Namespace, host: str, port: int, script: bool, probe: bool) -> Any:
    """The RankSpec of this node's ranks, from the command line."""
    from loopscope.engine.distributed.rank import RankSpec

    return RankSpec(
        target=args.target,
        device=args.device,
        seed=0 if args.seed is None else args.seed,
        bugs=tuple(args.bug),
        probe=probe,
        world_size=args.nproc * args.nnodes,
        master_port=port,
        master_addr=host,
        first_rank=args.node_rank * args.nproc,
        script=script,
        script_args=tuple(getattr(args, "script_args", ())),
    )


def follow_node(args: argparse.Namespace, script: bool) -> int:
    """`run --nnodes M --node-rank R` with R > 0: no screen here; this machine's ranks join node
    0's app, which moves them with its own, until it ends the run."""
    from loopscope.engine.distributed.launcher import follow

    host, port = rendezvous(args)
    spec = dataclasses.replace(_rank_spec(args, host, port, script, probe=True), coordinator=(host, port + 1))
    first, last = spec.first_rank, spec.first_rank + args.nproc - 1
    sys.stderr.write(
        f"loopscope: node {args.node_rank} of {args.nnodes}: rank{'s' if last > first else ''} "
        f"{first}{f'-{last}' if last > first else ''} follow node 0's app at {host}:{port + 1} "
        "(ctrl+c stops them)\n"
    )
    code = follow(spec, args.nproc)
    sys.stderr.write(f"loopscope: node {args.node_rank}: the ranks ended{'' if code == 0 else ' with an error'}\n")
    return code


def rendezvous(args: argparse.Namespace) -> tuple[str, int]:
    """Where the ranks meet: a free port here for one machine, --rdzv-endpoint for several."""
    from loopscope.engine.distributed.launcher import free_port

    if args.node_rank >= args.nnodes:
        raise UserError(f"--node-rank must be below --nnodes ({args.nnodes}), got {args.node_rank}")
    if args.rdzv_endpoint is None:
        if args.nnodes > 1:
            raise UserError(
                "--nnodes > 1 needs --rdzv-endpoint HOST:PORT: node 0's address and a free port on it, "
                "the same on every node"
            )
        return "127.0.0.1", free_port()
    return parse_endpoint(args.rdzv_endpoint)


def _write_trace(stepper: Any, args: argparse.Namespace, note: str | None) -> int:
    if note:
        sys.stderr.write(f"loopscope: {note}\n")
    out = _open_output(args.output)
    writer = TraceWriter(out, args.format)
    progress = _Progress(enabled=bool(args.output) and sys.stderr.isatty(), total=args.iterations)

    def on_event(event: StageEvent) -> None:
        writer.write(event)
        progress.update(stepper)

    stepper.on_event = on_event
    try:
        with _users_prints_to_stderr():
            stepper.run(args.iterations)
    finally:
        out.flush()
        if out is not sys.stdout:
            out.close()
        progress.close()
    return _report(stepper, writer, args)


def _report(stepper: Stepper, writer: TraceWriter, args: argparse.Namespace) -> int:
    where = f" to {args.output}" if args.output else ""
    loss = stepper.history.series["loss"]
    points = loss.points()
    first = next((p.mean for p in points if p.count > p.nonfinite), None)
    last = loss.last()
    done = stepper.completed_iterations
    summary = (
        f"loopscope: {done} iteration{'' if done == 1 else 's'} completed, epoch {stepper.epoch}, "
        f"{writer.count} stage records{where}"
    )
    if first is not None and last is not None:
        summary += f"; loss {first:.4g} -> {last:.4g}"
    val = stepper.history.series["val_accuracy"].last()
    if val is not None:
        summary += f", val accuracy {val:.1%}"
    if stepper.stop_reason:
        summary += f" ({stepper.stop_reason})"
    sys.stderr.write(summary + "\n")
    _report_findings(stepper)
    if stepper.halted is not None:
        err = stepper.halted
        last_event = stepper.history.last()
        stage = last_event.stage if last_event else "?"
        message = f"loopscope: stage {stage} failed at iteration {stepper.iteration}: {err.type}: {err.message}"
        if err.location:
            message += f" ({err.location})"
        sys.stderr.write(message + "\n")
        if err.hint:
            sys.stderr.write(f"loopscope: hint: {err.hint}\n")
        return EXIT_STAGE_ERROR
    return EXIT_OK


def _report_findings(stepper: Stepper) -> None:
    """Each finding once, with the iteration it first appeared, so a long trace ends with its verdict."""
    if stepper.diagnostics is None:
        return
    first: dict[str, tuple[int, Finding]] = {}
    for iteration, finding in stepper.diagnostics.all_findings:
        # Stage errors are reported on their own below.
        if finding.severity != "info" and finding.id != "stage_error" and finding.id not in first:
            first[finding.id] = (iteration, finding)
    for iteration, finding in sorted(first.values(), key=lambda item: item[0]):
        sys.stderr.write(_finding_line(iteration, finding))


def _finding_line(iteration: int, finding: Finding, where: str = "") -> str:
    """A finding as a trace's closing lines give it, with the iteration it first appeared (and,
    with several ranks, `where`: the ranks that raised it)."""
    suspects = f" [suspects: {', '.join(finding.suspects)}]" if finding.suspects else ""
    return f"loopscope: {finding.severity} at iteration {iteration}{where}: {finding.message}{suspects}\n"


class _Progress:
    """A one-line progress report on a terminal's stderr while a trace goes to a file."""

    def __init__(self, enabled: bool, total: int | None) -> None:
        self.enabled = enabled
        self.total = total
        self._last = -1

    def update(self, stepper: Stepper) -> None:
        done = stepper.completed_iterations
        if not self.enabled or done == self._last or done % 10:
            return
        self._last = done
        total = f"/{self.total}" if self.total else ""
        loss = stepper.history.series["loss"].last()
        loss_text = f"  loss {loss:.4g}" if loss is not None else ""
        sys.stderr.write(f"\r  iteration {done}{total}  epoch {stepper.epoch}{loss_text}   ")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self._last >= 0:
            sys.stderr.write("\n")


def bugs_for_command(target: str, as_json: bool) -> int:
    """`loopscope bugs --for TARGET`: the bugs that apply to that experiment, and for every other
    one what the experiment lacks (read from the experiment itself, without running it)."""
    from loopscope.engine.experiment import check_target, load_experiment
    from loopscope.engine.features import experiment_features, infer_task
    from loopscope.shared.bugs import BUGS, FEATURE_WORDS

    check_target(target)
    with _users_prints_to_stderr():
        experiment = load_experiment(target, 0)
    features = experiment_features(experiment, infer_task(experiment))
    rows: list[dict[str, Any]] = []
    for bug in BUGS:
        missing = [FEATURE_WORDS.get(f, f) for f in bug.requires if f not in features]
        rows.append({"id": bug.id, "applies": not missing, "missing": missing})
    if as_json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    applying = [r for r in rows if r["applies"]]
    width = max(len(r["id"]) for r in rows)
    print(f"{len(applying)} of {len(rows)} bugs apply to {target}:")
    for r in applying:
        print(f"  {r['id']}")
    print("\nThe others need what this experiment does not have:")
    for r in rows:
        if not r["applies"]:
            print(f"  {r['id']:<{width}}  needs {', '.join(r['missing'])}")
    return EXIT_OK
