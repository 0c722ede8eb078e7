"""Redis restarts empty in the middle of a run (a crash without persistence): the server
writes the run's configuration back, workers re-register on their own ranks, the run goes on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import Processes, small_config, wait_until
from gradhub.coordination import RunCoordinator, connect
from gradhub.redis_server import EmbeddedRedis
from test_cluster import server_status, start_cluster

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def test_a_run_survives_redis_restarting_empty(processes: Processes, run_id: str, tmp_path: Path):
    redis = EmbeddedRedis().start()
    try:
        coordinator = RunCoordinator(connect(redis.url), run_id)
        config = coordinator.publish_config(
            small_config(run_id, steps=1500, eval_every=500, lease_seconds=2.0, lr=0.05))
        out = tmp_path / "run"
        server, workers = start_cluster(processes, redis.url, config, out, workers=2)
        address = coordinator.wait_server(60)
        wait_until(lambda: server_status(address).version >= 200, 60, "the run to reach version 200")
        ranks_before = coordinator.live_workers(2)

        redis.kill()
        # Redis is gone: training goes on (the server keeps its last view of membership).
        down_at = server_status(address).version
        wait_until(lambda: server_status(address).version >= down_at + 100, 30, "steps while Redis is down")
        redis.start()  # empty: no config, no leases, no status

        wait_until(lambda: coordinator.read_config() == config, 20, "the server to write the config back")
        wait_until(lambda: coordinator.live_workers(2) == ranks_before, 30, "workers back on their own ranks")
        assert server.wait(timeout=120) == 0, processes.log("server")
        for rank, worker in enumerate(workers):
            assert worker.wait(timeout=30) == 0, processes.log(f"worker-{rank}")
        summary = json.loads((out / "summary.json").read_text())
        assert summary["status"] == "finished" and summary["steps"] == 1500
        assert "configuration written again" in processes.log("server")
    finally:
        redis.stop()
