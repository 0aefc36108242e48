"""The wide MLP of `loopscope bench`, written as a plain training script: what `bench` times as
`python script.py` and under loopscope's script mode. It times its own iterations (after a warm-up)
and appends the seconds per iteration to the file named by its first argument, if one is given.

    python wide_mlp_script.py [TIMES_FILE] [ITERATIONS]
"""

import sys
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

WARM_UP = 10


def main() -> None:
    times_file = sys.argv[1] if len(sys.argv) > 1 else None
    iterations = int(sys.argv[2]) if len(sys.argv) > 2 else 200
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 512, generator=g)
    y = torch.randint(0, 10, (4096,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True, drop_last=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    done, started = 0, 0.0
    while done < WARM_UP + iterations:
        for inputs, targets in loader:
            optimizer.zero_grad()
            loss = loss_fn(model(inputs), targets)
            loss.backward()
            optimizer.step()
            done += 1
            if done == WARM_UP:
                started = time.perf_counter()
            if done == WARM_UP + iterations:
                break
    seconds = (time.perf_counter() - started) / iterations
    print(f"final loss {loss.item():.6f}, {seconds * 1000:.3f} ms/it")
    if times_file:
        with open(times_file, "a") as out:
            out.write(f"{seconds}\n")


if __name__ == "__main__":
    main()
