"""The stage bodies after training's iterations: validation and the careful loop's bookkeeping
(best checkpoint, early stopping). Part of `LoopBody` (`engine.stages`)."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch
from torch import nn

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
                    if loss_fn is None:  # the model computes its own loss, from the targets it is given
                        raw = call_model_with_targets(self.model, inputs, targets, target_key(batch))
                        loss, output = own_loss(raw), shown_output(raw)
                    else:
                        output = bugs.transform_output(primary_output(call_model(self.model, inputs)))
                    builds_graph = builds_graph or output.requires_grad
                    targets = bugs.transform_targets_for_loss(targets)
                    n = batch_size(targets)
                    if loss_fn is not None:
                        loss = loss_fn(output, targets)
                    # Per example whatever the reduction, weighted by example count so a short last
                    # batch does not skew the mean (a summed loss is already a batch total).
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
        val_loss = total_loss.item() / examples
        self.state.last_val_loss = val_loss
        record.metrics["val_loss"] = val_loss
        record.metrics["val_examples"] = examples
        if correct is not None:
            record.metrics["val_accuracy"] = correct.item() / examples
        record.metrics["val_seconds"] = time.perf_counter() - started

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
        if improved:
            assert val_loss is not None
            state.best_val_loss = val_loss
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            path = self.experiment.checkpoint
            if isinstance(path, str):
                torch.save(self.best_state, path)
                record.metrics["path"] = path
        record.metrics["saved"] = improved
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
            state.finish(f"early stop: no better validation loss in {patience} validations")

    def _improved_now(self) -> bool:
        # Without a checkpoint stage the best loss is tracked here instead.
        state = self.state
        if self.experiment.checkpoint:
            return state.last_val_loss == state.best_val_loss
        if state.last_val_loss is not None and state.last_val_loss < state.best_val_loss:
            state.best_val_loss = state.last_val_loss
            return True
        return False


def binary_threshold(kind: LossKind, output: torch.Tensor) -> float:
    """Where a binary model's output says "1": 0 for logits, 0.5 for probabilities or a score
    fitted to 0/1 targets (MSE on 0/1 labels); for another loss, from the output's own range."""
    if kind == "bce_with_logits":
        return 0.0
    if kind in UNIT_INTERVAL_KINDS:
        return 0.5
    inside = bool((output.amin() >= 0) & (output.amax() <= 1)) if output.numel() else False
    return 0.5 if inside else 0.0


def autocast_for(amp: str | None, device: torch.device) -> contextlib.AbstractContextManager[object]:
    """torch.autocast in bfloat16 for amp="bf16", in float16 for amp="fp16"; nothing otherwise."""
    if amp in ("bf16", "fp16"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
    return contextlib.nullcontext()


def grad_scaler_for(amp: str | None, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16 gradients underflow unless the loss is scaled up for backward: a GradScaler does it."""
    return torch.amp.GradScaler(device.type) if amp == "fp16" else None
