"""The server's view of who is alive, refreshed from the leases in Redis.

A background thread reads the rank leases every `refresh_interval` and tells
subscribers when the set changes, so a sync barrier stops waiting for a worker
within (lease time + refresh interval) of its death. A push from a worker the
view does not know triggers a refresh that starts after the push arrived (it
may have just joined), so a worker is refused as unknown only when Redis held no
lease for it at some moment after it sent the push. Concurrent misses share one
refresh.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from gradhub.coordination import RunCoordinator
from gradhub.errors import CoordinationError

log = logging.getLogger(__name__)


class Membership:
    def __init__(
        self,
        coordinator: RunCoordinator,
        world_size: int,
        refresh_interval: float,
    ) -> None:
        self._coordinator = coordinator
        self._world_size = world_size
        self._interval = refresh_interval
        self._lock = threading.Lock()
        self._refreshing = threading.Lock()
        self._live: dict[str, int] = {}
        self._refresh_started = float("-inf")  # of the last refresh that succeeded
        self._subscribers: list[Callable[[dict[str, int], dict[str, int]], None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="membership", daemon=True)

    def subscribe(self, callback: Callable[[dict[str, int], dict[str, int]], None]) -> None:
        """callback(old, new) runs on the refresh thread after every change."""
        self._subscribers.append(callback)

    def start(self) -> None:
        self.refresh()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def live(self) -> dict[str, int]:
        with self._lock:
            return dict(self._live)

    def rank_of(self, worker_id: str) -> int | None:
        asked = time.monotonic()
        with self._lock:
            rank = self._live.get(worker_id)
        if rank is None:
            self.refresh(newer_than=asked)
            with self._lock:
                rank = self._live.get(worker_id)
        return rank

    def refresh(self, newer_than: float | None = None) -> None:
        """Read the leases; with `newer_than`, only when no read has started since then
        (a caller that waited for a concurrent refresh gets that one's answer)."""
        with self._refreshing:
            if newer_than is not None and self._refresh_started >= newer_than:
                return
            started = time.monotonic()
            try:
                live = self._coordinator.live_workers(self._world_size)
            except CoordinationError as exc:
                # Keep the last view: a Redis hiccup must not make every worker look dead.
                log.warning("membership refresh failed, keeping the last view: %s", exc)
                return
            with self._lock:
                old, self._live = self._live, live
                self._refresh_started = started
        if old != live:
            joined = sorted(set(live) - set(old))
            left = sorted(set(old) - set(live))
            log.info("membership: %d live; joined %s; left %s", len(live), joined, left)
            for callback in self._subscribers:
                callback(old, live)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.refresh()
