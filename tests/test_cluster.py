"""Whole clusters of real processes: Redis, a server and workers over real gRPC.

Workers are killed with real SIGKILL; the launcher gets a real SIGINT. Every test
checks that no process it started is left behind.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import psutil
import pytest
import torch

from conftest import Processes, small_config, wait_until
from gradhub.config import RunConfig
from gradhub.coordination import RunCoordinator
from gradhub.models import build_model
from gradhub.v1 import parameter_server_pb2 as pb
from gradhub.v1 import parameter_server_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration

SUMMARY_KEYS = {
    "mode", "workers", "steps", "model_parameters", "final_test_accuracy", "final_test_loss",
    "wall_seconds", "pushes_applied", "pushes_refused", "bytes_pushed", "bytes_pulled",
    "dense_bytes_equivalent", "staleness",
}


def processes_of(run_id: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if run_id in " ".join(proc.info["cmdline"] or []):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def gradhub(*args: str) -> list[str]:
    return [sys.executable, "-m", "gradhub_cli", *args]


@contextmanager
def launched(*args: str) -> Iterator[subprocess.Popen[str]]:
    """`gradhub run ARGS` in the background; killed at the end if still running."""
    launcher = subprocess.Popen(gradhub("run", "--no-progress", *args),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield launcher
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.communicate()


def wait_for_version(coordinator: RunCoordinator, version: int) -> None:
    wait_until(lambda: (coordinator.read_status() or {}).get("version", 0) >= version, 60,
               f"the run to reach version {version}")


def process_running(run_id: str, module: str) -> psutil.Process:
    return next(p for p in processes_of(run_id) if module in " ".join(p.cmdline()))


def server_status(address: str) -> pb.ServerStatus:
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.ParameterServerStub(channel).GetStatus(pb.GetStatusRequest(), timeout=5)


def start_cluster(
    processes: Processes, redis_url: str, config: RunConfig, out: Path, workers: int
) -> tuple[subprocess.Popen[bytes], list[subprocess.Popen[bytes]]]:
    """A server and `workers` workers as real processes; returns (server, workers)."""
    common = ["--redis-url", redis_url, "--run-id", config.run_id, "--torch-threads", "1"]
    server = processes.module("server", "gradhub_server", *common, "--out", str(out), "--drain-timeout", "5")
    return server, [
        processes.module(f"worker-{rank}", "gradhub_worker", *common, "--worker-id", f"worker-{rank}")
        for rank in range(workers)
    ]


@pytest.mark.timeout(120)
def test_a_worker_killed_in_sync_mode_leaves_the_barrier_within_its_lease(
    processes: Processes, redis_url: str, coordinator: RunCoordinator, run_id: str, tmp_path: Path
):
    lease = 1.0
    config = coordinator.publish_config(
        small_config(run_id, steps=1500, lease_seconds=lease, eval_every=500, lr=0.05)
    )
    out = tmp_path / "run"
    server, _ = start_cluster(processes, redis_url, config, out, workers=2)
    address = coordinator.wait_server(60)
    wait_until(lambda: server_status(address).version >= 100, 60, "the run to reach version 100")
    assert len(server_status(address).live_workers) == 2

    process_running(run_id, "worker-1").send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    version_at_kill = server_status(address).version
    wait_until(lambda: server_status(address).version >= version_at_kill + 5, 30,
               "the barrier to move on without the killed worker")
    moved_on_after = time.monotonic() - killed_at
    # The lease expires within `lease`; the server sees it within lease/6 more.
    assert moved_on_after < lease + 2.0, f"barrier stalled {moved_on_after:.2f}s after the kill"
    assert list(server_status(address).live_workers) == ["worker-0"]

    assert server.wait(timeout=90) == 0, processes.log("server")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 1500
    per_worker = summary["per_worker"]
    assert per_worker["worker-1"]["pushes_applied"] < per_worker["worker-0"]["pushes_applied"]
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("worker-1" in e.get("left", []) for e in events if e["event"] == "membership")


@pytest.mark.timeout(150)
def test_a_worker_that_joins_a_sync_run_midway_gets_a_rank_the_current_model_and_a_place_in_the_barrier(
    processes: Processes, redis_url: str, coordinator: RunCoordinator, run_id: str, tmp_path: Path
):
    config = coordinator.publish_config(small_config(run_id, workers=3, steps=1200, eval_every=400, lr=0.05))
    out = tmp_path / "run"
    server, early = start_cluster(processes, redis_url, config, out, workers=2)
    address = coordinator.wait_server(60)
    # Two of three planned workers: the barrier is over the live ones, so the run goes on.
    wait_until(lambda: server_status(address).version >= 200, 60, "the run to reach version 200 with 2 workers")
    common = ["--redis-url", redis_url, "--run-id", run_id, "--torch-threads", "1"]
    late = processes.module("worker-2", "gradhub_worker", *common, "--worker-id", "worker-2")
    wait_until(lambda: len(server_status(address).live_workers) == 3, 30, "the newcomer to join")
    joined_at = server_status(address).version

    assert server.wait(timeout=120) == 0, processes.log("server")
    for worker in (*early, late):
        assert worker.wait(timeout=30) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 1200
    per_worker = summary["per_worker"]
    assert per_worker["worker-2"]["rank"] == 2
    # The early workers pushed into every step; the newcomer into every step after it joined,
    # each computed on the current version (sync refuses anything else): it pulled the model.
    assert per_worker["worker-0"]["pushes_applied"] == per_worker["worker-1"]["pushes_applied"] == 1200
    assert 0 < per_worker["worker-2"]["pushes_applied"] <= 1200 - 200
    assert per_worker["worker-2"]["pushes_applied"] >= 1200 - joined_at - 1
    # At most its first push can lose the race with a step the server took before it saw the
    # newcomer's lease: refused as stale, kept in the residual, sent with the next one.
    assert per_worker["worker-2"]["refused_by_reason"] in ({}, {"StalePush": 1})
    assert per_worker["worker-2"]["staleness"]["max"] == 0


@pytest.mark.timeout(120)
def test_gradhub_run_trains_reports_and_leaves_nothing_behind(tmp_path: Path):
    out = tmp_path / "run"
    result = subprocess.run(
        gradhub("run", "--steps", "300", "--workers", "2", "--out", str(out), "--no-progress",
                "--run-id", "cli-e2e-" + tmp_path.name[-8:], "--eval-every", "50"),
        capture_output=True, text=True, timeout=110,
    )
    assert result.returncode == 0, result.stderr
    assert "test accuracy" in result.stdout and str(out) in result.stdout
    assert "metrics (Prometheus): http://127.0.0.1:" in result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) >= SUMMARY_KEYS
    assert summary["status"] == "finished" and summary["steps"] == 300
    assert summary["model_parameters"] == 5210
    assert summary["pushes_applied"] == 600 and summary["pushes_refused"] == 0
    # fp16 pushes: about half of what the same pushes would cost in dense fp32.
    assert 1.8 < summary["dense_bytes_equivalent"] / summary["bytes_pushed"] < 2.0
    assert summary["final_test_accuracy"] > 0.5  # 300 steps of 2 workers: well past chance (10%)
    assert set(summary["staleness"]) >= {"mean", "max", "histogram"}
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["version"] for e in evals if e["event"] == "eval"][:3] == [50, 100, 150]
    for name in ("training.png", "staleness.png", "config.json"):
        assert (out / name).stat().st_size > 0
    model = build_model("cnn")
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    # The embedded Redis, the server and the workers are gone, and so is Redis's folder.
    redis_line = next(line for line in result.stderr.splitlines() if "--redis-url" in line)
    socket_path = redis_line.split("unix://", 1)[1].strip()
    assert not Path(socket_path).parent.exists()
    assert processes_of(summary["run_id"]) == []
    assert [p for p in psutil.process_iter(["cmdline"]) if socket_path in " ".join(p.info["cmdline"] or [])] == []


@pytest.mark.timeout(120)
def test_ctrl_c_stops_every_process_and_keeps_partial_results(
    redis_url: str, coordinator: RunCoordinator, run_id: str, tmp_path: Path
):
    out = tmp_path / "run"
    with launched("--steps", "100000", "--out", str(out), "--redis-url", redis_url,
                  "--run-id", run_id) as launcher:
        wait_for_version(coordinator, 50)
        status = subprocess.run(gradhub("status", "--redis-url", redis_url, "--run-id", run_id),
                                capture_output=True, text=True, timeout=30)
        assert status.returncode == 0, status.stderr
        assert f"run {run_id} (sync): running" in status.stdout
        assert "live workers 2/2" in status.stdout
        assert "metrics http://127.0.0.1:" in status.stdout
        launcher.send_signal(signal.SIGINT)
        _, stderr = launcher.communicate(timeout=60)
    assert launcher.returncode == 130, stderr
    assert "interrupted" in stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and 50 <= summary["steps"] < 100000
    assert processes_of(run_id) == []
    assert (coordinator.read_status() or {}).get("state") == "interrupted"


@pytest.mark.timeout(120)
def test_sigterm_stops_every_process_including_the_embedded_redis(tmp_path: Path):
    out = tmp_path / "run"
    with launched("--steps", "100000", "--out", str(out), "--eval-every", "20") as launcher:
        wait_until(lambda: (out / "metrics.jsonl").exists() and '"event": "eval"' in
                   (out / "metrics.jsonl").read_text(), 60, "the run's first evaluation")
        children = psutil.Process(launcher.pid).children(recursive=True)
        assert any("redis-server" in " ".join(c.cmdline()) for c in children)
        launcher.send_signal(signal.SIGTERM)
        _, stderr = launcher.communicate(timeout=60)
    assert launcher.returncode == 130, stderr
    assert json.loads((out / "summary.json").read_text())["status"] == "interrupted"
    _, alive = psutil.wait_procs(children, timeout=10)
    assert alive == [], [p.cmdline() for p in alive]


@pytest.mark.timeout(150)
def test_gradhub_run_restarts_a_killed_worker_and_finishes(
    redis_url: str, coordinator: RunCoordinator, run_id: str, tmp_path: Path
):
    out = tmp_path / "run"
    with launched("--steps", "1200", "--out", str(out), "--redis-url", redis_url,
                  "--run-id", run_id, "--lease-seconds", "1") as launcher:
        wait_for_version(coordinator, 100)
        process_running(run_id, "gradhub_worker").send_signal(signal.SIGKILL)
        _, stderr = launcher.communicate(timeout=120)
    assert launcher.returncode == 0, stderr
    assert "exited with code -9; restarting (1/2)" in stderr, stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 1200, summary
    assert len(summary["per_worker"]) == 3, (summary["per_worker"], stderr)  # two originals, one replacement
    assert processes_of(run_id) == [], [p.info["cmdline"] for p in processes_of(run_id)]


@pytest.mark.timeout(120)
def test_a_server_that_dies_for_good_stops_the_whole_run(
    redis_url: str, coordinator: RunCoordinator, run_id: str, tmp_path: Path
):
    with launched("--steps", "100000", "--out", str(tmp_path / "run"), "--redis-url", redis_url,
                  "--run-id", run_id) as launcher:
        wait_for_version(coordinator, 20)
        process_running(run_id, "gradhub_server").send_signal(signal.SIGKILL)
        _, stderr = launcher.communicate(timeout=60)
    assert launcher.returncode == 1
    assert "the server exited with code -9" in stderr
    assert "serving run" in stderr  # the tail of the server's log is shown
    assert processes_of(run_id) == []


@pytest.mark.timeout(120)
def test_stopping_the_server_writes_results_and_workers_leave_promptly(
    processes: Processes, redis_url: str, coordinator: RunCoordinator, run_id: str, tmp_path: Path
):
    config = coordinator.publish_config(small_config(run_id, steps=100000, eval_every=50))
    out = tmp_path / "run"
    server, workers = start_cluster(processes, redis_url, config, out, workers=2)
    wait_for_version(coordinator, 50)
    server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=30) == 130, processes.log("server")
    stopped_at = time.monotonic()
    for worker in workers:
        # Workers would retry a vanished server for --give-up-after (60 s); a stopped run
        # is announced in Redis, so they leave at once, cleanly.
        assert worker.wait(timeout=30) == 0
    assert time.monotonic() - stopped_at < 15
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["steps"] >= 50
    assert coordinator.live_workers(2) == {}
