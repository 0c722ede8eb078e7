"""Update policies: when and how pushed gradients change the parent model.

Each policy is one small class behind `UpdatePolicy`, chosen by the run's mode:

- `sync`: a barrier per step over the live workers. Each live worker pushes one
  gradient computed on the current version; when all have, their mean (summed in
  rank order, so the result is reproducible) makes one optimizer step. A push
  returns once its step is applied. A worker whose lease expires stops being
  waited for; a gradient it pushed before dying still counts.
  With `backup_workers` b (Chen et al. 2016), a step goes ahead once all but b live
  workers have pushed; a push that arrives after its step is dropped (`LatePush`,
  counted) and its worker, as after any refusal, keeps it in its residual.
- `async`: every push is applied on arrival. Its staleness (server version minus
  the version it was computed on) is recorded; beyond `max_staleness` it is refused.
- `async-sa`: `async` with a staleness-aware learning rate (Zhang et al., IJCAI 2016):
  a push of staleness t > 0 is applied at lr / t, so the stalest gradients move the
  model least; a fresh one gets the full rate.
- `ssp`: `async` with a bound s (Ho et al., NIPS 2013): a worker's clock is the number
  of its pushes applied; a worker more than s pushes ahead of the slowest live worker
  waits at its pull until the slowest catches up (or dies and leaves the membership).
- `dc-asgd`: `async` with delay compensation (Zheng et al., ICML 2017): a push computed
  on parameters w_base is applied as g + lambda * g*g*(w_now - w_base). w_base is a
  server-side mirror of what each worker holds (see `delay_compensation`).

Every async mode can apply pushes `inject_staleness` (tau) pushes late: a FIFO holds
the last tau pushes and each arrival applies the oldest (the first tau arrivals only
advance the version). With one worker every gradient is then exactly tau versions
stale, free of timing noise; the last tau pushes of a run are never applied.

Validation (shapes, finiteness, identity, no version from the future) happened
before `submit`: a policy only decides about well-formed gradients.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gradhub.config import RunConfig
from gradhub.domain import ParameterSnapshot, PushResult
from gradhub.errors import DuplicatePush, LatePush, PullDeferred, ServerUnavailable, StalePush
from gradhub.retry import Deadline
from gradhub_server.applied import AppliedPush
from gradhub_server.delay_compensation import DelayCompensation, WorkerMirrors
from gradhub_server.gradients import StepSums, Submission, mean_of
from gradhub_server.membership import Membership
from gradhub_server.stats import ServerStats
from gradhub_server.store import ParameterStore
from gradhub_server.update_rules import Gradient

log = logging.getLogger(__name__)

#: How often a waiting sync push re-checks membership, besides being woken on changes.
BARRIER_TICK_S = 0.1


class UpdatePolicy(ABC):
    name: str

    def __init__(
        self, config: RunConfig, store: ParameterStore, membership: Membership, stats: ServerStats
    ) -> None:
        self.config = config
        self.store = store
        self.membership = membership
        self.stats = stats
        membership.subscribe(lambda old, new: self.on_membership_change())

    def prepare(self, submission: Submission) -> None:
        """Before `submit`, outside the policy's lock: build the push's fp32 gradient, which
        the async policies apply (a sync step sums the pushes' wire values itself)."""
        _ = submission.gradient

    @abstractmethod
    def submit(self, submission: Submission, timeout: float) -> PushResult:
        """Apply (or queue and wait for) one validated gradient; raise to refuse it."""

    def on_membership_change(self) -> None:
        """Called when workers join or leave."""

    def before_pull(self, worker_id: str, timeout: float) -> None:
        """Block while `worker_id` may not read the parameters yet (SSP); raise PullDeferred
        when that lasts past `timeout`."""

    def after_pull(self, worker_id: str, snapshot: ParameterSnapshot) -> None:
        """`snapshot` is on its way to `worker_id`."""

    def report(self) -> dict[str, Any]:
        """The policy's own figures, for the run's summary."""
        return {"name": self.name}

    def pending(self) -> list[str]:
        """Workers whose pushes wait for a step (empty for policies that never wait)."""
        return []

    def close(self) -> None:
        """Wake everything that waits: the server is stopping."""


class SyncPolicy(UpdatePolicy):
    name = "sync"

    def __init__(
        self, config: RunConfig, store: ParameterStore, membership: Membership, stats: ServerStats
    ) -> None:
        super().__init__(config, store, membership, stats)
        self._cond = threading.Condition()
        self._pending: dict[str, Submission] = {}
        self._closed = False
        self._sums = StepSums()

    def prepare(self, submission: Submission) -> None:
        """Nothing: the step's mean is summed from the wire values (`StepSums`)."""

    def submit(self, submission: Submission, timeout: float) -> PushResult:
        push = submission.push
        worker = push.meta.worker_id
        deadline = Deadline(timeout)
        with self._cond:
            step = self.store.version
            if push.meta.base_version < step and self.config.backup_workers:
                raise LatePush(
                    f"step {push.meta.base_version + 1} went ahead without this gradient "
                    f"(backup workers: {self.config.backup_workers}); it was dropped"
                )
            if push.meta.base_version < step:
                raise StalePush(
                    f"step {step} is under way; this gradient was computed on version "
                    f"{push.meta.base_version}: pull and compute again"
                )
            if worker in self._pending:
                raise DuplicatePush(f"worker {worker} already pushed a gradient for step {step}")
            self._pending[worker] = submission
            waiting = time.monotonic()
            self._try_step()
            while self.store.version == step:
                if self._closed:
                    self._pending.pop(worker, None)
                    raise ServerUnavailable("the server is stopping")
                remaining = deadline.remaining()
                if remaining == 0.0:
                    # Withdraw the gradient: a refused push must leave no trace in a later step.
                    self._pending.pop(worker, None)
                    missing = sorted(set(self.membership.live()) - set(self._pending))
                    raise ServerUnavailable(
                        f"step {step} did not complete within {timeout:g}s; still waiting for "
                        f"{missing}"
                    )
                self._cond.wait(min(remaining, BARRIER_TICK_S))
                self._try_step()
            version = self.store.version
        self.stats.record_wait(worker, time.monotonic() - waiting)
        return PushResult(version=version, staleness=0, finished=version >= self.store.steps)

    def pending(self) -> list[str]:
        with self._cond:
            return sorted(self._pending)

    def _try_step(self) -> None:
        """With the lock held: take the step if every live worker has pushed."""
        if not self._pending:
            return
        missing = [worker for worker in self.membership.live() if worker not in self._pending]
        if len(missing) > self.config.backup_workers:
            return
        entries = sorted(self._pending.values(), key=lambda s: (s.rank, s.push.meta.worker_id))
        self.store.apply(
            mean_of(entries, self.store.shapes, self._sums),
            pushes=[AppliedPush.of(e.push, staleness=0, rank=e.rank) for e in entries],
            # Every worker of the step pulls next: its snapshot is made with the step.
            pull_dtypes=[e.push.meta.pull_dtype for e in entries],
        )
        self._pending.clear()
        self._cond.notify_all()

    def on_membership_change(self) -> None:
        with self._cond:
            self._try_step()
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class AsyncPolicy(UpdatePolicy):
    name = "async"

    def __init__(
        self, config: RunConfig, store: ParameterStore, membership: Membership, stats: ServerStats
    ) -> None:
        super().__init__(config, store, membership, stats)
        self._lock = threading.Lock()
        #: The injected-staleness line: pushes waiting to be applied tau arrivals later.
        self._line: deque[_Delayed] = deque()

    def submit(self, submission: Submission, timeout: float) -> PushResult:
        push = submission.push
        tau = self.config.inject_staleness
        with self._lock:
            version = self.store.version
            staleness = version - push.meta.base_version
            if staleness + tau > self.config.max_staleness:
                raise StalePush(
                    f"gradient computed on version {push.meta.base_version} is {staleness} "
                    f"versions stale{f' (+{tau} injected)' if tau else ''}; this run refuses more "
                    f"than {self.config.max_staleness}"
                )
            self.on_arrival(submission)
            self._line.append(_Delayed(submission, self.base_of(submission)))
            if len(self._line) <= tau:
                new_version = self.store.advance()
            else:
                due = self._line.popleft()
                applied_staleness = version - due.submission.push.meta.base_version
                gradient = self.compensate(due.submission.gradient, due.base)
                new_version = self.store.apply(
                    gradient, self.lr_scale(applied_staleness),
                    pushes=[AppliedPush.of(due.submission.push, applied_staleness, due.submission.rank)],
                )
        return PushResult(
            version=new_version, staleness=staleness + tau, finished=new_version >= self.store.steps
        )

    def lr_scale(self, staleness: int) -> float:
        """The factor on the scheduled learning rate for a push this stale."""
        return 1.0

    def on_arrival(self, submission: Submission) -> None:
        """With the lock held: a push was accepted (it may be applied later)."""

    def base_of(self, submission: Submission) -> list[torch.Tensor] | None:
        """With the lock held: the parameters the push was computed on, where kept."""
        return None

    def compensate(self, gradient: Sequence[Gradient], base: list[torch.Tensor] | None) -> Sequence[Gradient]:
        """With the lock held, just before applying: the gradient as it will be applied."""
        return gradient


@dataclass(frozen=True)
class _Delayed:
    submission: Submission
    base: list[torch.Tensor] | None


class StalenessAwarePolicy(AsyncPolicy):
    name = "async-sa"

    def lr_scale(self, staleness: int) -> float:
        return 1.0 / max(1, staleness)


class StaleSynchronousPolicy(AsyncPolicy):
    """SSP. A worker's clock counts its accepted pushes. Every live worker has a clock, so
    one that registered but has not pushed yet holds the others at the bound; a worker
    that joins a running run (a newcomer, a replacement) starts at the slowest live
    clock, so it neither waits for the others to come back to zero nor holds them back."""

    name = "ssp"

    def __init__(
        self, config: RunConfig, store: ParameterStore, membership: Membership, stats: ServerStats
    ) -> None:
        self._gate = threading.Condition()
        self._clock: dict[str, int] = {}
        self.max_lead = 0
        self._closed = False
        super().__init__(config, store, membership, stats)

    def _clock_of_locked(self, worker: str) -> int:
        if worker not in self._clock:
            self._clock[worker] = min(self._clock.values(), default=0)
        return self._clock[worker]

    def on_arrival(self, submission: Submission) -> None:
        with self._gate:
            worker = submission.push.meta.worker_id
            self._clock[worker] = self._clock_of_locked(worker) + 1
            self._gate.notify_all()

    def before_pull(self, worker_id: str, timeout: float) -> None:
        if self.membership.rank_of(worker_id) is None:
            return  # not a worker of the run (a reader): nothing to hold back
        deadline = Deadline(timeout)
        bound = self.config.ssp_bound
        started = time.monotonic()
        waited = False
        with self._gate:
            while True:
                mine = self._clock_of_locked(worker_id)
                lead = mine - min(self._clock.values())
                if self.store.finished:
                    lead = 0  # nothing more to bound: the last pulls only say "finished"
                    break
                if lead <= bound:
                    break
                if self._closed:
                    raise ServerUnavailable("the server is stopping")
                if deadline.expired():
                    raise PullDeferred(
                        f"worker {worker_id} is {lead} pushes ahead of the slowest live worker; "
                        f"the bound is {bound}: pull again"
                    )
                waited = True
                self._gate.wait(min(deadline.remaining(), BARRIER_TICK_S))
            self.max_lead = max(self.max_lead, lead)
        if waited:  # the waits themselves are counted per worker in the stats
            self.stats.record_wait(worker_id, time.monotonic() - started)

    def on_membership_change(self) -> None:
        with self._gate:
            live = set(self.membership.live())
            for worker in [w for w in self._clock if w not in live]:
                del self._clock[worker]  # a dead worker holds nobody back
            for worker in sorted(live - set(self._clock)):
                self._clock_of_locked(worker)
            self._gate.notify_all()

    def clocks(self) -> dict[str, int]:
        with self._gate:
            return dict(self._clock)

    def close(self) -> None:
        with self._gate:
            self._closed = True
            self._gate.notify_all()

    def report(self) -> dict[str, Any]:
        with self._gate:
            return {"name": self.name, "bound": self.config.ssp_bound, "max_lead": self.max_lead}


class DelayCompensatedPolicy(AsyncPolicy):
    name = "dc-asgd"

    def __init__(
        self, config: RunConfig, store: ParameterStore, membership: Membership, stats: ServerStats
    ) -> None:
        super().__init__(config, store, membership, stats)
        self._mirrors = WorkerMirrors()
        self._compensation = DelayCompensation(store.shapes, config.dc_lambda)

    def after_pull(self, worker_id: str, snapshot: ParameterSnapshot) -> None:
        if self.membership.rank_of(worker_id) is not None:  # readers get no mirror
            self._mirrors.update(worker_id, snapshot)

    def base_of(self, submission: Submission) -> list[torch.Tensor] | None:
        return self._mirrors.holding(submission.push.meta.worker_id, submission.push.meta.base_version)

    def compensate(self, gradient: Sequence[Gradient], base: list[torch.Tensor] | None) -> Sequence[Gradient]:
        return self._compensation.apply(gradient, self.store.current_parameters(), base)

    def on_membership_change(self) -> None:
        self._mirrors.keep_only(set(self.membership.live()))

    def report(self) -> dict[str, Any]:
        return {"name": self.name, "lambda": self.config.dc_lambda, **self._compensation.report()}


PolicyFactory = Callable[[RunConfig, ParameterStore, Membership, ServerStats], UpdatePolicy]
_POLICIES: dict[str, PolicyFactory] = {
    "sync": SyncPolicy, "ssp": StaleSynchronousPolicy, "async": AsyncPolicy,
    "async-sa": StalenessAwarePolicy, "dc-asgd": DelayCompensatedPolicy,
}


def register_policy(name: str, factory: PolicyFactory) -> None:
    _POLICIES[name] = factory


def build_policy(
    config: RunConfig, store: ParameterStore, membership: Membership, stats: ServerStats
) -> UpdatePolicy:
    return _POLICIES[config.mode](config, store, membership, stats)
