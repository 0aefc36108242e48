"""`loopscope bench`: what loopscope costs, measured side by side in one run (ratios, not seconds).

- Stepper vs a plain PyTorch loop, in continuous-run mode as the app runs it (full statistics for
  the ~5 iterations a second the panels show, snapshots for stepping back), on three reference
  models at batch 64 on CPU, 256 on a GPU.
- Loss-plot render time with 1e3, 1e5 and 1e6 points of history (downsampled before plotext).
- Memory of a 1e6-iteration history.
- Training throughput inside the running app (engine in its own process, plot redrawing) against
  the plain loop, and the time to the app's first frame.
"""

from __future__ import annotations

import contextlib
import io
import json
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

from loopscope.engine.allocator import tune_allocator
from loopscope.engine.plainloop import PlainLoop
from loopscope.engine.probe_schedule import ProbeSchedule
from loopscope.scenarios.bench_models import BATCH, GPU_BATCH, MODELS
from loopscope.scenarios.bench_models import reference_experiment as _experiment
from loopscope.shared.protocol import DEFAULT_HISTORY


# ----- stepper vs plain loop -----------------------------------------------------------------
class RunClock:
    """`perf_counter`, stopped while the plain loop has its turn.

    The app runs the stepper on without pauses, and both the probe schedule and the snapshot
    spacing go by the clock: a plain-loop turn seen as a pause would make the next iteration take
    a probe and a snapshot the app would not take (measured: probes cost 4.5% instead of 2%)."""

    def __init__(self) -> None:
        self.stopped_for = 0.0

    def __call__(self) -> float:
        return time.perf_counter() - self.stopped_for

    def stop_while(self, work: Callable[[], Any]) -> Any:
        began = time.perf_counter()
        try:
            return work()
        finally:
            self.stopped_for += time.perf_counter() - began


def _stepper_iteration(stepper, schedule, clock: RunClock) -> float:
    """One iteration as the app's engine runs it, timed as the plain loop times its own: with
    `perf_counter` alone (the run's clock differs from it only by the plain loop's turns)."""
    start = time.perf_counter()
    run_start = start - clock.stopped_for
    # As the app's engine does: full statistics for the iterations the screen will show.
    stepper.probe = schedule.should_probe(run_start)
    stepper.run_iteration()
    if stepper.device.type == "cuda":
        import torch

        torch.cuda.synchronize(stepper.device)
    elapsed = time.perf_counter() - start
    schedule.record(stepper.probe, run_start, elapsed)
    return elapsed


def compare(
    name: str, iterations: int = 600, rounds: int = 10, device: str = "cpu", batch: int = BATCH
) -> dict[str, Any]:
    """Per-iteration time of each: they take turns iteration by iteration, so machine noise and
    training's own drift hit both alike.

    Training changes the speed as it goes (the wide MLP's Adam slows by half after ~800
    iterations, from subnormal floats in its state), and on this shared machine the speed of
    both swings by up to 30% from one half second to the next: taking turns in rounds of 60
    iterations, the rounds' ratios ranged 0.82-1.46 when it was busy; iteration by iteration, the
    chunks' ratios stay within a few percent. The pairs are cut into `rounds` chunks (each long
    enough to hold its share of probes and snapshots); the ratio is the median of the chunks'
    ratios. Both train the very same model, optimizer and data: two copies of a model sit at
    different places in memory, which alone was measured to move a ratio by up to 10%. The
    stepper's clock stops during the plain loop's turns (RunClock)."""
    import torch

    from loopscope.engine.stepper import Stepper

    tune_allocator()  # as the app's engine process does; the plain loop gets it too
    dev = torch.device(device)
    torch.manual_seed(0)
    experiment = _experiment(name, batch)
    # As the app runs it: snapshots for stepping back, full statistics on the schedule.
    stepper = Stepper(experiment, dev, keep_snapshots=DEFAULT_HISTORY)
    stepper.sync_cuda = False  # as the app's engine runs: no GPU sync per stage
    stepper.quiet = True  # and its unprobed iterations make no events but the loss's
    clock = RunClock()
    stepper.rewinder.clock = clock
    schedule = ProbeSchedule()
    plain = PlainLoop(experiment, dev)
    plain_times, our_times = [], []
    # As the app's engine does, one recorder of warnings serves many iterations.
    with stepper.recording_warnings():
        for _ in range(10):  # warm up
            clock.stop_while(plain.step)
            _stepper_iteration(stepper, schedule, clock)
        for _ in range(iterations):
            plain_times.append(clock.stop_while(plain.step))
            our_times.append(_stepper_iteration(stepper, schedule, clock))
    rounds = max(1, min(rounds, iterations))
    size = iterations // rounds
    chunks = [
        (sum(our_times[i : i + size]), sum(plain_times[i : i + size]), len(plain_times[i : i + size]))
        for i in range(0, size * rounds, size)
    ]
    return {
        "name": name,
        "batch": batch,
        "plain_ms": round(statistics.median(p / n for _, p, n in chunks) * 1000, 3),
        "stepper_ms": round(statistics.median(o / n for o, _, n in chunks) * 1000, 3),
        "ratio": round(statistics.median(o / p for o, p, _ in chunks), 3),
    }


# ----- script mode vs python script.py ------------------------------------------------------
def script_compare(iterations: int = 300, rounds: int = 6) -> dict[str, Any]:
    """The wide MLP written as a plain script (`scenarios/wide_mlp_script.py`), run as written and
    under script mode as the app's engine runs it (whole iterations a turn, full statistics on the
    probe schedule), in this process, taking turns script run by script run. Each run times its
    own iterations after a warm-up; the ratio is the median of the rounds' ratios."""
    import runpy
    import tempfile

    from loopscope.engine.script.driver import ScriptDriver
    from loopscope.engine.script.main_thread import lend_main_thread
    from loopscope.scenarios import wide_mlp_script

    tune_allocator()  # as the app's engine process does; the plain run gets it too
    path = wide_mlp_script.__file__

    def timed(run: Callable[[list[str]], None]) -> float:
        with tempfile.NamedTemporaryFile("r", suffix=".txt") as times:
            run([path, times.name, str(iterations)])
            return float(times.read())

    def plain(argv: list[str]) -> None:
        saved = sys.argv
        sys.argv = argv
        try:
            runpy.run_path(path, run_name="__main__")
        finally:
            sys.argv = saved

    def under_loopscope(argv: list[str]) -> None:
        driver = ScriptDriver(path, argv[1:])
        driver.quiet = True  # as the app's engine runs it: unprobed iterations make no events but the loss's
        schedule = ProbeSchedule()

        def drive() -> None:
            try:
                while not driver.finished and driver.halted is None:
                    started = time.perf_counter()
                    driver.probe = schedule.should_probe(started)
                    driver.run_iteration()  # quiet: its events are held, so the list may be empty
                    schedule.record(driver.probe, started, time.perf_counter() - started)
            finally:
                driver.close()

        lend_main_thread(drive)  # the script on the main thread, as the engine process runs it

    plain_times, our_times = [], []
    with contextlib.redirect_stdout(io.StringIO()):  # the script prints its final loss
        for _ in range(rounds):
            plain_times.append(timed(plain))
            our_times.append(timed(under_loopscope))
    return {
        "name": "wide_mlp",
        "plain_ms": round(statistics.median(plain_times) * 1000, 3),
        "script_ms": round(statistics.median(our_times) * 1000, 3),
        "ratio": round(statistics.median(o / p for o, p in zip(our_times, plain_times)), 3),
    }


# ----- plot and history --------------------------------------------------------------------
def plot_render_ms(points: int, width: int = 60, height: int = 15) -> float:
    """Time to render the loss plot from a history of `points` losses, as the app does."""
    import math

    from textual_plotext.plot import Plot

    from loopscope.shared.history import Series
    from loopscope.ui.plot import plot_points, plotext_text

    series = Series(4096)
    for i in range(points):
        series.add(i, 1.0 / math.sqrt(i + 1))
    start = time.perf_counter()
    xs, ys = plot_points(series, width)
    figure = Plot()
    figure.plotsize(width, height)
    figure.plot(xs, ys, marker="braille")
    plotext_text(figure)  # as the app's plot widgets turn the figure into their text
    return (time.perf_counter() - start) * 1000


def history_memory_mb(iterations: int = 1_000_000) -> float:
    from loopscope.shared.events import StageEvent
    from loopscope.shared.history import History
    from loopscope.shared.vocab import Stage

    tracemalloc.start()
    history = History()
    for i in range(1, iterations + 1):
        history.add(StageEvent(iteration=i, epoch=1, stage=Stage.LOSS, loss=1.0 / i))
    current, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return current / 2**20


# ----- the app -------------------------------------------------------------------------------
# Runs in its own process, as a user's `loopscope` does: the app (engine in its own process, plot
# redrawing) and the plain loop take turns in rounds, so machine noise hits both alike. The plain
# loop runs in the engine process on the engine's own model and data (TimePlainLoop), with the
# screen idle: the only difference between the two is loopscope.
# Each round, the app's and the plain loop's, is counted from 1.5 s after it starts: the app's first
# half second after `r` ran ~30% slower (inside the training's own torch calls, cause unknown; a plain
# loop after a pause shows no such start), and in 2 s rounds that
# alone moved adam_mlp's figure from ~0.99 to ~0.85x; screen_rate likewise waits 2 s.
APP_WARM_UP_SECONDS = 1.5
_APP_PROBE = """
import asyncio, json, sys, time
t0 = time.perf_counter()
from loopscope.shared.protocol import PlainLoopTimed, SessionSpec, TimePlainLoop
from loopscope.ui.app import LoopscopeApp

class Timed(LoopscopeApp):
    first_frame = None
    plain = None
    def on_mount(self):
        # Textual also calls LoopscopeApp.on_mount itself: calling super() here would start two engines.
        self.call_after_refresh(self._first)
    def _first(self):
        Timed.first_frame = Timed.first_frame or time.perf_counter() - t0
    def _from_engine(self, payload):
        if isinstance(payload, PlainLoopTimed):
            Timed.plain = payload
        else:
            super()._from_engine(payload)

async def wait_for(pilot, condition):
    # asyncio.sleep, not pilot.pause: a pause also makes the screen recompose (it waits for every
    # widget, then refreshes the compositor), and polled 50 times a second that took the CPU away
    # from the plain loop's rounds (they ran at ~0.86x the rate of an idle screen).
    while not condition():
        await asyncio.sleep(0.02)

async def plain_rate(app, pilot, seconds):
    Timed.plain = None
    app.send(TimePlainLoop(seconds, WARM_UP))
    await wait_for(pilot, lambda: Timed.plain is not None)
    return Timed.plain.iterations / Timed.plain.seconds

async def main(name, seconds, rounds, device_name):
    app = Timed(SessionSpec(f"loopscope.scenarios.bench_models:{name}_experiment", device=device_name))
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, lambda: app.model.info is not None)
        state = lambda: app.model.state
        app_rates, plain_rates = [], [await plain_rate(app, pilot, seconds)]
        for _ in range(rounds):
            await pilot.press("r")
            first = state().completed_iterations
            await wait_for(pilot, lambda: state().running and state().completed_iterations >= first + 5)
            await asyncio.sleep(WARM_UP)  # past the resume's own work, as devtools.screen_rate waits 2 s
            start, done = time.perf_counter(), state().completed_iterations
            await asyncio.sleep(seconds)
            app_rates.append((state().completed_iterations - done) / (time.perf_counter() - start))
            await pilot.press("r")
            await wait_for(pilot, lambda: not state().running)
            plain_rates.append(await plain_rate(app, pilot, seconds))
    print(json.dumps({"first_frame_ms": Timed.first_frame * 1000, "app_rates": app_rates,
                      "plain_rates": plain_rates}))

WARM_UP = float(sys.argv[5])  # seconds each round runs before it is counted, the plain loop's too
asyncio.run(main(sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]))
"""


def app_throughput(
    name: str = "wide_mlp", seconds: float = 8.0, rounds: int = 8, device: str = "cpu"
) -> dict[str, Any]:
    """Iterations a second inside the running app against the plain loop, `seconds` each in all.

    They take turns in short rounds, the plain loop first and last; the ratio is the median of each
    round's rate against the plain rounds on either side of it, so a burst of load from elsewhere
    on the machine spoils one round, not the figure.
    """
    result = subprocess.run(
        [sys.executable, "-c", _APP_PROBE, name, str(seconds / rounds), str(rounds), device, str(APP_WARM_UP_SECONDS)],
        capture_output=True,
        text=True,
        timeout=2 * seconds + 2 * (rounds + 1) * APP_WARM_UP_SECONDS + 120,
    )
    if result.returncode != 0:
        raise RuntimeError(f"the app probe failed: {result.stderr.strip()[-2000:]}")
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    app_rates, plain_rates = measured["app_rates"], measured["plain_rates"]
    # Each app round against the plain rounds before and after it, on times (1 / rate): training
    # changes the speed as it goes (the wide MLP's Adam slows by half after ~800 iterations, from
    # subnormal floats in its state), and bracketed, a steady drift cancels.
    ratios = [app * (1 / before + 1 / after) / 2 for app, before, after in zip(app_rates, plain_rates, plain_rates[1:])]
    return {
        "plain_its": round(statistics.median(plain_rates), 1),
        "app_its": round(statistics.median(app_rates), 1),
        "ratio": round(statistics.median(ratios), 3),
        "rounds": [round(r, 3) for r in ratios],
        "first_frame_ms": round(measured["first_frame_ms"], 1),
    }


def run(
    device: str = "cpu",
    quick: bool = False,
    batch: int | None = None,
    progress: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """Every figure, measured in this one run; `progress` hears what is being measured."""
    batch = batch or (GPU_BATCH if device.startswith("cuda") else BATCH)
    models = []
    for name in MODELS:
        progress(f"stepper vs plain loop: {name} at batch {batch} on {device}")
        models.append(
            compare(name, iterations=100 if quick else 600, rounds=4 if quick else 10, device=device, batch=batch)
        )
    progress("script mode vs python script.py: the wide MLP written as a script, in turns")
    script = script_compare(iterations=100 if quick else 300, rounds=3 if quick else 6)
    progress("loss-plot render time at 1e3, 1e5 and 1e6 points")
    plot = {str(n): round(plot_render_ms(n), 2) for n in (1_000, 100_000, 1_000_000)}
    progress("memory of a 1e6-iteration history")
    memory = round(history_memory_mb(), 2)
    apps = {}
    for name in APP_MODELS:
        progress(f"throughput inside the app on {name} (engine process, live plot) vs the plain loop, taking turns")
        apps[name] = app_throughput(name, seconds=6.0 if quick else 16.0, rounds=4 if quick else 8, device=device)
    return {
        "device": device,
        "quick": quick,
        "models": models,
        "script": script,
        "plot_render_ms": plot,
        "history_memory_mb": memory,
        "app": {name: {k: app[k] for k in ("plain_its", "app_its", "ratio", "rounds")} for name, app in apps.items()},
        "first_frame_ms": apps[APP_MODELS[0]]["first_frame_ms"],
    }


# In the app: issue 17's small MLP with Adam (~1 ms an iteration here), where bookkeeping and the
# screen's CPU show, and a wide one.
APP_MODELS = ("adam_mlp", "wide_mlp")
TARGETS = {"mlp": 1.05, "wide_mlp": 1.05, "cnn": 1.05}  # stepper/plain in run mode
SCRIPT_TARGET = 1.10  # script mode / python script.py on the wide MLP
APP_TARGET = 0.90  # iterations a second inside the app / the plain loop's


def _verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def print_table(result: dict[str, Any]) -> None:
    print(
        f"on {result['device']}"
        + (
            "  (--quick: few short rounds, so the ratios are rough; judge the targets on a full run)"
            if result.get("quick")
            else ""
        )
    )
    print(f"{'model':<10} {'batch':>6} {'plain ms/it':>12} {'stepper ms/it':>14} {'ratio':>7}  target")
    for row in result["models"]:
        target = TARGETS[row["name"]]
        judged = f"<= {target:.2f} {_verdict(row['ratio'] <= target)}"
        print(
            f"{row['name']:<10} {row['batch']:>6} {row['plain_ms']:>12.3f} {row['stepper_ms']:>14.3f} "
            f"{row['ratio']:>7.3f}  {judged}"
        )
    script = result["script"]
    print(
        f"script mode ({script['name']} as a script): python script.py {script['plain_ms']:.3f} ms/it, "
        f"under loopscope {script['script_ms']:.3f} ms/it, ratio {script['ratio']:.3f}  "
        f"(target <= {SCRIPT_TARGET:.2f}: {_verdict(script['ratio'] <= SCRIPT_TARGET)})"
    )
    worst_plot = max(result["plot_render_ms"].values())
    print(
        "loss plot render: "
        + ", ".join(f"{k} points {v:.1f} ms" for k, v in result["plot_render_ms"].items())
        + f"  (target < 20 ms: {_verdict(worst_plot < 20)})"
    )
    print(
        f"history of 1e6 iterations: {result['history_memory_mb']:.2f} MB  "
        f"(target < 50 MB: {_verdict(result['history_memory_mb'] < 50)})"
    )
    for name, app in result["app"].items():
        print(
            f"in the app ({name}, engine process, live plot): {app['ratio']:.2f}x the plain loop's rate, the median "
            f"of {len(app['rounds'])} rounds ({', '.join(f'{r:.2f}' for r in app['rounds'])}; about "
            f"{app['app_its']:.0f} vs {app['plain_its']:.0f} it/s)  "
            f"(target >= {APP_TARGET:.2f}x: {_verdict(app['ratio'] >= APP_TARGET)})"
        )
    print(
        f"first frame of the app: {result['first_frame_ms']:.0f} ms  "
        f"(target < 500 ms: {_verdict(result['first_frame_ms'] < 500)})"
    )
