"""blobs (the default): two overlapping Gaussian blobs in 10-D, a binary classifier."""

from __future__ import annotations

import torch
from torch import nn

from loopscope.engine.experiment import Experiment
from loopscope.scenarios._data import data_generator, loaders, split, standardise

ROWS, FEATURES, BATCH = 1000, 10, 10


def make_data():
    gen = data_generator()
    labels = torch.randint(0, 2, (ROWS,), generator=gen)
    centres = torch.randn(2, FEATURES, generator=gen) * 0.6
    x = centres[labels] + torch.randn(ROWS, FEATURES, generator=gen)
    y = labels.to(torch.float32).unsqueeze(1)  # [N, 1], the shape BCEWithLogitsLoss wants
    x_train, y_train, x_val, y_val = split(x, y, 800, gen)
    x_train, x_val = standardise(x_train, x_val)
    return x_train, y_train, x_val, y_val


def experiment() -> Experiment:
    x_train, y_train, x_val, y_val = make_data()
    train_loader, val_loader = loaders(x_train, y_train, x_val, y_val, batch_size=BATCH)
    model = nn.Sequential(
        nn.Linear(FEATURES, 16),
        nn.ReLU(),
        nn.Linear(16, 8),
        nn.ReLU(),
        nn.Linear(8, 1),
    )
    return Experiment(
        name="blobs",
        model=model,
        loss_fn=nn.BCEWithLogitsLoss(),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
        train_loader=train_loader,
        val_loader=val_loader,
        epochs=5,
        task="binary",
    )
