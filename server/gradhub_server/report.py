"""The run folder the server writes: metrics.jsonl as it goes, the rest at the end.

- `metrics.jsonl`   one JSON object per line: `start`, `eval` (every eval_every
                    versions), `metrics` (every second: the /metrics figures),
                    `membership` (workers joining or leaving), `end`
- `summary.json`    the run's figures (see `summary()` for the keys)
- `training.png`    test accuracy and loss against steps and wall time
- `staleness.png`   staleness histogram per worker
- `model.pt`        the final parameters as a PyTorch state_dict
                    (load with `torch.load(path, weights_only=True)`)
- `config.json`     the run configuration
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import IO, Any

import torch

from gradhub.config import RunConfig
from gradhub.plots import plot_staleness, plot_training

log = logging.getLogger(__name__)


class MetricsLog:
    """Appends records to metrics.jsonl (flushed per line) and keeps the eval records."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file: IO[str] = path.open("a", encoding="utf-8")
        self._lock = threading.Lock()
        self.evals: list[dict[str, Any]] = []

    def write(self, record: dict[str, Any]) -> None:
        with self._lock:
            if record.get("event") == "eval":
                self.evals.append(record)
            self._file.write(json.dumps(record, sort_keys=True) + "\n")
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()


def metrics_record(status: dict[str, Any], totals: dict[str, Any], wall_seconds: float) -> dict[str, Any]:
    """The `metrics` event: counters so far, per worker its staleness histogram, version lag
    and time held back (barrier or SSP)."""
    version = status["version"]
    return {
        "event": "metrics",
        "wall_seconds": round(wall_seconds, 3),
        "version": version,
        "updates_per_second": status["pushes_per_second"],
        "live_workers": len(status["live_workers"]),
        "pushes_applied": totals["pushes_applied"],
        "pushes_refused": totals["pushes_refused"],
        "pushes_dropped": totals["refused_by_reason"].get("LatePush", 0),
        "refused_by_reason": totals["refused_by_reason"],
        "wait_seconds": totals["wait_seconds"],
        "staleness_mean": totals["staleness"]["mean"],
        "staleness_max": totals["staleness"]["max"],
        "per_worker": {
            worker: {
                "rank": c["rank"],
                "pushes_applied": c["pushes_applied"],
                "pushes_refused": c["pushes_refused"],
                "version_lag": version - c["last_base_version"] if c["pushes_applied"] else None,
                "waits": c["waits"],
                "wait_seconds": c["wait_seconds"],
                "staleness": c["staleness"]["histogram"],
            }
            for worker, c in totals["workers"].items()
        },
    }


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def summary(
    config: RunConfig,
    status: str,
    version: int,
    model_parameters: int,
    final_eval: dict[str, Any] | None,
    wall_seconds: float,
    totals: dict[str, Any],
    policy: dict[str, Any] | None = None,
) -> dict[str, Any]:
    dense = totals["dense_bytes_equivalent"]
    pushed = totals["bytes_pushed"]
    return {
        "run_id": config.run_id,
        "status": status,
        "mode": config.mode,
        "workers": config.workers,
        "steps": version,
        "steps_planned": config.steps,
        "model": config.model,
        "model_parameters": model_parameters,
        "compression": config.compression,
        "optimizer": config.optimizer,
        "lr": config.lr,
        "batch_size": config.batch_size,
        "seed": config.seed,
        "final_test_accuracy": None if final_eval is None else final_eval["test_accuracy"],
        "final_test_loss": None if final_eval is None else final_eval["test_loss"],
        "wall_seconds": round(wall_seconds, 3),
        "pushes_applied": totals["pushes_applied"],
        "pushes_refused": totals["pushes_refused"],
        "pushes_after_finish": totals["pushes_after_finish"],
        "refused_by_reason": totals["refused_by_reason"],
        "bytes_pushed": pushed,
        "bytes_pulled": totals["bytes_pulled"],
        "dense_bytes_equivalent": dense,
        "compression_ratio": round(dense / pushed, 3) if pushed else None,
        "staleness": totals["staleness"],
        "wait_seconds": totals["wait_seconds"],
        "policy": policy or {"name": config.mode},
        "injected": {"staleness": config.inject_staleness, "delay": config.delay,
                     "slowdown": config.slowdown},
        "per_worker": totals["workers"],
    }


def write_run_folder(
    out: Path,
    config: RunConfig,
    summary_record: dict[str, Any],
    state_dict: dict[str, torch.Tensor],
    evals: list[dict[str, Any]],
    staleness: dict[str, dict[int, int]],
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch.save(state_dict, out / "model.pt")
    _atomic_write(out / "config.json", json.dumps(config.as_dict(), indent=2, sort_keys=True) + "\n")
    title = (
        f"gradhub {config.mode}, {config.workers} workers, {config.model}, "
        f"{config.compression} — run {config.run_id}"
    )
    try:
        if evals:
            plot_training(evals, out / "training.png", title)
        plot_staleness(staleness, out / "staleness.png", f"staleness — run {config.run_id}")
    except Exception:  # a plotting failure must not lose the summary
        log.exception("plotting failed")
    # Last: a summary.json on disk means the folder is complete.
    _atomic_write(out / "summary.json", json.dumps(summary_record, indent=2) + "\n")
