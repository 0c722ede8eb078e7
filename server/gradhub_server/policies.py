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

Validation (shapes, finiteness, identity, no version from the future) happened
before `submit`: a policy only decides about well-formed gradients.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from gradhub.config import RunConfig
from gradhub.domain import Push, PushResult
from gradhub.errors import DuplicatePush, LatePush, ServerUnavailable, StalePush
from gradhub.retry import Deadline
from gradhub_server.membership import Membership
from gradhub_server.stats import ServerStats
from gradhub_server.store import ParameterStore
from gradhub_server.update_rules import Gradient, SparseGradient

log = logging.getLogger(__name__)

#: How often a waiting sync push re-checks membership, besides being woken on changes.
BARRIER_TICK_S = 0.1


@dataclass(frozen=True)
class Submission:
    push: Push
    gradient: Sequence[Gradient]
    rank: int


def mean_gradient(gradients: Sequence[Sequence[Gradient]], shapes: Sequence[torch.Size]) -> list[Gradient]:
    """The mean of W workers' gradients, parameter by parameter, summed in the given order.

    Sparse stays sparse (the indices of all workers, values divided by W: O(W k)); a
    parameter with any dense gradient is summed densely and divided by W.
    """
    count = len(gradients)
    mean: list[Gradient] = []
    for position, shape in enumerate(shapes):
        parts = [g[position] for g in gradients]
        if all(isinstance(part, SparseGradient) for part in parts):
            sparse_parts = [part for part in parts if isinstance(part, SparseGradient)]
            mean.append(
                SparseGradient(
                    torch.cat([part.indices for part in sparse_parts]),
                    torch.cat([part.values for part in sparse_parts]) / count,
                )
            )
            continue
        dense = [part.to_dense(shape) if isinstance(part, SparseGradient) else part for part in parts]
        total = dense[0].clone()
        for part in dense[1:]:
            total.add_(part)
        mean.append(total.div_(count))
    return mean


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

    @abstractmethod
    def submit(self, submission: Submission, timeout: float) -> PushResult:
        """Apply (or queue and wait for) one validated gradient; raise to refuse it."""

    def on_membership_change(self) -> None:
        """Called when workers join or leave."""

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
        self.store.apply(mean_gradient([e.gradient for e in entries], self.store.shapes))
        for entry in entries:
            self.stats.record_applied(entry.push, staleness=0, rank=entry.rank)
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

    def submit(self, submission: Submission, timeout: float) -> PushResult:
        push = submission.push
        with self._lock:
            version = self.store.version
            staleness = version - push.meta.base_version
            if staleness > self.config.max_staleness:
                raise StalePush(
                    f"gradient computed on version {push.meta.base_version} is {staleness} "
                    f"versions stale; this run refuses more than {self.config.max_staleness}"
                )
            new_version = self.store.apply(submission.gradient, self.lr_scale(staleness))
            self.stats.record_applied(push, staleness=staleness, rank=submission.rank)
        return PushResult(
            version=new_version, staleness=staleness, finished=new_version >= self.store.steps
        )

    def lr_scale(self, staleness: int) -> float:
        """The factor on the scheduled learning rate for a push this stale."""
        return 1.0


class StalenessAwarePolicy(AsyncPolicy):
    name = "async-sa"

    def lr_scale(self, staleness: int) -> float:
        return 1.0 / max(1, staleness)


PolicyFactory = Callable[[RunConfig, ParameterStore, Membership, ServerStats], UpdatePolicy]
_POLICIES: dict[str, PolicyFactory] = {
    "sync": SyncPolicy, "async": AsyncPolicy, "async-sa": StalenessAwarePolicy,
}


def register_policy(name: str, factory: PolicyFactory) -> None:
    _POLICIES[name] = factory


def build_policy(
    config: RunConfig, store: ParameterStore, membership: Membership, stats: ServerStats
) -> UpdatePolicy:
    return _POLICIES[config.mode](config, store, membership, stats)
