"""Exactly-once pushes: each worker's last sequence number, and what became of that push.

A worker that gets no answer to a push (a deadline, a dropped connection) cannot know
whether it was applied, so it sends the same push again under the same sequence number.
The first copy to arrive whole is the one that counts. A retry is never applied: it
waits for the first copy's outcome and gets the same answer, the same PushResult or the
same refusal. The worker only puts a gradient back into its error-feedback residual on a
refusal, so a push is applied once or not at all, and the worker knows which.

One receipt per worker is enough: a worker sends its pushes one at a time.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from gradhub.domain import PushResult
from gradhub.errors import DuplicatePush, GradhubError, ServerUnavailable, VersionNotReached


@dataclass
class Receipt:
    seq: int
    settled: threading.Event = field(default_factory=threading.Event)
    result: PushResult | None = None
    error: GradhubError | None = None


class Receipts:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: dict[str, Receipt] = {}
        self.replayed = 0

    def earlier(self, worker_id: str, seq: int) -> Receipt | None:
        """The receipt when this is a retry of the worker's last push; None for a new push.

        Raises DuplicatePush for a sequence number older than the last: a copy that
        arrives after a later push cannot be the answer the worker is waiting for.
        """
        with self._lock:
            last = self._last.get(worker_id)
        if last is None or seq > last.seq:
            return None
        if seq == last.seq:
            return last
        raise DuplicatePush(f"worker {worker_id!r} push seq {seq} is older than its last ({last.seq})")

    def claim(self, worker_id: str, seq: int) -> tuple[Receipt, bool]:
        """Take `seq` for a push that passed validation: (receipt, True) when this copy is the
        one to apply; (the first copy's receipt, False) when another copy took it first."""
        with self._lock:
            last = self._last.get(worker_id)
            if last is not None and seq <= last.seq:
                if seq < last.seq:
                    raise DuplicatePush(f"worker {worker_id!r} push seq {seq} is older than its last ({last.seq})")
                return last, False
            receipt = Receipt(seq)
            self._last[worker_id] = receipt
            return receipt, True

    def restore(self, saved: dict[str, list[int]]) -> None:
        """Per worker, [seq, version, staleness] of its last applied push (from a checkpoint and
        the journal replayed after it): a retry of that push is answered, not applied again.
        Refused pushes are left out: a retry after a restart is simply processed again."""
        with self._lock:
            for worker, (seq, version, staleness) in saved.items():
                receipt = Receipt(int(seq), result=PushResult(version=int(version), staleness=int(staleness)))
                receipt.settled.set()
                self._last[worker] = receipt

    @staticmethod
    def settle(receipt: Receipt, result: PushResult | None = None, error: GradhubError | None = None) -> None:
        receipt.result, receipt.error = result, error
        receipt.settled.set()

    def replay(self, receipt: Receipt, timeout: float) -> PushResult:
        """The first copy's answer, once it has one (a sync push may still be at its barrier)."""
        if not receipt.settled.wait(timeout):
            raise VersionNotReached(f"push seq {receipt.seq} is still being applied; ask again")
        with self._lock:
            self.replayed += 1
        if receipt.error is not None:
            receipt.error.replayed = True
            raise receipt.error
        if receipt.result is None:  # settle() always records one of the two
            raise ServerUnavailable(f"push seq {receipt.seq} has no recorded outcome")
        return receipt.result
