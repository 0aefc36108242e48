"""The stage bodies after training's iterations: validation and the careful loop's bookkeeping
(best checkpoint, early stopping). Part of `LoopBody` (`engine.stages`)."""

from __future__ import annotations

import contextlib
import copy
import math
import time
from typing import Any

import torch
from torch import nn

from loopscope.engine.batches import (
    batch_size,
    batch_slice,
    call_model,
    call_model_with_targets,
    own_loss,
    primary_output,
    shown_output,
    split_batch,
    target_key,
    to_device,
)
from loopscope.engine.copies import forked_rng
from loopscope.engine.experiment import Experiment
from loopscope.engine.explain import LoopError
from loopscope.engine.inject import BugInjector
from loopscope.engine.losses import UNIT_INTERVAL_KINDS, LossKind, loss_kind, loss_reduction
from loopscope.engine.recorder import StageRecord
from loopscope.engine.state import LoopState
from loopscope.shared.vocab import Task


class EpochEndStages:
    experiment: Experiment
    device: torch.device
    task: Task | None
    injector: BugInjector
    state: LoopState
    model: nn.Module
    best_state: dict[str, torch.Tensor] | None = None  # the checkpoint stage's copy of the best model
    # (loss_fn, "mean" or "sum"): the reduction measured for a loss that does not state it.
    measured_reduction: tuple[Any, str] | None = None

    def validate(self, record: StageRecord) -> None:
        bugs = self.injector
        exp = self.experiment
        loader = exp.train_loader if "val_is_train" in bugs else exp.val_loader
        assert loader is not None
        record.metrics["val_loader_is_train_loader"] = loader is exp.train_loader or (
            getattr(loader, "dataset", None) is not None
            and getattr(loader, "dataset", None) is getattr(exp.train_loader, "dataset", object())
        )
        loss_fn = exp.loss_fn
        reduction, kind = loss_reduction(loss_fn), loss_kind(loss_fn)
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
            with grad_mode, autocast_for(exp.amp, self.device):
                for batch in loader:
                    inputs, targets = split_batch(batch)
                    inputs, targets = to_device(inputs, self.device), to_device(targets, self.device)
                    inputs, targets = bugs.prepare_batch(inputs, targets)
                    if reduction is None and batch_size(targets) >= 2:
                        reduction = self._reduction(inputs, targets, target_key(batch))
                    output, loss = validation_loss(self.model, loss_fn, bugs, inputs, targets, target_key(batch))
                    builds_graph = builds_graph or output.requires_grad
                    targets = bugs.transform_targets_for_loss(targets)
                    n = batch_size(targets)
                    # Per example whatever the reduction, weighted by example count so a short last
                    # batch does not skew the mean (a summed loss is already a batch total). A
                    # reduction that cannot be measured is taken for torch's default, the mean.
                    batch_loss = loss.detach().float()
                    batch_loss = batch_loss if reduction == "sum" else batch_loss.mean() * n
                    total_loss = batch_loss if total_loss is None else total_loss + batch_loss
                    hits = self._correct(output, targets, kind)
                    if hits is not None:
                        correct = hits if correct is None else correct + hits
                    examples += n
        finally:
            if "train_in_eval_mode" not in bugs:
                self.model.train()
        record.metrics["builds_graph"] = builds_graph
        if examples == 0 or total_loss is None:
            raise LoopError("the validation loader yielded no batches")
        if _split_between_ranks(loader) and "val_metrics_rank0_only" not in bugs:
            total_loss, correct, examples = _summed_over_ranks(total_loss, correct, examples)
        val_loss = total_loss.item() / examples
        self.state.last_val_loss = val_loss
        record.metrics["val_loss"] = val_loss
        record.metrics["val_examples"] = examples
        if correct is not None:
            record.metrics["val_accuracy"] = correct.item() / examples
        record.metrics["val_seconds"] = time.perf_counter() - started

    def _reduction(self, inputs: Any, targets: Any, key: str | None) -> str:
        """How a loss that does not say so folds a batch, measured once (see measure_reduction) on a
        copy of the model, so that a state kept on the module (a hidden state) is untouched; the
        mean where it cannot be measured (as before, torch's default)."""
        loss_fn = self.experiment.loss_fn
        if self.measured_reduction is None or self.measured_reduction[0] is not loss_fn:
            try:
                model = copy.deepcopy(self.model)
            except Exception:  # a model that cannot be copied is validated as before
                reduction = None
            else:
                reduction = measure_reduction(model, loss_fn, self.injector, inputs, targets, key, self.device)
            self.measured_reduction = (loss_fn, reduction or "mean")
        return self.measured_reduction[1]

    def _correct(self, output: torch.Tensor, targets: Any, kind: LossKind) -> torch.Tensor | None:
        """Number of right answers in a batch, or None where accuracy means nothing."""
        if not isinstance(targets, torch.Tensor):
            return None
        if self.task == Task.BINARY:
            if output.numel() != targets.numel():
                return None
            threshold = binary_threshold(kind, output)
            predicted = (output.reshape(-1) > threshold).to(torch.int64)
            return (predicted == targets.reshape(-1).round().to(torch.int64)).sum()
        if self.task == Task.CLASSIFICATION and output.dim() >= 2:
            predicted = output.argmax(dim=1)
            truth = targets.argmax(dim=1) if targets.shape == output.shape else targets
            if predicted.shape != truth.shape:
                return None
            return (predicted == truth).sum()
        return None

    def checkpoint(self, record: StageRecord) -> None:
        state = self.state
        val_loss = state.last_val_loss
        improved = val_loss is not None and val_loss < state.best_val_loss
        writes = _writes_checkpoints(self.injector)
        if improved:
            assert val_loss is not None
            state.best_val_loss = val_loss
        if improved and writes:
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            path = self.experiment.checkpoint
            if isinstance(path, str):
                torch.save(self.best_state, path)
                record.metrics["path"] = path
        record.metrics["saved"] = improved and writes
        record.metrics["best_val_loss"] = state.best_val_loss

    def early_stop(self, record: StageRecord) -> None:
        state = self.state
        patience = self.experiment.early_stopping_patience
        assert patience is not None
        if state.last_val_loss is not None and state.last_val_loss <= state.best_val_loss and self._improved_now():
            state.validations_without_improvement = 0
        else:
            state.validations_without_improvement += 1
        stop = state.validations_without_improvement >= patience
        record.metrics["without_improvement"] = state.validations_without_improvement
        record.metrics["patience"] = patience
        record.metrics["stop"] = stop
        if stop:
            state.finish(f"early stop: val loss not better in {patience} validations")

    def _improved_now(self) -> bool:
        # Without a checkpoint stage the best loss is tracked here instead.
        state = self.state
        if self.experiment.checkpoint:
            return state.last_val_loss == state.best_val_loss
        if state.last_val_loss is not None and state.last_val_loss < state.best_val_loss:
            state.best_val_loss = state.last_val_loss
            return True
        return False


def _writes_checkpoints(bugs: BugInjector) -> bool:
    """Whether this process writes the checkpoint: one process does, or under --nproc rank 0 alone
    (the ranks hold one model; N writers of one file race)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return True
    return dist.get_rank() == 0 or "checkpoint_every_rank" in bugs


def _split_between_ranks(loader: Any) -> bool:
    """Whether each rank validates only its share of the set (under --nproc, see ShardedValidation)."""
    from torch.utils.data.distributed import DistributedSampler

    return isinstance(getattr(loader, "sampler", None), DistributedSampler)


def _summed_over_ranks(
    total_loss: torch.Tensor, correct: torch.Tensor | None, examples: int
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """The whole validation set's totals: every rank's share summed, as a DDP loop all-reduces them."""
    import torch.distributed as dist

    hits = torch.zeros((), device=total_loss.device) if correct is None else correct
    totals = torch.stack(
        [total_loss.double(), hits.double(), torch.tensor(float(examples), device=total_loss.device).double()]
    )
    dist.all_reduce(totals)
    summed_hits = None if correct is None else totals[1]
    return totals[0], summed_hits, int(totals[2].item())


def validation_loss(
    model: nn.Module, loss_fn: Any, bugs: BugInjector, inputs: Any, targets: Any, key: str | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the output validation shows, the loss) for one validation batch, as the loop computes them."""
    if loss_fn is None:  # the model computes its own loss, from the targets it is given
        raw = call_model_with_targets(model, inputs, targets, key)
        return shown_output(raw), own_loss(raw)
    output = bugs.transform_output(primary_output(call_model(model, inputs)))
    return output, loss_fn(output, bugs.transform_targets_for_loss(targets))


def measure_reduction(
    model: nn.Module,
    loss_fn: Any,
    bugs: BugInjector,
    inputs: Any,
    targets: Any,
    key: str | None,
    device: torch.device,
) -> str | None:
    """ "sum" or "mean", for a loss that does not say which (a model's own, a lambda): its value on a
    batch (L) and on the batch's two halves (L1, L2), in eval mode with no gradient and with the
    random generators forked, so the run's random stream is untouched. Summed over examples,
    L1 + L2 = L; averaged, L1 + L2 = 2L. None where it cannot tell: a batch that cannot be cut in
    two, a loss that is not one number, or one that is not finite. `model` is changed (its mode,
    any state it keeps): hand over a copy."""
    size = batch_size(targets)
    half = size // 2
    training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad(), forked_rng(device):
            pieces = [(0, 2 * half), (0, half), (half, 2 * half)]
            losses = []
            for start, stop in pieces:
                part = [batch_slice(v, start, stop, size) for v in (inputs, targets)]
                _, loss = validation_loss(model, loss_fn, bugs, part[0], part[1], key)
                if loss.numel() != 1:
                    return None
                losses.append(float(loss.detach().float()))
    except Exception:  # the loop's own validation reports whatever fails, at its stage
        return None
    finally:
        for module, mode in training.items():
            module.training = mode
    whole, first, second = losses
    if not all(math.isfinite(v) for v in losses):
        return None
    return "sum" if abs(first + second - whole) < abs(first + second - 2 * whole) else "mean"


def binary_threshold(kind: LossKind, output: torch.Tensor) -> float:
    """Where a binary model's output says "1": 0 for logits, 0.5 for probabilities or a score
    fitted to 0/1 targets (MSE on 0/1 labels); for another loss, from the output's own range."""
    if kind == "bce_with_logits":
        return 0.0
    if kind in UNIT_INTERVAL_KINDS:
        return 0.5
    inside = bool((output.amin() >= 0) & (output.amax() <= 1)) if output.numel() else False
    return 0.5 if inside else 0.0


_NO_AUTOCAST = contextlib.nullcontext()  # reusable: it holds no state


def autocast_for(amp: str | None, device: torch.device) -> contextlib.AbstractContextManager[object]:
    """torch.autocast in bfloat16 for amp="bf16", in float16 for amp="fp16"; nothing otherwise."""
    if amp in ("bf16", "fp16"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
    return _NO_AUTOCAST


def grad_scaler_for(amp: str | None, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16 gradients underflow unless the loss is scaled up for backward: a GradScaler does it."""
    return torch.amp.GradScaler(device.type) if amp == "fp16" else None
