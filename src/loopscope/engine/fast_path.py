"""Run mode's fast path: an unprobed iteration of a clean loop, run as a hand-written loop runs it.

Running, most iterations are shown only by their loss. The stage-by-stage path still dispatched
each stage with its own record, clock reading and checks: ~80 us an iteration, 11% of a 0.7 ms
MLP's step (issue 17). Where the iteration is exactly the plain loop (no bug on, no clean twin, no
loss scaler, one micro-batch, no scheduler inside the iteration, not DDP) it runs here as
straight-line code: the same calls on the same objects in the same order as the stage bodies make
them, so the numbers are bitwise the same. The loss's record is built by the stage body's own
`note_loss`, so what the plot and the trend checks receive is unchanged.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from loopscope.engine import plan
from loopscope.engine.batches import own_loss, primary_output, split_batch, target_key, to_device
from loopscope.engine.recorder import PlainLoss, StageRecord, plain_loss_record, warning_lines
from loopscope.engine.stages import IterationValues, LoopBody
from loopscope.shared.vocab import Stage

_LOAD_BATCH, _ZERO_GRAD, _FORWARD, _LOSS = Stage.LOAD_BATCH, Stage.ZERO_GRAD, Stage.FORWARD, Stage.LOSS
_BACKWARD, _CLIP_GRAD, _STEP = Stage.BACKWARD, Stage.CLIP_GRAD, Stage.STEP
_PLAIN = (_ZERO_GRAD, _FORWARD, _LOSS, _BACKWARD, _STEP)
_PLAIN_CLIPPED = (_ZERO_GRAD, _FORWARD, _LOSS, _BACKWARD, _CLIP_GRAD, _STEP)


class FastPath:
    """Runs whole plain iterations of one LoopBody; `stage` says where it is, for an error's place."""

    def __init__(self, body: LoopBody) -> None:
        self.body = body
        experiment = body.experiment
        self.stage = Stage.LOAD_BATCH
        self.warned: dict[Stage, list[str]] = {}  # the warnings each stage raised
        self.loss_note: PlainLoss | None = None  # the loss's figures, once the loss stage has run
        self.iterations = 0  # run here so far
        self._values: IterationValues | None = None  # reused from one fast iteration to the next
        # Decided once: none of these change while the experiment runs. An iteration runs here where
        # this holds, the body is quiet, no bug is on and no twin runs (Stepper._quiet_iteration).
        self.possible = (
            experiment.accumulation == 1
            and body.scaler is None
            and not isinstance(body.model, DistributedDataParallel)
            and tuple(plan.iteration_queue(experiment, _NO_BUGS)[1:]) in (_PLAIN, _PLAIN_CLIPPED)
        )

    @property
    def stages(self) -> tuple[Stage, ...]:
        return _PLAIN if self.body.experiment.clip_grad_norm is None else _PLAIN_CLIPPED

    def run(self, batch: Any, caught: list[warnings.WarningMessage]) -> None:
        """One iteration after its batch was taken. An exception leaves `stage` at the stage that
        raised it; the warnings are kept per stage in `warned`, the loss's figures in `loss_note`.

        Each line is one the stage bodies run too, minus what they do only for bugs or probes; the
        common shapes (a tensor batch, a tensor output) skip the general helpers' dispatch. Between
        a small model's torch calls each Python step costs several times what it costs alone (the
        interpreter's caches are cold again): stages are module constants, not Enum lookups, and
        each object is read once (issue 17)."""
        body = self.body
        values = body.values
        if values is not self._values:  # fresh after a stage-by-stage iteration; then the fast path's own
            values = body.values = self._values = IterationValues()
        self.iterations += 1
        if self.warned:
            self.warned = {}
        self.loss_note = None
        experiment = body.experiment
        stage = _LOAD_BATCH  # a local: kept in `self.stage` only when something raises
        try:
            kind = type(batch)
            if (kind is list or kind is tuple) and len(batch) == 2:  # what a DataLoader of pairs gives
                inputs, targets = batch
                values.target_key = None
            else:
                inputs, targets = split_batch(batch)
                values.target_key = target_key(batch)
            device = body.device
            inputs = inputs.to(device) if type(inputs) is torch.Tensor else to_device(inputs, device)
            targets = targets.to(device) if type(targets) is torch.Tensor else to_device(targets, device)
            values.clean_inputs = values.inputs = inputs
            values.clean_targets = values.targets = targets
            state = body.state
            if state.batches_this_epoch == 1:
                state.running_loss = 0.0  # the loop's per-epoch report starts afresh
            if caught:
                self._note_warnings(stage, caught)
            stage = _ZERO_GRAD
            optimizer = experiment.optimizer
            optimizer.zero_grad()
            if caught:
                self._note_warnings(stage, caught)
            stage = _FORWARD
            model = body.model
            self._training = model.training
            loss_fn, amp = experiment.loss_fn, experiment.amp
            if amp is None and loss_fn is not None and type(inputs) is torch.Tensor and torch.is_grad_enabled():
                raw = model(inputs)
                output = raw if type(raw) is torch.Tensor else primary_output(raw)
            else:
                with torch.enable_grad(), body.autocast():
                    raw = body._call_model()
                    output = body._output_of(raw)
            if caught:
                self._note_warnings(stage, caught)
            stage = _LOSS
            if amp is None:
                loss = own_loss(raw) if loss_fn is None else loss_fn(output, targets)
            else:
                with body.autocast():
                    loss = own_loss(raw) if loss_fn is None else loss_fn(output, targets)
            if not isinstance(loss, torch.Tensor):
                raise TypeError(f"the loss function returned {type(loss).__name__}, not a tensor")
            known = body.training_reduction
            if (  # the common case, a scalar loss known not to be a sum: LoopBody.loss_value's answer, inline
                known is not None
                and known[2] != "sum"
                and known[0] is loss_fn
                and known[1] == getattr(loss_fn, "reduction", None)
                and loss.numel() == 1
            ):
                value, summed_over = float(loss.item()), None
            else:
                value, summed_over = body.loss_value(loss)
            state.running_loss = float(state.running_loss) + value  # the loop's epoch report
            self.loss_note = (value, loss.shape, summed_over)
            if caught:
                self._note_warnings(stage, caught)
            stage = _BACKWARD
            loss.backward()
            if caught:
                self._note_warnings(stage, caught)
            max_norm = experiment.clip_grad_norm
            if max_norm is not None:
                stage = _CLIP_GRAD
                self._clip_total = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
                if caught:
                    self._note_warnings(stage, caught)
            stage = _STEP
            optimizer.step()
            if caught:
                self._note_warnings(stage, caught)
        except BaseException:
            self.stage = stage
            raise

    def _note_warnings(self, stage: Stage, caught: list[warnings.WarningMessage]) -> None:
        self.warned[stage] = warning_lines(caught)
        caught.clear()

    def warned_record(self, stage: Stage) -> StageRecord:
        """The record of a stage that warned, as the stage body would have filled it unprobed."""
        note = self.loss_note
        record = plain_loss_record(note) if stage == Stage.LOSS and note is not None else StageRecord()
        metrics = record.metrics
        if stage == Stage.FORWARD:
            metrics["model_training"] = self._training
        elif stage == Stage.CLIP_GRAD:
            body = self.body
            body.note_clip(record, self._clip_total)
        elif stage == Stage.STEP:
            self.body.note_lr(record)
        metrics["warnings"] = self.warned[stage]
        return record


class _NoBugs:
    """The plan of the loop with no bug on."""

    active: frozenset[str] = frozenset()

    def __contains__(self, bug_id: object) -> bool:
        return False


_NO_BUGS: Any = _NoBugs()
