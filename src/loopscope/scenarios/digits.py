"""digits: 8x8 images of the digits 0-9, drawn here from a 5x7 font, and a small CNN."""

from __future__ import annotations

import torch
from torch import nn

from loopscope.engine.experiment import Experiment
from loopscope.scenarios._data import data_generator, loaders, split

# A 5x7 bitmap font; each image places one glyph somewhere in an 8x8 frame, with noise.
FONT = {
    0: "01110 10001 10011 10101 11001 10001 01110",
    1: "00100 01100 00100 00100 00100 00100 01110",
    2: "01110 10001 00001 00010 00100 01000 11111",
    3: "11111 00010 00100 00010 00001 10001 01110",
    4: "00010 00110 01010 10010 11111 00010 00010",
    5: "11111 10000 11110 00001 00001 10001 01110",
    6: "00110 01000 10000 11110 10001 10001 01110",
    7: "11111 00001 00010 00100 01000 01000 01000",
    8: "01110 10001 10001 01110 10001 10001 01110",
    9: "01110 10001 10001 01111 00001 00010 01100",
}
IMAGES, BATCH, NOISE = 2400, 32, 0.25


def glyphs() -> torch.Tensor:
    rows = [[[float(c) for c in row] for row in FONT[d].split()] for d in range(10)]
    return torch.tensor(rows)  # [10, 7, 5]


def make_data():
    gen = data_generator()
    font = glyphs()
    labels = torch.randint(0, 10, (IMAGES,), generator=gen)
    images = torch.zeros(IMAGES, 1, 8, 8)
    dx = torch.randint(0, 4, (IMAGES,), generator=gen)
    dy = torch.randint(0, 2, (IMAGES,), generator=gen)
    ink = 0.6 + 0.4 * torch.rand(IMAGES, generator=gen)
    for i in range(IMAGES):
        y0, x0 = int(dy[i]), int(dx[i])
        images[i, 0, y0 : y0 + 7, x0 : x0 + 5] = font[labels[i]] * ink[i]
    images += torch.randn(images.shape, generator=gen) * NOISE
    images = (images - 0.3) / 0.5  # roughly mean 0, std 1
    return split(images, labels, 2000, gen)


def experiment() -> Experiment:
    x_train, y_train, x_val, y_val = make_data()
    train_loader, val_loader = loaders(x_train, y_train, x_val, y_val, batch_size=BATCH)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 2 * 2, 10),
    )
    return Experiment(
        name="digits",
        model=model,
        loss_fn=nn.CrossEntropyLoss(),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        train_loader=train_loader,
        val_loader=val_loader,
        epochs=5,
        task="classification",
    )
