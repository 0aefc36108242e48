"""amp: the blobs data trained the way large models are: fp16 autocast with a GradScaler,
gradients accumulated over micro-batches, clipping. SGD, so a wrong gradient scale shows
(Adam divides by the gradients' own size and would hide it)."""

from __future__ import annotations

import torch
from torch import nn

from loopscope.engine.experiment import Experiment
from loopscope.scenarios._data import loaders
from loopscope.scenarios.blobs import FEATURES, make_data

MICRO_BATCH, ACCUMULATION = 10, 4  # an effective batch of 40


def experiment() -> Experiment:
    x_train, y_train, x_val, y_val = make_data()
    train_loader, val_loader = loaders(x_train, y_train, x_val, y_val, batch_size=MICRO_BATCH)
    model = nn.Sequential(
        nn.Linear(FEATURES, 16),
        nn.ReLU(),
        nn.Linear(16, 8),
        nn.ReLU(),
        nn.Linear(8, 1),
    )
    return Experiment(
        name="amp",
        model=model,
        loss_fn=nn.BCEWithLogitsLoss(),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.3),
        train_loader=train_loader,
        val_loader=val_loader,
        epochs=20,
        task="binary",
        clip_grad_norm=0.5,
        accumulation=ACCUMULATION,
        amp="fp16",
    )
