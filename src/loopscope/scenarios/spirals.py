"""spirals: three interleaved spirals in 2-D, trained with the careful practitioner's loop."""

from __future__ import annotations

import math

import torch
from torch import nn

from loopscope.engine.experiment import Experiment
from loopscope.scenarios._data import data_generator, loaders, split

CLASSES, PER_CLASS, BATCH = 3, 300, 32


def make_data():
    gen = data_generator()
    xs, ys = [], []
    for label in range(CLASSES):
        radius = torch.linspace(0.05, 1.0, PER_CLASS)
        angle = radius * 4.0 + label * 2 * math.pi / CLASSES + torch.randn(PER_CLASS, generator=gen) * 0.2
        xs.append(torch.stack([radius * torch.sin(angle), radius * torch.cos(angle)], dim=1))
        ys.append(torch.full((PER_CLASS,), label, dtype=torch.int64))
    x = torch.cat(xs)
    x = (x + torch.randn(x.shape, generator=gen) * 0.06) * 2.0  # roughly unit scale: no normalisation needed
    y = torch.cat(ys)
    return split(x, y, 720, gen)


def experiment() -> Experiment:
    x_train, y_train, x_val, y_val = make_data()
    train_loader, val_loader = loaders(x_train, y_train, x_val, y_val, batch_size=BATCH)
    model = nn.Sequential(
        nn.Linear(2, 64),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Linear(64, 64),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Linear(64, CLASSES),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    return Experiment(
        name="spirals",
        model=model,
        loss_fn=nn.CrossEntropyLoss(),
        optimizer=optimizer,
        train_loader=train_loader,
        val_loader=val_loader,
        epochs=40,
        task="classification",
        clip_grad_norm=1.0,
        scheduler=torch.optim.lr_scheduler.StepLR(optimizer, step_size=15, gamma=0.5),
        checkpoint=True,
        early_stopping_patience=8,
    )
