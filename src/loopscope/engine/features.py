"""What an experiment is made of, read without running it: its task, its features (which decide
which bugs apply) and the facts the screen shows about it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from loopscope.engine.batches import split_batch
from loopscope.engine.experiment import Experiment
from loopscope.engine.losses import loss_kind
from loopscope.shared.bugs import BUGS, requirement_text
from loopscope.shared.protocol import SessionInfo
from loopscope.shared.vocab import Stage, Task


def first_example(loader: Any) -> Any:
    """One example or batch, read without iterating a DataLoader (which would draw a random seed)."""
    if isinstance(loader, DataLoader):
        dataset = loader.dataset
        if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__getitem__"):
            return None
        try:
            return dataset[0]
        except Exception:
            return None
    if isinstance(loader, (list, tuple)) and loader:
        return loader[0]
    return None


def experiment_features(experiment: Experiment, task: str | None) -> frozenset[str]:
    """Feature names as `loopscope.shared.bugs.Bug.requires` uses them."""
    model, loss = experiment.model, experiment.loss_fn
    modules = list(model.modules())
    found: set[str] = set()
    kind = loss_kind(loss)  # a module or its function from torch.nn.functional
    if kind == "cross_entropy":
        found.add("classification")
    if kind == "bce_with_logits":
        found.add("binary_logits")
    if task in ("binary", "classification"):
        found.add("labels")
    if experiment.val_loader is not None:
        found.add("validation")
    has_dropout = any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in modules)
    has_batchnorm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in modules)
    if has_dropout:
        found.add("dropout")
    found.add("batchnorm" if has_batchnorm else "no_batchnorm")
    if has_dropout or has_batchnorm:
        found.add("train_eval_differs")
    if any(isinstance(m, nn.ReLU) for m in modules):
        found.add("relu")
    if sum(isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) for m in modules) >= 2:
        found.add("hidden_layers")
    if not any(isinstance(m, nn.modules.conv._ConvNd) for m in modules):
        found.add("mlp")
    if experiment.scheduler is not None:
        found.add("scheduler")
    if experiment.checkpoint:
        found.add("checkpoint")
    if experiment.clip_grad_norm is not None:
        found.add("clip_grad")
    if experiment.accumulation > 1:
        found.add("accumulation")
    if experiment.amp == "fp16":
        found.add("fp16_scaler")
    loader = experiment.train_loader
    if isinstance(loader, DataLoader) and not isinstance(loader.dataset, IterableDataset):
        found.add("map_dataset")
    if isinstance(model, nn.parallel.DistributedDataParallel):
        found.add("distributed")
    example = first_example(loader)
    if example is not None:
        try:
            inputs, targets = split_batch(example)
        except TypeError:
            inputs = targets = None
        if isinstance(inputs, torch.Tensor):
            found.add("tensor_inputs")
            if inputs.numel() >= 2:
                found.add("multi_feature_inputs")
            if inputs.is_floating_point():
                found.add("float_inputs")
        if (
            kind in ("mse", "l1", "smooth_l1", "huber")
            and isinstance(targets, torch.Tensor)
            and targets.shape[-1:] == (1,)
        ):
            found.add("regression_column")
    return frozenset(found)


def infer_task(experiment: Experiment) -> Task | None:
    """The task implied by the loss function when the experiment does not say."""
    if experiment.task:
        return Task(experiment.task)
    kind = loss_kind(experiment.loss_fn)  # a module or a function from torch.nn.functional
    if kind in ("cross_entropy", "nll"):
        return Task.CLASSIFICATION
    if kind in ("bce_with_logits", "bce"):
        return Task.BINARY
    if kind in ("mse", "l1", "smooth_l1", "huber"):
        return Task.REGRESSION
    return None


def experiment_info(
    experiment: Experiment,
    device: torch.device,
    task: Task | None,
    iteration_stages: Sequence[Stage],
    epoch_end_stages: Sequence[Stage],
    applicable_bugs: Sequence[str],
) -> SessionInfo:
    """Facts about the run that do not change while it runs."""
    exp = experiment
    try:
        batches: int | None = len(exp.train_loader)  # type: ignore[arg-type]
    except TypeError:
        batches = None
    options = {
        "clip_grad_norm": exp.clip_grad_norm,
        "scheduler": type(exp.scheduler).__name__ if exp.scheduler is not None else None,
        "scheduler_interval": exp.scheduler_interval,
        "validation": exp.val_loader is not None,
        "checkpoint": bool(exp.checkpoint),
        "early_stopping_patience": exp.early_stopping_patience,
        "optimizer": type(exp.optimizer).__name__,
        "loss_fn": type(exp.loss_fn).__name__ if exp.loss_fn is not None else None,
        "own_loss": exp.loss_fn is None,
        "amp": exp.amp,
        "accumulation": exp.accumulation,
        "lr": exp.optimizer.param_groups[0].get("lr"),
        "distributed": isinstance(exp.model, nn.parallel.DistributedDataParallel),
        # torch's, or --nproc's (which syncs on CPU too, and is no SyncBatchNorm to DDP's eyes)
        "sync_batchnorm": any(
            isinstance(m, nn.SyncBatchNorm) or hasattr(m, "per_rank_statistics") for m in exp.model.modules()
        ),
    }
    return SessionInfo(
        name=exp.name,
        device=str(device),
        task=task,
        epochs=exp.epochs,
        batches_per_epoch=batches,
        iteration_stages=tuple(iteration_stages),
        epoch_end_stages=tuple(epoch_end_stages),
        applicable_bugs=tuple(applicable_bugs),
        options=options,
        bug_reasons={bug.id: f"needs {requirement_text(bug)}" for bug in BUGS if bug.id not in applicable_bugs},
    )
