"""Coordination through a real Redis server: config once, ranks, leases, status."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest

from conftest import wait_until
from gradhub.config import RunConfig
from gradhub.coordination import RunCoordinator, connect, list_runs
from gradhub.errors import ConfigConflict, ConfigurationError, CoordinationError, NoFreeRank, RedisUnavailable
from gradhub.redis_server import EmbeddedRedis

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]


def test_config_is_written_once_and_read_by_everyone(coordinator: RunCoordinator, run_id: str, redis_url: str):
    config = RunConfig(run_id=run_id, mode="async", workers=3)
    assert coordinator.read_config() is None
    assert coordinator.publish_config(config) == config
    # A second writer with the same values is fine; another process reads the same thing.
    assert coordinator.publish_config(config) == config
    assert RunCoordinator(connect(redis_url), run_id).wait_config(1.0) == config
    with pytest.raises(ConfigConflict, match=r"workers: 3 -> 4"):
        coordinator.publish_config(replace(config, workers=4))
    assert run_id in list_runs(coordinator.client)


def test_ranks_are_distinct_and_bounded_by_world_size(coordinator: RunCoordinator):
    leases = [coordinator.try_register(f"w{i}", 3, lease_seconds=30) for i in range(3)]
    assert sorted(lease.rank for lease in leases if lease) == [0, 1, 2]
    assert len({lease.token for lease in leases if lease}) == 3
    assert coordinator.try_register("w3", 3, lease_seconds=30) is None
    with pytest.raises(NoFreeRank):
        coordinator.register("w3", 3, lease_seconds=30, timeout=0.3)
    assert coordinator.live_workers(3) == {"w0": 0, "w1": 1, "w2": 2}


def test_a_fixed_rank_is_taken_exactly_and_waits_for_its_holder(coordinator: RunCoordinator):
    """Kubernetes Indexed Job pods ask for their completion index: distinct pods, distinct ranks."""
    assert coordinator.try_register("pod-2", 3, lease_seconds=30, rank=2).rank == 2
    assert coordinator.try_register("pod-0", 3, lease_seconds=30, rank=0).rank == 0
    # A replacement for index 2 must not take another rank while the old pod's lease lives.
    assert coordinator.try_register("pod-2-restarted", 3, lease_seconds=30, rank=2) is None
    with pytest.raises(NoFreeRank, match="rank 2"):
        coordinator.register("pod-2-restarted", 3, lease_seconds=30, timeout=0.3, rank=2)
    with pytest.raises(ConfigurationError, match="rank 3 is outside"):
        coordinator.try_register("pod-3", 3, lease_seconds=30, rank=3)
    assert coordinator.live_workers(3) == {"pod-0": 0, "pod-2": 2}


def test_a_lease_that_is_not_renewed_expires_and_frees_its_rank(coordinator: RunCoordinator):
    dead = coordinator.try_register("dead", 1, lease_seconds=0.3)
    assert dead is not None and dead.rank == 0
    started = time.monotonic()
    lease = coordinator.register("newcomer", 1, lease_seconds=30, timeout=5)
    assert lease.rank == 0 and lease.token > dead.token
    assert time.monotonic() - started < 2.0
    # The dead worker cannot renew or release the newcomer's lease.
    assert not coordinator.renew(dead, 30)
    coordinator.release(dead)
    assert coordinator.live_workers(1) == {"newcomer": 0}


def test_renewal_keeps_a_lease_alive_past_its_length(coordinator: RunCoordinator):
    lease = coordinator.try_register("alive", 1, lease_seconds=0.4)
    assert lease is not None
    deadline = time.monotonic() + 1.2
    while time.monotonic() < deadline:  # renew every 0.1 s for three lease lengths
        assert coordinator.renew(lease, 0.4)
        time.sleep(0.1)
    assert coordinator.live_workers(1) == {"alive": 0}
    coordinator.release(lease)
    assert coordinator.live_workers(1) == {}


def test_status_round_trip(coordinator: RunCoordinator):
    coordinator.write_status({"version": 5, "state": "running"})
    assert coordinator.read_status() == {"version": 5, "state": "running"}


def test_a_dead_redis_is_a_clear_error_not_a_hang():
    server = EmbeddedRedis().start()
    coordinator = RunCoordinator(connect(server.url, timeout=1.0), "r")
    coordinator.ping()
    server.stop()
    started = time.monotonic()
    with pytest.raises(RedisUnavailable, match="Redis unavailable while trying to read the run config"):
        coordinator.read_config()
    assert time.monotonic() - started < 5


def test_embedded_redis_cleans_up_its_folder():
    server = EmbeddedRedis().start()
    folder = server.socket_path.parent
    assert folder.exists()
    server.stop()
    wait_until(lambda: not folder.exists(), 5, "the Redis folder to be removed")


def test_a_worker_that_registers_just_after_the_servers_refresh_is_known_on_its_first_push(
    coordinator: RunCoordinator,
):
    """The CI flake of stop 10: a push that arrived within a rate-limit window after a refresh
    that predated the worker's lease was refused as unknown, again and again."""
    from gradhub_server.membership import Membership

    membership = Membership(coordinator, world_size=2, refresh_interval=3600.0)
    membership.refresh()  # the view: nobody; the next periodic refresh is an hour away
    for attempt in range(20):
        worker_id = f"newcomer-{attempt}"
        lease = coordinator.try_register(worker_id, 2, lease_seconds=30)
        assert lease is not None
        assert membership.rank_of(worker_id) == lease.rank
        coordinator.release(lease)
        membership.refresh()
    assert membership.rank_of("never-registered") is None


def test_waiting_for_the_config_rides_out_redis_being_down_until_it_comes_back(
    run_id: str, caplog: pytest.LogCaptureFixture
):
    """A worker (re)started while Redis restarts waits for it, instead of exiting at once."""
    import threading

    server = EmbeddedRedis().start()
    try:
        coordinator = RunCoordinator(connect(server.url, timeout=1.0), run_id)
        server.kill()
        waited: list[object] = []
        waiter = threading.Thread(target=lambda: waited.append(coordinator.wait_config(30)))
        waiter.start()
        wait_until(lambda: "waiting up to 30s" in caplog.text, 10, "the waiter to find Redis down")
        server.start()
        config = coordinator.publish_config(RunConfig(run_id=run_id, workers=2))
        waiter.join(timeout=30)
        assert waited == [config]
        # And when it does not come back, the timeout names why.
        server.kill()
        with pytest.raises(CoordinationError, match=r"timed out after 1s .*Redis unavailable"):
            RunCoordinator(connect(server.url, timeout=0.2), "another-run").wait_config(1)
    finally:
        server.stop()
