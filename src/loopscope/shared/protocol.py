"""What the UI and the engine process say to each other: plain picklable data, no tensors.

Torch-free, so the UI process can unpickle everything the engine sends.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loopscope.shared.events import CheckResult, StageError, StageEvent
from loopscope.shared.vocab import PictureKind, Stage, StepKind, Task

# While training runs, the screen's counters move at 10 frames a second and the detail panels
# (tensors, gradients) at 5, the plot at 2.5: a person cannot read numbers that change faster, and every
# wake-up of the UI process takes a core from the engine's threads. Measured with `loopscope bench`
# on 2 cores: 20 frames a second cost ~5% of throughput against 10; so, oddly, did 5 (one clock at
# 0.2 s: 0.90x against 0.94x over five runs each). The engine probes in full no more often than
# the panels show.
FRAME_SECONDS = 0.1
DETAIL_SECONDS = 0.2
# The loss plot, the costliest thing on screen (a plotext build, ~5 ms), follows a run at half the
# panels' rate: the UI process then takes 0.067-0.071 of a core instead of 0.090-0.109 (the bench's
# mlp running in the app, 2 cores, four runs each).
PLOT_SECONDS = 0.4
# At max speed the detail panels and the plot follow a run once a second:
# there the engine's threads want every core, and the panels' redraws were what the UI process cost
# them. A paced run (a lecture's 20 it/s) keeps the rates above: each of its iterations is worth seeing.
MAX_SPEED_DETAIL_SECONDS = 1.0
# And at max speed the engine sends its news 4 times a second, not 10, so the counters move at 4: the UI
# process then takes ~0.045 of a core instead of ~0.067 (2 cores, issue 17's MLP). On 2 cores each
# of its ms takes about two from training, since torch's two threads wait for each other.
MAX_SPEED_FRAME_SECONDS = 0.25


def running_rates(speed: float | None) -> tuple[float, float, float]:
    """Seconds between the engine's frames, the detail panels' redraws and the plot's while a run
    goes on at `speed` (iterations a second; None: max). The engine and the screen both follow it."""
    if speed is None:
        return MAX_SPEED_FRAME_SECONDS, MAX_SPEED_DETAIL_SECONDS, MAX_SPEED_DETAIL_SECONDS
    return FRAME_SECONDS, DETAIL_SECONDS, PLOT_SECONDS


DEFAULT_HISTORY = 200  # iterations that `b` can step back through

# ----- UI -> engine ----------------------------------------------------------------------


# The run speeds `+` and `-` move through, in iterations a second; None: as fast as it goes.
RUN_SPEEDS: tuple[float | None, ...] = (1.0, 2.0, 5.0, 20.0, 100.0, None)
# What `loopscope run` starts at: a class can watch the loss fall (blobs takes 20 s, not 3); `m` is max.
TEACHING_SPEED = 20.0


@dataclass(frozen=True)
class SessionSpec:
    """How to build the run: the same arguments as `loopscope run`."""

    target: str
    device: str = "auto"
    seed: int = 0
    bugs: tuple[str, ...] = ()
    twin: bool = False
    history: int = DEFAULT_HISTORY
    script: bool = False  # run the target file as a script even if it defines experiment()
    script_args: tuple[str, ...] = ()  # a script's own command line (after `--`)
    seed_given: bool = True  # a script seeds itself: `seed` applies only when the user gave it
    speed: float | None = None  # iterations a second when running (one of RUN_SPEEDS); None: max
    nproc: int = 1  # ranks of DistributedDataParallel, each its own process (1: no torch.distributed)
    nnodes: int = 1  # machines taking part; the app runs on node 0 and moves every node's ranks
    rdzv_endpoint: str | None = None  # HOST:PORT of node 0 (torch.distributed's store), with nnodes > 1


@dataclass(frozen=True)
class Step:
    """Run one stage, the rest of the iteration, or the rest of the epoch."""

    kind: StepKind


@dataclass(frozen=True)
class SetRunning:
    on: bool


@dataclass(frozen=True)
class RunIterations:
    """Run this many more iterations, then pause (a demo's `run N`)."""

    count: int


@dataclass(frozen=True)
class SetSpeed:
    """Iterations per second while running; None means as fast as possible."""

    iterations_per_second: float | None


@dataclass(frozen=True)
class TimePlainLoop:
    """`loopscope bench` only: run a plain PyTorch loop for `seconds` on the engine's own model,
    optimizer and data, as the reference for the app's throughput. The same objects in the same
    process: a copy elsewhere lands elsewhere in memory, which alone moved the figure by up to ~10%."""

    seconds: float
    warm_up: float = 0.0  # run this long before counting, as the app's rounds are counted


@dataclass(frozen=True)
class PlainLoopTimed:
    iterations: int
    seconds: float


@dataclass(frozen=True)
class SetBug:
    bug_id: str
    on: bool


@dataclass(frozen=True)
class SetTwin:
    on: bool


@dataclass(frozen=True)
class RunChecks:
    """Karpathy's sanity checks on copies of the current state."""


@dataclass(frozen=True)
class Rewind:
    """Step back one iteration."""


@dataclass(frozen=True)
class Rewound:
    """The loop stepped back: everything after this many iterations is forgotten. `events` are
    the training stages of the iteration it is back at the end of, as first recorded (the replay
    is quiet), so the panels show where the loop stands."""

    completed_iterations: int
    epoch: int
    events: tuple[StageEvent, ...] = ()


@dataclass(frozen=True)
class Shutdown:
    pass


# ----- engine -> UI ----------------------------------------------------------------------


@dataclass(frozen=True)
class SessionInfo:
    """Facts about the run that do not change while it runs."""

    name: str
    device: str
    task: Task | None
    epochs: int
    batches_per_epoch: int | None
    iteration_stages: tuple[Stage, ...]
    epoch_end_stages: tuple[Stage, ...]
    applicable_bugs: tuple[str, ...]
    options: dict[str, object] = field(default_factory=dict)  # clip_grad_norm, scheduler, ...
    bug_reasons: dict[str, str] = field(default_factory=dict)  # why each other bug does not apply
    world_size: int = 1  # ranks under torch.distributed (the panels show rank 0, and each rank's numbers)


@dataclass(frozen=True)
class EngineState:
    """Where the loop is now."""

    iteration: int
    epoch: int
    completed_iterations: int
    next_stage: Stage | None
    running: bool
    finished: bool
    stop_reason: str | None
    halted: StageError | None
    active_bugs: tuple[str, ...]
    twin: bool
    iteration_stages: tuple[Stage, ...]
    speed: float | None
    iterations_per_second: float | None = None
    # Commands received so far: the UI knows the number of each command it sends, so it can tell
    # when one has been carried out (a run: when it is no longer running).
    handled: int = 0


@dataclass(frozen=True)
class Ready:
    info: SessionInfo
    state: EngineState


@dataclass(frozen=True)
class Update:
    """New events (in full for the iterations the screen shows), every loss since the last
    update as (iteration, epoch, loss, twin_loss), and the state after them."""

    events: tuple[StageEvent, ...]
    losses: tuple[tuple[float, int, float | None, float | None], ...]  # (x on the plot, epoch, loss, twin loss)
    state: EngineState


@dataclass(frozen=True)
class Checks:
    """The sanity checks' results so far (sent as each one ends), then all of them."""

    results: tuple[CheckResult, ...]
    total: int = 0  # how many checks run in all
    done: bool = True
    blind_spots: str = ""  # what the checks cannot see (with the last message)


@dataclass(frozen=True)
class Failed:
    """The engine could not start, or a command could not be carried out."""

    message: str
    fatal: bool = True


@dataclass(frozen=True)
class SetPicture:
    """Send pictures of what the model has learned (decision boundary or fitted curve)."""

    on: bool


@dataclass(frozen=True)
class NoPicture:
    """Why this model gets no picture (its inputs are not 2-D points or 1-D values)."""

    reason: str


@dataclass(frozen=True)
class Picture:
    """What the model computes over its input space, for 2-D classifiers and 1-D regressions.

    kind "boundary": `grid[row][col]` is the predicted class over x_range x y_range (row 0 at the
    bottom); kind "curve": `curve` is (x, prediction). `points` are recent training examples as
    (x, y, label) for a boundary, (x, target) for a curve.
    """

    kind: PictureKind
    iteration: int
    x_range: tuple[float, float]
    y_range: tuple[float, float]
    grid: tuple[tuple[int, ...], ...] = ()
    curve: tuple[tuple[float, float], ...] = ()
    points: tuple[tuple[float, ...], ...] = ()
