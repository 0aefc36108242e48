"""The engine side of a session: owns the Stepper, obeys commands, streams updates.

Runs in its own process (or a thread, in tests) and talks over a multiprocessing Connection.
In run mode it probes in full only the iterations the detail panels will show (at most 5 a second)
and sends every loss, so the plot is complete while statistics cost little.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from loopscope.engine.driver import Driver
from loopscope.engine.pictures import PictureMaker
from loopscope.engine.probe_schedule import ProbeSchedule
from loopscope.engine.recorder import QUIET_STAGES
from loopscope.shared.errors import UserError, check_processes
from loopscope.shared.history import loss_point
from loopscope.shared.nodes import parse_endpoint
from loopscope.shared.protocol import (
    Checks,
    EngineState,
    Failed,
    NoPicture,
    PlainLoopTimed,
    Ready,
    Rewind,
    Rewound,
    RunChecks,
    RunIterations,
    SessionSpec,
    SetBug,
    SetPicture,
    SetRunning,
    SetSpeed,
    SetTwin,
    Shutdown,
    Step,
    TimePlainLoop,
    Update,
    running_rates,
)
from loopscope.shared.vocab import Stage, StepKind

PICTURE_SECONDS = 0.5  # a picture costs a forward pass over a grid: at most two a second


# Module constants: the loss of every iteration passes _collect, an Enum lookup costs ~60 ns.
_LOSS, _LOAD_BATCH = Stage.LOSS, Stage.LOAD_BATCH
RATE_WINDOW = 50  # iterations the shown rate is measured over
POLL_SECONDS = 0.005  # running, commands are looked for this often (a key's wait: unnoticeable)


class EngineServer:
    def __init__(self, conn: Any, spec: SessionSpec) -> None:
        self.conn = conn
        self.spec = spec
        self.running = False
        self.speed: float | None = spec.speed
        self.handled = 0
        self.stepper: Driver = None  # type: ignore[assignment]  # set by start()
        self._events: list = []
        self._losses: list = []
        self._last_frame = 0.0
        self._rate_window: deque[tuple[float, int]] = deque(maxlen=RATE_WINDOW)
        self.schedule = ProbeSchedule()
        self.run_until: int | None = None  # completed-iteration count at which running pauses
        self.pictures: PictureMaker | None = None  # while the UI shows pictures
        self._last_picture = 0.0

    # ----- start ------------------------------------------------------------------------
    def start(self) -> bool:
        try:
            from loopscope.engine.devices import resolve_device
            from loopscope.engine.experiment import load_experiment
            from loopscope.engine.script.target import is_script
            from loopscope.engine.stepper import Stepper

            spec = self.spec
            script = is_script(spec.target, spec.script)
            check_processes(spec.nproc * spec.nnodes, spec.twin)
            if spec.nproc * spec.nnodes > 1:
                self.stepper = self._distributed_driver(script)
            elif script:
                self.stepper = self._script_driver()
            else:
                self.stepper = Stepper(
                    load_experiment(spec.target, spec.seed),
                    resolve_device(spec.device),
                    bugs=spec.bugs,
                    twin=spec.twin,
                    on_event=self._collect,
                    keep_snapshots=spec.history,
                )
            ready = Ready(self.stepper.info(), self._state())
        except UserError as exc:
            self.conn.send(Failed(str(exc)))
            return False
        except Exception as exc:  # anything else while building: still one clear line
            self.conn.send(Failed(f"{type(exc).__name__}: {exc}"))
            return False
        self.conn.send(ready)
        return True

    def _script_driver(self) -> Driver:
        from loopscope.engine.experiment import seed_everything
        from loopscope.engine.script.driver import ScriptDriver

        spec = self.spec
        if spec.twin:
            raise UserError("--twin needs an experiment() factory: a script cannot be run twice from one state")
        if spec.seed_given:
            seed_everything(spec.seed)
        return ScriptDriver(spec.target, list(spec.script_args), bugs=spec.bugs, on_event=self._collect)

    def _distributed_driver(self, script: bool) -> Driver:
        from loopscope.engine.distributed.driver import DistributedDriver
        from loopscope.engine.distributed.launcher import free_port
        from loopscope.engine.distributed.rank import RankSpec

        spec = self.spec
        host, port = "127.0.0.1", None
        if spec.nnodes > 1 and spec.rdzv_endpoint:  # node 0 of several: its address, as every node was told
            host, port = parse_endpoint(spec.rdzv_endpoint)
        ranks = RankSpec(
            target=spec.target,
            device=spec.device,
            seed=spec.seed,
            bugs=spec.bugs,
            probe=True,
            world_size=spec.nproc * spec.nnodes,
            master_port=port or free_port(),
            master_addr=host,
            script=script,
            script_args=tuple(spec.script_args),
        )
        remote = spec.nproc * (spec.nnodes - 1)  # the other nodes' ranks connect next to the store's port
        listen = (host, ranks.master_port + 1) if remote else None
        return DistributedDriver(
            ranks, on_event=self._collect, local_ranks=spec.nproc, remote_ranks=remote, listen=listen
        )

    def _state(self) -> EngineState:
        s = self.stepper
        return EngineState(
            iteration=s.iteration,
            epoch=s.epoch,
            completed_iterations=s.completed_iterations,
            next_stage=s.next_stage(),
            running=self.running,
            finished=s.finished,
            stop_reason=s.stop_reason,
            halted=s.halted,
            active_bugs=s.active_bugs,
            twin=s.twin_enabled,
            iteration_stages=tuple(s.iteration_stages()),
            speed=self.speed,
            iterations_per_second=self._rate(),
            handled=self.handled,
        )

    def _rate(self) -> float | None:
        if len(self._rate_window) < 2:
            return None
        (t0, i0), (t1, i1) = self._rate_window[0], self._rate_window[-1]
        return (i1 - i0) / (t1 - t0) if t1 > t0 else None

    # ----- events ----------------------------------------------------------------------
    def _collect(self, event: Any) -> None:
        stage = event.stage
        if stage == _LOSS:
            if not event.rank:  # the plot follows rank 0's loop
                x, loss, twin_loss = loss_point(event)
                self._losses.append((x, event.epoch, loss, twin_loss))
        elif self.pictures is not None and stage == _LOAD_BATCH and event.error is None:
            self.pictures.remember_batch()
        if event.diagnostics or event.error or stage not in QUIET_STAGES or self.stepper.probe:
            self._events.append(event)

    def _flush(self) -> None:
        self.stepper.catch_up()
        self.conn.send(Update(tuple(self._events), tuple(self._losses), self._state()))
        self._events, self._losses = [], []
        self._last_frame = time.monotonic()
        if self.pictures is not None and (not self.running or self._last_frame - self._last_picture >= PICTURE_SECONDS):
            self._last_picture = self._last_frame
            picture = self.pictures.make()
            if picture is not None:
                self.conn.send(picture)
            elif (reason := self.pictures.unavailable()) is not None:
                self.conn.send(NoPicture(reason))

    def _time_plain_loop(self, seconds: float, warm_up: float) -> PlainLoopTimed:
        from loopscope.engine.plainloop import plain_iterations_for
        from loopscope.engine.stepper import Stepper

        assert isinstance(self.stepper, Stepper), "the plain loop reference needs an experiment"
        done, took = plain_iterations_for(self.stepper.experiment, self.stepper.device, seconds, warm_up)
        return PlainLoopTimed(done, took)

    # ----- loop ------------------------------------------------------------------------
    def serve(self) -> None:
        if not self.start():
            return
        while True:
            busy = self.running and not self.stepper.finished and self.stepper.halted is None
            if not busy and self.running:
                self.running = False
                self._flush()
            if self.conn.poll(0 if busy else 0.5):
                try:
                    command = self.conn.recv()
                except (EOFError, OSError):
                    return  # the UI went away
                if isinstance(command, Shutdown):
                    return
                self._handle(command)
            elif busy:
                self._run_a_little()

    def _handle(self, command: Any) -> None:
        s = self.stepper
        self.handled += 1
        s.catch_up()  # whatever the command reads or changes, the history is complete first
        try:
            match command:
                case Step(kind=kind):
                    self.running = False
                    s.probe, s.quiet = True, False
                    s.sync_cuda = True  # stepping: true per-stage durations (on CUDA)
                    if s.halted is not None:
                        s.resume()  # stepping on after an error starts a fresh iteration
                    match kind:
                        case StepKind.STAGE:
                            s.step_stage()
                        case StepKind.ITERATION:
                            s.run_iteration()
                        case StepKind.EPOCH:
                            s.run_epoch()
                case RunIterations(count=count):
                    self._set_running(True, until=s.completed_iterations + count)
                case SetRunning(on=on):
                    self._set_running(on)
                case SetSpeed(iterations_per_second=speed):
                    self.speed = speed
                case SetBug(bug_id=bug_id, on=on):
                    s.set_bug(bug_id, on)
                    self.schedule.probe_next()  # the loop's code changed: let the screen see it at once
                case SetTwin(on=on):
                    s.set_twin(on)
                case Rewind():
                    self._rewind()
                case SetPicture(on=on):
                    self.pictures = s.picture_maker() if on else None
                    if self.pictures is not None:
                        self.pictures.remember_batch()  # a paused or finished run has a picture too
                case RunChecks():
                    self._run_checks()
                case TimePlainLoop(seconds=seconds, warm_up=warm_up):
                    self.running, self.run_until = False, None
                    self.conn.send(self._time_plain_loop(seconds, warm_up))
        except UserError as exc:
            self.conn.send(Failed(str(exc), fatal=False))
        self._flush()

    def _run_checks(self) -> None:
        from loopscope.engine.checks import CHECKS, blind_spots, run_checks
        from loopscope.engine.stepper import Stepper

        subject: Any = self.stepper
        if not isinstance(subject, Stepper):  # a script: copies of what it trains, while it waits
            try:
                subject = subject.check_subject()
            except UserError as exc:
                self.conn.send(Failed(str(exc), fatal=False))
                return
        so_far: list = []

        def ended(result: Any) -> None:
            so_far.append(result)
            if len(so_far) < len(CHECKS):
                self.conn.send(Checks(tuple(so_far), len(CHECKS), done=False))

        results = run_checks(subject, on_result=ended)
        self.conn.send(Checks(tuple(results), len(CHECKS), True, blind_spots(results, self.stepper.active_bugs)))

    def _rewind(self) -> None:
        s = self.stepper
        self.running, self.run_until = False, None
        if s.rewind():
            self._events, self._losses = [], []
            self.conn.send(Rewound(s.completed_iterations, s.epoch, s.rewound_events))
            if s.rewind_warning:
                self.conn.send(Failed(s.rewind_warning, fatal=False))
        else:
            self.conn.send(
                Failed(
                    f"cannot step back further: only the last {s.rewind_window} iterations are kept "
                    "(loopscope run --history N keeps more)",
                    fatal=False,
                )
            )

    def _set_running(self, on: bool, until: int | None = None) -> None:
        """Run (until that many completed iterations, or on) or pause; running on after an error
        starts a fresh iteration."""
        s = self.stepper
        self.run_until = until
        self.running = on and not s.finished
        if self.running and s.halted is not None:
            s.resume()
        self._rate_window = deque([(time.monotonic(), s.completed_iterations)], maxlen=RATE_WINDOW)

    def _last_of_run(self) -> bool:
        """The iteration about to start is the run's last: probe it, so the screen ends on it."""
        s = self.stepper
        return (self.run_until is not None and s.completed_iterations + 1 >= self.run_until) or s.last_iteration_next()

    def _run_a_little(self) -> None:
        """Run whole iterations until a frame is due; probe fully only the one the frame shows."""
        s = self.stepper
        s.sync_cuda = False  # running: never force a GPU sync per stage
        s.quiet = True  # and the unprobed iterations make no events but their losses
        frame_seconds, _, _ = running_rates(self.speed)
        frame_due = self._last_frame + frame_seconds
        with s.recording_warnings():
            self._run_until_frame(frame_due)
        if (
            time.monotonic() >= frame_due
            or self.speed is not None
            or s.finished
            or s.halted is not None
            or not self.running
        ):
            self._flush()

    def _run_until_frame(self, frame_due: float) -> None:
        s = self.stepper
        poll_due = 0.0
        # Looked up once, not per iteration: on a small model each lookup between torch calls costs
        # several times what it costs alone (issue 17).
        monotonic, should_probe, record = time.monotonic, self.schedule.should_probe, self.schedule.record
        remember_rate = self._rate_window.append
        while True:
            started = monotonic()
            probed = False
            if s.at_boundary:
                probed = s.probe = self.speed is not None or self._last_of_run() or should_probe(started)
            s.run_iteration()
            now = monotonic()
            if self.speed is None:
                record(probed, started, now - started)
            remember_rate((now, s.completed_iterations))
            if s.finished or s.halted is not None:
                break
            if self.run_until is not None and s.completed_iterations >= self.run_until and s.at_boundary:
                self.running, self.run_until = False, None
                break
            if self.speed is not None:
                pause = 1.0 / self.speed - (now - started)
                if pause > 0:
                    self.conn.poll(pause)  # returns early when a command arrives
                break
            if now >= frame_due:
                break
            if now >= poll_due:  # a poll is a system call: ~1% of a small model's iteration, made every time
                if self.conn.poll():
                    break
                poll_due = now + POLL_SECONDS


def engine_process_main(conn: Any, spec: SessionSpec) -> None:
    """Entry point of the engine process."""
    from loopscope.engine.script.main_thread import lend_main_thread
    from loopscope.engine.script.target import is_script

    server = EngineServer(conn, spec)

    def serve() -> None:
        try:
            server.serve()
        finally:
            close = getattr(server.stepper, "close", None)
            if close is not None:  # a script waiting at a stage is ended, giving the main thread back
                close()

    try:
        if is_script(spec.target, spec.script):  # the script gets the main thread, as under python
            lend_main_thread(serve)
        else:
            serve()
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        pass
    finally:
        conn.close()
