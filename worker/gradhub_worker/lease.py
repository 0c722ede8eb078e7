"""Keeps a worker's membership lease alive from a background thread.

Renewal every third of the lease length leaves two chances to renew before it
expires. If the lease is lost (expired during a long stall, or taken over),
`lost` is set and the training loop re-registers.
"""

from __future__ import annotations

import logging
import threading

from gradhub.coordination import Lease, RunCoordinator
from gradhub.errors import CoordinationError

log = logging.getLogger(__name__)


class LeaseKeeper:
    def __init__(self, coordinator: RunCoordinator, lease: Lease, lease_seconds: float) -> None:
        self._coordinator = coordinator
        self.lease = lease
        self._seconds = lease_seconds
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def replace(self, lease: Lease) -> None:
        self.lease = lease
        self.lost.clear()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self._seconds / 3):
            try:
                if not self._coordinator.renew(self.lease, self._seconds):
                    if not self.lost.is_set():
                        log.warning("lease on rank %d lost", self.lease.rank)
                    self.lost.set()
            except CoordinationError as exc:
                log.warning("lease renewal failed: %s", exc)
