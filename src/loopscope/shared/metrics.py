"""The numbers each stage reports beside its tensors: `StageEvent.metrics`, typed per stage.

At run time the metrics are a plain dict (the trace writes it as it is, and the UI reads it with
`.get`); these TypedDicts name every key, its type and the stage that writes it, so a typo in a
key is a type error instead of a silently missing number.
"""

from __future__ import annotations

from typing import Literal, TypedDict


class GradPresence(TypedDict):
    """How many gradient tensors are None, all zero, or hold values, and their global norm."""

    none: int
    zero: int
    nonzero: int
    norm: float


LossInput = Literal["probabilities", "unit_interval", "logits", "other"]


class CommonMetrics(TypedDict, total=False):
    """Any stage."""

    warnings: list[str]  # warnings the user's code (or torch) raised during the stage
    cuda_allocated_mb: float  # on CUDA: memory allocated after the stage
    cuda_peak_mb: float
    skipped: bool  # an injected bug left the stage's call out
    # Gradient accumulation: which micro-batch of the iteration this stage worked on (load_batch,
    # forward, loss, backward), of how many.
    micro_batch: int
    micro_batches: int
    # fp16 with a GradScaler: the loss scale (backward: the one the loss was multiplied by, and the
    # gradient norms shown are divided by it; clip_grad: still on the gradients; step: after update()).
    grad_scale: float


class LoadBatchMetrics(TypedDict, total=False):
    batch_size: int
    class_counts: dict[str, int]  # label -> examples in the batch (classification, probed)
    # --nproc: CRC-32 of the batch's inputs (equal on two ranks holding the same examples), and
    # whether the rank's sampler shuffles (a fixed order each epoch is then a mistake)
    batch_fingerprint: str
    sampler_shuffles: bool


class ZeroGradMetrics(TypedDict, total=False):
    grads_before: GradPresence  # probed
    grads_after: GradPresence


class ForwardMetrics(TypedDict, total=False):
    model_training: bool  # forward: model.training; validate: any module still in training mode
    output_requires_grad: bool
    # --nproc: CRC-32 of the BatchNorm layers' running statistics after a training forward (equal on
    # every rank when they normalize with the statistics of the whole batch: SyncBatchNorm)
    batchnorm_checksum: str


class LossMetrics(TypedDict, total=False):
    loss_shape: list[int]
    running_loss_holds_graph: bool
    loss_input: LossInput  # probed
    loss_divisor: int  # accumulation or DDP: what the loss was divided by before backward (K, or 1)
    world_size: int  # DDP: the ranks whose gradients the all-reduce averages
    loss_summed_over: int  # a summed loss (reduction "sum"): the examples it adds up (the plot divides)


class BackwardMetrics(TypedDict, total=False):
    grads_before: GradPresence
    nonfinite_grads: int
    grads_none: int
    # --nproc: this rank's gradient norm before DDP averaged the ranks' gradients (grad_norm is after)
    local_grad_norm: float
    # --nproc: gradient buckets DDP all-reduced in this backward, and the milliseconds from handing
    # each over to its all-reduce being done (waiting for the other ranks included), summed
    all_reduces: int
    comm_ms: float


class UnscaleMetrics(TypedDict, total=False):
    found_inf: bool  # inf/NaN in the unscaled gradients: the scaler will skip this step


class ClipGradMetrics(TypedDict, total=False):
    max_norm: float
    norm_before: float
    clipped: bool


class StepMetrics(TypedDict, total=False):
    lr: float | None  # also the scheduler's, after it ran
    lrs: list[float | None]  # every parameter group's, when there are several
    grads_at_step: GradPresence
    max_update_ratio: float
    step_skipped: bool  # the GradScaler skipped optimizer.step() (inf/NaN gradients)
    # script mode: the optimizer stepped before and no zero_grad cleared its gradients since
    stale_grads: GradPresence
    grad_scale_before: float
    # --nproc: CRC-32 of the rank's parameters after the step (equal on every rank while healthy)
    param_checksum: str


class SchedulerMetrics(TypedDict, total=False):
    lr_before: float | None


class ValidateMetrics(TypedDict, total=False):
    val_loss: float
    val_accuracy: float
    val_examples: int
    val_seconds: float
    val_loader_is_train_loader: bool
    builds_graph: bool


class CheckpointMetrics(TypedDict, total=False):
    saved: bool
    best_val_loss: float
    path: str
    saved_tensors: int  # script mode: the tensors torch.save wrote


class EarlyStopMetrics(TypedDict, total=False):
    without_improvement: int
    patience: int
    stop: bool


class StageMetrics(
    CommonMetrics,
    LoadBatchMetrics,
    ForwardMetrics,
    LossMetrics,
    BackwardMetrics,
    UnscaleMetrics,
    ClipGradMetrics,
    StepMetrics,
    SchedulerMetrics,
    ValidateMetrics,
    CheckpointMetrics,
    EarlyStopMetrics,
    total=False,
):
    """Every key any stage may write (zero_grad's `grads_after` included)."""

    grads_after: GradPresence
