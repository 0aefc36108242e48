"""What factory mode does to an experiment for DDP, as a hand-written DDP loop does it: the model
wrapped in DistributedDataParallel, the training loader drawing from a DistributedSampler that is
told the epoch (`set_epoch`) before each pass."""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, RandomSampler
from torch.utils.data.distributed import DistributedSampler

from loopscope.engine.experiment import Experiment
from loopscope.shared.errors import UserError


class EpochSampledLoader:
    """A DataLoader over a DistributedSampler whose epoch is set as each pass begins, the way
    `for epoch in ...: sampler.set_epoch(epoch); for batch in loader:` sets it."""

    def __init__(self, loader: DataLoader[Any], sampler: DistributedSampler[Any]) -> None:
        self.loader = loader
        self.sampler = sampler
        self.epoch = 0

    def __iter__(self) -> Iterator[Any]:
        self.sampler.set_epoch(self.epoch)
        self.epoch += 1
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)


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
    rebuilt = DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=sampler,
        drop_last=loader.drop_last,
        collate_fn=loader.collate_fn,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
    )
    experiment.train_loader = EpochSampledLoader(rebuilt, sampler)
    model = experiment.model.to(device)
    experiment.model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return experiment


class LocalGradNorms:
    """Each backward's gradient norm on this rank before DDP averages the ranks' gradients: read
    from the buckets DDP hands its communication hook, which then all-reduces them with torch's own
    `allreduce_hook`, documented to leave DDP's results as they are without a hook."""

    def __init__(self) -> None:
        self.measuring = True  # off: the hook only all-reduces (an unprobed iteration)
        self._squares = 0.0
        self._seen = False

    def install(self, model: torch.nn.Module) -> None:
        assert isinstance(model, DistributedDataParallel)
        model.register_comm_hook(None, self._hook)

    # Unannotated: DDP compares the annotations with the classes themselves, and this module's
    # annotations are strings (`from __future__ import annotations`).
    def _hook(self, state, bucket):
        if self.measuring:
            self._squares += float(bucket.buffer().detach().double().pow(2).sum())
            self._seen = True
        return default_hooks.allreduce_hook(state, bucket)

    def take(self) -> float | None:
        """The norm since the last take (None if no gradient was all-reduced), and start afresh."""
        norm = math.sqrt(self._squares) if self._seen else None
        self._squares, self._seen = 0.0, False
        return norm


def parameter_checksum(model: torch.nn.Module) -> str:
    """CRC-32 of every parameter's bytes, in order: equal on two ranks exactly when their
    parameters are bitwise equal (up to a 1 in 4e9 collision)."""
    crc = 0
    for parameter in model.parameters():
        data = parameter.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        crc = zlib.crc32(data, crc)
    return f"{crc:08x}"
