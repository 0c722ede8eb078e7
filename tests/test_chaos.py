"""Seeded chaos: workers, the server and Redis are killed (SIGKILL) and restarted at random
points of a run. Nothing may hang, nothing acknowledged may be lost, nothing applied twice.

What a worker was told is read from its acknowledgement log (written as each answer
arrives, so it survives the kill); what the model holds is read from the server's update
journal (kept whole with --keep-journal): every version and the pushes it carried. An
acknowledged push missing from the journal is lost; one that appears twice was doubled.

The seed is GRADHUB_CHAOS_SEED (default below); the schedule (which component, at which
version) follows from it, so a failing seed can be run again.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
from collections import Counter
from pathlib import Path

import grpc
import pytest

from conftest import Processes, small_config, wait_until
from gradhub.coordination import RunCoordinator, connect
from gradhub.errors import CoordinationError
from gradhub.models import build_model
from gradhub.redis_server import EmbeddedRedis
from gradhub_server.journal import UpdateJournal
from test_cluster import server_status

pytestmark = [pytest.mark.integration, pytest.mark.chaos, pytest.mark.timeout(420)]

SEED = int(os.environ.get("GRADHUB_CHAOS_SEED", "20261122"))
STEPS = 6000  # room for every fault: the faster hot path finished 4,000 before the last one
WORKERS = 3
#: A component that makes no progress for this long after a fault counts as hung.
RECOVERY_S = 60.0


class Cluster:
    """The run's processes, restartable, each life with its own log and acknowledgement log."""

    def __init__(self, processes: Processes, redis: EmbeddedRedis, run_id: str, tmp_path: Path) -> None:
        self.processes = processes
        self.redis = redis
        self.coordinator = RunCoordinator(connect(redis.url), run_id)
        self.out = tmp_path / "run"
        self.acks = tmp_path / "acks"
        self.common = ["--redis-url", redis.url, "--run-id", run_id, "--torch-threads", "1"]
        self.lives: Counter[str] = Counter()
        self.server: subprocess.Popen[bytes] | None = None
        self.address = ""
        self.workers: dict[int, subprocess.Popen[bytes]] = {}

    def _name(self, role: str) -> str:
        self.lives[role] += 1
        return f"{role}-life{self.lives[role]}"

    def start_server(self) -> None:
        before = self.address
        self.server = self.processes.module(
            self._name("server"), "gradhub_server", *self.common, "--out", str(self.out),
            "--drain-timeout", "5", "--checkpoint-every", "300", "--keep-journal",
        )
        self.address = wait_until(
            lambda: (address := self._published_address()) not in (None, before) and address,
            RECOVERY_S, "the server to publish its address",
        )

    def _published_address(self) -> str | None:
        try:
            return self.coordinator.server_address()
        except CoordinationError:
            return None

    def start_worker(self, rank: int) -> None:
        name = self._name(f"worker-{rank}")
        self.workers[rank] = self.processes.module(
            name, "gradhub_worker", *self.common, "--worker-id", f"worker-{rank}", "--rank", str(rank),
            "--ack-log", str(self.acks / f"{name}.jsonl"), "--give-up-after", "90",
        )

    def ended(self) -> bool:
        return self.server is not None and self.server.poll() is not None

    def version(self) -> int:
        try:
            return server_status(self.address).version
        except grpc.RpcError:
            return -1


def kill(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)


def test_chaos_kills_nothing_acknowledged_and_hangs_nowhere(processes: Processes, run_id: str, tmp_path: Path):
    rng = random.Random(SEED)
    redis = EmbeddedRedis().start()
    try:
        cluster = Cluster(processes, redis, run_id, tmp_path)
        config = cluster.coordinator.publish_config(
            small_config(run_id, mode="async", workers=WORKERS, steps=STEPS, eval_every=1000,
                         lease_seconds=2.0, lr=0.05))
        cluster.start_server()
        for rank in range(WORKERS):
            cluster.start_worker(rank)

        faults: Counter[str] = Counter()
        hangs: list[str] = []

        def progressed(beyond: int, what: str) -> bool:
            try:
                wait_until(lambda: cluster.version() > beyond, RECOVERY_S, what)
                return True
            except TimeoutError:
                hangs.append(f"{what} (stuck at version {beyond})")
                return False

        # Every kind of fault, in a seeded order, each at a seeded version.
        schedule = ["worker"] * 3 + ["server"] * 3 + ["redis"] * 2
        rng.shuffle(schedule)
        for kind in schedule:
            at = cluster.version() + rng.randint(100, 300)
            if at > 0.85 * STEPS or not progressed(at - 1, f"the run to reach version {at}"):
                break
            faults[kind] += 1
            if kind == "worker":
                rank = rng.randrange(WORKERS)
                kill(cluster.workers[rank])
                cluster.start_worker(rank)  # the same id and rank: it waits out its old lease
                progressed(cluster.version(), f"training after worker {rank} was killed")
            elif kind == "server":
                assert cluster.server is not None
                kill(cluster.server)
                cluster.start_server()  # from its newest checkpoint and the journal after it
                progressed(at, "training after the server was killed")
            else:
                redis.kill()
                down_for = rng.randint(20, 120)  # versions trained while Redis is down
                progressed(cluster.version() + down_for, "training while Redis is down")
                redis.start()  # empty: no config, leases, status or address
                # (Unless the run ended meanwhile: then nobody comes back, rightly.)
                wait_until(lambda: cluster.ended() or cluster.coordinator.read_config() == config,
                           RECOVERY_S, "the server to write the configuration back")
                wait_until(lambda: cluster.ended() or len(cluster.coordinator.live_workers(WORKERS)) == WORKERS,
                           RECOVERY_S, "every worker to re-register")

        assert cluster.server is not None
        try:
            server_exit = cluster.server.wait(timeout=180)
        except subprocess.TimeoutExpired:
            hangs.append("the server did not end the run")
            server_exit = None
        for rank, worker in cluster.workers.items():
            try:
                assert worker.wait(timeout=60) == 0, processes.log(f"worker-{rank}-life{cluster.lives[f'worker-{rank}']}")
            except subprocess.TimeoutExpired:
                hangs.append(f"worker {rank} did not exit after the run")

        acknowledged = set()
        for path in sorted(cluster.acks.glob("*.jsonl")):
            for line in path.read_text().splitlines():
                ack = json.loads(line)
                acknowledged.add((ack["worker_id"], ack["seq"]))
        shapes = [p.shape for p in build_model(config.model, config.model_kwargs).parameters()]
        records = list(UpdateJournal(cluster.out / "journal").records_after(0, shapes))
        applied = [(p.worker_id, p.seq) for record in records for p in record.pushes]
        lost = acknowledged - set(applied)
        doubled = len(applied) - len(set(applied))
        summary = json.loads((cluster.out / "summary.json").read_text())
        print(
            f"\nchaos seed {SEED}: faults injected {sum(faults.values())} ({dict(faults)}); "
            f"updates acknowledged {len(acknowledged)}; updates applied {len(applied)}; "
            f"hangs {len(hangs)}; acknowledged updates lost {len(lost)}; applied twice {doubled}; "
            f"run {summary['status']} at version {summary['steps']}, "
            f"test accuracy {summary['final_test_accuracy']:.3f}"
        )
        assert hangs == []
        assert server_exit == 0
        assert faults == Counter(schedule), "the run ended before every fault was injected"
        assert summary["status"] == "finished" and summary["steps"] == STEPS
        assert [r.version for r in records] == list(range(1, STEPS + 1))  # every version journaled once
        assert lost == set() and doubled == 0
        # The server's counters went through every restart: they count the journal's pushes.
        assert summary["pushes_applied"] == len(applied)
        assert summary["versions_lost"] == 0
    finally:
        redis.stop()
