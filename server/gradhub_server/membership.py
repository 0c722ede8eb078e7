"""The server's view of who is alive, refreshed from the leases in Redis.

A background thread reads the rank leases every `refresh_interval` and tells
subscribers when the set changes, so a sync barrier stops waiting for a worker
within (lease time + refresh interval) of its death. A push from a worker the
view does not know triggers one immediate refresh (it may have just joined).
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
        self._live: dict[str, int] = {}
        self._last_refresh = 0.0
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
        with self._lock:
            rank = self._live.get(worker_id)
            stale = time.monotonic() - self._last_refresh > self._interval / 4
        if rank is None and stale:
            self.refresh()
            with self._lock:
                rank = self._live.get(worker_id)
        return rank

    def refresh(self) -> None:
        try:
            live = self._coordinator.live_workers(self._world_size)
        except CoordinationError as exc:
            # Keep the last view: a Redis hiccup must not make every worker look dead.
            log.warning("membership refresh failed, keeping the last view: %s", exc)
            return
        with self._lock:
            old, self._live = self._live, live
            self._last_refresh = time.monotonic()
        if old != live:
            joined = sorted(set(live) - set(old))
            left = sorted(set(old) - set(live))
            log.info("membership: %d live; joined %s; left %s", len(live), joined, left)
            for callback in self._subscribers:
                callback(old, live)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.refresh()
