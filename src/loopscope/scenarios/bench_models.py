"""The reference models (synthetic data, generated locally): the three `loopscope bench` times (a small
MLP, a wide MLP with Adam and a CNN), and the MLP with Adam whose speed `devtools.screen_rate` counts
on the app's screen. Experiments like the scenarios, so the engine process builds them by name
without loading the command-line tools."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from loopscope.engine.experiment import Experiment

BATCH = 64  # the CPU reference; on a GPU the reference is batch 256 (`--batch`)
GPU_BATCH = 256


def reference_experiment(name: str, batch: int = BATCH) -> Experiment:
    """`name`'s model, optimizer and 4096 random examples, batch `batch`, for 10,000 epochs."""
    g = torch.Generator().manual_seed(0)
    if name == "cnn":
        x = torch.randn(4096, 3, 32, 32, generator=g)
        model = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 8 * 8, 128),
            nn.ReLU(),
            nn.Linear(128, 10),
        )
        optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    elif name == "wide_mlp":
        x = torch.randn(4096, 512, generator=g)
        model = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    elif name == "adam_mlp":  # issue 17's model: ~1 ms an iteration on a 2-core CPU
        x = torch.randn(4096, 64, generator=g)
        model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    else:
        x = torch.randn(4096, 64, generator=g)
        model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    y = torch.randint(0, 10, (x.shape[0],), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True, drop_last=True)
    return Experiment(
        model=model, loss_fn=nn.CrossEntropyLoss(), optimizer=optimizer, train_loader=loader, epochs=10_000, name=name
    )


def mlp_experiment():
    return reference_experiment("mlp")


def wide_mlp_experiment():
    return reference_experiment("wide_mlp")


def adam_mlp_experiment():
    return reference_experiment("adam_mlp")


def cnn_experiment():
    return reference_experiment("cnn")


MODELS = {"mlp": mlp_experiment, "wide_mlp": wide_mlp_experiment, "cnn": cnn_experiment}
