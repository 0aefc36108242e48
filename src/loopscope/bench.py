"""`loopscope bench`: what loopscope costs, measured side by side in one run (ratios, not seconds).

- Stepper vs a plain PyTorch loop, in continuous-run mode (full statistics only for the ~20
  iterations a second the screen shows), on three reference models at batch 64.
- Loss-plot render time with 1e3, 1e5 and 1e6 points of history (downsampled before plotext).
- Memory of a 1e6-iteration history.
- Training throughput inside the running app (engine in its own process, plot redrawing) against
  the plain loop, and the time to the app's first frame.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
import tracemalloc
from typing import Any

from loopscope.engine.probe_schedule import ProbeSchedule

BATCH = 64


# ----- reference models (synthetic data, generated locally) ---------------------------------
def _experiment(name: str):
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from loopscope.experiment import Experiment

    g = torch.Generator().manual_seed(0)
    if name == "cnn":
        x = torch.randn(4096, 3, 32, 32, generator=g)
        model = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 8 * 8, 128), nn.ReLU(), nn.Linear(128, 10),
        )
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    elif name == "wide_mlp":
        x = torch.randn(4096, 512, generator=g)
        model = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                              nn.Linear(1024, 10))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    else:
        x = torch.randn(4096, 64, generator=g)
        model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    y = torch.randint(0, 10, (x.shape[0],), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True, drop_last=True)
    return Experiment(model=model, loss_fn=nn.CrossEntropyLoss(), optimizer=optimizer, train_loader=loader,
                      epochs=10_000, name=name)


def mlp_experiment():
    return _experiment("mlp")


def wide_mlp_experiment():
    return _experiment("wide_mlp")


def cnn_experiment():
    return _experiment("cnn")


MODELS = {"mlp": mlp_experiment, "wide_mlp": wide_mlp_experiment, "cnn": cnn_experiment}


# ----- stepper vs plain loop -----------------------------------------------------------------
def _plain_times(experiment, iterations: int, device) -> list[float]:
    import torch

    model, optimizer, loss_fn = experiment.model.to(device), experiment.optimizer, experiment.loss_fn
    times, batches = [], iter(experiment.train_loader)
    for _ in range(iterations):
        start = time.perf_counter()
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(experiment.train_loader)
            x, y = next(batches)
        x, y = x.to(device), y.to(device)
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        loss.item()  # the plain loop reads its loss too (for a progress print)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def _stepper_times(stepper, iterations: int, schedule) -> list[float]:
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        # As the app's engine does: full statistics for the iterations the screen will show.
        stepper.probe = schedule.should_probe(start)
        stepper.sync_cuda = False
        stepper.run_iteration()
        if stepper.device.type == "cuda":
            import torch

            torch.cuda.synchronize(stepper.device)
        elapsed = time.perf_counter() - start
        schedule.record(stepper.probe, start, elapsed)
        times.append(elapsed)
    return times


def compare(name: str, iterations: int = 150, rounds: int = 4, device: str = "cpu") -> dict[str, Any]:
    """Median per-iteration time of each, interleaved in rounds so machine noise hits both alike."""
    import torch

    from loopscope.engine.stepper import Stepper

    dev = torch.device(device)
    torch.manual_seed(0)
    plain_exp = MODELS[name]()
    torch.manual_seed(0)
    stepper = Stepper(MODELS[name](), dev)
    schedule = ProbeSchedule()
    _plain_times(plain_exp, 10, dev), _stepper_times(stepper, 10, schedule)  # warm up
    plain, ours = [], []
    for _ in range(rounds):
        plain += _plain_times(plain_exp, iterations, dev)
        ours += _stepper_times(stepper, iterations, schedule)
    # Means, not medians: the probed iterations are rare but they are part of the cost.
    plain_ms, stepper_ms = statistics.fmean(plain) * 1000, statistics.fmean(ours) * 1000
    return {"name": name, "plain_ms": round(plain_ms, 3), "stepper_ms": round(stepper_ms, 3),
            "ratio": round(stepper_ms / plain_ms, 3)}


# ----- plot and history --------------------------------------------------------------------
def plot_render_ms(points: int, width: int = 60, height: int = 15) -> float:
    """Time to render the loss plot from a history of `points` losses, as the app does."""
    import math

    import plotext as plt

    from loopscope.history import Series
    from loopscope.ui.model import downsample

    series = Series(4096)
    for i in range(points):
        series.add(i, 1.0 / math.sqrt(i + 1))
    start = time.perf_counter()
    xs, ys = zip(*((p.x, p.mean) for p in series.points()))
    xs, ys = downsample(list(xs), list(ys), 2 * width)
    plt.clear_figure()
    plt.plotsize(width, height)
    plt.plot(xs, ys, marker="braille")
    plt.build()
    return (time.perf_counter() - start) * 1000


def history_memory_mb(iterations: int = 1_000_000) -> float:
    from loopscope.events import StageEvent
    from loopscope.history import History

    tracemalloc.start()
    history = History()
    for i in range(1, iterations + 1):
        history.add(StageEvent(iteration=i, epoch=1, stage="loss", loss=1.0 / i))
    current, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return current / 2**20


# ----- the app -------------------------------------------------------------------------------
_APP_PROBE = """
import asyncio, json, sys, time
t0 = time.perf_counter()
from loopscope.protocol import SessionSpec
from loopscope.ui.app import LoopscopeApp

class Timed(LoopscopeApp):
    first_frame = None
    def on_mount(self):
        super().on_mount()
        self.call_after_refresh(self._first)
    def _first(self):
        Timed.first_frame = Timed.first_frame or time.perf_counter() - t0

async def main(seconds):
    app = Timed(SessionSpec(sys.argv[1]))
    async with app.run_test(size=(120, 40)) as pilot:
        while app.model.info is None:
            await pilot.pause(0.05)
        await pilot.press("r")
        while app.model.state.completed_iterations < 20:
            await pilot.pause(0.05)
        start, done = time.monotonic(), app.model.state.completed_iterations
        await pilot.pause(seconds)
        rate = (app.model.state.completed_iterations - done) / (time.monotonic() - start)
        await pilot.press("r")
    print(json.dumps({"first_frame_ms": Timed.first_frame * 1000, "app_its": rate}))

asyncio.run(main(float(sys.argv[2])))
"""


def app_throughput(name: str = "wide_mlp", seconds: float = 8.0) -> dict[str, Any]:
    import torch

    torch.manual_seed(0)
    experiment = MODELS[name]()
    plain = _plain_times(experiment, 100, torch.device("cpu"))
    plain_its = 1.0 / statistics.median(plain)
    result = subprocess.run([sys.executable, "-c", _APP_PROBE, f"loopscope.bench:{name}_experiment", str(seconds)],
                            capture_output=True, text=True, timeout=seconds + 120)
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    return {"plain_its": round(plain_its, 1), "app_its": round(measured["app_its"], 1),
            "ratio": round(measured["app_its"] / plain_its, 3), "first_frame_ms": round(measured["first_frame_ms"], 1)}


def run(device: str = "cpu", quick: bool = False) -> dict[str, Any]:
    models = [compare(name, iterations=40 if quick else 150, rounds=2 if quick else 4, device=device)
              for name in MODELS]
    plot = {str(n): round(plot_render_ms(n), 2) for n in (1_000, 100_000, 1_000_000)}
    app = app_throughput(seconds=3.0 if quick else 8.0)
    return {"models": models, "plot_render_ms": plot, "history_memory_mb": round(history_memory_mb(), 2),
            "app": {k: app[k] for k in ("plain_its", "app_its", "ratio")}, "first_frame_ms": app["first_frame_ms"]}


def print_table(result: dict[str, Any]) -> None:
    print(f"{'model':<10} {'plain ms/it':>12} {'stepper ms/it':>14} {'ratio':>7}")
    for row in result["models"]:
        print(f"{row['name']:<10} {row['plain_ms']:>12.3f} {row['stepper_ms']:>14.3f} {row['ratio']:>7.3f}")
    print("loss plot render: " + ", ".join(f"{k} points {v:.1f} ms" for k, v in result["plot_render_ms"].items()))
    print(f"history of 1e6 iterations: {result['history_memory_mb']:.2f} MB")
    app = result["app"]
    print(f"in the app (wide_mlp, engine process, live plot): {app['app_its']:.0f} it/s vs plain "
          f"{app['plain_its']:.0f} it/s = {app['ratio']:.2f}x")
    print(f"first frame of the app: {result['first_frame_ms']:.0f} ms")
