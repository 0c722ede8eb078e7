"""Counters per worker and overall: pushes applied and refused, bytes, staleness.

Refusals are errors as data: each is counted under its reason (the exception's
name) and the server goes on. Pushes that arrive after the last step are counted
apart (`pushes_after_finish`): they are the normal end of an async run, not faults.
Refusals that name no worker (a stream that ended before its header, e.g. from a
worker killed mid-push) count in the totals but get no per-worker entry, so the
per-worker table lists only workers that exist.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from gradhub_server.applied import AppliedPush

#: Window over which pushes per second are measured for progress reports.
RATE_WINDOW_S = 5.0


@dataclass
class WorkerCounters:
    rank: int | None = None
    pushes_applied: int = 0
    pushes_refused: int = 0
    pushes_after_finish: int = 0
    refused_by_reason: Counter[str] = field(default_factory=Counter)
    bytes_pushed: int = 0
    bytes_pulled: int = 0
    dense_bytes_equivalent: int = 0
    staleness: Counter[int] = field(default_factory=Counter)
    last_base_version: int = 0
    last_loss: float = float("nan")
    #: Time spent held back: at a sync barrier, or at an SSP pull.
    waits: int = 0
    wait_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "pushes_applied": self.pushes_applied,
            "pushes_refused": self.pushes_refused,
            "pushes_after_finish": self.pushes_after_finish,
            "refused_by_reason": dict(self.refused_by_reason),
            "bytes_pushed": self.bytes_pushed,
            "bytes_pulled": self.bytes_pulled,
            "dense_bytes_equivalent": self.dense_bytes_equivalent,
            "staleness": staleness_summary(self.staleness),
            "last_base_version": self.last_base_version,
            "waits": self.waits,
            "wait_seconds": round(self.wait_seconds, 3),
        }


def staleness_summary(histogram: Counter[int]) -> dict[str, Any]:
    total = sum(histogram.values())
    mean = sum(s * n for s, n in histogram.items()) / total if total else 0.0
    return {
        "mean": mean,
        "max": max(histogram) if histogram else 0,
        "histogram": {str(s): histogram[s] for s in sorted(histogram)},
    }


class ServerStats:
    """Thread-safe; every servicer thread records here."""

    def __init__(self, loss_smoothing: float = 0.05) -> None:
        self._lock = threading.Lock()
        self._workers: dict[str, WorkerCounters] = {}
        self._unattributed = WorkerCounters()
        self._applied_times: deque[float] = deque()
        self._loss_ema: float | None = None
        self._smoothing = loss_smoothing

    def _worker(self, worker_id: str) -> WorkerCounters:
        if not worker_id:
            return self._unattributed
        counters = self._workers.get(worker_id)
        if counters is None:
            counters = self._workers[worker_id] = WorkerCounters()
        return counters

    def record_applied(self, pushes: Sequence[AppliedPush]) -> None:
        now = time.monotonic()
        with self._lock:
            for push in pushes:
                w = self._worker(push.worker_id)
                w.rank = push.rank
                w.pushes_applied += 1
                w.bytes_pushed += push.wire_bytes
                w.dense_bytes_equivalent += push.dense_bytes
                w.staleness[push.staleness] += 1
                w.last_base_version = push.base_version
                loss = push.loss
                if loss == loss:  # not NaN
                    w.last_loss = loss
                    self._loss_ema = (
                        loss
                        if self._loss_ema is None
                        else (1 - self._smoothing) * self._loss_ema + self._smoothing * loss
                    )
                self._applied_times.append(now)
            while self._applied_times and self._applied_times[0] < now - RATE_WINDOW_S:
                self._applied_times.popleft()

    def state(self) -> dict[str, Any]:
        """The counters as plain values (for a checkpoint: a restarted server goes on counting)."""
        def plain(counters: WorkerCounters) -> dict[str, Any]:
            # Plain dicts, not Counters: a checkpoint is loaded with weights_only=True.
            return {**asdict(counters), "refused_by_reason": dict(counters.refused_by_reason),
                    "staleness": dict(counters.staleness)}

        with self._lock:
            return {"workers": {k: plain(v) for k, v in self._workers.items()},
                    "unattributed": plain(self._unattributed), "loss_ema": self._loss_ema}

    def load(self, state: dict[str, Any]) -> None:
        def counters(fields: dict[str, Any]) -> WorkerCounters:
            return replace(WorkerCounters(**fields), refused_by_reason=Counter(fields["refused_by_reason"]),
                           staleness=Counter(fields["staleness"]))

        with self._lock:
            self._workers = {k: counters(v) for k, v in state["workers"].items()}
            self._unattributed = counters(state["unattributed"])
            self._loss_ema = state["loss_ema"]

    def record_refused(
        self, worker_id: str, reason: str, wire_bytes: int, dense_bytes: int, after_finish: bool
    ) -> None:
        with self._lock:
            w = self._worker(worker_id)
            w.bytes_pushed += wire_bytes
            w.dense_bytes_equivalent += dense_bytes
            if after_finish:
                w.pushes_after_finish += 1
            else:
                w.pushes_refused += 1
                w.refused_by_reason[reason] += 1

    def record_wait(self, worker_id: str, seconds: float) -> None:
        with self._lock:
            w = self._worker(worker_id)
            w.waits += 1
            w.wait_seconds += seconds

    def record_pull(self, worker_id: str, wire_bytes: int) -> None:
        with self._lock:
            w = self._worker(worker_id)
            w.bytes_pulled += wire_bytes

    @property
    def train_loss(self) -> float | None:
        with self._lock:
            return self._loss_ema

    def pushes_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            recent = [t for t in self._applied_times if t >= now - RATE_WINDOW_S]
        if len(recent) < 2:
            return 0.0
        return (len(recent) - 1) / max(1e-9, recent[-1] - recent[0])

    def totals(self) -> dict[str, Any]:
        with self._lock:
            workers = {k: v.as_dict() for k, v in sorted(self._workers.items())}
            every = [*self._workers.values(), self._unattributed]
            histogram: Counter[int] = Counter()
            reasons: Counter[str] = Counter()
            for counters in every:
                histogram.update(counters.staleness)
                reasons.update(counters.refused_by_reason)
            return {
                "pushes_applied": sum(w.pushes_applied for w in every),
                "pushes_refused": sum(w.pushes_refused for w in every),
                "pushes_refused_unattributed": self._unattributed.pushes_refused,
                "pushes_after_finish": sum(w.pushes_after_finish for w in every),
                "refused_by_reason": dict(reasons),
                "bytes_pushed": sum(w.bytes_pushed for w in every),
                "bytes_pulled": sum(w.bytes_pulled for w in every),
                "dense_bytes_equivalent": sum(w.dense_bytes_equivalent for w in every),
                "wait_seconds": round(sum(w.wait_seconds for w in every), 3),
                "staleness": staleness_summary(histogram),
                "workers": workers,
            }

    def staleness_histograms(self) -> dict[str, dict[int, int]]:
        """Per worker, labelled "rank R: worker-id", in rank order."""
        with self._lock:
            ordered = sorted(
                self._workers.items(), key=lambda kv: (kv[1].rank is None, kv[1].rank or 0, kv[0])
            )
            return {
                (f"rank {v.rank}: {k}" if v.rank is not None else k): dict(v.staleness)
                for k, v in ordered
                if v.staleness
            }
