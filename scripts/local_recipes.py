"""Why the defaults are what they are: one process, no cluster, several seeds per recipe.

Trains the MNIST-1D CNN locally with each optimizer recipe (batch 100, 3000 steps, the
batch and steps of a 2-worker sync run) and prints the final test accuracy per seed.

    .venv/bin/python scripts/local_recipes.py --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from gradhub.data import load_dataset
from gradhub.models import build_model

RECIPES = {
    "adam lr 0.01, constant": ("adam", 0.01, "constant"),
    "sgd lr 0.1 momentum 0.9 wd 5e-4, constant": ("sgd", 0.1, "constant"),
    "sgd lr 0.1 momentum 0.9 wd 5e-4, step": ("sgd", 0.1, "step"),
}


def train(optimizer_name: str, lr: float, schedule: str, seed: int, steps: int, batch: int) -> float:
    data = load_dataset()
    torch.manual_seed(seed)
    model = build_model("cnn")
    if optimizer_name == "adam":
        optimizer: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        factor = 0.1 if schedule == "step" and step >= 0.75 * steps else 1.0
        for group in optimizer.param_groups:
            group["lr"] = lr * factor
        index = torch.randint(0, len(data.y_train), (batch,), generator=generator)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(data.x_train[index]), data.y_train[index]).backward()
        optimizer.step()
    with torch.no_grad():
        return (model(data.x_test).argmax(1) == data.y_test).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name, (optimizer_name, lr, schedule) in RECIPES.items():
        accs = [train(optimizer_name, lr, schedule, s, args.steps, args.batch_size) for s in args.seeds]
        print(f"{name}: " + ", ".join(f"{100 * a:.1f}" for a in accs)
              + f"  (min {100 * min(accs):.1f}, mean {100 * sum(accs) / len(accs):.1f})")


if __name__ == "__main__":
    main()
