"""BatchNorm over every rank's batch, as `nn.SyncBatchNorm.convert_sync_batchnorm(model)` makes it,
on any device. Torch's SyncBatchNorm has GPU kernels only (a CPU input raises), so on CPU the
statistics are computed from sums all-reduced over gloo, differentiably: the same mean and
variance as one process would compute over the ranks' batches together.

`per_rank_statistics` is the bug `batchnorm_not_synced`: each rank's own batch statistics, exactly
what the BatchNorm layer left unconverted computes."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class _SumOverRanks(torch.autograd.Function):
    """all_reduce(SUM) with its gradient: every rank's loss depends on the sum, so each rank's
    input gets the gradients of all of them (summed over the ranks again). Torch's own
    `torch.distributed.nn.functional.all_reduce` does this but is deprecated, and its successor is
    differentiable only in recent versions."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        summed = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(summed, group=group)
        return summed

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        summed = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(summed, group=ctx.group)
        return summed, None


class RankSyncedBatchNorm(_BatchNorm):
    """A SyncBatchNorm that also syncs on CPU, and can be told not to sync at all. Not a
    SyncBatchNorm subclass: DDP refuses those on CPU before they would run."""

    per_rank_statistics = False
    process_group: Any = None
    _check_input_dim = nn.SyncBatchNorm._check_input_dim
    _check_non_zero_input_channels = nn.SyncBatchNorm._check_non_zero_input_channels

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.per_rank_statistics:
            return super().forward(input)  # what nn.BatchNorm2d (1d, 3d) computes
        if input.device.type != "cpu":
            return nn.SyncBatchNorm.forward(self, input)  # type: ignore[arg-type]  # torch's kernels
        group = self.process_group or dist.group.WORLD
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1):
            return super().forward(input)  # nothing to sync with: torch's SyncBatchNorm falls back so too
        return self._synced_on_cpu(input, group)

    def _synced_on_cpu(self, input: torch.Tensor, group: Any) -> torch.Tensor:
        self._check_input_dim(input)  # type: ignore[misc]  # SyncBatchNorm's, borrowed
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # a cumulative average, as torch's
                factor = 1.0 / float(self.num_batches_tracked)
        work_dtype = torch.promote_types(input.dtype, torch.float32)  # half-precision sums lose too much
        x = input.to(work_dtype)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1, *([1] * (x.dim() - 2))]
        count = torch.tensor([x.numel() // x.size(1)], dtype=work_dtype)
        # Two all-reduces: the mean first, then the squares about it (steadier than E[x²] - E[x]²).
        totals = _SumOverRanks.apply(torch.cat([x.sum(dims), count]), group)
        examples = totals[-1]
        mean = totals[:-1] / examples
        centered = x - mean.reshape(shape)
        variance = _SumOverRanks.apply(centered.square().sum(dims), group) / examples
        out = centered * torch.rsqrt(variance + self.eps).reshape(shape)
        if self.affine:
            out = out * self.weight.reshape(shape) + self.bias.reshape(shape)
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():  # the running variance is unbiased, as torch keeps it
                unbiased = variance * (examples / (examples - 1).clamp(min=1))
                self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        return out.to(input.dtype)


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """`nn.SyncBatchNorm.convert_sync_batchnorm(model)`, its layers able to sync on CPU too (the
    same parameters and buffers: an optimizer built on the model still steps them)."""
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for module in converted.modules():
        if type(module) is nn.SyncBatchNorm:
            module.__class__ = RankSyncedBatchNorm  # type: ignore[assignment]  # the same state; only forward differs
    return converted
