"""Helpers the built-in scenarios share: fixed datasets and the standard loaders."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset

# Each dataset is drawn from its own generator, so it is the same whatever --seed says; the
# seed governs what a seed governs in a real script: initial weights, shuffling and dropout.
DATA_SEED = 20261121


def data_generator() -> torch.Generator:
    return torch.Generator().manual_seed(DATA_SEED)


def split(x: torch.Tensor, y: torch.Tensor, n_train: int, generator: torch.Generator):
    """A random train/validation split of the rows."""
    order = torch.randperm(x.shape[0], generator=generator)
    train, val = order[:n_train], order[n_train:]
    return x[train], y[train], x[val], y[val]


def standardise(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Scale features to mean 0, std 1 using statistics of the training rows only."""
    mean, std = train.mean(dim=0), train.std(dim=0).clamp_min(1e-8)
    return [(t - mean) / std for t in (train, *others)]


def loaders(x_train, y_train, x_val, y_val, batch_size: int, val_batch_size: int = 100):
    """The classic pair: a shuffled training loader and an ordered validation loader."""
    train = DataLoader(TensorDataset(x_train, y_train), batch_size=batch_size, shuffle=True)
    val = DataLoader(TensorDataset(x_val, y_val), batch_size=val_batch_size, shuffle=False)
    return train, val
