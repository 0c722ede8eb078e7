"""Coordination of a run through Redis: configuration, server address, membership, status.

Keys of run R live under `gradhub:R:`:

- `config`            the RunConfig as JSON, written once (SET NX) and read by everyone
- `server`            the server's address, with a TTL the server keeps renewing
- `rank:<r>`          the worker id holding rank r: a lease (PX) renewed by that worker only
- `fence`             a counter: each registration gets a larger fencing token
- `status`            the server's latest status as JSON, for `gradhub status`

and `gradhub:runs` is a sorted set of run ids by creation time. A killed worker stops
renewing, so its rank key expires within the lease time and it leaves the run.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gradhub.config import RunConfig
from gradhub.errors import ConfigConflict, ConfigurationError, CoordinationError, NoFreeRank, RedisUnavailable
from gradhub.retry import Backoff, wait_for

log = logging.getLogger(__name__)

RUNS_KEY = "gradhub:runs"
#: How long one Redis command may take before it counts as unavailable.
REDIS_SOCKET_TIMEOUT_S = 5.0

T = TypeVar("T")

# Renew only our own lease: a worker whose lease expired and was taken by another must not
# extend the newcomer's.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def connect(url: str, timeout: float = REDIS_SOCKET_TIMEOUT_S) -> redis.Redis:
    """A client for `url` (redis://host:port/db or unix:///path.sock) with explicit timeouts."""
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        decode_responses=True,
    )


@dataclass(frozen=True)
class Lease:
    """A worker's membership: its rank, and a fencing token larger than any before it."""

    worker_id: str
    rank: int
    token: int


class RunCoordinator:
    def __init__(self, client: redis.Redis, run_id: str) -> None:
        self.client = client
        self.run_id = run_id
        self._prefix = f"gradhub:{run_id}:"
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    @classmethod
    def from_url(cls, url: str, run_id: str) -> RunCoordinator:
        return cls(connect(url), run_id)

    def key(self, name: str) -> str:
        return self._prefix + name

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise RedisUnavailable(f"Redis unavailable while trying to {what}: {exc}") from exc
        except RedisError as exc:
            raise CoordinationError(f"Redis refused to {what}: {exc}") from exc

    def ping(self) -> bool:
        return bool(self._call("ping", self.client.ping))

    # --- configuration --------------------------------------------------------------------

    def publish_config(self, config: RunConfig) -> RunConfig:
        """Write the run's configuration once; a second writer must agree with the first."""
        if config.run_id != self.run_id:
            raise CoordinationError(f"config of run {config.run_id} given to run {self.run_id}")
        text = config.to_json()
        created = self._call("write the run config", lambda: self.client.set(self.key("config"), text, nx=True))
        if created:
            self._call("index the run", lambda: self.client.zadd(RUNS_KEY, {self.run_id: time.time()}))
            return config
        existing = self.read_config()
        if existing is None:  # deleted between SET NX and GET: nothing sane to do
            raise ConfigConflict(f"run {self.run_id}: config vanished while being written")
        if existing != config:
            raise ConfigConflict(
                f"run {self.run_id} already has a different configuration: "
                f"{_diff(existing, config)}"
            )
        return existing

    def restore_config(self, config: RunConfig) -> bool:
        """Write the config again if Redis lost it (a restart without persistence); one SET NX.

        True when it had to be written.
        """
        created = self._call("restore the run config",
                             lambda: self.client.set(self.key("config"), config.to_json(), nx=True))
        if created:
            self._call("index the run", lambda: self.client.zadd(RUNS_KEY, {self.run_id: time.time()}))
        return bool(created)

    def read_config(self) -> RunConfig | None:
        text = self._call("read the run config", lambda: self.client.get(self.key("config")))
        return None if text is None else RunConfig.from_json(str(text))

    def _wait(
        self, probe: Callable[[], T | None], timeout: float, what: str,
        on_timeout: Callable[[str], Exception], backoff: Backoff | None = None,
    ) -> T:
        """wait_for, riding out Redis being down (restarting, or not up yet when a cluster
        starts) until the timeout: the timeout's error then names the last Redis error."""
        last: list[RedisUnavailable] = []

        def attempt() -> T | None:
            try:
                return probe()
            except RedisUnavailable as exc:
                if not last:
                    log.warning("%s; waiting up to %gs for it", exc, timeout)
                last[:] = [exc]
                return None

        def timed_out(message: str) -> Exception:
            return on_timeout(f"{message} ({last[0]})" if last else message)

        return wait_for(attempt, timeout, what, backoff=backoff, on_timeout=timed_out)

    def wait_config(self, timeout: float) -> RunConfig:
        return self._wait(
            self.read_config, timeout, f"the configuration of run {self.run_id}", on_timeout=CoordinationError
        )

    # --- server address ------------------------------------------------------------------

    def publish_server(self, address: str, ttl: float) -> None:
        self._call(
            "publish the server address",
            lambda: self.client.set(self.key("server"), address, px=int(ttl * 1000)),
        )

    def server_address(self) -> str | None:
        value = self._call("read the server address", lambda: self.client.get(self.key("server")))
        return None if value is None else str(value)

    def wait_server(self, timeout: float) -> str:
        return self._wait(
            self.server_address, timeout, f"the server of run {self.run_id}", on_timeout=CoordinationError
        )

    # --- membership ----------------------------------------------------------------------

    def try_register(
        self, worker_id: str, world_size: int, lease_seconds: float, rank: int | None = None
    ) -> Lease | None:
        """Take the lowest free rank (or exactly `rank`), or return None when none is free.

        A fixed rank is how orchestrators that number their workers (a Kubernetes Indexed
        Job's completion index) keep a restarted worker on its own rank and data shard.
        """
        if rank is not None and not 0 <= rank < world_size:
            raise ConfigurationError(f"rank {rank} is outside the run's {world_size} workers (0..{world_size - 1})")
        lease_ms = int(lease_seconds * 1000)
        for candidate in range(world_size) if rank is None else (rank,):
            key = self.key(f"rank:{candidate}")
            taken = self._call(
                "claim a rank", functools.partial(self.client.set, key, worker_id, nx=True, px=lease_ms)
            )
            if taken:
                token = int(self._call("take a fencing token", lambda: self.client.incr(self.key("fence"))))
                return Lease(worker_id=worker_id, rank=candidate, token=token)
        return None

    def register(
        self, worker_id: str, world_size: int, lease_seconds: float, timeout: float, rank: int | None = None
    ) -> Lease:
        """Take the lowest free rank (or `rank`), waiting up to `timeout` for a dead worker's lease to expire."""
        wanted = f"rank {rank}" if rank is not None else f"a free rank among {world_size}"
        return self._wait(
            lambda: self.try_register(worker_id, world_size, lease_seconds, rank),
            timeout,
            f"{wanted} in run {self.run_id}",
            backoff=Backoff(initial=0.05, maximum=min(1.0, lease_seconds / 2)),
            on_timeout=NoFreeRank,
        )

    def renew(self, lease: Lease, lease_seconds: float) -> bool:
        """Extend the lease; False when it expired or another worker holds the rank now."""
        key = self.key(f"rank:{lease.rank}")
        result = self._call(
            "renew a lease",
            lambda: self._renew(keys=[key], args=[lease.worker_id, int(lease_seconds * 1000)]),
        )
        return bool(result)

    def release(self, lease: Lease) -> None:
        key = self.key(f"rank:{lease.rank}")
        self._call("release a lease", lambda: self._release(keys=[key], args=[lease.worker_id]))

    def live_workers(self, world_size: int) -> dict[str, int]:
        """worker id -> rank, for every rank whose lease has not expired."""
        keys = [self.key(f"rank:{rank}") for rank in range(world_size)]
        values = self._call("read membership", lambda: self.client.mget(keys))
        return {str(worker): rank for rank, worker in enumerate(values) if worker is not None}

    # --- status --------------------------------------------------------------------------

    def write_status(self, status: dict[str, Any]) -> None:
        text = json.dumps(status, sort_keys=True)
        self._call("write the run status", lambda: self.client.set(self.key("status"), text))

    def read_status(self) -> dict[str, Any] | None:
        text = self._call("read the run status", lambda: self.client.get(self.key("status")))
        return None if text is None else dict(json.loads(str(text)))

    def report_diverged(self, worker_id: str, version: int, reason: str) -> None:
        """A worker saw training diverge (its gradients stay non-finite); the first report
        stands. The server ends the run with status `diverged`."""
        text = json.dumps({"worker_id": worker_id, "version": version, "reason": reason})
        self._call("report divergence", lambda: self.client.set(self.key("diverged"), text, nx=True))

    def read_diverged(self) -> dict[str, Any] | None:
        text = self._call("read divergence", lambda: self.client.get(self.key("diverged")))
        return None if text is None else dict(json.loads(str(text)))


def list_runs(client: redis.Redis) -> list[str]:
    """Run ids known to this Redis, newest first."""
    try:
        return [str(r) for r in client.zrevrange(RUNS_KEY, 0, -1)]
    except (RedisConnectionError, RedisTimeoutError) as exc:
        raise RedisUnavailable(f"Redis unavailable while listing runs: {exc}") from exc


def _diff(old: RunConfig, new: RunConfig) -> str:
    a, b = old.as_dict(), new.as_dict()
    changed = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return ", ".join(changed)
