"""The parameter server's domain: what a push and a pull do, without protobuf or gRPC.

A push is checked in this order, each failure a precise error and nothing touched:
run id; a retry of the worker's last push (same sequence number) gets that push's answer
and is never applied again (receipts.py); run not finished, worker holds a lease,
gradient matches the model and is finite, version not from the future, sequence number
new (a push that gets this far takes its number, whatever the policy decides); then the
policy decides (stale, barrier), and its answer is kept for retries.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from gradhub.config import RunConfig
from gradhub.domain import ParameterSnapshot, Push, PushResult
from gradhub.encoded import flat_values
from gradhub.errors import (
    FuturePush,
    GradhubError,
    RunFinished,
    ServerUnavailable,
    UnknownWorker,
    VersionNotReached,
    WrongRun,
)
from gradhub.retry import Deadline
from gradhub_server.gradients import Submission
from gradhub_server.membership import Membership
from gradhub_server.policies import UpdatePolicy
from gradhub_server.receipts import Receipts
from gradhub_server.stats import ServerStats
from gradhub_server.store import ParameterStore

log = logging.getLogger(__name__)

#: Longest a push may wait in a barrier, or a pull for a version, when the caller set no deadline.
DEFAULT_WAIT_S = 60.0


class ParameterServerCore:
    def __init__(
        self,
        config: RunConfig,
        store: ParameterStore,
        policy: UpdatePolicy,
        membership: Membership,
        stats: ServerStats,
    ) -> None:
        self.config = config
        self.store = store
        self.policy = policy
        self.membership = membership
        self.stats = stats
        self.started = time.monotonic()
        self.receipts = Receipts()
        self._closing = False

    def push(self, push: Push, timeout: float | None) -> PushResult:
        meta = push.meta
        if meta.run_id != self.config.run_id:
            raise WrongRun(f"push for run {meta.run_id!r}; this server serves {self.config.run_id!r}")
        if self._closing:
            raise ServerUnavailable("the server is stopping")
        wait = timeout or DEFAULT_WAIT_S
        # Before the lease and finish checks: a push applied just before its worker's lease
        # lapsed, or before the last step, must still get its own answer, not a refusal.
        earlier = self.receipts.earlier(meta.worker_id, meta.seq)
        if earlier is not None:
            return self.receipts.replay(earlier, wait)
        if self.store.finished:
            raise RunFinished(f"the run finished at version {self.store.version}")
        rank = self.membership.rank_of(meta.worker_id)
        if rank is None:
            raise UnknownWorker(
                f"worker {meta.worker_id!r} holds no lease in run {self.config.run_id}: "
                "register (or re-register after a lease loss) first"
            )
        flat = flat_values(push.tensors)
        self.store.validate(push.tensors, flat)
        if meta.base_version > self.store.version:  # versions only grow: safe to check early
            raise FuturePush(
                f"push computed on version {meta.base_version}, but the server is at "
                f"version {self.store.version}"
            )
        receipt, first = self.receipts.claim(meta.worker_id, meta.seq)
        if not first:  # another copy of this push got here first
            return self.receipts.replay(receipt, wait)
        try:
            submission = Submission(push=push, rank=rank, flat=flat)
            self.policy.prepare(submission)
            result = self.policy.submit(submission, wait)
        except GradhubError as exc:
            self.receipts.settle(receipt, error=exc)
            raise
        except BaseException:
            self.receipts.settle(receipt, error=ServerUnavailable(f"push seq {meta.seq} failed on the server"))
            raise
        self.receipts.settle(receipt, result=result)
        return result

    def refused(self, push: Push | None, worker_id: str, error: GradhubError) -> None:
        """Count a refused push (errors as data); the caller turns it into a status."""
        if error.replayed:
            return  # the first copy's refusal, counted when it happened
        self.stats.record_refused(
            worker_id,
            type(error).__name__,
            wire_bytes=push.wire_bytes if push else 0,
            dense_bytes=push.dense_bytes if push else 0,
            after_finish=isinstance(error, RunFinished),
        )
        if not isinstance(error, RunFinished):
            log.info("refused push from %s: %s: %s", worker_id or "?", type(error).__name__, error)

    def pull(
        self, run_id: str, min_version: int, dtype: torch.dtype, timeout: float | None,
        have_version: int | None = None, worker_id: str = "",
    ) -> ParameterSnapshot:
        """The parameters once the server reaches `min_version` and the policy lets the
        worker read (SSP): a delta against `have_version` when the caller holds it and the
        history allows, else whole."""
        if run_id != self.config.run_id:
            raise WrongRun(f"pull for run {run_id!r}; this server serves {self.config.run_id!r}")
        if self._closing:
            raise ServerUnavailable("the server is stopping")
        wait = DEFAULT_WAIT_S if timeout is None else timeout
        deadline = Deadline(wait)
        waiting = min_version > self.store.version and not self.store.finished
        if waiting and not self.store.wait_for_version(min_version, wait):
            if self._closing:
                raise ServerUnavailable("the server is stopping")
            raise VersionNotReached(
                f"version {min_version} not reached within {wait:.1f}s "
                f"(server at {self.store.version})"
            )
        self.policy.before_pull(worker_id, deadline.remaining())
        snapshot = None
        if have_version is not None:
            snapshot = self.store.delta_snapshot(have_version, dtype)
        if snapshot is None:
            snapshot = self.store.snapshot(dtype)
        self.policy.after_pull(worker_id, snapshot)
        return snapshot

    def close(self) -> None:
        self._closing = True
        self.policy.close()
        self.store.close()

    def wall_seconds(self) -> float:
        """Seconds since serving started, frozen when the run reaches its last step."""
        return (self.store.finished_at or time.monotonic()) - self.started

    def status(self) -> dict[str, Any]:
        version = self.store.version
        live = self.membership.live()
        totals = self.stats.totals()
        workers = []
        for worker_id, rank in sorted(live.items(), key=lambda item: item[1]):
            counters = totals["workers"].get(worker_id, {})
            last = counters.get("last_base_version", 0)
            workers.append(
                {
                    "rank": rank,
                    "worker_id": worker_id,
                    "pushes_applied": counters.get("pushes_applied", 0),
                    "lag": version - last if counters else None,
                }
            )
        return {
            "run_id": self.config.run_id,
            "mode": self.config.mode,
            "version": version,
            "steps": self.store.steps,
            "finished": self.store.finished,
            "live_workers": workers,
            "pushes_applied": totals["pushes_applied"],
            "pushes_refused": totals["pushes_refused"],
            "pushes_per_second": round(self.stats.pushes_per_second(), 2),
            "train_loss": self.stats.train_loss,
            "staleness_mean": totals["staleness"]["mean"],
            "staleness_max": totals["staleness"]["max"],
            "wall_seconds": round(self.wall_seconds(), 3),
        }
