"""The factory driver: runs the loop of an `experiment()` one stage at a time.

It decides which stage runs next (from `engine.plan`), runs that stage's code (`engine.stages`),
and hands what the stage did to the `EventRecorder`; it also steps back (rewind and replay) and
resumes after an error. Every counter lives in a `LoopState`. The stepper never draws random numbers
of its own, so its losses and parameters are bitwise those of the plain loop (the trajectory contract).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from loopscope.engine import plan
from loopscope.engine.checks import rows_mixed
from loopscope.engine.copies import copy_model_and_optimizer
from loopscope.engine.diagnostics import DiagnosticContext, Diagnostics
from loopscope.engine.diagnostics.context import ForwardFlow
from loopscope.engine.driver import DriverBase
from loopscope.engine.experiment import Experiment
from loopscope.engine.explain import LoopError, explain
from loopscope.engine.fast_path import FastPath
from loopscope.engine.features import experiment_features, experiment_info, infer_task
from loopscope.engine.inject import BugInjector
from loopscope.engine.losses import loss_kind
from loopscope.engine.pictures import PictureMaker
from loopscope.engine.recorder import (
    HELD_AT_MOST,
    EventRecorder,
    StageRecord,
    plain_loss_record,
    quiet_stage,
    warning_lines,
)
from loopscope.engine.rewind import WAIT_SECONDS, Rewinder, capture_rng, restore_rng
from loopscope.engine.stages import LoopBody
from loopscope.engine.state import LoopState
from loopscope.engine.twin import CleanTwin
from loopscope.shared.bugs import applicable
from loopscope.shared.errors import UserError
from loopscope.shared.events import StageEvent
from loopscope.shared.history import History
from loopscope.shared.loopcode import stage_lines
from loopscope.shared.protocol import SessionInfo
from loopscope.shared.vocab import Stage


class LoopHalted(RuntimeError):
    """A stage raised; call `resume()` to abandon that iteration and start the next one."""


_END = object()
# Module constants: an Enum member looked up on its class costs ~60 ns, more between torch calls.
_STEP, _LOSS = Stage.STEP, Stage.LOSS


class Stepper(DriverBase):
    """Runs an Experiment stage by stage and reports each stage as a StageEvent (a `Driver`)."""

    def __init__(
        self,
        experiment: Experiment,
        device: str | torch.device = "cpu",
        *,
        probe: bool = True,
        sync_cuda: bool = True,
        history: History | None = None,
        on_event: Callable[[StageEvent], None] | None = None,
        bugs: Iterable[str] = (),
        diagnose: bool = True,
        twin: bool = False,
        keep_snapshots: int = 0,
    ) -> None:
        self.experiment = experiment
        self.device = torch.device(device)
        self.task = infer_task(experiment)
        self.model = experiment.model.to(self.device)
        if isinstance(experiment.loss_fn, nn.Module):
            experiment.loss_fn.to(self.device)
        self.history = history if history is not None else History()
        self.state = LoopState()
        self.features = experiment_features(experiment, self.task)
        self.injector = BugInjector(experiment, applicable(self.features))
        self.body = LoopBody(experiment, self.device, self.task, self.injector, self.state)
        self.body.probe = probe
        self.fast_path = FastPath(self.body)
        self.rewinder = Rewinder(keep_snapshots)
        self.twin_enabled = twin
        for bug_id in bugs:
            self.set_bug(bug_id, True)
        self._stage_lines: dict[Stage, dict[str, object]] | None = None  # code_line per stage (clean loop)
        self.recorder = EventRecorder(
            self.device, self.history, self._diagnostics() if diagnose else None, on_event, sync_cuda
        )
        self.rewound_events: tuple[StageEvent, ...] = ()  # see rewind()
        self.rewind_warning: str | None = None  # the last step back's replay gave other numbers
        self._caught = None
        self._block_seconds = 0.0  # training time since the last iteration boundary
        # Boundaries the fast path passed without the rewinder (see _pass_quietly): how many, the
        # last, the training time up to it, and when the last fast iteration ended.
        self._lane, self._lane_last, self._lane_seconds = 0, 0, 0.0
        self._quiet_end = -math.inf
        self._queues: dict[tuple[str, ...], list[Stage]] = {}  # see _iteration_queue

    def _diagnostics(self) -> Diagnostics:
        linears = [m for m in self.model.modules() if isinstance(m, nn.Linear)]
        exp = self.experiment
        return Diagnostics(
            DiagnosticContext(
                loss_kind=loss_kind(exp.loss_fn),
                task=self.task,
                features=self.features,
                scheduler_interval=exp.scheduler_interval,
                classes=linears[-1].out_features if linears else None,
                has_trainable_params=lambda: any(p.requires_grad for _, p in self.body.named_params),
                forward_flow=lambda: self.body.values.flow or ForwardFlow(),
                replay_differs=self.rewinder.replay_differs,
                batch_mixing=lambda: rows_mixed(
                    self.model,
                    *self.current_batch,
                    self.injector.prepare_batch,
                    self.device,
                    own_loss=exp.loss_fn is None,
                    key=self.body.values.target_key,
                ),
            )
        )

    # ----- the driver's settings, kept where they act ------------------------------------------
    @property
    def probe(self) -> bool:
        return self.body.probe

    @probe.setter
    def probe(self, on: bool) -> None:
        self.body.probe = on

    @property
    def quiet(self) -> bool:
        """Running: an unprobed iteration's training stages make no events (see QUIET_STAGES)."""
        return self.body.quiet_when_unprobed

    @quiet.setter
    def quiet(self, on: bool) -> None:
        self.body.quiet_when_unprobed = on

    @property
    def named_params(self) -> list[tuple[str, nn.Parameter]]:
        return self.body.named_params

    @property
    def current_batch(self) -> tuple[Any, Any]:
        """The current iteration's (inputs, targets), before any data-pipeline bug."""
        return self.body.values.clean_inputs, self.body.values.clean_targets

    @property
    def best_state(self) -> dict[str, torch.Tensor] | None:
        return self.body.best_state

    @property
    def rewind_window(self) -> int:
        return self.rewinder.keep

    # ----- what runs next -------------------------------------------------------------------
    def iteration_stages(self) -> list[Stage]:
        """The stages of one training iteration for this experiment, in order."""
        return plan.iteration_stages(self.experiment, self.injector)

    def epoch_end_stages(self) -> list[Stage]:
        return plan.epoch_end_stages(self.experiment, self.injector)

    def next_stage(self) -> Stage | None:
        """The stage `step_stage` will run next (`load_batch` may turn out to be the epoch's end)."""
        if self.state.finished:
            return None
        return self.state.queue[0] if self.state.queue else Stage.LOAD_BATCH

    def last_iteration_next(self) -> bool:
        """At a boundary: whether the next iteration is training's last (when the loader has a
        length), so a run can probe it and the panels end on the final numbers."""
        if not self.state.loader_open or self.state.epoch < self.experiment.epochs:
            return False
        try:
            batches = len(self.experiment.train_loader)  # type: ignore[arg-type]
        except TypeError:
            return False
        return self.state.batches_this_epoch + self.experiment.accumulation >= batches

    # ----- bugs and the twin ---------------------------------------------------------------------
    @property
    def active_bugs(self) -> tuple[str, ...]:
        return self.injector.ids()

    def set_bug(self, bug_id: str, on: bool) -> bool:
        """Turn a bug on or off; it takes effect from the next stage (stage order: next iteration)."""
        twin_failure = None
        if on and self.twin_enabled and self.body.twin is None and bug_id not in self.injector:
            try:
                self._start_twin()  # copied before the bug changes anything
            except UserError as exc:  # the bug still goes on; the twin cannot run beside it
                twin_failure = exc
        changed = self.injector.set(bug_id, on)
        if not self.injector.active:
            self.body.twin = None
        if twin_failure is not None:
            raise UserError(f"the clean twin cannot run: {twin_failure}") from twin_failure
        return changed

    def switch_bugs(self, bugs: Iterable[str]) -> None:
        """Exactly `bugs` on, as they were at a boundary being restored or replayed (no twin)."""
        wanted = set(bugs)
        for bug_id in set(self.active_bugs) - wanted:
            self.injector.set(bug_id, False)
        for bug_id in wanted - set(self.active_bugs):
            self.injector.set(bug_id, True)

    @property
    def twin(self) -> CleanTwin | None:
        return self.body.twin

    def set_twin(self, on: bool) -> None:
        """Run a clean twin beside the loop while any bug is on (from the current state if one already is)."""
        self.twin_enabled = on
        if not on:
            self.body.twin = None
        elif self.injector.active and self.body.twin is None:
            self._start_twin()

    def _start_twin(self) -> None:
        exp = self.experiment
        self.body.twin = CleanTwin(
            self.model,
            exp.optimizer,
            exp.loss_fn,
            exp.clip_grad_norm,
            self.device,
            amp=exp.amp,
            accumulation=exp.accumulation,
        )

    def trial_copy(self, batches: list[Any], steps: int) -> Stepper:
        """A quiet stepper over copies of the model and optimizer (the bugs' effects included), fed
        `batches` in turn for `steps` iterations: where the sanity checks try things."""
        exp = self.experiment
        model, optimizer = copy_model_and_optimizer(self.model, exp.optimizer)
        loader = [batches[i % len(batches)] for i in range(steps)]
        trial = Experiment(
            model=model,
            loss_fn=exp.loss_fn,
            optimizer=optimizer,
            train_loader=loader,
            epochs=1,
            task=self.task,
            clip_grad_norm=exp.clip_grad_norm,
            amp=exp.amp,
        )  # no accumulation: a check's steps are optimizer steps, each on one of `batches`
        copied = Stepper(trial, self.device, probe=False, diagnose=False)
        # The copies already carry the bugs' switch effects (scaled lr, swapped modules): only the
        # in-loop effects need turning on, without switching again.
        copied.injector.adopt(self.injector.active)
        return copied

    def picture_maker(self) -> PictureMaker | None:
        return PictureMaker(
            self.model,
            self.device,
            self.task,
            self.injector.prepare_batch,
            current_batch=lambda: self.current_batch,
            iteration=lambda: self.state.iteration,
        )

    # ----- running --------------------------------------------------------------------------
    def _step_stage(self) -> StageEvent | None:
        if self.state.halted is not None:
            raise LoopHalted(f"the loop stopped at an error ({self.state.halted.type}); call resume()")
        if self.state.finished:
            return None
        if not self.state.queue:
            return self._start_block()
        stage = self.state.queue.popleft()
        if stage == Stage.LOAD_BATCH:
            return self._load_micro_batch()
        return self._run(stage)

    def run_iteration(self) -> list[StageEvent]:
        body = self.body
        if body.quiet_when_unprobed and not body.probe and self.experiment.accumulation == 1:  # body.quiet
            if self._caught is not None:  # running, the engine holds one recorder across a frame
                events = self._quiet_iteration()
            else:
                with self.recording_warnings():
                    events = self._quiet_iteration()
            if events is not None:
                return events
        return super().run_iteration()

    def _quiet_iteration(self) -> list[StageEvent] | None:
        """A whole unprobed iteration while running, at close to a hand-written loop's cost: the
        same stage bodies, without the per-stage scheduling, events and diagnostics (only the loss,
        errors, warnings and skipped fp16 steps make events). None, having run nothing, where the
        next block is not a plain iteration (the epoch ends, an error waits, the first batch of an
        epoch under a reordering bug): the stage-by-stage path runs it."""
        state = self.state
        if state.queue or state.halted is not None or state.finished or state.prefetched is not None:
            return None
        if state.loader_exhausted:
            return None
        if state.batches_this_epoch == 0 and plan.epoch_scheduler_first(self.experiment, self.injector):
            return None
        # Where the fast path applies (run_iteration saw `quiet`): nothing on that changes the loop.
        # Inline, as the rest here: a method call costs ~0.7 us between a small model's torch calls
        # (0.07 us alone: the interpreter's caches are cold again), 0.15% of a 0.45 ms step (issue 17).
        fast, body = self.fast_path, self.body
        fast_now = fast.possible and not body.injector.active and body.twin is None
        start = time.perf_counter()
        done = state.completed_iterations
        if fast_now and done < self.rewinder.quiet_until and start - self._quiet_end < WAIT_SECONDS:
            # A boundary the rewinder would only count: told later, in one call (_pass_quietly).
            self._lane += 1
            self._lane_last = done
            self._lane_seconds += self._block_seconds
            self._block_seconds = 0.0
        else:
            self._take()
            start = time.perf_counter()
        while True:
            try:
                train_iter = state.train_iter
                if train_iter is not None and not state.loader_exhausted:
                    batch = next(train_iter, _END)
                else:
                    batch = self._next_batch()  # opening the epoch's iterator where `for batch in loader:` would
            except Exception as exc:
                state.prefetched = (time.perf_counter() - start, None, exc)
                return None
            if batch is not _END:
                break
            if state.batches_this_epoch == 0 or self.epoch_end_stages():
                # An empty loader's error, or the epoch's own stages: the stage-by-stage path shows them.
                state.prefetched = (time.perf_counter() - start, _END, None)
                return None
            state.train_iter = None  # the epoch is over, with nothing to run at its end
            if not self._advance_epoch():
                return []
            if plan.epoch_scheduler_first(self.experiment, self.injector):
                return None  # the new epoch starts with the scheduler: the stage-by-stage path runs it
        if fast_now:
            state.iteration += 1
            state.batches_this_epoch += 1
            state.micro_batch = 1
            state.iteration_last_stage = _STEP
            caught = self._caught
            assert caught is not None
            caught.clear()  # what came before this iteration is not its own
            try:
                fast.run(batch, caught)
            except Exception as exc:
                return self._fast_events(start, exc)
            state.completed_iterations += 1  # _end_iteration
            if self.experiment.validate_every:
                self._queue_validation_if_due()
            note = fast.loss_note
            if fast.warned or note is None:
                return self._fast_events(start, None)
            self._quiet_end = end = time.perf_counter()
            seconds = end - start
            self._block_seconds += seconds
            held = self.recorder.held  # as EventRecorder.hold does
            held.append((_LOSS, note, state.iteration, state.epoch, (), seconds * 1000.0))
            if len(held) >= HELD_AT_MOST:
                self.recorder.catch_up()
            return []
        stages = (Stage.LOAD_BATCH, *self._begin_iteration())
        bugs = self.active_bugs
        caught = self._caught
        assert caught is not None
        caught.clear()
        events: list[StageEvent] = []
        body = self.body
        for stage in stages:
            record = StageRecord()
            try:
                body.run(stage, record, batch)
            except Exception as exc:  # shown at its stage, as the stage-by-stage path shows it
                events.append(self._finish(stage, record, start, exc, bugs))
                return events
            if stage is stages[-1]:
                self._end_iteration()
            if caught:
                record.metrics["warnings"] = warning_lines(caught)
                caught.clear()
            if quiet_stage(stage, record):
                self._done_quietly(stage, record, start, bugs)
            else:
                events.append(self._finish(stage, record, start, None, bugs))
            start = time.perf_counter()
        return events

    def _fast_events(self, start: float, failure: Exception | None) -> list[StageEvent]:
        """A fast iteration where a stage warned or raised: that stage makes its event (the
        loss its held one), as the stage-by-stage path would."""
        fast = self.fast_path
        events: list[StageEvent] = []
        for stage in (Stage.LOAD_BATCH, *fast.stages):
            if failure is not None and stage == fast.stage:
                events.append(self._finish(stage, StageRecord(), start, failure, ()))
                break
            if stage in fast.warned:
                events.append(self._finish(stage, fast.warned_record(stage), start, None, ()))
                start = time.perf_counter()
            elif stage == Stage.LOSS and fast.loss_note is not None:
                self._done_quietly(stage, plain_loss_record(fast.loss_note), start, ())
                start = time.perf_counter()
        return events

    def _done_quietly(self, stage: Stage, record: StageRecord, start: float, bugs: tuple[str, ...]) -> None:
        """A quiet stage makes no event; a loss is held, for the plot and the trend checks."""
        seconds = time.perf_counter() - start
        self._block_seconds += seconds
        if record.loss is not None:
            state = self.state
            self.recorder.hold(stage, record, state.iteration, state.epoch, bugs, seconds * 1000.0)

    def run_epoch(self) -> list[StageEvent]:
        """Run to the end of the current epoch, its validation and bookkeeping stages included."""
        events: list[StageEvent] = []
        start_epoch = self.state.epoch
        ran = False
        while not self.state.finished and self.state.halted is None:
            if self.at_boundary and self.state.epoch != start_epoch:
                break
            if self.at_boundary and ran and not self.epoch_end_stages() and self._loader_exhausted():
                # No epoch-end stages to show: close the epoch here so the next call starts the new one.
                self.state.prefetched = None
                self.state.train_iter = None
                self._advance_epoch()
                break
            event = self.step_stage()
            ran = True
            if event is not None:
                events.append(event)
        return events

    def resume(self) -> None:
        """After an error: drop the broken iteration; the next stage starts a fresh one."""
        self.state.halted = None
        self.state.queue.clear()
        self.body.new_iteration()
        if self.state.epoch_ending:
            self.state.epoch_ending = False
            self._advance_epoch()

    # ----- stepping back --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to carry on from here, in torch's style (references, not copies)."""
        exp = self.experiment
        return {
            "bugs": frozenset(self.active_bugs),
            "model": self.model.state_dict(),
            "optimizer": exp.optimizer.state_dict(),
            "scheduler": exp.scheduler.state_dict() if exp.scheduler is not None else None,
            "scaler": self.body.scaler.state_dict() if self.body.scaler is not None else None,
            "loop": self.state.state_dict(),
            "rng": capture_rng(self.device),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pass_quietly()  # the boundaries passed so far are the rewinder's before they are left
        exp = self.experiment
        self.switch_bugs(state["bugs"])  # first: switching a bug changes the model and optimizer
        self.model.load_state_dict(state["model"])
        exp.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        if state["scheduler"] is not None:
            exp.scheduler.load_state_dict(copy.deepcopy(state["scheduler"]))
        if self.body.scaler is not None:
            self.body.scaler.load_state_dict(state["scaler"])
        self.state.load_state_dict(state["loop"])
        if self.state.epoch_rng is not None:
            # Re-made from the generators' state at its making, the iterator gives the same batches.
            restore_rng(self.state.epoch_rng)
            self.state.train_iter = iter(exp.train_loader)
            for _ in range(self.state.batches_this_epoch):
                next(self.state.train_iter)
        restore_rng(state["rng"])
        self.body.new_iteration()

    def rewind(self) -> bool:
        """Step back one iteration (to the boundary before it); False beyond the kept window.

        Afterwards `rewound_events` are the training stages of the iteration the loop is back at
        the end of, with full statistics where they can be had, for the panels to show."""
        self.recorder.catch_up()  # the history must hold every loss before it is rewritten
        self._pass_quietly()  # and the rewinder every boundary
        events = self.rewinder.step_back(self)
        if events is None:
            return False
        self.rewound_events = events
        self.rewind_warning = self.rewinder.mismatch
        return True

    @contextmanager
    def quietly(self) -> Iterator[None]:
        """Stages run without telling anyone (no events out, no diagnostics): a replay."""
        recorder = self.recorder
        recorder.catch_up()
        saved = recorder.on_event, recorder.diagnostics, self.probe, self.quiet
        recorder.on_event, recorder.diagnostics, self.quiet = None, None, False  # a replay's events are its result
        try:
            yield
        finally:
            recorder.on_event, recorder.diagnostics, self.probe, self.quiet = saved

    # ----- blocks ---------------------------------------------------------------------------
    def _start_block(self) -> StageEvent | None:
        state = self.state
        if state.prefetched is None:
            self._take()
        while True:
            start, batch, failure = self._take_batch()
            if failure is not None:
                state.iteration += 1
                return self._finish(Stage.LOAD_BATCH, StageRecord(), start, failure)
            if batch is not _END:
                state.queue.extend(self._begin_iteration())
                return self._run(Stage.LOAD_BATCH, batch=batch, start=start)
            if state.batches_this_epoch == 0:
                state.iteration += 1
                loader = self.experiment.train_loader
                state.train_iter = None
                error = LoopError("the training loader yielded no batches in this epoch")
                if state.epoch > 1 and iter(loader) is loader:
                    error = LoopError(
                        "the training loader is an iterator (a generator, say) that the first epoch used "
                        "up: pass a DataLoader, a list, or an object whose __iter__ starts afresh"
                    )
                return self._finish(Stage.LOAD_BATCH, StageRecord(), start, error)
            # The loader is exhausted: this epoch is over.
            state.train_iter = None
            end_stages = self.epoch_end_stages()
            if end_stages:
                state.epoch_ending = True
                state.queue.extend(end_stages[1:])
                return self._run(end_stages[0])
            if not self._advance_epoch():
                return None

    def _begin_iteration(self) -> list[Stage]:
        """A batch was taken: count the new iteration; returns its stages after load_batch."""
        state = self.state
        state.iteration += 1
        state.batches_this_epoch += 1
        self.body.new_iteration()
        state.micro_batch = 1
        stages = self._iteration_queue()
        if state.batches_this_epoch == 1 and plan.epoch_scheduler_first(self.experiment, self.injector):
            stages.insert(0, Stage.SCHEDULER)  # the bug: scheduler.step() at the top of the epoch
        # Fixed when the iteration starts: a bug switched mid-iteration changes the next one.
        state.iteration_last_stage = stages[-1] if stages else Stage.LOAD_BATCH
        return stages

    def _iteration_queue(self) -> list[Stage]:
        """The stages after load_batch of an iteration starting now (the plan, kept per set of bugs)."""
        bugs = self.injector.ids()
        stages = self._queues.get(bugs)
        if stages is None:
            stages = self._queues[bugs] = plan.iteration_queue(self.experiment, self.injector)[1:]
        return list(stages)

    def _load_micro_batch(self) -> StageEvent | None:
        """The next micro-batch of an accumulating iteration. If the loader runs out first, the
        gradients of the micro-batches there were are used, as `if (i + 1) % K == 0 or
        i + 1 == len(train_loader): optimizer.step()` does."""
        state = self.state
        start, batch, failure = self._take_batch()
        if failure is not None:
            return self._finish(Stage.LOAD_BATCH, StageRecord(), start, failure)
        if batch is _END:
            state.loader_exhausted = True
            while state.queue and state.queue[0] in plan.MICRO_BATCH_STAGES:
                state.queue.popleft()
            if not state.queue:  # the micro-batches were the iteration's last stages (a reordering bug)
                self._end_iteration()
            return self._step_stage()
        state.batches_this_epoch += 1
        state.micro_batch += 1
        return self._run(Stage.LOAD_BATCH, batch=batch, start=start)

    def _take(self) -> None:
        """The rewinder's turn at a boundary, after the seconds the stages since the last one took
        (training, not waiting for a person); told first of the boundaries passed quietly."""
        gap = self._pass_quietly()
        seconds, self._block_seconds = self._block_seconds, 0.0
        self.rewinder.take(self, seconds, gap)

    def _pass_quietly(self) -> float | None:
        """Hand the rewinder the boundaries the fast path passed without it (Rewinder.quiet_until).
        Returns the time since the last fast iteration ended; None where none were passed."""
        if not self._lane:
            return None
        self.rewinder.passed_quietly(self._lane, self._lane_last, self._lane_seconds)
        self._lane, self._lane_seconds = 0, 0.0
        return time.perf_counter() - self._quiet_end

    def _take_batch(self) -> tuple[float, Any, BaseException | None]:
        """(start time, batch or _END, exception); uses a batch fetched early by `run_epoch`."""
        if self.state.prefetched is not None:
            seconds, batch, failure = self.state.prefetched
            self.state.prefetched = None
            return time.perf_counter() - seconds, batch, failure
        start = time.perf_counter()
        try:
            return start, self._next_batch(), None
        except Exception as exc:
            return start, None, exc

    def _loader_exhausted(self) -> bool:
        """At a boundary: whether the epoch's loader has no batch left (fetching it early if not).

        The early fetch happens exactly where the plain loop's `next()` would, so it changes
        nothing in the order of random draws.
        """
        if self.state.prefetched is None:
            self._take()
            start, batch, failure = self._take_batch()
            self.state.prefetched = (time.perf_counter() - start, batch, failure)
        return self.state.prefetched[1] is _END

    def _next_batch(self) -> Any:
        state = self.state
        if state.train_iter is None:
            # Created exactly where `for batch in loader:` would create it: the DataLoader draws
            # its base seed from the global RNG here, so the order of draws matches a plain loop.
            if self.rewinder.keep:
                state.epoch_rng = capture_rng(self.device)
            state.train_iter = iter(self.experiment.train_loader)
            state.batches_this_epoch = 0
            state.loader_exhausted = False
        if state.loader_exhausted:
            return _END
        return next(state.train_iter, _END)

    def _advance_epoch(self) -> bool:
        if self.state.epoch >= self.experiment.epochs:
            self.state.finish(f"finished {self.experiment.epochs} epochs")
            return False
        self.state.epoch += 1
        return True

    def info(self) -> SessionInfo:
        return experiment_info(
            self.experiment,
            self.device,
            self.task,
            self.iteration_stages(),
            self.epoch_end_stages(),
            self.injector.applicable,
        )

    def _run(self, stage: Stage, batch: Any = None, start: float | None = None) -> StageEvent | None:
        start = start or time.perf_counter()
        state = self.state
        record = StageRecord()
        bugs_now = self.active_bugs
        caught = self._caught
        assert caught is not None
        caught.clear()  # what came before this stage is not its own
        try:
            self.body.run(stage, record, batch)
        except Exception as exc:  # user code failing is shown at its stage, never a crash
            return self._finish(stage, record, start, exc, bugs_now)
        if caught:
            record.metrics["warnings"] = warning_lines(caught)
        if stage == state.iteration_last_stage and not state.queue and not state.epoch_ending:
            self._end_iteration()
        if self.body.quiet and quiet_stage(stage, record):
            self._done_quietly(stage, record, start, bugs_now)
            return None
        event = self._finish(stage, record, start, None, bugs_now)
        if state.epoch_ending and not state.queue:
            state.epoch_ending = False
            if not state.finished:
                self._advance_epoch()
        return event

    def _end_iteration(self) -> None:
        self.state.completed_iterations += 1
        if self.experiment.validate_every:
            self._queue_validation_if_due()

    def _queue_validation_if_due(self) -> None:
        every = self.experiment.validate_every
        if every and self.experiment.val_loader is not None and self.state.completed_iterations % every == 0:
            self.state.queue.extend(plan.validation_stages(self.experiment))

    def _finish(
        self,
        stage: Stage,
        record: StageRecord,
        start: float,
        exc: BaseException | None,
        bugs: tuple[str, ...] | None = None,
    ) -> StageEvent:
        duration_ms = self.recorder.elapsed_ms(start)
        self._block_seconds += duration_ms / 1000.0
        error = None
        if exc is not None:
            error = explain(exc, module=self.body.failing_module, stage=stage)
            self.body.failing_module = None
            self.state.halt(error)
        if self._stage_lines is None:
            info = self.info()
            self._stage_lines = stage_lines(info.options, (*info.iteration_stages, *info.epoch_end_stages))
        line = self._stage_lines.get(stage)
        return self.recorder.emit(
            stage,
            record,
            iteration=self.state.iteration,
            epoch=self.state.epoch,
            bugs=self.active_bugs if bugs is None else bugs,
            duration_ms=duration_ms,
            error=error,
            code_line=dict(line) if line is not None else None,
        )
