"""`gradhub status`: what a run is doing, read from Redis by anyone who can reach it."""

from __future__ import annotations

import json
import time
from typing import Any

from gradhub.coordination import RunCoordinator, connect, list_runs
from gradhub.errors import CoordinationError

#: A running server rewrites its status every 0.5 s; older than this, it is not reporting.
STALE_AFTER_S = 5.0


def read_status(redis_url: str, run_id: str | None) -> dict[str, Any]:
    client = connect(redis_url)
    if run_id is None:
        runs = list_runs(client)
        if not runs:
            raise CoordinationError(f"no runs in Redis at {redis_url}")
        run_id = runs[0]
    coordinator = RunCoordinator(client, run_id)
    config = coordinator.read_config()
    if config is None:
        raise CoordinationError(f"no run {run_id!r} in Redis at {redis_url}")
    status = coordinator.read_status() or {"run_id": run_id, "state": "starting", "version": 0,
                                           "steps": config.steps, "mode": config.mode}
    status["workers_planned"] = config.workers
    status["registered_workers"] = coordinator.live_workers(config.workers)
    updated = status.get("updated_at")
    status["seconds_since_update"] = None if updated is None else round(time.time() - updated, 1)
    return status


def format_status_report(status: dict[str, Any]) -> str:
    lines = [
        f"run {status['run_id']} ({status.get('mode')}): {status.get('state')}, "
        f"version {status.get('version')}/{status.get('steps')}",
    ]
    age = status.get("seconds_since_update")
    if status.get("state") == "running" and age is not None and age > STALE_AFTER_S:
        lines.append(f"  warning: the server has not reported for {age:.0f}s (dead or stuck?)")
    acc = status.get("test_accuracy")
    if acc is not None:
        lines.append(f"  test accuracy {100 * acc:.2f}% (version {status.get('eval_version')}), "
                     f"test loss {status.get('test_loss'):.4f}")
    loss = status.get("train_loss")
    if loss is not None:
        lines.append(f"  train loss {loss:.4f}")
    lines.append(
        f"  pushes applied {status.get('pushes_applied', 0)}, refused {status.get('pushes_refused', 0)}, "
        f"{status.get('pushes_per_second', 0):.0f} pushes/s; staleness mean "
        f"{status.get('staleness_mean', 0):.2f}, max {status.get('staleness_max', 0)}"
    )
    if status.get("metrics_url"):
        lines.append(f"  metrics {status['metrics_url']}")
    live = status.get("live_workers", [])
    lines.append(f"  live workers {len(live)}/{status.get('workers_planned')}:")
    for worker in live:
        lag = worker.get("lag")
        lines.append(f"    rank {worker['rank']}: {worker['worker_id']}  pushes {worker['pushes_applied']}"
                     f"  lag {'-' if lag is None else lag}")
    return "\n".join(lines)


def to_json(status: dict[str, Any]) -> str:
    return json.dumps(status, indent=2, sort_keys=True)
