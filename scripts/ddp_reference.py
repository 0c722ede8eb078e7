"""The reference a user would pick instead: PyTorch DDP over gloo, same model, data, recipe.

Trains the MNIST-1D CNN with N processes (each on its strided shard, batch 50 per
process) with the same optimizer and schedule as `gradhub run --mode sync`, and
prints wall time (process start excluded, like gradhub's `wall_seconds`) and test
accuracy as JSON. Rendezvous through a file: no TCP port is opened.

    .venv/bin/python scripts/ddp_reference.py --workers 2 --steps 3000
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from gradhub.data import load_dataset, shard_indices
from gradhub.models import build_model


def train(rank: int, args: argparse.Namespace, init_file: str, result_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=args.workers)
    data = load_dataset()
    torch.manual_seed(args.seed)
    model = DistributedDataParallel(build_model("cnn"))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    indices = shard_indices(len(data.y_train), rank, args.workers)
    x, y = data.x_train[indices], data.y_train[indices]
    generator = torch.Generator().manual_seed(args.seed * 7919 + rank)
    order = torch.randperm(len(y), generator=generator)
    position = 0
    dist.barrier()
    started = time.monotonic()
    for step in range(args.steps):
        factor = 1.0 if step < 0.75 * args.steps else 0.1
        for group in optimizer.param_groups:
            group["lr"] = args.lr * factor
        if position + args.batch_size > len(y):
            order, position = torch.randperm(len(y), generator=generator), 0
        batch = order[position : position + args.batch_size]
        position += args.batch_size
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        optimizer.step()
    dist.barrier()
    wall = time.monotonic() - started
    if rank == 0:
        with torch.no_grad():
            accuracy = (model.module(data.x_test).argmax(1) == data.y_test).float().mean().item()
        Path(result_file).write_text(json.dumps({
            "reference": f"DDP gloo x{args.workers}", "steps": args.steps, "wall_seconds": round(wall, 3),
            "ms_per_step": round(1000 * wall / args.steps, 3), "final_test_accuracy": accuracy,
        }))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    load_dataset()  # generate the cache once, before the processes start
    with tempfile.TemporaryDirectory() as folder:
        init_file, result_file = os.path.join(folder, "init"), os.path.join(folder, "result.json")
        mp.spawn(train, args=(args, init_file, result_file), nprocs=args.workers, join=True)
        print(Path(result_file).read_text())


if __name__ == "__main__":
    main()
