"""The script driver: runs the user's training script as `__main__`, unmodified (on the main
thread where `main_thread` lends it), and turns what torch's hooks report (`script.hooks`) into
the same StageEvents the factory driver makes.

The two threads take turns: `step_stage()` lets the script run to its next training stage and
waits; the stage's hook records the event, hands it over and waits for the next turn. Only one of
them runs at any time, so the driver's state needs no locks, and the script computes exactly what
`python script.py` computes (probes read tensors; they draw no random numbers). Running (not
stepping), the script hands over once an iteration, not once a stage: a turn costs a thread switch.

An iteration is one step of the first optimizer seen; the calls that follow a step before any new
training work (nanoGPT's `zero_grad` after `step`, a scheduler) belong to the iteration that
stepped. An epoch is each new iterator over the first DataLoader the script iterates.
"""

from __future__ import annotations

import functools
import linecache
import math
import os
import queue
import runpy
import sys
import threading
import time
import types
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loopscope.engine import probes
from loopscope.engine.batches import batch_size, own_loss, primary_output, split_batch
from loopscope.engine.diagnostics import DiagnosticContext, Diagnostics
from loopscope.engine.driver import DriverBase
from loopscope.engine.explain import explain
from loopscope.engine.losses import loss_kind
from loopscope.engine.pictures import PictureMaker
from loopscope.engine.recorder import EventRecorder, StageRecord, quiet_stage
from loopscope.engine.script.check_subject import CHECKABLE_BUGS, OWN_LOSS, CheckMaterial
from loopscope.engine.script.hooks import Interception
from loopscope.engine.script.main_thread import start_script
from loopscope.engine.stages import describe_loss_input
from loopscope.engine.state import LoopState
from loopscope.shared.bugs import BUGS
from loopscope.shared.errors import UserError
from loopscope.shared.events import StageEvent
from loopscope.shared.history import History
from loopscope.shared.protocol import SessionInfo
from loopscope.shared.vocab import Stage

# The bugs a hook can apply to a script as written (DESIGN.md §8): the catalog marks them.
SCRIPT_BUGS = tuple(bug.id for bug in BUGS if bug.script)
_LR_FACTORS = {"lr_too_high": 100.0, "lr_too_low": 1e-3}
_OWN_SOURCE = str(Path(__file__).resolve().parents[2])  # loopscope's own files are never the script's
NEEDS_A_FACTORY = "needs an experiment() factory: a script cannot be re-run from a saved state"


class _Abort(BaseException):
    """Raised in the script's thread to end it early (a BaseException: `except Exception` in the
    script does not catch it)."""


class ScriptDriver(DriverBase):
    """Runs a training script stage by stage (a `Driver`)."""

    twin_enabled = False
    rewound_events: tuple[StageEvent, ...] = ()
    rewind_warning: str | None = None
    rewind_window = 0

    def __init__(
        self,
        path: str | Path,
        argv: list[str] | None = None,
        *,
        probe: bool = True,
        history: History | None = None,
        on_event: Callable[[StageEvent], None] | None = None,
        bugs: tuple[str, ...] | list[str] = (),
        diagnose: bool = True,
    ) -> None:
        self.path = Path(path).resolve()
        if not self.path.is_file():
            raise UserError(f"no such file: {path}")
        self.folder = self.path.parent
        self.argv = [str(path), *(argv or [])]
        self.device = torch.device("cpu")  # the script chooses its own; durations are not synchronised
        self.state = LoopState()
        self.history = history if history is not None else History()
        self.recorder = EventRecorder(self.device, self.history, None, on_event, sync_cuda=False)
        self.diagnose = diagnose
        self.probe = probe
        self.quiet = False  # running: unprobed stages make no events but the loss's (held)
        self._caught = None
        self._bugs: set[str] = set()
        self._turn = threading.Semaphore(0)  # the script may go on
        # What the script hands over: the events since the last turn (one, when stepping).
        self._handed: queue.Queue[list[StageEvent] | None] = queue.Queue()
        self._pending: list[StageEvent] = []
        self._whole_iterations = False  # hand over at iteration boundaries only (running, not stepping)
        self._new_epoch = False  # the stage being recorded is a new epoch's first batch
        self._worked = False  # this turn has done training work (a turn at a boundary may start with trailing calls)
        self._started = False
        self._ended = threading.Event()  # the script's run is over (it ended or was ended)
        self._abort = False
        self._trailing = True  # after a step (or before anything): at an iteration boundary
        self._first_optimizer: weakref.ref[torch.optim.Optimizer] | None = None
        self._train_dataset: Any = None
        self._train_iterator: weakref.ref[Any] | None = None
        self._models: list[nn.Module] = []
        self.last_batch: Any = None  # the training batch the script loaded last (--nproc fingerprints it)
        self._backwards_since_step = 0
        self._loss_since_backward = False
        self._scales: dict[int, float] = {}  # id of a GradScaler-scaled loss -> the scale
        self._validation: dict[str, Any] | None = None  # an open group of eval forwards
        self._forward_started: float | None = None
        self._stage_now: Stage | None = None  # the stage whose call is running (for errors)
        self._update_meter = probes.UpdateMeter()
        self._saved_lrs: list[float] | None = None
        self._steps_in_scaler = 0
        # Optimizers (by id) that stepped and have not had their gradients cleared since: a second
        # step on the same gradients is the stale-gradient mistake, whatever order the calls come in.
        self._not_cleared: set[int] = set()
        self._undo: list[Callable[[], object]] = []  # what a validation bug changed for one forward
        self._backward_in_step = False
        self._optimizer_params: dict[int, set[int]] = {}
        self._last_forward: tuple[nn.Module, tuple[Any, ...], dict[str, Any]] | None = None
        self._check_material = CheckMaterial()
        self._optimizers: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()
        self._skippable: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()  # see _make_skippable
        self._skipping = False  # the step being recorded was left out (missing_step)
        # Run mode pays these per stage: which code objects are the script's, and its lines' text.
        self._script_code: dict[Any, bool] = {}
        self._lines: dict[tuple[str, int], dict[str, Any]] = {}
        for bug in bugs:
            self.set_bug(bug, True)

    # ----- the Driver interface -------------------------------------------------------------
    @property
    def at_boundary(self) -> bool:
        return self._trailing

    @property
    def active_bugs(self) -> tuple[str, ...]:
        return tuple(sorted(self._bugs))

    def next_stage(self) -> Stage | None:
        return None if self.state.finished else self._stage_now

    @property
    def models(self) -> list[nn.Module]:
        """The modules the script trains, in the order they first ran a forward."""
        return self._models

    def iteration_stages(self) -> list[Stage]:
        return [Stage.LOAD_BATCH, Stage.ZERO_GRAD, Stage.FORWARD, Stage.LOSS, Stage.BACKWARD, Stage.STEP]

    def last_iteration_next(self) -> bool:
        return False

    def info(self) -> SessionInfo:
        return SessionInfo(
            name=self.path.name,
            device="script",
            task=None,
            epochs=0,
            batches_per_epoch=None,
            iteration_stages=tuple(self.iteration_stages()),
            epoch_end_stages=(Stage.VALIDATE,),
            applicable_bugs=SCRIPT_BUGS,
            options={"script": str(self.path)},
            bug_reasons={bug.id: "needs an experiment() factory" for bug in BUGS if not bug.script},
        )

    def set_bug(self, bug_id: str, on: bool) -> bool:
        if bug_id not in SCRIPT_BUGS:
            raise UserError(
                f"bug {bug_id!r} cannot be applied to a script as written; in script mode: {', '.join(SCRIPT_BUGS)}"
            )
        changed = on != (bug_id in self._bugs)
        (self._bugs.add if on else self._bugs.discard)(bug_id)
        if bug_id == "missing_step" and on:
            for optimizer in list(self._optimizers):
                self._make_skippable(optimizer)
        return changed

    def set_twin(self, on: bool) -> None:
        if on:
            raise UserError(f"the clean twin {NEEDS_A_FACTORY}")

    def rewind(self) -> bool:
        raise UserError(f"stepping back {NEEDS_A_FACTORY}")

    def resume(self) -> None:
        """A script that raised has ended: there is nothing to resume."""

    def picture_maker(self) -> PictureMaker | None:
        return None

    def check_subject(self) -> Any:
        """A stepper over copies of the script's model and optimizer, fed the batches it trained on
        last: what the sanity checks try things on. Raises UserError saying why there is none."""
        first = self._first_optimizer() if self._first_optimizer is not None else None
        return self._check_material.subject(
            self._models,
            [first] if first is not None else list(self._optimizers),
            len(self._optimizers),
            self.completed_iterations,
            [b for b in self.active_bugs if b in CHECKABLE_BUGS],
        )

    def _step_stage(self) -> StageEvent | None:
        events = self._take_turn(whole_iterations=False)
        return events[0] if events else None

    def _take_turn(self, whole_iterations: bool) -> list[StageEvent]:
        """Let the script run to its next stage (or iteration boundary) and return what it did."""
        if self.state.finished or self.state.halted is not None:
            return []
        self._whole_iterations = whole_iterations  # read by the script's thread once it has the turn
        if not self._started:
            self._started = True
            start_script(self._run_script)
        else:
            self._turn.release()
        return self._handed.get() or []

    def run_iteration(self) -> list[StageEvent]:
        """Run to the next iteration boundary (or a new epoch's first batch, or an error) in one turn."""
        with self.recording_warnings():
            return self._take_turn(whole_iterations=True)

    def run_epoch(self) -> list[StageEvent]:
        """Run until a new epoch starts (a new iterator over the training DataLoader) or the script
        ends; a script without a DataLoader has one epoch: its whole run."""
        events: list[StageEvent] = []
        start = self.state.epoch
        with self.recording_warnings():
            while taken := self._take_turn(whole_iterations=True):
                events += taken
                if taken[-1].error is not None or self.state.epoch != start:
                    break
        return events

    def _advance(self) -> int:
        """`run` goes an iteration a turn."""
        return len(self.run_iteration())

    def close(self) -> None:
        """End the script if it is still waiting at a stage (a trace of its first N iterations)."""
        if self._started and not self._ended.is_set():
            self._abort = True
            self._turn.release()
            self._ended.wait(timeout=10)

    # ----- the script's thread ----------------------------------------------------------------
    def _run_script(self) -> None:
        try:
            self._run_to_end()
        finally:
            self._ended.set()

    def _run_to_end(self) -> None:
        try:
            with Interception(self), self._as_main():
                runpy.run_path(str(self.path), run_name="__main__")
        except _Abort:
            return
        except SystemExit as exc:
            if exc.code not in (None, 0):
                self._fail(RuntimeError(f"the script exited with status {exc.code}"))
            else:
                self._finish()
        except BaseException as exc:  # the script's own error: shown at its stage
            self._fail(exc)
        else:
            self._finish()
        if self._pending:
            self._hand_over()
        self._handed.put(None)  # nothing more comes

    def _finish(self) -> None:
        self._close_validation(wait=False)
        self._trailing = True
        self.state.finish("the script finished")

    @contextmanager
    def _as_main(self) -> Iterator[None]:
        """sys.argv and sys.path as `python script.py ARGS` has them."""
        saved_argv, saved_path = sys.argv, list(sys.path)
        sys.argv = list(self.argv)
        sys.path.insert(0, str(self.folder))
        try:
            yield
        finally:
            sys.argv, sys.path[:] = saved_argv, saved_path

    def _fail(self, exc: BaseException) -> None:
        """The script raised: shown at the stage whose call raised, else after the last stage seen
        (no stage's hint then: the error is the script's own code between stages)."""
        last = self.history.last()
        stage = self._stage_now or (last.stage if last is not None else Stage.LOAD_BATCH)
        error = explain(exc, stage=self._stage_now)
        self.state.halt(error)
        self._pending.append(self._event(stage, StageRecord(), 0.0, error=error, code_line=self._raising_line(exc)))

    def _emit(self, stage: Stage, record: StageRecord, started: float, code_line: Any = None) -> None:
        """Record the stage's event; hand over and wait for the next turn when stepping, at an
        iteration boundary, or when a new epoch has begun."""
        self._stage_now = None
        duration = (time.perf_counter() - started) * 1000.0
        if self._quiet_now(stage, record):
            self._hold(stage, record, duration)
        else:
            self._pending.append(self._event(stage, record, duration, code_line=code_line))
        new_epoch, self._new_epoch = self._new_epoch, False
        # Running, a turn is one iteration: its work up to the step, after the calls that trail the
        # step before it (nanoGPT's zero_grad after step is the previous iteration's).
        if self._whole_iterations and not (self._trailing and self._worked) and not new_epoch:
            return
        self._hand_over()
        self._turn.acquire()
        self._worked = False
        if self._abort:
            raise _Abort

    @property
    def _unseen(self) -> bool:
        """Running and unprobed: the stages being recorded make no event unless they carry a loss
        (see recorder.quiet_stage), so nothing is described for them."""
        return self.quiet and not self.probe and self._whole_iterations

    def _quiet_now(self, stage: Stage, record: StageRecord) -> bool:
        """Running, an unprobed stage makes no event (see recorder.quiet_stage)."""
        return self._unseen and quiet_stage(stage, record)

    def _hold(self, stage: Stage, record: StageRecord, duration_ms: float) -> None:
        """A quiet stage: its loss is held for the plot and the trend checks; the rest is dropped."""
        if record.loss is not None:
            place = self._place()
            self.recorder.hold(stage, record, place["iteration"], place["epoch"], place["bugs"], duration_ms)

    def _place(self) -> dict[str, Any]:
        """Where the loop is, for the event being made (the iteration a trailing call belongs to)."""
        state = self.state
        state.iteration = state.completed_iterations + (0 if self._trailing else 1)
        return {"iteration": max(state.iteration, 1), "epoch": state.epoch, "bugs": self.active_bugs}

    def _hand_over(self) -> None:
        pending, self._pending = self._pending, []
        self._handed.put(pending)

    def _event(
        self, stage: Stage, record: StageRecord, duration_ms: float, error: Any = None, code_line: Any = None
    ) -> StageEvent:
        return self.recorder.emit(
            stage,
            record,
            **self._place(),
            duration_ms=duration_ms,
            error=error,
            # Running, an unprobed iteration's events are not shown: their lines are not looked up.
            code_line=code_line or (self._code_line() if self.probe or not self._whole_iterations else None),
        )

    def _code_line(self) -> dict[str, Any] | None:
        """The script's line that made the call: the innermost frame in the script's folder."""
        frame = sys._getframe(1)
        known = self._script_code
        while frame is not None:
            code = frame.f_code
            in_script = known.get(code)
            if in_script is None:
                in_script = known[code] = self._in_script(code.co_filename)
            if in_script:
                return self._line(code.co_filename, frame.f_lineno)
            frame = frame.f_back  # type: ignore[assignment]
        return None

    def _raising_line(self, exc: BaseException) -> dict[str, Any] | None:
        """The script's innermost line in an exception's traceback (the stack is unwound by now)."""
        found = None
        tb = exc.__traceback__
        while tb is not None:
            if self._in_script(tb.tb_frame.f_code.co_filename):
                found = self._line(tb.tb_frame.f_code.co_filename, tb.tb_lineno)
            tb = tb.tb_next
        return found

    def _in_script(self, filename: str) -> bool:
        return filename.startswith(str(self.folder)) and not filename.startswith(_OWN_SOURCE)

    def _line(self, filename: str, number: int) -> dict[str, Any]:
        line = self._lines.get((filename, number))
        if line is None:
            text = linecache.getline(filename, number).strip()
            line = {"file": str(Path(filename).relative_to(self.folder)), "line": number, "text": text}
            self._lines[(filename, number)] = line
        return dict(line)  # each event its own: a reader may change it

    def _training_work(self) -> None:
        """A stage that starts (or continues) an iteration's work: no longer at a boundary."""
        self._close_validation()
        self._trailing = False
        self._worked = True

    # ----- what the hooks report (Listener) -----------------------------------------------------
    def batch_loaded(self, iterator: Any, batch: Any) -> None:
        dataset = getattr(iterator, "_dataset", None)
        if self._train_dataset is None:
            self._train_dataset = dataset
        if dataset is not self._train_dataset or self._validation is not None:
            return  # another loader's batch (validation's): part of that stage
        self.last_batch = batch
        if self._train_iterator is None or self._train_iterator() is not iterator:
            if self._train_iterator is not None:
                self.state.epoch += 1
                self._new_epoch = True
            self._train_iterator = weakref.ref(iterator)
        self._training_work()
        started = time.perf_counter()
        record = StageRecord()
        if self._unseen:
            self._emit(Stage.LOAD_BATCH, record, started)
            return
        try:
            inputs, targets = split_batch(batch)
        except TypeError:
            inputs, targets = batch, None
        named = [(n, t, None) for n, t in probes.flatten_tensors("inputs", inputs)]
        named += [(n, t, None) for n, t in probes.flatten_tensors("targets", targets)]
        record.tensors = (
            probes.tensor_stats(named) if self.probe else [probes.describe(n, t, None) for n, t, _ in named]
        )
        record.metrics["batch_size"] = batch_size(targets)
        self._emit(Stage.LOAD_BATCH, record, started)

    def zero_grad(self, owner: Any, call: Callable[[], None]) -> None:
        started = time.perf_counter()
        params = _params_of(owner)
        record = StageRecord()
        if self.probe:
            record.metrics["grads_before"] = probes.grad_presence(params)
        if "skip_zero_grad" in self._bugs:
            record.metrics["skipped"] = True
        else:
            self._stage_now = Stage.ZERO_GRAD
            call()
            self._backwards_since_step = 0
            if self._not_cleared:
                cleared = {id(p) for p in params}
                self._not_cleared = {o for o in self._not_cleared if not cleared & self._optimizer_params.get(o, set())}
        if self.probe:
            record.metrics["grads_after"] = probes.grad_presence(params)
        self._close_validation()
        self._emit(Stage.ZERO_GRAD, record, started)

    def forward_started(self, module: nn.Module) -> None:
        if isinstance(module, nn.modules.loss._Loss):
            return
        if not torch.is_grad_enabled() or not module.training:
            self._open_validation(module)
            self._apply_validation_bugs(module)
            return
        self._training_work()
        self._forward_started = time.perf_counter()
        self._stage_now = Stage.FORWARD

    def forward_done(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        """Records the forward stage; returns a replacement output under `double_softmax`."""
        if isinstance(module, nn.modules.loss._Loss):
            self.loss_computed(
                type(module).__name__, args[0] if args else None, args[1] if len(args) > 1 else None, output, module
            )
            return None
        if self._validation is not None:
            self._undo_validation_bugs()
            self._validation_forward(module, output)
            return None
        replaced = None
        if "double_softmax" in self._bugs and isinstance(output, torch.Tensor) and output.dim() >= 2:
            output = replaced = output.softmax(dim=1)  # the bug: probabilities where the loss wants logits
        if module not in self._models:
            self._models.append(module)
        self._last_forward = (module, args, kwargs)
        started = self._forward_started or time.perf_counter()
        record = StageRecord()
        record.metrics["model_training"] = module.training
        loss = _own_loss(output)
        if self._unseen and loss is None:
            self._emit(Stage.FORWARD, record, started)
            return replaced
        try:
            shown = primary_output(output)
        except TypeError:
            shown = None
        if shown is not None:
            record.metrics["output_requires_grad"] = shown.requires_grad
            record.tensors = (
                probes.tensor_stats([("output", shown.detach(), None)])
                if self.probe
                else [probes.describe("output", shown, None)]
            )
        self._emit(Stage.FORWARD, record, started)
        if loss is not None:  # a model that computes its own loss (nanoGPT, HuggingFace): its loss stage
            self.loss_computed(type(module).__name__, shown, None, loss, OWN_LOSS)
        return replaced

    def loss_computed(self, name: str, output: Any, target: Any, loss: Any, loss_fn: Any = None) -> None:
        if self._validation is not None:
            self._validation_loss(output, target, loss)
            return
        if not isinstance(loss, torch.Tensor) or not torch.is_grad_enabled():
            return  # a loss with gradients off trains nothing: a metric (or a model's unseen validation)
        self._check_material.saw_loss(self._last_forward, target, loss_fn, loss)
        self._training_work()
        started = time.perf_counter()
        if self.recorder.diagnostics is None and self.diagnose:
            self.recorder.diagnostics = self._diagnostics(name)
        record = StageRecord()
        record.loss = float(loss.detach().float().mean()) if loss.numel() else math.nan
        record.metrics["loss_shape"] = list(loss.shape)
        self._note_micro_batch(record, self._backwards_since_step + 1)
        self._loss_since_backward = True
        if self._unseen:  # the loss is kept for the plot and the trend checks; its tensors are not shown
            self._emit(Stage.LOSS, record, started)
            return
        named: list[tuple[str, torch.Tensor, str | None]] = []
        if isinstance(output, torch.Tensor):
            named.append(("output", output.detach(), None))
            if self.probe:
                record.metrics["loss_input"] = describe_loss_input(output)
        if isinstance(target, torch.Tensor):
            named.append(("targets", target.detach(), None))
        named.append(("loss", loss.detach(), None))
        record.tensors = (
            probes.tensor_stats(named) if self.probe else [probes.describe(n, t, None) for n, t, _ in named]
        )
        self._emit(Stage.LOSS, record, started)

    def scaled(self, scaler: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            self._scales[id(output)] = float(scaler.get_scale())

    def backward(self, tensor: torch.Tensor, call: Callable[[], None]) -> None:
        self._training_work()
        if not self._loss_since_backward:  # backward of a loss no stage saw: show it first
            scale = self._scales.get(id(tensor), 1.0)
            self.loss_computed("loss", None, None, tensor.detach() / scale)
        started = time.perf_counter()
        scale = self._scales.pop(id(tensor), 1.0)
        self._backwards_since_step += 1
        self._backward_in_step = True
        record = StageRecord()
        if scale != 1.0:
            record.metrics["grad_scale"] = scale
        self._stage_now = Stage.BACKWARD
        call()
        if self.probe:
            layers, total, nonfinite = probes.grad_layers(self._named_params(), scale)
            record.layers, record.grad_norm = layers, total
            record.metrics["nonfinite_grads"] = nonfinite
            record.metrics["grads_none"] = sum(1 for layer in layers if layer.grad_norm is None)
        self._note_micro_batch(record, self._backwards_since_step)
        self._loss_since_backward = False
        self._emit(Stage.BACKWARD, record, started)

    def clipped(self, max_norm: float, total: Any, parameters: Any) -> None:
        started = time.perf_counter()
        record = StageRecord()
        norm_before = float(total)
        record.metrics["max_norm"] = float(max_norm)
        record.metrics["norm_before"] = norm_before
        record.metrics["clipped"] = norm_before > max_norm
        if self.probe:
            layers, after, _ = probes.grad_layers(self._named_params())
            record.layers, record.grad_norm = layers, after
        self._emit(Stage.CLIP_GRAD, record, started)

    def unscaled(self, optimizer: torch.optim.Optimizer, call: Callable[[], None]) -> None:
        """scaler.unscale_(optimizer): the gradients divided by the loss scale, in place."""
        started = time.perf_counter()
        self._stage_now = Stage.UNSCALE
        call()
        record = StageRecord()
        if self.probe:
            layers, total, nonfinite = probes.grad_layers(self._named_params())
            record.layers, record.grad_norm = layers, total
            record.metrics["found_inf"] = nonfinite > 0
        self._emit(Stage.UNSCALE, record, started)

    def optimizer_created(self, optimizer: torch.optim.Optimizer) -> None:
        self._optimizers.add(optimizer)
        if "missing_step" in self._bugs:
            self._make_skippable(optimizer)

    def _make_skippable(self, optimizer: torch.optim.Optimizer) -> None:
        """Let missing_step leave out this optimizer's step() (and a closure's work inside it).

        torch's step hooks cannot cancel a step, so the optimizer's `step` is wrapped on the
        instance, as an LR scheduler wraps it; once there the wrapper stays, and with the bug off it
        calls the step it wrapped (a scheduler made after it wraps it in turn)."""
        if optimizer in self._skippable:
            return
        self._skippable.add(optimizer)
        wrapped = optimizer.step
        driver = self

        @functools.wraps(wrapped)
        def step(opt: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
            if "missing_step" not in driver._bugs:
                return wrapped(*args, **kwargs)
            driver.step_started(opt)
            closure = args[0] if args else kwargs.get("closure")
            with torch.enable_grad():  # a closure's gradients are computed still, and its loss returned
                loss = closure() if closure is not None else None
            driver._skipping = True  # the stage is recorded as a step that changed nothing
            driver.step_done(opt)
            return loss

        optimizer.step = types.MethodType(step, optimizer)  # type: ignore[method-assign]

    def step_started(self, optimizer: torch.optim.Optimizer) -> None:
        self._close_validation()
        self._trailing = False
        self._worked = True
        self._step_began = time.perf_counter()
        self._stage_now = Stage.STEP
        params = _params_of(optimizer)
        if len(self._optimizer_params.get(id(optimizer), ())) != len(params):
            self._optimizer_params[id(optimizer)] = {id(p) for p in params}
        self._backward_in_step = False
        if self.probe:
            self._update_meter.before_step(params)
            self._grads_at_step = probes.grad_presence(params)
        factors = [_LR_FACTORS[b] for b in self._bugs if b in _LR_FACTORS]
        if factors:  # the learning rate scaled for this step only: the script's own lr is restored after
            self._saved_lrs = [group["lr"] for group in optimizer.param_groups]
            for group in optimizer.param_groups:
                group["lr"] = group["lr"] * math.prod(factors)

    def step_done(self, optimizer: torch.optim.Optimizer) -> None:
        if self._saved_lrs is not None:
            for group, lr in zip(optimizer.param_groups, self._saved_lrs):
                group["lr"] = lr
            self._saved_lrs = None
        self._steps_in_scaler += 1
        record = StageRecord()
        if self._skipping:
            self._skipping = False
            record.metrics["skipped"] = True
        if id(optimizer) in self._not_cleared:  # stepped before, and no zero_grad since (a closure's included)
            stale = probes.grad_presence(_params_of(optimizer))
            if stale["nonzero"]:
                record.metrics["stale_grads"] = stale
        self._not_cleared.add(id(optimizer))
        record.metrics["lr"] = optimizer.param_groups[0].get("lr")
        if len(optimizer.param_groups) > 1:
            record.metrics["lrs"] = [group.get("lr") for group in optimizer.param_groups]
        if self.probe:
            # A closure (LBFGS) computes the gradients inside step(): read them as it left them.
            params = _params_of(optimizer)
            record.metrics["grads_at_step"] = (
                probes.grad_presence(params) if self._backward_in_step else self._grads_at_step
            )
            grad_norms = {
                name: float(p.grad.norm()) if p.grad is not None else None for name, p in self._named_params()
            }
            names = {id(p): n for n, p in self._named_params()}  # models seen in a forward so far
            named = [(names.get(id(p), f"param{i}"), p) for i, p in enumerate(_params_of(optimizer))]
            record.layers = self._update_meter.layers(named, grad_norms)
            ratios = [layer.update_ratio for layer in record.layers if layer.update_ratio is not None]
            if ratios:
                record.metrics["max_update_ratio"] = max(ratios)
        self._stepped(optimizer, record)

    def scaler_step(self, scaler: Any, optimizer: Any, call: Callable[[], Any]) -> Any:
        """A GradScaler's step: the optimizer's own step runs inside it, unless the gradients hold
        inf or NaN; then the step is skipped, and shown so."""
        before, scale = self._steps_in_scaler, float(scaler.get_scale())
        result = call()
        if self._steps_in_scaler == before:
            record = StageRecord()
            record.metrics["step_skipped"] = True
            record.metrics["grad_scale_before"] = scale
            record.metrics["lr"] = optimizer.param_groups[0].get("lr")
            self._stepped(optimizer, record)
        return result

    def _stepped(self, optimizer: torch.optim.Optimizer, record: StageRecord) -> None:
        started = getattr(self, "_step_began", time.perf_counter())
        if self._first_optimizer is None:
            self._first_optimizer = weakref.ref(optimizer)
        if self._first_optimizer() is optimizer:  # an iteration is a step of the first optimizer
            self.state.completed_iterations += 1
            self._backwards_since_step = 0
            self._trailing = True
        self._emit(Stage.STEP, record, started)

    def scheduler_stepped(self, scheduler: Any, call: Callable[[], None]) -> None:
        started = time.perf_counter()
        record = StageRecord()
        optimizer = getattr(scheduler, "optimizer", None)
        if optimizer is not None:
            record.metrics["lr_before"] = optimizer.param_groups[0].get("lr")
        self._stage_now = Stage.SCHEDULER
        call()
        if optimizer is not None:
            record.metrics["lr"] = optimizer.param_groups[0].get("lr")
        self._emit(Stage.SCHEDULER, record, started)

    def saved(self, obj: Any, where: Any, call: Callable[[], None]) -> None:
        """torch.save: the script's checkpoint, with what it wrote and where."""
        started = time.perf_counter()
        self._stage_now = Stage.CHECKPOINT
        call()
        record = StageRecord()
        record.metrics["saved"] = True
        record.metrics["saved_tensors"] = sum(1 for _ in probes.flatten_tensors("saved", obj))
        if isinstance(where, (str, os.PathLike)):
            record.metrics["path"] = os.fspath(where)
        self._close_validation()
        self._emit(Stage.CHECKPOINT, record, started)

    # ----- validation: eval-mode or no-grad forwards, one stage per group --------------------
    def _open_validation(self, module: nn.Module) -> None:
        if self._validation is None:
            self._validation = {
                "started": time.perf_counter(),
                "loss_sum": 0.0,
                "examples": 0,
                "correct": 0,
                "counted": 0,
                "model_training": False,
                "builds_graph": False,
                "code_line": self._code_line(),  # where validation began
            }
        group = self._validation
        group["model_training"] = group["model_training"] or any(m.training for m in module.modules())
        group["builds_graph"] = group["builds_graph"] or torch.is_grad_enabled()
        self._stage_now = Stage.VALIDATE

    def _apply_validation_bugs(self, module: nn.Module) -> None:
        """validate_in_train_mode: the forward runs in training mode; validate_with_grad: with
        gradients recorded. Both are undone when the forward returns."""
        group = self._validation
        assert group is not None
        if "validate_in_train_mode" in self._bugs and not module.training:
            modes = {m: m.training for m in module.modules()}
            module.train()
            self._undo.append(functools.partial(_restore_modes, modes))
            group["model_training"] = True
        if "validate_with_grad" in self._bugs and not torch.is_grad_enabled():
            torch.set_grad_enabled(True)
            self._undo.append(lambda: torch.set_grad_enabled(False))
            group["builds_graph"] = True

    def _undo_validation_bugs(self) -> None:
        undo, self._undo = self._undo, []
        for step in undo:
            step()

    def _validation_forward(self, module: nn.Module, output: Any) -> None:
        loss = _own_loss(output)
        if loss is not None:
            try:
                shown = primary_output(output)
            except TypeError:
                shown = None
            self._validation_loss(shown, None, loss)

    def _validation_loss(self, output: Any, target: Any, loss: Any) -> None:
        group = self._validation
        if group is None or not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            return
        n = int(output.shape[0]) if isinstance(output, torch.Tensor) and output.dim() > 0 else 1
        group["loss_sum"] += float(loss.detach().float()) * n
        group["examples"] += n
        if (
            isinstance(output, torch.Tensor)
            and isinstance(target, torch.Tensor)
            and output.dim() == 2
            and target.dim() == 1
            and not target.is_floating_point()
        ):
            group["correct"] += int((output.detach().argmax(dim=1) == target).sum())
            group["counted"] += n

    def _close_validation(self, wait: bool = True) -> None:
        group, self._validation = self._validation, None
        if group is None:
            return
        record = StageRecord()
        if group["examples"]:
            record.metrics["val_loss"] = group["loss_sum"] / group["examples"]
            record.metrics["val_examples"] = group["examples"]
        if group["counted"]:
            record.metrics["val_accuracy"] = group["correct"] / group["counted"]
        record.metrics["model_training"] = group["model_training"]
        record.metrics["builds_graph"] = group["builds_graph"]
        record.metrics["val_seconds"] = time.perf_counter() - group["started"]
        if wait:
            self._emit(Stage.VALIDATE, record, group["started"], code_line=group["code_line"])
        else:  # the script has ended: nothing waits for a turn
            self._pending.append(self._event(Stage.VALIDATE, record, 0.0, code_line=group["code_line"]))

    # ----- helpers --------------------------------------------------------------------------
    def _named_params(self) -> list[tuple[str, nn.Parameter]]:
        if len(self._models) == 1:
            return list(self._models[0].named_parameters())
        return [(f"{type(m).__name__}{i}.{n}", p) for i, m in enumerate(self._models) for n, p in m.named_parameters()]

    @staticmethod
    def _note_micro_batch(record: StageRecord, count: int) -> None:
        if count > 1:  # backward again before a step: gradients accumulated on purpose
            record.metrics["micro_batch"] = count

    def _features(self) -> frozenset[str]:
        """What the discovered models are made of, as the factory's features name it."""
        modules = [m for model in self._models for m in model.modules()]
        found = {"validation"}  # a script may validate at any point: judge it when it does
        if any(isinstance(m, (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm)) for m in modules):
            found.add("train_eval_differs")
        return frozenset(found)

    def _diagnostics(self, loss_name: str) -> Diagnostics:
        functional = getattr(torch.nn.functional, loss_name, None)
        return Diagnostics(
            DiagnosticContext(
                loss_kind=loss_kind(functional) if callable(functional) else _module_kind(loss_name),
                task=None,
                features=self._features(),
                scheduler_interval="iteration",
                classes=None,
                has_trainable_params=lambda: bool(self._named_params()),
                batch_mixing=lambda: None,
            )
        )


def _module_kind(name: str) -> Any:
    """The loss kind of a loss module's class, by name ("other" for a model's own loss)."""
    module_type = getattr(torch.nn, name, None)
    if isinstance(module_type, type) and issubclass(module_type, nn.modules.loss._Loss):
        return loss_kind(module_type())
    return "other"


def _restore_modes(modes: dict[nn.Module, bool]) -> None:
    for module, training in modes.items():
        module.training = training


def _params_of(owner: Any) -> list[nn.Parameter]:
    if isinstance(owner, torch.optim.Optimizer):
        return [p for group in owner.param_groups for p in group["params"]]
    if isinstance(owner, nn.Module):
        return list(owner.parameters())
    return []


def _own_loss(output: Any) -> torch.Tensor | None:
    """The loss a model returned beside its outputs, if it did."""
    if isinstance(output, torch.Tensor):
        return None
    try:
        loss = own_loss(output)
    except (TypeError, ValueError, KeyError, AttributeError):
        return None
    return loss if isinstance(loss, torch.Tensor) and loss.numel() == 1 else None
