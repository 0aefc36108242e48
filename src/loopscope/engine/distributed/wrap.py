"""What factory mode does to an experiment for DDP, as a hand-written DDP loop does it: the model
wrapped in DistributedDataParallel (its BatchNorm layers converted to SyncBatchNorm first), the
training loader drawing from a DistributedSampler that is told the epoch (`set_epoch`) before each
pass, the validation set split between the ranks."""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, RandomSampler
from torch.utils.data.dataloader import _BaseDataLoaderIter
from torch.utils.data.distributed import DistributedSampler

from loopscope.engine.distributed.sync_batchnorm import convert_sync_batchnorm
from loopscope.engine.experiment import Experiment
from loopscope.engine.probes import flatten_tensors
from loopscope.shared.errors import UserError


def _same_batching(original: DataLoader[Any]) -> dict[str, Any]:
    """What a loader over another sampler keeps of the user's: its batches, collation and workers."""
    return {
        "batch_size": original.batch_size,
        "drop_last": original.drop_last,
        "collate_fn": original.collate_fn,
        "num_workers": original.num_workers,
        "pin_memory": original.pin_memory,
    }


class EpochSampledLoader(DataLoader[Any]):
    """The training DataLoader over a DistributedSampler whose epoch is set as each pass begins, the
    way `for epoch in ...: sampler.set_epoch(epoch); for batch in loader:` sets it. `bug_on` (the
    stepper's switches) can make a pass forget set_epoch, or read the original loader instead."""

    def __init__(self, original: DataLoader[Any], sampler: DistributedSampler[Any]) -> None:
        super().__init__(original.dataset, sampler=sampler, **_same_batching(original))
        self.original = original
        self.epoch = 0
        self.bug_on: Callable[[str], bool] = lambda bug: False

    def __iter__(self) -> _BaseDataLoaderIter:
        epoch, self.epoch = self.epoch, self.epoch + 1
        if self.bug_on("no_distributed_sampler"):
            return iter(self.original)  # the whole dataset, shuffled alike on every rank
        if not self.bug_on("set_epoch_forgotten"):
            assert isinstance(self.sampler, DistributedSampler)
            self.sampler.set_epoch(epoch)
        return super().__iter__()


class ShardedValidation(DataLoader[Any]):
    """The validation DataLoader as DDP validates: each rank its own share of the set, in order
    (DistributedSampler pads the last share with repeats so that every rank runs as many batches),
    the totals then summed over the ranks (the validate stage's all-reduce)."""

    def __init__(self, original: DataLoader[Any], rank: int, world_size: int) -> None:
        sampler: DistributedSampler[Any] = DistributedSampler(
            original.dataset, num_replicas=world_size, rank=rank, shuffle=False
        )
        super().__init__(original.dataset, sampler=sampler, **_same_batching(original))


def distribute(experiment: Experiment, rank: int, world_size: int, seed: int, device: torch.device) -> Experiment:
    """The experiment as rank `rank` of `world_size` trains it (changed in place, and returned)."""
    loader = experiment.train_loader
    if not isinstance(loader, DataLoader) or loader.batch_size is None:
        raise UserError(
            "--nproc needs the experiment's train_loader to be a torch DataLoader with a batch_size "
            f"(got {type(loader).__name__}): each rank reads its own share of the dataset through a DistributedSampler"
        )
    sampler: DistributedSampler[Any] = DistributedSampler(
        loader.dataset,
        num_replicas=world_size,
        rank=rank,
        shuffle=isinstance(loader.sampler, RandomSampler),
        seed=seed,
        drop_last=loader.drop_last,
    )
    experiment.train_loader = EpochSampledLoader(loader, sampler)
    if isinstance(experiment.val_loader, DataLoader) and experiment.val_loader.batch_size is not None:
        experiment.val_loader = ShardedValidation(experiment.val_loader, rank, world_size)
    # As a DDP tutorial does for a model with BatchNorm: statistics over the ranks' batches together.
    model = convert_sync_batchnorm(experiment.model.to(device))
    experiment.model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return experiment


def batch_fingerprint(inputs: Any) -> str:
    """CRC-32 of a batch's input tensors: equal on two ranks when they hold the same examples."""
    return _crc32(tensor for _, tensor in flatten_tensors("inputs", inputs))


class LocalGradNorms:
    """Each backward's gradient norm on this rank before DDP averages the ranks' gradients: read
    from the buckets DDP hands its communication hook, which then all-reduces them with torch's own
    `allreduce_hook`, documented to leave DDP's results as they are without a hook."""

    def __init__(self) -> None:
        self.measuring = True  # off: the hook only all-reduces (an unprobed iteration)
        self._squares = 0.0
        self._seen = False
        self.all_reduces = 0  # buckets all-reduced since the last take
        self.comm_seconds = 0.0  # from each bucket's hand-over to its all-reduce done, waiting included

    def install(self, model: torch.nn.Module) -> None:
        assert isinstance(model, DistributedDataParallel)
        model.register_comm_hook(None, self._hook)

    # Unannotated: DDP compares the annotations with the classes themselves, and this module's
    # annotations are strings (`from __future__ import annotations`).
    def _hook(self, state, bucket):
        if self.measuring:
            self._squares += float(bucket.buffer().detach().double().pow(2).sum())
            self._seen = True
        self.all_reduces += 1
        started = time.perf_counter()

        def done(future):  # the all-reduced bucket passes through unchanged
            self.comm_seconds += time.perf_counter() - started
            return future.value()

        return default_hooks.allreduce_hook(state, bucket).then(done)

    def take(self) -> tuple[float | None, int, float]:
        """Since the last take: the local norm (None if not measured), the all-reduces and their
        seconds; then start afresh."""
        taken = (math.sqrt(self._squares) if self._seen else None, self.all_reduces, self.comm_seconds)
        self._squares, self._seen, self.all_reduces, self.comm_seconds = 0.0, False, 0, 0.0
        return taken


def parameter_checksum(model: torch.nn.Module) -> str:
    """CRC-32 of every parameter's bytes, in order: equal on two ranks exactly when their
    parameters are bitwise equal (up to a 1 in 4e9 collision)."""
    return _crc32(model.parameters())


def add_batchnorm_checksum(event: Any, model: torch.nn.Module) -> None:
    """A training forward's CRC-32 of every BatchNorm layer's running statistics, when the model
    has any: equal on every rank exactly when each normalized with the same statistics (DDP
    broadcast rank 0's before the forward)."""
    statistics = [
        tensor
        for module in model.modules()
        if isinstance(module, _BatchNorm) and module.training and module.track_running_stats
        for tensor in (module.running_mean, module.running_var)
        if isinstance(tensor, torch.Tensor)
    ]
    if statistics:
        event.metrics["batchnorm_checksum"] = _crc32(statistics)


def _crc32(tensors: Iterable[torch.Tensor]) -> str:
    """CRC-32 of the tensors' bytes, in order, as 8 hex digits."""
    crc = 0
    for tensor in tensors:
        crc = zlib.crc32(_bytes(tensor), crc)
    return f"{crc:08x}"


def _bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
