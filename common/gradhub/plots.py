"""Figures of a run: learning curves against steps and wall time, staleness histograms.

matplotlib is imported on first use, with the Agg backend: figures are files, and
a server in a container has no display.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training(evals: Sequence[Mapping[str, Any]], path: Path, title: str) -> Path:
    """Test accuracy and loss (train and test) against steps and against wall time."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharey="row")
    steps = [e["version"] for e in evals]
    wall = [e["wall_seconds"] for e in evals]
    acc = [100 * e["test_accuracy"] for e in evals]
    test_loss = [e["test_loss"] for e in evals]
    train_loss = [e.get("train_loss") for e in evals]
    for column, (xs, label) in enumerate(((steps, "step (model version)"), (wall, "wall time (s)"))):
        ax = axes[0][column]
        ax.plot(xs, acc, marker=".", color="tab:green")
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax = axes[1][column]
        ax.plot(xs, test_loss, marker=".", label="test loss", color="tab:red")
        points = [(x, y) for x, y in zip(xs, train_loss) if y is not None]
        if points:
            ax.plot(*zip(*points), label="train loss (EMA)", color="tab:blue", alpha=0.8)
        ax.set_xlabel(label)
        ax.set_ylabel("cross-entropy")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_staleness(per_worker: Mapping[str, Mapping[int, int]], path: Path, title: str) -> Path:
    """Pushes by staleness, one bar group per staleness value, one bar per worker."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    values = sorted({s for hist in per_worker.values() for s in hist}) or [0]
    workers = list(per_worker)
    width = 0.8 / max(1, len(workers))
    for i, worker in enumerate(workers):
        counts = [per_worker[worker].get(s, 0) for s in values]
        ax.bar([v + (i - (len(workers) - 1) / 2) * width for v in values], counts, width,
               label=_short(worker))
    ax.set_xlabel("staleness (server versions between pull and apply)")
    ax.set_ylabel("pushes applied")
    ax.set_xticks(values)
    ax.grid(alpha=0.3, axis="y")
    if workers:
        ax.legend(fontsize="small")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _short(worker_id: str) -> str:
    return worker_id if len(worker_id) <= 24 else worker_id[:21] + "..."
