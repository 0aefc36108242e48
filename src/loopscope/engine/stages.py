"""The stage bodies: the code of a careful hand-written training loop, one method per stage,
plus the probes that read what each stage did.

Which stage runs next is not decided here (that is the driver's job, `engine.stepper`); the body
of each stage is. Active bugs change the code exactly where the bug catalog says they do. The
values one iteration's stages hand each other (the batch, the output, the loss) live in
`IterationValues`, like the local variables of a loop body; the counters live in `LoopState`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sized
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from loopscope.engine import probes
from loopscope.engine.batches import (
    batch_size,
    call_model,
    call_model_with_targets,
    own_loss,
    primary_output,
    shown_output,
    split_batch,
    target_key,
    to_device,
)
from loopscope.engine.diagnostics.context import ForwardFlow
from loopscope.engine.epoch_end import EpochEndStages, autocast_for, grad_scaler_for
from loopscope.engine.experiment import Experiment
from loopscope.engine.inject import BugInjector
from loopscope.engine.losses import loss_reduction
from loopscope.engine.recorder import StageRecord
from loopscope.engine.state import LoopState
from loopscope.engine.twin import CleanTwin, rng_state
from loopscope.shared.metrics import LossInput
from loopscope.shared.vocab import Stage, Task

_UNCHANGED = contextlib.nullcontext()
MAX_CLASS_COUNTS = 12  # per batch: beyond this, the largest and 'others'


@dataclass(slots=True)
class IterationValues:
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
    target_key: str | None = None  # a dict batch's targets key (a model that computes its own loss gets it)
    flow: ForwardFlow | None = None  # what fed what in a probed forward
    grads_scaled: bool = False  # fp16: the gradients are still multiplied by the loss scale


class LoopBody(EpochEndStages):
    """Runs the code of one stage on the experiment's objects."""

    def __init__(
        self, experiment: Experiment, device: torch.device, task: Task | None, injector: BugInjector, state: LoopState
    ) -> None:
        self.experiment = experiment
        self.device = device
        self.task = task
        self.injector = injector
        self.state = state
        self.model = experiment.model
        # Under DDP, the ranks whose gradients its all-reduce averages (1 in one process).
        self.world_size = dist.get_world_size() if isinstance(self.model, DistributedDataParallel) else 1
        # Deduplicated like the optimizer sees them: shared weights appear once.
        self.named_params: list[tuple[str, nn.Parameter]] = list(self.model.named_parameters())
        self.probe = True  # full statistics; the loss and error checks run regardless
        self.quiet_when_unprobed = False  # running: unprobed stages but the loss make no event
        self.twin: CleanTwin | None = None
        self.values = IterationValues()
        self.failing_module: str | None = None  # the module a failed probed forward was in
        self.scaler = grad_scaler_for(experiment.amp, device)
        self._update_meter = probes.UpdateMeter()
        # (loss function, its `reduction` attribute, the reduction found): see _reduction_of_training_loss
        self.training_reduction: tuple[Any, Any, str] | None = None

    def run(self, stage: Stage, record: StageRecord, batch: Any = None) -> None:
        match stage:
            case Stage.LOAD_BATCH:
                self.load_batch(record, batch)
            case Stage.ZERO_GRAD:
                self.zero_grad(record)
            case Stage.FORWARD:
                self.forward(record)
            case Stage.LOSS:
                self.loss(record)
            case Stage.BACKWARD:
                self.backward(record)
            case Stage.UNSCALE:
                self.unscale(record)
            case Stage.CLIP_GRAD:
                self.clip_grad(record)
            case Stage.STEP:
                self.step(record)
            case Stage.SCHEDULER:
                self.scheduler(record)
            case Stage.VALIDATE:
                self.validate(record)
            case Stage.CHECKPOINT:
                self.checkpoint(record)
            case Stage.EARLY_STOP:
                self.early_stop(record)

    @property
    def quiet(self) -> bool:
        """This stage's event will not be made unless it carries a loss: describe nothing for it."""
        return self.quiet_when_unprobed and not self.probe

    def new_iteration(self) -> None:
        self.values = IterationValues()

    # ----- one iteration --------------------------------------------------------------------
    def _note_micro_batch(self, record: StageRecord) -> None:
        if self.experiment.accumulation > 1:
            record.metrics["micro_batch"] = self.state.micro_batch
            record.metrics["micro_batches"] = self.experiment.accumulation

    def take_batch(self, batch: Any) -> None:
        """The batch, split, on the device and through the data pipeline's bugs, into `values`."""
        inputs, targets = split_batch(batch)
        inputs, targets = to_device(inputs, self.device), to_device(targets, self.device)
        values = self.values
        values.target_key = target_key(batch)
        values.clean_inputs, values.clean_targets = inputs, targets
        values.inputs, values.targets = self.injector.prepare_batch(inputs, targets)
        if self.state.batches_this_epoch == 1:
            self.state.running_loss = 0.0  # the loop's per-epoch report starts afresh

    def load_batch(self, record: StageRecord, batch: Any) -> None:
        self._note_micro_batch(record)
        self.take_batch(batch)
        values = self.values
        if self.quiet:
            return
        named = [(n, t, None) for n, t in probes.flatten_tensors("inputs", values.inputs)]
        named += [(n, t, None) for n, t in probes.flatten_tensors("targets", values.targets)]
        if self.probe:
            record.tensors = probes.tensor_stats(named)
            counts = self._class_counts(values.targets)
            if counts is not None:
                record.metrics["class_counts"] = counts
        else:
            record.tensors = [probes.describe(n, t, None) for n, t, _ in named]
        record.metrics["batch_size"] = batch_size(values.targets)

    def _class_counts(self, targets: Any) -> dict[str, int] | None:
        if not isinstance(targets, torch.Tensor) or self.task not in (Task.BINARY, Task.CLASSIFICATION):
            return None
        labels = targets.detach().reshape(-1)
        if labels.is_floating_point():
            labels = labels.round()
        values, counts = torch.unique(labels.to(torch.int64), return_counts=True)
        found = dict(zip(values.tolist(), counts.tolist()))
        if len(found) <= MAX_CLASS_COUNTS:
            return {str(v): c for v, c in found.items()}
        # A language model's thousands of classes: the most frequent ones, the rest summed.
        top = sorted(sorted(found, key=found.__getitem__, reverse=True)[: MAX_CLASS_COUNTS - 1])
        counts_shown = {str(v): found[v] for v in top}
        counts_shown["others"] = sum(found.values()) - sum(counts_shown.values())
        return counts_shown

    def zero_grad(self, record: StageRecord) -> None:
        params = [p for _, p in self.named_params]
        if self.probe:
            record.metrics["grads_before"] = probes.grad_presence(params)
        if "skip_zero_grad" in self.injector or "zero_grad_after_backward" in self.injector:
            record.metrics["skipped"] = True
        else:
            self.experiment.optimizer.zero_grad()
        if self.probe:
            record.metrics["grads_after"] = probes.grad_presence(params)

    def forward(self, record: StageRecord) -> None:
        grad_mode: contextlib.AbstractContextManager[object] = _UNCHANGED
        if "forward_under_no_grad" in self.injector:
            grad_mode = torch.no_grad()
        elif not torch.is_grad_enabled():  # entering enable_grad() when it is already on cost ~4 us
            grad_mode = torch.enable_grad()
        values = self.values
        self._note_micro_batch(record)
        record.metrics["model_training"] = self.model.training
        if self.twin is not None:
            values.rng_before_forward = rng_state(self.device)
        if self.experiment.accumulation > 1 and isinstance(self.model, DistributedDataParallel):
            self._sync_only_at_step()
        if self.probe:
            with probes.ForwardRecorder(self.model) as recorder, grad_mode, self.autocast():
                try:
                    raw = self._call_model()
                except Exception:
                    self.failing_module = recorder.failing_module()
                    raise
                output = self._output_of(raw)
            record.tensors = probes.tensor_stats([*recorder.outputs, ("output", output.detach(), None)])
            values.flow = recorder.flow()
        else:
            with grad_mode, self.autocast():
                raw = self._call_model()
                output = self._output_of(raw)
            if not self.quiet:
                record.tensors = [probes.describe("output", output, None)]
        values.raw_output, values.output = raw, output
        if not self.quiet:
            record.metrics["output_requires_grad"] = output.requires_grad

    def _sync_only_at_step(self) -> None:
        """DDP with accumulation: only the micro-batch before a step all-reduces; the others run as
        under `with model.no_sync():` (the flag it sets, for this forward and its backward), their
        gradients summed locally and all-reduced with the last one's. The last micro-batch is the
        K-th, or the epoch's last batch (`i + 1 == len(train_loader)`)."""
        assert isinstance(self.model, DistributedDataParallel)
        state = self.state
        loader = self.experiment.train_loader
        last_of_epoch = isinstance(loader, Sized) and state.batches_this_epoch >= len(loader)
        steps_next = state.micro_batch >= self.experiment.accumulation or last_of_epoch
        self.model.require_backward_grad_sync = steps_next or "accumulation_without_no_sync" in self.injector

    def autocast(self) -> contextlib.AbstractContextManager[object]:
        """The mixed precision the experiment asks for (forward and loss), or nothing."""
        return autocast_for(self.experiment.amp, self.device)

    def _call_model(self) -> Any:
        values = self.values
        if self.experiment.loss_fn is None:  # the model computes its own loss: it gets the targets
            return call_model_with_targets(self.model, values.inputs, values.targets, values.target_key)
        return call_model(self.model, values.inputs)

    def _output_of(self, raw: Any) -> torch.Tensor:
        if self.experiment.loss_fn is None:
            return shown_output(raw)
        return self.injector.transform_output(primary_output(raw))

    def loss(self, record: StageRecord) -> None:
        values, state = self.values, self.state
        output = values.output
        assert output is not None
        targets = self.injector.transform_targets_for_loss(values.targets)
        loss_fn = self.experiment.loss_fn
        with self.autocast():
            loss = own_loss(values.raw_output) if loss_fn is None else loss_fn(output, targets)
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"the loss function returned {type(loss).__name__}, not a tensor")
        if "clip_loss_not_grad" in self.injector:
            loss = loss.clamp(max=self.experiment.clip_grad_norm)
        values.loss = loss
        if self.twin is not None and values.rng_before_forward is not None:
            record.twin_loss = self.twin.iterate(
                values.clean_inputs,
                values.clean_targets,
                values.rng_before_forward,
                values.target_key,
                micro_batch=state.micro_batch,
            )
        self.note_loss(record, loss)
        if self.quiet:  # the loss is kept for the plot and the trend checks; its tensors are not shown
            return
        named: list[tuple[str, torch.Tensor, str | None]] = [("output", output.detach(), None)]
        if isinstance(targets, torch.Tensor):
            named.append(("targets", targets.detach(), None))
        named.append(("loss", loss.detach(), None))
        if self.probe:
            record.tensors = probes.tensor_stats(named)
            record.metrics["loss_input"] = describe_loss_input(output)
        else:
            record.tensors = [probes.describe(n, t, None) for n, t, _ in named]

    def note_loss(self, record: StageRecord, loss: torch.Tensor) -> None:
        """What every loss event carries (the value, its shape, how it is reduced and divided), and
        the loop's own use of it: the running loss of its epoch report."""
        values, state, metrics = self.values, self.state, record.metrics
        value, summed_over = self.loss_value(loss)
        record.loss = value
        metrics["loss_shape"] = list(loss.shape)
        accumulation = self.experiment.accumulation
        if accumulation > 1:
            self._note_micro_batch(record)
        if summed_over is not None:
            metrics["loss_summed_over"] = summed_over  # the plot shows it per example, as validation
        if accumulation > 1 or self.world_size > 1:
            # The gradients of K micro-batches add up: divided by K, they are those of their mean.
            divisor = 1 if "accumulation_not_divided" in self.injector else accumulation
            if self.world_size > 1:
                metrics["world_size"] = self.world_size
                if "loss_divided_by_world_size" in self.injector:
                    divisor *= self.world_size  # the bug: DDP averages over the ranks already
            if accumulation > 1 or divisor > 1:
                metrics["loss_divisor"] = divisor
                values.loss = loss / divisor if divisor > 1 else loss
        if "loss_accumulates_graph" in self.injector.active:
            state.running_loss = state.running_loss + loss  # the bug: keeps every graph alive
        else:
            state.running_loss = float(state.running_loss) + value
        running = state.running_loss
        metrics["running_loss_holds_graph"] = isinstance(running, torch.Tensor) and running.grad_fn is not None

    def loss_value(self, loss: torch.Tensor) -> tuple[float, int | None]:
        """(the loss shown, the examples it adds up when its reduction is a sum, else None)."""
        # One host sync per iteration: the loss is always shown and always checked for NaN.
        if loss.numel() != 1:  # a loss left unreduced (a bug, or the user's choice): its mean is what is shown
            return (loss.detach().float().mean().item() if loss.numel() else math.nan), None
        value = float(loss.item())
        targets = self.values.targets
        examples = int(targets.shape[0]) if type(targets) is torch.Tensor and targets.dim() else batch_size(targets)
        if examples >= 2 and self._reduction_of_training_loss() == "sum":
            return value, examples
        return value, None

    def _reduction_of_training_loss(self) -> str:
        """ "sum" when the loss adds up its examples (stated, or measured once on this batch)."""
        loss_fn = self.experiment.loss_fn
        stated = getattr(loss_fn, "reduction", None)
        known = self.training_reduction
        if known is not None and known[0] is loss_fn and known[1] == stated:  # asked every iteration
            return known[2]
        values = self.values
        reduction = loss_reduction(loss_fn)
        if reduction is None:
            reduction = self._reduction(values.inputs, values.targets, values.target_key)
        self.training_reduction = (loss_fn, stated, reduction)
        return reduction

    def backward(self, record: StageRecord) -> None:
        if self.values.loss is None:
            raise RuntimeError("there is no loss to backpropagate")
        self._note_micro_batch(record)
        if self.probe:
            record.metrics["grads_before"] = probes.grad_presence([p for _, p in self.named_params])
        scale = 1.0
        if "missing_backward" in self.injector:
            record.metrics["skipped"] = True
        elif self.scaler is not None:
            scale = self.scaler.get_scale()
            record.metrics["grad_scale"] = scale
            self.scaler.scale(self.values.loss).backward()
            self.values.grads_scaled = True
        else:
            self.values.loss.backward()
        if self.probe:
            layers, total, nonfinite = probes.grad_layers(self.named_params, scale)
            record.layers = layers
            record.grad_norm = total
            record.metrics["nonfinite_grads"] = nonfinite
            record.metrics["grads_none"] = sum(1 for layer in layers if layer.grad_norm is None)
            self.values.grad_norms = {layer.name: layer.grad_norm for layer in layers}

    def unscale(self, record: StageRecord) -> None:
        """scaler.unscale_(optimizer): the gradients divided by the loss scale, in place."""
        assert self.scaler is not None
        self.scaler.unscale_(self.experiment.optimizer)
        self.values.grads_scaled = False
        if self.probe:
            layers, total, nonfinite = probes.grad_layers(self.named_params)
            record.layers = layers
            record.grad_norm = total
            record.metrics["found_inf"] = nonfinite > 0
            self.values.grad_norms = {layer.name: layer.grad_norm for layer in layers}

    def clip_grad(self, record: StageRecord) -> None:
        max_norm = self.experiment.clip_grad_norm
        assert max_norm is not None
        if "clip_loss_not_grad" in self.injector:
            record.metrics["skipped"] = True
            record.metrics["max_norm"] = max_norm
            return
        scale = self.scaler.get_scale() if self.scaler is not None and self.values.grads_scaled else 1.0
        if scale != 1.0:
            record.metrics["grad_scale"] = scale  # clipped before unscale_: the limit meets scaled values
        total = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        self.note_clip(record, total)
        if self.probe:
            layers, after, _ = probes.grad_layers(self.named_params, scale)
            record.layers = layers
            record.grad_norm = after
            self.values.grad_norms = {layer.name: layer.grad_norm for layer in layers}

    def note_clip(self, record: StageRecord, total: torch.Tensor) -> None:
        """What clipping did: the norm before it, against the limit."""
        max_norm = self.experiment.clip_grad_norm
        assert max_norm is not None
        norm_before = float(total)
        record.metrics["max_norm"] = max_norm
        record.metrics["norm_before"] = norm_before
        record.metrics["clipped"] = norm_before > max_norm

    def note_lr(self, record: StageRecord) -> None:
        """The learning rate the step used (every group's, where they differ)."""
        optimizer = self.experiment.optimizer
        record.metrics["lr"] = optimizer.param_groups[0].get("lr")
        if len(optimizer.param_groups) > 1:
            record.metrics["lrs"] = [group.get("lr") for group in optimizer.param_groups]

    def step(self, record: StageRecord) -> None:
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
            if self.scaler is not None:  # the bug leaves out scaler.step(optimizer), not update()
                self.scaler.update()
        elif self.scaler is not None:
            scale = self.scaler.get_scale()
            self.scaler.step(optimizer)  # skipped when the gradients hold inf or NaN
            self.scaler.update()
            record.metrics["grad_scale_before"] = scale
            record.metrics["grad_scale"] = self.scaler.get_scale()
            record.metrics["step_skipped"] = self.scaler.get_scale() < scale
            self.values.grads_scaled = False
        else:
            optimizer.step()
        self.note_lr(record)
        if self.probe:
            record.layers = self._update_meter.layers(trainable, self.values.grad_norms)
            ratios = [layer.update_ratio for layer in record.layers if layer.update_ratio is not None]
            if ratios:
                record.metrics["max_update_ratio"] = max(ratios)

    def scheduler(self, record: StageRecord) -> None:
        scheduler = self.experiment.scheduler
        optimizer = self.experiment.optimizer
        record.metrics["lr_before"] = optimizer.param_groups[0].get("lr")
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            if self.state.last_val_loss is None:
                raise RuntimeError("ReduceLROnPlateau needs a validation loss: give the experiment a val_loader")
            scheduler.step(self.state.last_val_loss)
        else:
            scheduler.step()
        record.metrics["lr"] = optimizer.param_groups[0].get("lr")


def describe_loss_input(output: torch.Tensor) -> LossInput:
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
