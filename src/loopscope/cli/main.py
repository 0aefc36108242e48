"""`loopscope` commands: thin over the engine. Errors are one line and exit code 2."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import NoReturn, TextIO

from loopscope import __version__
from loopscope.cli.codes import EXIT_INTERRUPTED, EXIT_OK, EXIT_TERMINATED, EXIT_USAGE
from loopscope.cli.headless import bugs_for_command, check_command, trace_command, verify_demo_command
from loopscope.shared.bugs import BUGS, BUGS_BY_ID, requirement_text, unknown_bug_message
from loopscope.shared.catalog import DEFAULT_SCENARIO, SCENARIOS
from loopscope.shared.errors import UserError, check_processes
from loopscope.shared.nodes import NODE_KEY, node_key
from loopscope.shared.protocol import DEFAULT_HISTORY, RUN_SPEEDS, TEACHING_SPEED
from loopscope.shared.vocab import STAGE_DESCRIPTIONS

COMMANDS = ("run", "trace", "scenarios", "check", "bugs", "demo", "serve", "bench")

TARGET_HELP = (
    "a built-in scenario (" + ", ".join(SCENARIOS) + f"; default {DEFAULT_SCENARIO}), "
    "a file.py defining experiment(), package.module:factory, or your own training script "
    "(script.py [-- ARGS], run as written)"
)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (no usage dump) and exits 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        raise SystemExit(EXIT_USAGE)


def _whole_number(low: int, high: int, what: str = "a whole number"):
    """An argparse type: an int in [low, high], with a one-line message otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not low <= value <= high:
            if high == 2**63 - 1:  # no upper bound worth naming
                raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}, got {value}")
        return value

    return parse


_positive_int = _whole_number(1, 2**63 - 1)
_non_negative_int = _whole_number(0, 2**63 - 1)
_seed = _whole_number(0, 2**63 - 2)
_port = _whole_number(1, 65535, "a port number")


def _bug_id(text: str) -> str:
    if text not in BUGS_BY_ID:
        raise argparse.ArgumentTypeError(unknown_bug_message(text))
    return text


def _add_svg_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--svg-dir",
        default="loopscope-shots",
        metavar="DIR",
        help="where s saves the screen as SVG (default: ./loopscope-shots, created when first needed)",
    )


def _seed_list(text: str) -> tuple[int, ...]:
    return tuple(_seed(part.strip()) for part in text.split(",") if part.strip()) or (0,)


def _speed(text: str) -> float | None:
    if text == "max":
        return None
    try:
        speed = float(text)
    except ValueError:
        speed = -1.0
    if speed not in RUN_SPEEDS:
        names = ", ".join(map(_speed_name, RUN_SPEEDS))
        raise argparse.ArgumentTypeError(f"{text!r} is not a run speed: one of {names}")
    return speed


def _add_speed(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--speed",
        type=_speed,
        default=TEACHING_SPEED,
        metavar="S",
        help=f"iterations a second when running (r): 1, 2, 5, 20, 100 or max (default: {TEACHING_SPEED:g}, "
        "slow enough to watch; + and - change it, m switches to max and back)",
    )


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", nargs="?", default=DEFAULT_SCENARIO, help=TARGET_HELP)
    parser.add_argument(
        "--bug",
        action="append",
        type=_bug_id,
        default=[],
        metavar="ID",
        help="start with this bug injected (repeatable; `loopscope bugs` lists them)",
    )
    parser.add_argument(
        "--twin",
        action="store_true",
        help="while a bug is on, train a clean twin on the same batches and record its loss",
    )
    parser.add_argument(
        "--device",
        default="auto",
        metavar="D",
        help="auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps (default: auto)",
    )
    parser.add_argument(
        "--seed",
        type=_seed,
        default=None,
        metavar="N",
        help="seeds torch, random and numpy once, before the experiment is built (default: 0; "
        "a script seeds itself, unless this is given)",
    )
    parser.add_argument(
        "--script",
        action="store_true",
        help="run the target file as a script, as written (the default for a .py file without "
        "experiment()); arguments after -- are the script's",
    )


def build_parser() -> argparse.ArgumentParser:
    stages = "\n".join(f"  {name:<11} {text}" for name, text in STAGE_DESCRIPTIONS.items())
    parser = _Parser(
        prog="loopscope",
        description="A debugger for the PyTorch training loop: run a real loop one stage at a time "
        "and see what each stage does to the tensors.",
        epilog=f"The stages of the loop:\n{stages}\n\nWith no command, loopscope runs the default "
        f"scenario ({DEFAULT_SCENARIO}).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"loopscope {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    run_parser = commands.add_parser(
        "run",
        help="step through a training loop in the terminal app (the default command)",
        description="Open the app on a training loop: step it stage by stage, run it, break it.",
        epilog="Keys: space stage, n iteration, e epoch, r run/pause, +/- speed, m max, t twin, c checks, d diagnostics, ? help, q quit.",
    )
    _add_run_arguments(run_parser)
    _add_speed(run_parser)
    _add_svg_dir(run_parser)
    _add_nproc(run_parser, "the panels show rank 0, the Ranks table every rank's numbers")
    _add_nodes(
        run_parser,
        f"the app runs on node 0 and moves every node's ranks; the other nodes' commands only start "
        f"their ranks; every node needs the same secret in {NODE_KEY}",
    )
    run_parser.add_argument(
        "--history",
        type=_non_negative_int,
        default=DEFAULT_HISTORY,
        metavar="N",
        help=f"iterations that b can step back through (default: {DEFAULT_HISTORY})",
    )

    trace = commands.add_parser(
        "trace",
        help="run headless and write one record per stage (table or JSON lines)",
        description="Run a training loop headless and write what every stage did.",
        epilog="Exit status: 0 when the run completes, 1 when a stage raised (the trace ends "
        "with that stage's error), 2 for bad arguments or targets, 130 when interrupted.",
    )
    _add_run_arguments(trace)
    trace.add_argument(
        "--iterations",
        "-n",
        type=_positive_int,
        default=None,
        metavar="N",
        help="training iterations to run (default: the experiment's whole run)",
    )
    trace.add_argument("--format", choices=("jsonl", "table"), default="table", help="output format (default: table)")
    trace.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of standard output")
    trace.add_argument(
        "--fast",
        action="store_true",
        help="skip the full statistics (tensor stats, per-layer norms); losses and errors are still recorded",
    )
    _add_nproc(trace, "every record carries its rank")
    _add_nodes(trace, "each node writes its own ranks' records")

    scenarios = commands.add_parser(
        "scenarios",
        help="list the built-in scenarios and the bugs that apply to each",
        description="List the built-in scenarios and the bugs that apply to each.",
    )
    scenarios.add_argument("--json", action="store_true", help="print JSON for machines")

    check = commands.add_parser(
        "check",
        help="run Karpathy's four sanity checks on copies of the model (pass/fail with numbers)",
        description="Sanity checks from Karpathy's recipe, each on a copy of the model and optimizer: "
        "loss at initialisation vs -ln(1/C), overfitting a single batch, an input-independent "
        "baseline (zeroed inputs must do worse), and the batch-mixing probe.",
        epilog="Exit status: 0 when every check passes, 1 when one fails, 2 for bad arguments.",
    )
    check.add_argument("target", nargs="?", default=DEFAULT_SCENARIO, help=TARGET_HELP)
    check.add_argument(
        "--bug", action="append", type=_bug_id, default=[], metavar="ID", help="inject this bug first (repeatable)"
    )
    check.add_argument("--device", default="auto", metavar="D", help="auto, cpu, cuda, cuda:N or mps")
    check.add_argument("--seed", type=_seed, default=0, metavar="N", help="seed (default: 0)")
    check.add_argument("--json", action="store_true", help="print JSON for machines")

    demo = commands.add_parser(
        "demo",
        help="play a scripted lecture demo (demos/*.toml) in the app",
        description="Play a scripted demo: right arrow or space runs the next step, left arrow goes back, "
        "escape leaves the script to explore freely.",
    )
    demo.add_argument(
        "file",
        nargs="?",
        help="a demo TOML file, or a shipped demo's name or number (02_forgetting_zero_grad, forgetting_zero_grad, 2)",
    )
    demo.add_argument("--list", action="store_true", help="list the demos that come with loopscope")
    demo.add_argument("--check", action="store_true", help="only validate the file (exit 0 if it is playable)")
    demo.add_argument(
        "--verify",
        action="store_true",
        help="play the demo headless and check every step's claim (expect = ...) against what the loop did; "
        "exit 1 naming the step and the numbers when one does not hold",
    )
    demo.add_argument(
        "--seeds",
        type=_seed_list,
        default=(0, 1, 2),
        metavar="LIST",
        help="with --verify: the seeds to play it on, comma-separated (default: 0,1,2; a claim must hold on each)",
    )
    demo.add_argument("--device", default="auto", metavar="D", help="auto, cpu, cuda, cuda:N or mps")
    demo.add_argument(
        "--seed",
        type=_seed,
        default=None,
        metavar="N",
        help="play on this seed instead of the demo's own (default: its seed)",
    )
    _add_speed(demo)
    _add_svg_dir(demo)

    serve = commands.add_parser(
        "serve",
        help="serve the app in a web browser (for a projector), on 127.0.0.1",
        description="Serve `loopscope run` (or a demo) in the browser with textual-serve, on 127.0.0.1 only.",
    )
    _add_run_arguments(serve)
    _add_speed(serve)
    serve.add_argument("--port", type=_port, default=8000, help="port (default: 8000)")
    serve.add_argument("--demo", metavar="FILE", help="serve this demo instead of a free run")

    bench = commands.add_parser(
        "bench",
        help="measure loopscope's overhead against a plain loop, in one run",
        description="Measure, side by side in one run: the stepper vs a plain PyTorch loop on three models, "
        "loss-plot render time at 1e3/1e5/1e6 points, the memory of a 1e6-iteration history, "
        "throughput inside the app, and the app's first frame.",
    )
    bench.add_argument("--json", action="store_true", help="print JSON for machines")
    bench.add_argument("--device", default="cpu", metavar="D", help="cpu (default), cuda, cuda:N or mps")
    bench.add_argument("--quick", action="store_true", help="fewer iterations (a rough look)")
    bench.add_argument(
        "--batch",
        type=_positive_int,
        metavar="N",
        help="batch size of the reference models (default: 64 on CPU, 256 on a GPU)",
    )

    bugs = commands.add_parser(
        "bugs",
        help="list the bugs loopscope can inject, or explain one",
        description="The catalog of classic training-loop bugs: what changes, what you will see, why, and the fix.",
    )
    bugs.add_argument("bug", nargs="?", type=_bug_id, metavar="ID", help="explain this bug in full")
    bugs.add_argument("--json", action="store_true", help="print JSON for machines")
    bugs.add_argument(
        "--for",
        dest="for_target",
        metavar="TARGET",
        help="which bugs apply to this experiment (" + TARGET_HELP + "), and why each other does not",
    )
    return parser


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    script_args: list[str] = []
    if "--" in argv:  # what follows is the script's own command line (script mode)
        at = argv.index("--")
        argv, script_args = argv[:at], argv[at + 1 :]
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help", "--version")):
        _refuse_a_misspelt_command(argv[0] if argv else None)
        argv = ["run", *argv]  # `loopscope spirals --bug X` means `loopscope run spirals --bug X`
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:
        prog = f"loopscope {args.command}" if args.command else "loopscope"
        sys.stderr.write(f"{prog}: error: unrecognized arguments: {' '.join(extras)} (see {prog} --help)\n")
        raise SystemExit(EXIT_USAGE)
    args.script_args = script_args
    return args


def _refuse_a_misspelt_command(word: str | None) -> None:
    """`loopscope bug X` is a typo for `loopscope bugs X`, not a target named "bug" to run."""
    import difflib

    if word is None or word.startswith("-") or word in SCENARIOS or any(c in word for c in "./:"):
        return
    if os.path.exists(word):
        return
    close = difflib.get_close_matches(word, COMMANDS, n=1)
    if close:
        sys.stderr.write(
            f"loopscope: unknown command {word!r}; did you mean `loopscope {close[0]}`? "
            "(loopscope --help lists the commands)\n"
        )
        raise SystemExit(EXIT_USAGE)


class _Terminated(BaseException):
    """SIGTERM arrived: stop like ctrl+c does, with everything written so far kept (a BaseException,
    like KeyboardInterrupt, so no stage mistakes it for an error in the user's code)."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    if args.command != "run" and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        if args.command == "scenarios":
            return _scenarios(args.json)
        if args.command == "bugs" and args.for_target:
            return bugs_for_command(args.for_target, args.json)
        if args.command == "bugs":
            return _bugs(args.bug, args.json)
        if args.command == "check":
            return check_command(args)
        if args.command == "demo":
            return _demo(args)
        if args.command == "serve":
            return _serve(args)
        if args.command == "bench":
            return _bench(args)
        if args.command == "trace":
            return trace_command(args)
        if args.command == "run":
            return _run_app(args)
        raise AssertionError(f"unhandled command {args.command}")
    except UserError as exc:
        sys.stderr.write(f"loopscope: error: {exc}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write("\nloopscope: interrupted\n")
        return EXIT_INTERRUPTED
    except _Terminated:
        sys.stderr.write("\nloopscope: terminated\n")
        return EXIT_TERMINATED
    except BrokenPipeError:
        # `loopscope trace | head` closed the pipe: not an error worth a traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK


def _scenarios(as_json: bool) -> int:
    if as_json:
        rows = [
            {"name": s.name, "description": s.description, "task": s.task, "bugs": s.bugs} for s in SCENARIOS.values()
        ]
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    width = max(map(len, SCENARIOS))
    for info in SCENARIOS.values():
        default = " (default)" if info.name == DEFAULT_SCENARIO else ""
        print(f"{info.name:<{width}}  {info.task:<14} {info.description}{default}")
        print(f"{'':<{width}}  {len(info.bugs)} bugs apply: {', '.join(info.bugs)}")
    return EXIT_OK


def _bugs(bug_id: str | None, as_json: bool) -> int:
    chosen = [BUGS_BY_ID[bug_id]] if bug_id else list(BUGS)
    if as_json:
        keys = ("id", "title", "stage", "symptom", "why", "fix", "correct", "buggy", "requires")
        rows = [{k: v for k, v in bug.to_dict().items() if k in keys} for bug in chosen]
        print(json.dumps(rows[0] if bug_id else rows, indent=2))
        return EXIT_OK
    if bug_id:
        bug = chosen[0]
        scenarios = [s.name for s in SCENARIOS.values() if bug.id in s.bugs]
        if "distributed" in bug.requires:  # any scenario run as several processes
            scenarios = [
                f"{s.name} (--nproc 2)" for s in SCENARIOS.values() if set(bug.requires) <= s.features | {"distributed"}
            ]
        print(f"{bug.id}: {bug.title}  (stage {bug.stage})\n")
        for line in bug.correct.splitlines():
            print(f"  - {line}")
        for line in bug.buggy.splitlines() or ["(line removed)"]:
            print(f"  + {line}")
        print(f"\nWhat you will see: {bug.symptom}\nWhy: {bug.why}\nFix: {bug.fix}")
        print(f"Needs: {requirement_text(bug)}; built-in scenarios: {', '.join(scenarios) or 'none'}")
        return EXIT_OK
    width = max(len(b.id) for b in BUGS)
    for bug in BUGS:
        print(f"{bug.id:<{width}}  {bug.stage:<10}  {bug.title}")
    print(f"\n{len(BUGS)} bugs. `loopscope bugs ID` explains one; `--bug ID` on run/trace injects it.")
    return EXIT_OK


def _add_nproc(parser: argparse.ArgumentParser, shown: str) -> None:
    parser.add_argument(
        "--nproc",
        type=_positive_int,
        default=1,
        metavar="N",
        help="train as DistributedDataParallel on N processes of this machine (gloo on CPU, nccl on GPUs), "
        f"all ranks stage by stage together; {shown} (default: 1, no torch.distributed)",
    )


def _add_nodes(parser: argparse.ArgumentParser, how: str) -> None:
    parser.add_argument(
        "--nnodes",
        type=_positive_int,
        default=1,
        metavar="M",
        help="machines taking part (default: 1); run the same command on each, with its --node-rank, "
        f"and --rdzv-endpoint naming node 0; {how}",
    )
    parser.add_argument(
        "--node-rank",
        type=_non_negative_int,
        default=0,
        metavar="R",
        help="this machine's place among the --nnodes, from 0 (node 0 hosts the rendezvous)",
    )
    parser.add_argument(
        "--rdzv-endpoint",
        metavar="HOST:PORT",
        help="where the ranks meet (torch.distributed's TCP store, hosted by node 0); needed with --nnodes > 1",
    )


def _run_app(args: argparse.Namespace) -> int:
    from loopscope.cli.headless import follow_node, rendezvous
    from loopscope.engine.experiment import check_target
    from loopscope.engine.script.target import is_script
    from loopscope.shared.protocol import SessionSpec

    script = is_script(args.target, args.script)
    if not script:
        check_target(args.target)
    check_processes(args.nproc * args.nnodes, args.twin)
    if args.device not in ("auto", "cpu") and not args.device.startswith(("cuda", "mps")):
        raise UserError(f"--device {args.device!r}: expected one of auto|cpu|cuda|cuda:N|mps")
    if args.nnodes > 1:
        rendezvous(args)  # the endpoint, node rank and secret checked before anything starts
        node_key()
        if args.node_rank > 0:  # no screen here: node 0's app moves this node's ranks
            return follow_node(args, script)
    from loopscope.ui.app import LoopscopeApp

    spec = SessionSpec(
        args.target,
        args.device,
        0 if args.seed is None else args.seed,
        tuple(args.bug),
        args.twin,
        args.history,
        script=script,
        script_args=tuple(args.script_args),
        seed_given=args.seed is not None or not script,
        speed=args.speed,
        nproc=args.nproc,
        nnodes=args.nnodes,
        rdzv_endpoint=args.rdzv_endpoint,
    )
    app = LoopscopeApp(spec, svg_dir=args.svg_dir)
    # SIGTERM quits like `q`: Textual restores the terminal and the engine process is stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: app.exit())
    app.run()
    if app.model.failure and app.model.info is None:
        sys.stderr.write(f"loopscope: error: {app.model.failure}\n")
        return EXIT_USAGE
    return EXIT_OK


def _list_demos(out: TextIO) -> None:
    from loopscope.shared.demo import DemoError, load_demo, shipped_demos

    for name, path in shipped_demos().items():
        try:
            demo = load_demo(path)
            out.write(f"{name:<34} {demo.title} (scenario {demo.target}, {len(demo.steps)} steps)\n")
        except DemoError as exc:
            out.write(f"{name:<34} cannot be played: {exc}\n")


def _demo(args: argparse.Namespace) -> int:
    from loopscope.shared.demo import DemoError, load_demo

    if args.list:
        _list_demos(sys.stdout)
        return EXIT_OK
    if args.file is None:
        sys.stderr.write("loopscope demo: which demo? `loopscope demo NAME` plays one of these:\n")
        _list_demos(sys.stderr)
        return EXIT_USAGE

    try:
        demo = load_demo(args.file)
    except DemoError as exc:
        raise UserError(str(exc)) from exc
    if args.verify:
        return verify_demo_command(demo, args.seeds if args.seed is None else (args.seed,), args.device)
    if args.check:
        questions = sum(1 for step in demo.steps if step.ask)
        print(
            f"{args.file}: ok: {demo.title!r}, {len(demo.steps)} steps, {questions} question(s), scenario {demo.target}"
        )
        return EXIT_OK
    from loopscope.shared.protocol import SessionSpec
    from loopscope.ui.app import LoopscopeApp

    seed = demo.seed if args.seed is None else args.seed
    spec = SessionSpec(demo.target, args.device, seed, demo.bugs, demo.twin, speed=args.speed)
    app = LoopscopeApp(spec, demo=demo, svg_dir=args.svg_dir)
    signal.signal(signal.SIGTERM, lambda signum, frame: app.exit())
    app.run()
    return EXIT_OK


def _speed_name(speed: float | None) -> str:
    return "max" if speed is None else f"{speed:g}"


def _serve(args: argparse.Namespace) -> int:
    import shlex

    from loopscope.engine.experiment import check_target

    if args.demo:
        from loopscope.shared.demo import DemoError, load_demo

        try:
            load_demo(args.demo)
        except DemoError as exc:
            raise UserError(str(exc)) from exc
        command = [sys.executable, "-m", "loopscope", "demo", args.demo, "--device", args.device]
        command += ["--speed", _speed_name(args.speed)]
        if args.seed is not None:
            command += ["--seed", str(args.seed)]
    else:
        check_target(args.target)
        command = [
            sys.executable,
            "-m",
            "loopscope",
            "run",
            args.target,
            "--device",
            args.device,
            "--seed",
            str(0 if args.seed is None else args.seed),
            *[f"--bug={b}" for b in args.bug],
            *(["--twin"] if args.twin else []),
            *["--speed", _speed_name(args.speed)],
        ]
    from loopscope.cli.serve import serve

    serve(shlex.join(command), args.port)
    return EXIT_OK


def _bench(args: argparse.Namespace) -> int:
    from loopscope.cli import bench
    from loopscope.engine.devices import resolve_device

    device = str(resolve_device(args.device))
    result = bench.run(
        device=device,
        quick=args.quick,
        batch=args.batch,
        progress=lambda line: print(f"measuring {line}...", file=sys.stderr, flush=True),
    )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        bench.print_table(result)
    return EXIT_OK
