"""regression: fit a noisy 1-D curve with an MLP and mean squared error."""

from __future__ import annotations

import torch
from torch import nn

from loopscope.engine.experiment import Experiment
from loopscope.scenarios._data import data_generator, loaders, split

ROWS, BATCH, NOISE = 1000, 32, 0.1


def curve(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(2.0 * x) + 0.3 * x


def make_data():
    gen = data_generator()
    x = torch.rand(ROWS, 1, generator=gen) * 4.0 - 2.0  # [-2, 2]: already unit scale
    y = curve(x) + torch.randn(ROWS, 1, generator=gen) * NOISE  # [N, 1] like the model's output
    return split(x, y, 800, gen)


def experiment() -> Experiment:
    x_train, y_train, x_val, y_val = make_data()
    train_loader, val_loader = loaders(x_train, y_train, x_val, y_val, batch_size=BATCH)
    model = nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
    return Experiment(
        name="regression",
        model=model,
        loss_fn=nn.MSELoss(),
        optimizer=torch.optim.Adam(model.parameters(), lr=0.01),
        train_loader=train_loader,
        val_loader=val_loader,
        epochs=30,
        task="regression",
    )
