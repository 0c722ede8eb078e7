"""Fixtures: a real Redis server, in-process parameter servers on port 0, real processes.

Nothing here mocks Redis or gRPC. Every process a test starts is tracked and
stopped at teardown (SIGTERM, then SIGKILL), also when the test fails.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import IO, Any

import pytest
import torch

from gradhub.config import RunConfig
from gradhub.coordination import RunCoordinator, connect
from gradhub.data import load_dataset
from gradhub.redis_server import EmbeddedRedis
from gradhub.retry import wait_for

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """One real redis-server for the session; each test uses its own run id (key prefix)."""
    with EmbeddedRedis() as server:
        yield server.url


@pytest.fixture(scope="session", autouse=True)
def dataset_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Generate MNIST-1D once into a session cache shared by every process a test starts."""
    cache = tmp_path_factory.mktemp("cache")
    os.environ["GRADHUB_CACHE_DIR"] = str(cache)
    load_dataset("mnist1d", cache)
    return cache


@pytest.fixture
def run_id() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def coordinator(redis_url: str, run_id: str) -> RunCoordinator:
    return RunCoordinator(connect(redis_url), run_id)


def small_config(run_id: str, **overrides: Any) -> RunConfig:
    """Deterministic settings: plain SGD, constant lr, lossless pushes."""
    base = RunConfig(
        run_id=run_id, mode="sync", workers=2, steps=1000, optimizer="sgd", lr=0.1,
        momentum=0.0, weight_decay=0.0, lr_schedule="constant", compression="none",
        seed=3, eval_every=1000, lease_seconds=30.0,
    )
    return replace(base, **overrides)


class Processes:
    """Real child processes, stopped at teardown whatever happened."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._procs: list[tuple[subprocess.Popen[bytes], IO[bytes]]] = []

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = (self.log_dir / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        self._procs.append((proc, log))
        return proc

    def module(self, name: str, module: str, *args: str) -> subprocess.Popen[bytes]:
        return self.start(name, [sys.executable, "-m", module, *args])

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        for proc, _ in self._procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, log in self._procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
            log.close()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    tracker = Processes(tmp_path)
    try:
        yield tracker
    finally:
        tracker.stop_all()


def wait_until(predicate: Any, timeout: float, what: str) -> Any:
    """Poll `predicate` until truthy (returned) or fail the test after `timeout` seconds."""
    return wait_for(lambda: predicate() or None, timeout, what)


def random_gradient(model: torch.nn.Module, seed: int) -> list[tuple[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(name, torch.randn(p.shape, generator=generator)) for name, p in model.named_parameters()]


class InProcessServer:
    """A ServerApp on 127.0.0.1:0 in this process, with helpers to act as workers."""

    def __init__(self, config: RunConfig, coordinator: RunCoordinator, out: Path, **settings: Any) -> None:
        from gradhub_server.app import ServerApp, ServerSettings

        self.config = coordinator.publish_config(config)
        self.coordinator = coordinator
        self.token = settings.get("auth_token")
        self.app = ServerApp(
            self.config, coordinator, ServerSettings(out=out, drain_timeout=0.0, metrics_interval=0.1, **settings)
        )
        self.address = self.app.start()
        self._clients: list[Any] = []
        self._leases: dict[str, Any] = {}

    def register(self, worker_id: str) -> int:
        lease = self.coordinator.try_register(worker_id, self.config.workers, lease_seconds=60)
        assert lease is not None, "no free rank"
        self._leases[worker_id] = lease
        self.app.membership.refresh()
        return lease.rank

    def leave(self, worker_id: str) -> None:
        """The worker's lease goes, as when it dies; the server's view follows at once."""
        self.coordinator.release(self._leases.pop(worker_id))
        self.app.membership.refresh()

    def client(self, worker_id: str) -> Any:
        from gradhub_worker.client import ParameterClient

        client = ParameterClient(
            self.address, self.config.run_id, worker_id, max_payload_bytes=1 << 26, token=self.token
        )
        self._clients.append(client)
        return client

    def parameters(self) -> list[torch.Tensor]:
        return self.app.store.versioned_parameters()[1]

    def close(self) -> None:
        for client in self._clients:
            client.close()
        self.app.stop()


@pytest.fixture
def serve(coordinator: RunCoordinator, tmp_path: Path) -> Iterator[Any]:
    servers: list[InProcessServer] = []

    def start(config: RunConfig, **settings: Any) -> InProcessServer:
        server = InProcessServer(config, coordinator, tmp_path / f"server-{len(servers)}", **settings)
        servers.append(server)
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.close()
