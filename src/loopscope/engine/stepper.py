"""The one way the loop runs: a real PyTorch training loop, one stage at a time.

Each call to `step_stage` runs exactly the code a careful practitioner writes for that stage and
returns an immutable StageEvent describing it. The stepper never draws random numbers of its own,
so its losses and parameters are bitwise those of the plain loop (the trajectory contract).
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from loopscope.engine import probes
from loopscope.engine.batches import batch_size, call_model, primary_output, split_batch, to_device
from loopscope.engine.explain import LoopError, explain
from loopscope.engine.features import experiment_features
from loopscope.engine.inject import BugInjector
from loopscope.engine.rewind import Rewinder, capture_rng
from loopscope.engine.twin import CleanTwin, rng_state
from loopscope.bugs import applicable
from loopscope.events import LayerStat, StageError, StageEvent, TensorStat
from loopscope.experiment import Experiment
from loopscope.history import History


class LoopHalted(RuntimeError):
    """A stage raised; call `resume()` to abandon that iteration and start the next one."""


@dataclass
class _Iteration:
    """What the stages of one iteration hand each other, like the local variables of a loop body."""

    inputs: Any = None
    targets: Any = None
    clean_inputs: Any = None  # before any data-pipeline bug (what a clean twin is fed)
    clean_targets: Any = None
    raw_output: Any = None
    output: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    grad_norms: dict[str, float | None] = field(default_factory=dict)
    rng_before_forward: Any = None


@dataclass
class _Record:
    """Mutable scratch for the event a stage is building."""

    tensors: list[TensorStat] = field(default_factory=list)
    loss: float | None = None
    grad_norm: float | None = None
    layers: list[LayerStat] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    twin_loss: float | None = None


def infer_task(experiment: Experiment) -> str | None:
    """The task implied by the loss function when the experiment does not say."""
    if experiment.task:
        return experiment.task
    loss = experiment.loss_fn
    if isinstance(loss, (nn.CrossEntropyLoss, nn.NLLLoss)):
        return "classification"
    if isinstance(loss, (nn.BCEWithLogitsLoss, nn.BCELoss)):
        return "binary"
    if isinstance(loss, (nn.MSELoss, nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss)):
        return "regression"
    return None


class Stepper:
    """Runs an Experiment stage by stage and reports each stage as a StageEvent."""

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
        self.probe = probe  # full statistics; the loss and error checks run regardless
        self.sync_cuda = sync_cuda and self.device.type == "cuda"
        self.history = history if history is not None else History()
        self.on_event = on_event
        self.task = infer_task(experiment)
        self.model = experiment.model.to(self.device)
        if isinstance(experiment.loss_fn, nn.Module):
            experiment.loss_fn.to(self.device)
        # Deduplicated like the optimizer sees them: shared weights appear once.
        self.named_params: list[tuple[str, nn.Parameter]] = list(self.model.named_parameters())
        self.iteration = 0  # iterations started
        self.completed_iterations = 0
        self.epoch = 1
        self.finished = False
        self.halted: StageError | None = None
        self.stop_reason: str | None = None
        self.best_val_loss = math.inf
        self.best_state: dict[str, torch.Tensor] | None = None
        self.validations_without_improvement = 0
        self._train_iter: Iterator[Any] | None = None
        self._batches_this_epoch = 0
        self._queue: deque[str] = deque()  # stages left in the current block
        self._current = _Iteration()
        self._last_val_loss: float | None = None
        self._epoch_ending = False  # running the epoch-end block
        self._running_loss: Any = 0.0  # what the loop accumulates for its epoch report
        self._iteration_last_stage = "step"
        self._epoch_rng: Any = None  # the generators' state when this epoch's loader iterator was made
        self.rewinder = Rewinder(keep_snapshots)
        self._block_seconds = 0.0  # training time since the last iteration boundary
        self._failing_module: str | None = None
        self.features = experiment_features(experiment, self.task)
        self.injector = BugInjector(experiment, applicable(self.features))
        self.twin_enabled = twin
        self.twin: CleanTwin | None = None
        for bug_id in bugs:
            self.set_bug(bug_id, True)
        from loopscope.engine.diagnostics import Diagnostics

        self.diagnostics = Diagnostics(self) if diagnose else None
        self._prefetched: tuple[float, Any, BaseException | None] | None = None
        self._caught: list[warnings.WarningMessage] | None = None  # see _warnings_recorded
        self._update_meter = probes.UpdateMeter()
        self.rewound_events: tuple[StageEvent, ...] = ()  # see rewind()

    # ----- what runs next -------------------------------------------------------------------
    def iteration_stages(self) -> list[str]:
        """The stages of one training iteration for this experiment, in order."""
        exp = self.experiment
        bugs = self.injector
        per_iteration_scheduler = exp.scheduler is not None and exp.scheduler_interval == "iteration"
        stages = ["load_batch", "zero_grad", "forward", "loss", "backward"]
        if exp.clip_grad_norm is not None:
            stages.append("clip_grad")
        if "step_before_backward" in bugs:
            stages = ["load_batch", "forward", "loss", "step", "zero_grad", "backward"] + stages[5:]
        else:
            stages.append("step")
        if per_iteration_scheduler:
            if "scheduler_before_step" in bugs:
                stages.insert(stages.index("step"), "scheduler")
            else:
                stages.append("scheduler")
        return stages

    @property
    def active_bugs(self) -> tuple[str, ...]:
        return self.injector.ids()

    def set_bug(self, bug_id: str, on: bool) -> bool:
        """Turn a bug on or off; it takes effect from the next stage (stage order: next iteration)."""
        if on and self.twin_enabled and self.twin is None and bug_id not in self.injector:
            self._start_twin()  # copied before the bug changes anything
        changed = self.injector.set(bug_id, on)
        if not self.injector.active:
            self.twin = None
        return changed

    def set_twin(self, on: bool) -> None:
        """Run a clean twin beside the loop while any bug is on (from the current state if one already is)."""
        self.twin_enabled = on
        if not on:
            self.twin = None
        elif self.injector.active and self.twin is None:
            self._start_twin()

    def _start_twin(self) -> None:
        exp = self.experiment
        self.twin = CleanTwin(self.model, exp.optimizer, exp.loss_fn, exp.clip_grad_norm, self.device)

    def _validation_stages(self) -> list[str]:
        stages = ["validate"]
        if self.experiment.checkpoint:
            stages.append("checkpoint")
        if self.experiment.early_stopping_patience is not None:
            stages.append("early_stop")
        return stages

    def _epoch_end_stages(self) -> list[str]:
        exp = self.experiment
        validate_now = exp.val_loader is not None and exp.validate_every is None
        stages = ["validate"] if validate_now else []
        if exp.scheduler is not None and exp.scheduler_interval == "epoch" and "scheduler_before_step" not in self.injector:
            stages.append("scheduler")
        if validate_now:
            stages.extend(self._validation_stages()[1:])
        return stages

    @property
    def at_boundary(self) -> bool:
        """True between blocks: the next stage starts an iteration (or ends the epoch)."""
        return not self._queue

    def last_iteration_next(self) -> bool:
        """At a boundary: whether the next iteration is training's last (when the loader has a
        length), so a run can probe it and the panels end on the final numbers."""
        if self._train_iter is None or self.epoch < self.experiment.epochs:
            return False
        try:
            batches = len(self.experiment.train_loader)
        except TypeError:
            return False
        return self._batches_this_epoch + 1 >= batches

    def next_stage(self) -> str | None:
        """The stage `step_stage` will run next (`load_batch` may turn out to be the epoch's end)."""
        if self.finished:
            return None
        return self._queue[0] if self._queue else "load_batch"

    # ----- running --------------------------------------------------------------------------
    @contextmanager
    def _warnings_recorded(self) -> Iterator[None]:
        """Record the warnings user code raises, for `_run` to show at the stage that raised them.
        One recorder serves every stage of a call: entering one per stage cost ~40 us an iteration."""
        if self._caught is not None:
            yield
            return
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # a warning repeated every iteration shows every time
            self._caught = caught
            try:
                yield
            finally:
                self._caught = None

    def step_stage(self) -> StageEvent | None:
        """Run one stage; None once training is over."""
        with self._warnings_recorded():
            return self._step_stage()

    def _step_stage(self) -> StageEvent | None:
        if self.halted is not None:
            raise LoopHalted(f"the loop stopped at an error ({self.halted.type}); call resume()")
        if self.finished:
            return None
        if not self._queue:
            return self._start_block()
        return self._run(self._queue.popleft())

    def run_iteration(self) -> list[StageEvent]:
        """Run to the end of the current block: the rest of this iteration, or the epoch's end."""
        events = []
        with self._warnings_recorded():
            while True:
                event = self._step_stage()
                if event is None:
                    break
                events.append(event)
                if event.error is not None or self.at_boundary:
                    break
        return events

    def run_epoch(self) -> list[StageEvent]:
        """Run to the end of the current epoch, its validation and bookkeeping stages included."""
        events: list[StageEvent] = []
        start_epoch = self.epoch
        while not self.finished and self.halted is None:
            if self.at_boundary and self.epoch != start_epoch:
                break
            if self.at_boundary and events and not self._epoch_end_stages() and self._loader_exhausted():
                # No epoch-end stages to show: close the epoch here so the next call starts the new one.
                self._prefetched = None
                self._train_iter = None
                self._advance_epoch()
                break
            event = self.step_stage()
            if event is None:
                break
            events.append(event)
        return events

    def run(self, iterations: int | None = None, should_stop: Callable[[], bool] | None = None) -> int:
        """Run `iterations` more training iterations (None: to the end); returns events produced.

        Events go to `on_event` and the history; `should_stop` is checked between stages.
        """
        target = None if iterations is None else self.completed_iterations + iterations
        produced = 0
        while not self.finished and self.halted is None:
            if target is not None and self.completed_iterations >= target and self.at_boundary:
                break
            if should_stop is not None and should_stop():
                break
            if self.step_stage() is None:
                break
            produced += 1
        return produced

    def rewind(self) -> bool:
        """Step back one iteration (to the boundary before it); False beyond the kept window.

        Afterwards `rewound_events` are the training stages of the iteration the loop is back at
        the end of, with full statistics where they can be had, for the panels to show."""
        found = self.rewinder.target(self)
        if found is None:
            return False
        snapshot, wanted = found
        stages = set(self.iteration_stages())
        recorded = tuple(e for e in self.history.recent() if e.iteration == wanted and e.stage in stages)
        self.rewinder.restore(self, snapshot)
        self._current = _Iteration()
        self.history.truncate(snapshot.completed_iterations)
        replayed: list[StageEvent] = []
        if wanted > snapshot.completed_iterations:
            replayed = [e for e in self._replay_to(wanted) if e.stage in stages]
        # Run mode records most iterations without statistics; the replay probes the last one.
        probed = any(e.layers for e in recorded)
        self.rewound_events = recorded if probed or not replayed else tuple(replayed)
        return True

    def _replay_to(self, completed: int) -> list[StageEvent]:
        """Run again, quietly, from a snapshot to the boundary wanted: same code, same numbers.
        Returns the events of the last block run, probed (probes never change the numbers)."""
        saved = self.on_event, self.diagnostics, self.probe
        self.on_event, self.diagnostics, self.probe = None, None, False
        last: list[StageEvent] = []
        try:
            while self.completed_iterations < completed and not self.finished and self.halted is None:
                if self.at_boundary:
                    self.rewinder.set_bugs_for(self, self.completed_iterations)
                self.probe = self.completed_iterations == completed - 1
                last = self.run_iteration()
            # The bugs that were on when the next iteration began the first time, as a snapshot
            # taken at this boundary would have restored them.
            self.rewinder.set_bugs_for(self, self.completed_iterations)
        finally:
            self.on_event, self.diagnostics, self.probe = saved
        return last

    def resume(self) -> None:
        """After an error: drop the broken iteration; the next stage starts a fresh one."""
        self.halted = None
        self._queue.clear()
        self._current = _Iteration()
        if self._epoch_ending:
            self._epoch_ending = False
            self._advance_epoch()

    # ----- blocks ---------------------------------------------------------------------------
    def _start_block(self) -> StageEvent | None:
        if self._prefetched is None:
            self.rewinder.take(self, self._take_block_seconds())
        while True:
            start, batch, failure = self._take_batch()
            if failure is not None:
                self.iteration += 1
                return self._finish("load_batch", _Record(), start, failure)
            if batch is not _END:
                self.iteration += 1
                self._batches_this_epoch += 1
                self._current = _Iteration()
                plan = self.iteration_stages()[1:]
                if self._batches_this_epoch == 1 and self._epoch_scheduler_first():
                    plan.insert(0, "scheduler")  # the bug: scheduler.step() at the top of the epoch
                # Fixed when the iteration starts: a bug switched mid-iteration changes the next one.
                self._iteration_last_stage = plan[-1] if plan else "load_batch"
                self._queue.extend(plan)
                return self._run("load_batch", batch=batch, start=start)
            if self._batches_this_epoch == 0:
                self.iteration += 1
                loader = self.experiment.train_loader
                self._train_iter = None
                error = LoopError("the training loader yielded no batches in this epoch")
                if self.epoch > 1 and iter(loader) is loader:
                    error = LoopError(
                        "the training loader is an iterator (a generator, say) that the first epoch used "
                        "up: pass a DataLoader, a list, or an object whose __iter__ starts afresh"
                    )
                return self._finish("load_batch", _Record(), start, error)
            # The loader is exhausted: this epoch is over.
            self._train_iter = None
            end_stages = self._epoch_end_stages()
            if end_stages:
                self._epoch_ending = True
                self._queue.extend(end_stages[1:])
                return self._run(end_stages[0])
            if not self._advance_epoch():
                return None

    def _take_block_seconds(self) -> float:
        """Seconds the stages since the last boundary took (training, not waiting for a person)."""
        seconds, self._block_seconds = self._block_seconds, 0.0
        return seconds

    def _epoch_scheduler_first(self) -> bool:
        exp = self.experiment
        return exp.scheduler is not None and exp.scheduler_interval == "epoch" and "scheduler_before_step" in self.injector

    def _take_batch(self) -> tuple[float, Any, BaseException | None]:
        """(start time, batch or _END, exception); uses a batch fetched early by `run_epoch`."""
        if self._prefetched is not None:
            seconds, batch, failure = self._prefetched
            self._prefetched = None
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
        if self._prefetched is None:
            self.rewinder.take(self, self._take_block_seconds())
            start, batch, failure = self._take_batch()
            self._prefetched = (time.perf_counter() - start, batch, failure)
        return self._prefetched[1] is _END

    def _next_batch(self) -> Any:
        if self._train_iter is None:
            # Created exactly where `for batch in loader:` would create it: the DataLoader draws
            # its base seed from the global RNG here, so the order of draws matches a plain loop.
            if self.rewinder.keep:
                self._epoch_rng = capture_rng(self.device)
            self._train_iter = iter(self.experiment.train_loader)
            self._batches_this_epoch = 0
        return next(self._train_iter, _END)

    def _advance_epoch(self) -> bool:
        if self.epoch >= self.experiment.epochs:
            self.finished = True
            self.stop_reason = f"finished {self.experiment.epochs} epochs"
            return False
        self.epoch += 1
        return True

    def _run(self, stage: str, **kwargs: Any) -> StageEvent | None:
        start = kwargs.pop("start", None) or time.perf_counter()
        record = _Record()
        bugs_now = self.active_bugs
        caught = self._caught
        caught.clear()  # what came before this stage is not its own
        try:
            getattr(self, f"_stage_{stage}")(record, **kwargs)
        except Exception as exc:  # user code failing is shown at its stage, never a crash
            return self._finish(stage, record, start, exc, bugs_now)
        if caught:
            record.metrics["warnings"] = sorted({str(w.message).splitlines()[0][:300] for w in caught})
        if stage == self._iteration_last_stage and not self._queue and not self._epoch_ending:
            self._end_iteration()
        event = self._finish(stage, record, start, None, bugs_now)
        if self._epoch_ending and not self._queue:
            self._epoch_ending = False
            if not self.finished:
                self._advance_epoch()
        return event

    def _end_iteration(self) -> None:
        self.completed_iterations += 1
        every = self.experiment.validate_every
        if every and self.experiment.val_loader is not None and self.completed_iterations % every == 0:
            self._queue.extend(self._validation_stages())

    def _finish(
        self, stage: str, record: _Record, start: float, exc: BaseException | None, bugs: tuple[str, ...] | None = None
    ) -> StageEvent:
        if self.sync_cuda:
            torch.cuda.synchronize(self.device)
        duration_ms = (time.perf_counter() - start) * 1000.0
        self._block_seconds += duration_ms / 1000.0
        error = None
        if exc is not None:
            error = explain(exc, module=self._failing_module, stage=stage)
            self._failing_module = None
            self.halted = error
            self._queue.clear()
        if self.device.type == "cuda":
            record.metrics["cuda_allocated_mb"] = torch.cuda.memory_allocated(self.device) / 2**20
            record.metrics["cuda_peak_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        event = StageEvent(
            iteration=self.iteration,
            epoch=self.epoch,
            stage=stage,
            tensors=tuple(record.tensors),
            loss=record.loss,
            grad_norm=record.grad_norm,
            layers=tuple(record.layers),
            metrics=record.metrics,  # the record is the stage's own: no copy needed
            error=error,
            duration_ms=duration_ms,
            device=str(self.device),
            bugs=self.active_bugs if bugs is None else bugs,
            twin_loss=record.twin_loss,
        )
        if self.diagnostics is not None:
            findings = self.diagnostics.observe(event)
            if findings:
                event = dataclasses.replace(event, diagnostics=tuple(findings))
        self.history.add(event)
        if self.on_event is not None:
            self.on_event(event)
        return event

    # ----- the stages: each is the code of a hand-written loop, plus probes -----------------
    def _stage_load_batch(self, record: _Record, batch: Any) -> None:
        inputs, targets = split_batch(batch)
        inputs, targets = to_device(inputs, self.device), to_device(targets, self.device)
        self._current.clean_inputs, self._current.clean_targets = inputs, targets
        self._current.inputs, self._current.targets = self.injector.prepare_batch(inputs, targets)
        if self._batches_this_epoch == 1:
            self._running_loss = 0.0  # the loop's per-epoch report starts afresh
        named = [(n, t, None) for n, t in probes.flatten_tensors("inputs", self._current.inputs)]
        named += [(n, t, None) for n, t in probes.flatten_tensors("targets", self._current.targets)]
        if self.probe:
            record.tensors = probes.tensor_stats(named)
            counts = self._class_counts(self._current.targets)
            if counts is not None:
                record.metrics["class_counts"] = counts
        else:
            record.tensors = [probes._describe(n, t, None) for n, t, _ in named]
        record.metrics["batch_size"] = batch_size(self._current.targets)

    def _class_counts(self, targets: Any) -> dict[str, int] | None:
        if not isinstance(targets, torch.Tensor) or self.task not in ("binary", "classification"):
            return None
        labels = targets.detach().reshape(-1)
        if labels.is_floating_point():
            labels = labels.round()
        values, counts = torch.unique(labels.to(torch.int64), return_counts=True)
        return {str(v): c for v, c in zip(values.tolist(), counts.tolist())}

    def _stage_zero_grad(self, record: _Record) -> None:
        params = [p for _, p in self.named_params]
        if self.probe:
            record.metrics["grads_before"] = probes.grad_presence(params)
        if "skip_zero_grad" in self.injector or "zero_grad_after_backward" in self.injector:
            record.metrics["skipped"] = True
        else:
            self.experiment.optimizer.zero_grad()
        if self.probe:
            record.metrics["grads_after"] = probes.grad_presence(params)

    def _stage_forward(self, record: _Record) -> None:
        grad_mode = torch.no_grad() if "forward_under_no_grad" in self.injector else torch.enable_grad()
        record.metrics["model_training"] = self.model.training
        if self.twin is not None:
            self._current.rng_before_forward = rng_state(self.device)
        if self.probe:
            with probes.ForwardRecorder(self.model) as recorder, grad_mode:
                try:
                    raw = call_model(self.model, self._current.inputs)
                except Exception:
                    self._failing_module = recorder.failing_module()
                    raise
                output = self.injector.transform_output(primary_output(raw))
            record.tensors = probes.tensor_stats(recorder.outputs + [("output", output.detach(), None)])
        else:
            with grad_mode:
                raw = call_model(self.model, self._current.inputs)
                output = self.injector.transform_output(primary_output(raw))
            record.tensors = [probes._describe("output", output, None)]
        record.metrics["output_requires_grad"] = output.requires_grad
        self._current.raw_output, self._current.output = raw, output

    def _stage_loss(self, record: _Record) -> None:
        output = self._current.output
        targets = self.injector.transform_targets_for_loss(self._current.targets)
        loss = self.experiment.loss_fn(output, targets)
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"the loss function returned {type(loss).__name__}, not a tensor")
        if "clip_loss_not_grad" in self.injector:
            loss = loss.clamp(max=self.experiment.clip_grad_norm)
        self._current.loss = loss
        if self.twin is not None and self._current.rng_before_forward is not None:
            record.twin_loss = self.twin.iterate(
                self._current.clean_inputs, self._current.clean_targets, self._current.rng_before_forward
            )
        # One host sync per iteration: the loss is always shown and always checked for NaN.
        if loss.numel() == 1:
            record.loss = float(loss.item())
        else:  # a loss left unreduced (a bug, or the user's choice): its mean is what is shown
            record.loss = loss.detach().float().mean().item() if loss.numel() else math.nan
        record.metrics["loss_shape"] = list(loss.shape)
        if "loss_accumulates_graph" in self.injector:
            self._running_loss = self._running_loss + loss  # the bug: keeps every graph alive
        else:
            self._running_loss = float(self._running_loss) + record.loss
        record.metrics["running_loss_holds_graph"] = isinstance(self._running_loss, torch.Tensor) and (
            self._running_loss.grad_fn is not None
        )
        named = [("output", output.detach(), None)]
        if isinstance(targets, torch.Tensor):
            named.append(("targets", targets.detach(), None))
        named.append(("loss", loss.detach(), None))
        if self.probe:
            record.tensors = probes.tensor_stats(named)
            record.metrics["loss_input"] = self._describe_loss_input(output)
        else:
            record.tensors = [probes._describe(n, t, None) for n, t, _ in named]

    @staticmethod
    def _describe_loss_input(output: torch.Tensor) -> str:
        """`probabilities` if each row sums to 1 (softmax already applied), `unit_interval`, or `logits`."""
        out = output.detach()
        if not out.is_floating_point() or out.numel() == 0:
            return "other"
        low, high = out.amin().item(), out.amax().item()
        if low < 0 or high > 1:
            return "logits"
        if out.dim() >= 2 and out.shape[1] > 1:
            row_sums = out.sum(dim=1)
            if torch.allclose(row_sums, torch.ones_like(row_sums), atol=1e-3):
                return "probabilities"
        return "unit_interval"

    def _stage_backward(self, record: _Record) -> None:
        if self._current.loss is None:
            raise RuntimeError("there is no loss to backpropagate")
        if self.probe:
            record.metrics["grads_before"] = probes.grad_presence([p for _, p in self.named_params])
        if "missing_backward" in self.injector:
            record.metrics["skipped"] = True
        else:
            self._current.loss.backward()
        if self.probe:
            layers, total, nonfinite = probes.grad_layers(self.named_params)
            record.layers = layers
            record.grad_norm = total
            record.metrics["nonfinite_grads"] = nonfinite
            record.metrics["grads_none"] = sum(1 for layer in layers if layer.grad_norm is None)
            self._current.grad_norms = {layer.name: layer.grad_norm for layer in layers}

    def _stage_clip_grad(self, record: _Record) -> None:
        max_norm = self.experiment.clip_grad_norm
        if "clip_loss_not_grad" in self.injector:
            record.metrics.update(skipped=True, max_norm=max_norm)
            return
        total = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        norm_before = float(total)
        record.metrics.update(max_norm=max_norm, norm_before=norm_before, clipped=norm_before > max_norm)
        if self.probe:
            layers, after, _ = probes.grad_layers(self.named_params)
            record.layers = layers
            record.grad_norm = after
            self._current.grad_norms = {layer.name: layer.grad_norm for layer in layers}

    def _stage_step(self, record: _Record) -> None:
        optimizer = self.experiment.optimizer
        trainable = [(n, p) for n, p in self.named_params if p.requires_grad]
        if self.probe:
            self._update_meter.before_step([p for _, p in trainable])
        if "zero_grad_after_backward" in self.injector:
            optimizer.zero_grad()  # the bug: the fresh gradients are thrown away here
        if self.probe:
            record.metrics["grads_at_step"] = probes.grad_presence([p for _, p in trainable])
        if "missing_step" in self.injector:
            record.metrics["skipped"] = True
        else:
            optimizer.step()
        record.metrics["lr"] = optimizer.param_groups[0].get("lr")
        if len(optimizer.param_groups) > 1:
            record.metrics["lrs"] = [group.get("lr") for group in optimizer.param_groups]
        if self.probe:
            record.layers = self._update_meter.layers(trainable, self._current.grad_norms)
            ratios = [layer.update_ratio for layer in record.layers if layer.update_ratio is not None]
            if ratios:
                record.metrics["max_update_ratio"] = max(ratios)

    def _stage_scheduler(self, record: _Record) -> None:
        scheduler = self.experiment.scheduler
        optimizer = self.experiment.optimizer
        record.metrics["lr_before"] = optimizer.param_groups[0].get("lr")
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            if self._last_val_loss is None:
                raise RuntimeError("ReduceLROnPlateau needs a validation loss: give the experiment a val_loader")
            scheduler.step(self._last_val_loss)
        else:
            scheduler.step()
        record.metrics["lr"] = optimizer.param_groups[0].get("lr")

    def _stage_validate(self, record: _Record) -> None:
        bugs = self.injector
        loader = self.experiment.train_loader if "val_is_train" in bugs else self.experiment.val_loader
        record.metrics["val_loader_is_train_loader"] = loader is self.experiment.train_loader or (
            getattr(loader, "dataset", None) is not None
            and getattr(loader, "dataset", None) is getattr(self.experiment.train_loader, "dataset", object())
        )
        loss_fn = self.experiment.loss_fn
        started = time.perf_counter()
        total_loss: torch.Tensor | None = None
        correct: torch.Tensor | None = None
        examples = 0
        if "validate_in_train_mode" not in bugs:
            self.model.eval()
        record.metrics["model_training"] = any(m.training for m in self.model.modules())
        grad_mode = torch.enable_grad() if "validate_with_grad" in bugs else torch.no_grad()
        builds_graph = False
        try:
            with grad_mode:
                for batch in loader:
                    inputs, targets = split_batch(batch)
                    inputs, targets = to_device(inputs, self.device), to_device(targets, self.device)
                    inputs, targets = bugs.prepare_batch(inputs, targets)
                    output = bugs.transform_output(primary_output(call_model(self.model, inputs)))
                    builds_graph = builds_graph or output.requires_grad
                    targets = bugs.transform_targets_for_loss(targets)
                    n = batch_size(targets)
                    # Weighted by example count so a short last batch does not skew the mean.
                    batch_loss = loss_fn(output, targets).detach().float() * n
                    total_loss = batch_loss if total_loss is None else total_loss + batch_loss
                    hits = self._correct(output, targets)
                    if hits is not None:
                        correct = hits if correct is None else correct + hits
                    examples += n
        finally:
            if "train_in_eval_mode" not in bugs:
                self.model.train()
        record.metrics["builds_graph"] = builds_graph
        if examples == 0:
            raise LoopError("the validation loader yielded no batches")
        val_loss = total_loss.item() / examples
        self._last_val_loss = val_loss
        record.metrics["val_loss"] = val_loss
        record.metrics["val_examples"] = examples
        if correct is not None:
            record.metrics["val_accuracy"] = correct.item() / examples
        record.metrics["val_seconds"] = time.perf_counter() - started

    def _correct(self, output: torch.Tensor, targets: Any) -> torch.Tensor | None:
        """Number of right answers in a batch, or None where accuracy means nothing."""
        if not isinstance(targets, torch.Tensor):
            return None
        if self.task == "binary":
            threshold = 0.5 if isinstance(self.experiment.loss_fn, nn.BCELoss) else 0.0
            if output.numel() != targets.numel():
                return None
            predicted = (output.reshape(-1) > threshold).to(torch.int64)
            return (predicted == targets.reshape(-1).round().to(torch.int64)).sum()
        if self.task == "classification" and output.dim() >= 2:
            predicted = output.argmax(dim=1)
            truth = targets.argmax(dim=1) if targets.shape == output.shape else targets
            if predicted.shape != truth.shape:
                return None
            return (predicted == truth).sum()
        return None

    def _stage_checkpoint(self, record: _Record) -> None:
        val_loss = self._last_val_loss
        improved = val_loss is not None and val_loss < self.best_val_loss
        if improved:
            self.best_val_loss = val_loss
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            path = self.experiment.checkpoint
            if isinstance(path, str):
                torch.save(self.best_state, path)
                record.metrics["path"] = path
        record.metrics.update(saved=improved, best_val_loss=self.best_val_loss)

    def _stage_early_stop(self, record: _Record) -> None:
        patience = self.experiment.early_stopping_patience
        if self._last_val_loss is not None and self._last_val_loss <= self.best_val_loss and self._improved_now():
            self.validations_without_improvement = 0
        else:
            self.validations_without_improvement += 1
        stop = self.validations_without_improvement >= patience
        record.metrics.update(
            without_improvement=self.validations_without_improvement, patience=patience, stop=stop
        )
        if stop:
            self.finished = True
            self.stop_reason = f"early stop: no better validation loss in {patience} validations"
            self._queue.clear()

    def _improved_now(self) -> bool:
        # Without a checkpoint stage the best loss is tracked here instead.
        if self.experiment.checkpoint:
            return self._last_val_loss == self.best_val_loss
        if self._last_val_loss is not None and self._last_val_loss < self.best_val_loss:
            self.best_val_loss = self._last_val_loss
            return True
        return False


_END = object()
