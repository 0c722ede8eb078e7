"""The parent model: parameters, the server-side update rule, and the version counter.

Everything that changes the model goes through `apply`, under one lock, after
the caller validated the gradient with `validate`: a push that fails validation
never reaches the parameters. With a journal, each update is written to it first
(gradhub_server/journal.py), under the same lock, so the journal's order is the
version order; a restarted server replays it with `replay`. Pullers get immutable snapshots, built once per
(version, dtype) and shared, so W workers pulling one version copy the model once.

The store also remembers, for the last `history` versions, which coordinates each
update touched (all of them for a dense update), so that a worker holding version v
can be sent only what changed since (`changed_since`).
"""

from __future__ import annotations

import copy
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from gradhub import memory
from gradhub.config import RunConfig, momentum_on_workers
from gradhub.domain import ParameterSnapshot
from gradhub.encoded import EncodedTensor, dense, dense_views, sparse, values_finite
from gradhub.errors import InvalidRequest, NonFiniteGradient, RunFinished, ServerUnavailable
from gradhub.models import flatten_parameters
from gradhub_server.applied import AppliedPush
from gradhub_server.gradients import DenseMean
from gradhub_server.journal import JournalRecord, UpdateJournal
from gradhub_server.schedules import Schedule, constant
from gradhub_server.update_rules import Gradient, SparseGradient, UpdateRule, build_update_rule, gather


def build_rule(config: RunConfig, params: Sequence[nn.Parameter], lanes: int = 1) -> UpdateRule:
    """The server's rule, its large steps on `lanes` threads. Under momentum correction,
    momentum and weight decay live on the workers (DGC), and the server takes plain SGD
    steps: exact and O(k) for sparse pushes."""
    if momentum_on_workers(config):
        return build_update_rule("sgd", params, config.lr, momentum=0.0, weight_decay=0.0, lanes=lanes)
    return build_update_rule(config.optimizer, params, config.lr, config.momentum, config.weight_decay, lanes)


def _sorted_unique(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """The sorted unique values of all parts.

    What a step records is made of runs of ascending indices (every push's indices strictly
    increase, and a sync step's sparse mean is its pushes' concatenated), which numpy's
    stable sort (timsort) merges in about O(n log runs): 6 ms for two runs of 500 k, where
    torch.unique's full sort takes 34."""
    merged = np.concatenate([part.numpy() for part in parts]).astype(np.int64, copy=False)  # new: sorted in place
    merged.sort(kind="stable")
    keep = np.empty(len(merged), dtype=bool)
    keep[:1] = True
    np.not_equal(merged[1:], merged[:-1], out=keep[1:])
    return torch.from_numpy(merged[keep])


def _union(parts: list[torch.Tensor] | None) -> torch.Tensor | None:
    """Sorted unique indices of all parts, each strictly increasing already (what a step
    records, `_recorded`): one part, the common pull, is its own union."""
    if parts is None:
        return None
    if not parts:
        return torch.empty(0, dtype=torch.int64)
    if len(parts) == 1:
        return parts[0]
    return _sorted_unique(parts)


def _recorded(gradient: Gradient) -> torch.Tensor | None:
    """What a step records of one parameter's gradient for later delta pulls: its indices
    strictly increasing (None: dense, maybe all changed).

    Made once per step here, not at every pull: the check that a push's indices increased,
    which every decoder has already made, took 1.3 ms per 500 k at each pull."""
    if not isinstance(gradient, SparseGradient):
        return None
    return gradient.indices if gradient.unique else _sorted_unique([gradient.indices])


class ParameterStore:
    def __init__(
        self,
        model: nn.Module,
        rule: UpdateRule,
        steps: int,
        schedule: Schedule = constant,
        history: int = 64,
        compact_indices: bool = False,
    ) -> None:
        self.model = model
        self.compact_indices = compact_indices
        self.rule = rule
        self.steps = steps
        self._schedule = schedule
        #: (version, per parameter: flat indices the update to that version touched, or None: all)
        self._changes: deque[tuple[int, list[torch.Tensor | None]]] = deque(maxlen=history)
        # One buffer for all parameters: a snapshot is one copy, and a dense SGD step one
        # operation per stage rather than per tensor (update_rules.SGDRule).
        self._flat = flatten_parameters(model)
        self._named = [(name, p) for name, p in model.named_parameters()]
        self._shapes = {name: tuple(p.shape) for name, p in self._named}
        self._numel = sum(p.numel() for _, p in self._named)
        self._name_shapes = [(name, tuple(p.shape)) for name, p in self._named]
        self._version = 0
        self._lock = threading.Lock()
        #: Waiters for a version, by that version: an update wakes only those it satisfies
        #: (a condition notified on every update woke every waiter on every step).
        self._waiters: dict[int, threading.Event] = {}
        self._snapshots: dict[torch.dtype, ParameterSnapshot] = {}
        self._deltas: dict[tuple[int, torch.dtype], ParameterSnapshot] = {}
        #: Per parameter, the values the update to the current version wrote at the indices
        #: it touched, where its rule returned them (None: none kept; every version change
        #: clears it): the one-version delta's values.
        self._written: list[torch.Tensor | None] | None = None
        self._closed = False
        #: time.monotonic() of the update that reached the last step.
        self.finished_at: float | None = None
        #: Where each update is written before it is made (None: not journaled).
        self.journal: UpdateJournal | None = None
        #: Called under the lock with the pushes each update carried (the counters).
        self.on_applied: Callable[[Sequence[AppliedPush]], None] | None = None

    # --- reading --------------------------------------------------------------------------

    @property
    def version(self) -> int:
        return self._version

    @property
    def finished(self) -> bool:
        return self._version >= self.steps

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self._named]

    @property
    def shapes(self) -> list[torch.Size]:
        return [p.shape for _, p in self._named]

    @property
    def numel(self) -> int:
        return self._numel

    def validate(self, tensors: Sequence[EncodedTensor], flat: torch.Tensor | None = None) -> None:
        """Raise unless `tensors` is a finite gradient for exactly this model's parameters;
        `flat`, all their values as one tensor (`flat_values`), is checked in one pass."""
        if len(tensors) != len(self._named):
            raise InvalidRequest(
                f"gradient has {len(tensors)} tensors, the model has {len(self._named)} parameters"
            )
        for tensor, (name, _) in zip(tensors, self._named):
            if tensor.name != name:
                raise InvalidRequest(
                    f"gradient tensor {tensor.name!r} where parameter {name!r} was expected "
                    "(tensors must follow the model's parameter order)"
                )
            expected = self._shapes[name]
            if tensor.shape != expected:
                raise InvalidRequest(
                    f"gradient for {name!r} has shape {list(tensor.shape)}, "
                    f"the parameter has shape {list(expected)}"
                )
            if flat is None and not tensor.is_finite():
                raise NonFiniteGradient(f"gradient for {name!r} holds NaN or Inf")
        if flat is not None and not values_finite(tensors, flat):
            culprit = next((t.name for t in tensors if not t.is_finite()), "?")
            raise NonFiniteGradient(f"gradient for {culprit!r} holds NaN or Inf")

    def snapshot(self, dtype: torch.dtype = torch.float32) -> ParameterSnapshot:
        with self._lock:
            return self._snapshot_locked(dtype)

    def _snapshot_locked(self, dtype: torch.dtype) -> ParameterSnapshot:
        cached = self._snapshots.get(dtype)
        if cached is not None:
            return cached
        # One copy (the conversion with it) into one buffer: the pull goes out as one segment.
        return self._keep_snapshot_locked(memory.empty(self._numel, dtype).copy_(self._flat.detach()))

    def _keep_snapshot_locked(self, flat: torch.Tensor) -> ParameterSnapshot:
        """The current version's snapshot in `flat`'s type, whose values `flat` holds."""
        snap = ParameterSnapshot(
            version=self._version, tensors=dense_views(self._name_shapes, flat), finished=self.finished
        )
        self._snapshots[flat.dtype] = snap
        return snap

    def wait_for_version(self, version: int, timeout: float) -> bool:
        """True once the store reached `version` or finished; False on timeout or close."""
        with self._lock:
            if self._version >= version or self.finished:
                return True
            if self._closed:
                return False
            reached = self._waiters.setdefault(version, threading.Event())
        reached.wait(timeout)
        with self._lock:
            return self._version >= version or self.finished

    def state_dict(self) -> dict[str, torch.Tensor]:
        with self._lock:
            return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def delta_snapshot(self, have_version: int, dtype: torch.dtype) -> ParameterSnapshot | None:
        """The parameters as a delta against `have_version`, or None when history does not
        reach back that far. Per parameter, the changed coordinates with their current
        values, or the whole parameter when that is no larger; when every parameter goes
        whole, the shared full snapshot (dense pushes change everything every version)."""
        itemsize = dtype.itemsize
        with self._lock:
            # Changes and values are read under one lock: a version applied in between
            # would otherwise be claimed without its coordinates.
            key = (have_version, dtype)
            cached = self._deltas.get(key)
            if cached is not None and cached.version == self._version:
                return cached  # every worker at have_version asks for the same delta
            changes = self._changed_since_locked(have_version)
            if changes is None:
                return None
            if all(indices is None for indices in changes):  # dense updates since: all of it
                return self._snapshot_locked(dtype)
            whole = [
                indices is None or indices.numel() * (itemsize + 2) >= param.numel() * itemsize
                for (_, param), indices in zip(self._named, changes)
            ]
            if all(whole):
                return self._snapshot_locked(dtype)
            tensors = []
            for position, ((name, param), indices, send_whole) in enumerate(zip(self._named, changes, whole)):
                if send_whole or indices is None:
                    tensors.append(dense(name, param.detach().clone(), dtype))
                else:
                    values = self._written_at_locked(have_version, position, indices)
                    if values is None:
                        # index_select, not flat[indices]: 6 against 17 ms for 500 k of 50 M
                        # here; on the rule's lanes.
                        values = gather(param.detach().view(-1), indices, self.rule.lanes)
                    values = values.to(dtype)
                    tensors.append(sparse(name, tuple(param.shape), indices, values,
                                          compact_indices=self.compact_indices))
            snap = ParameterSnapshot(
                version=self._version, tensors=tuple(tensors), finished=self.finished, delta_from=have_version
            )
            self._deltas = {k: v for k, v in self._deltas.items() if v.version == self._version}
            self._deltas[key] = snap
            return snap

    def _written_at_locked(self, have_version: int, position: int, indices: torch.Tensor) -> torch.Tensor | None:
        """The values the last update wrote at `indices`, when the delta since `have_version`
        is that one update's, at exactly its indices (the common sync pull); else None.

        Gathering them again from a model much larger than the cache is most of a sparse
        delta's cost: 2.2-2.7 ms for 500 k of 50 M."""
        if self._written is None or have_version != self._version - 1:
            return None
        values = self._written[position]
        # apply() kept them right after recording this version's indices as _changes[-1].
        return values if values is not None and indices is self._changes[-1][1][position] else None

    def changed_since(self, version: int) -> list[torch.Tensor | None] | None:
        """Per parameter, the unique flat indices changed after `version` (None: maybe all);
        None when the history does not reach back that far."""
        with self._lock:
            return self._changed_since_locked(version)

    def _changed_since_locked(self, version: int) -> list[torch.Tensor | None] | None:
        if version > self._version:
            return None
        if version < self._version and (not self._changes or self._changes[0][0] > version + 1):
            return None
        touched: list[list[torch.Tensor] | None] = [[] for _ in self._named]
        for changed_version, per_param in self._changes:
            if changed_version <= version:
                continue
            for i, indices in enumerate(per_param):
                parts = touched[i]
                if indices is None:
                    touched[i] = None
                elif parts is not None:
                    parts.append(indices)
        return [_union(parts) for parts in touched]

    def versioned_parameters(self) -> tuple[int, list[torch.Tensor]]:
        """A copy of the parameters with the version they belong to, read atomically."""
        with self._lock:
            return self._version, [p.detach().clone() for _, p in self._named]

    def checkpoint_state(self, also: Callable[[], dict[str, Any]] | None = None) -> dict[str, Any]:
        """Parameters, optimizer state and version, copied atomically (for a checkpoint), with
        what `also` returns read under the same lock (state that `on_applied` keeps)."""
        with self._lock:
            return {
                "version": self._version,
                "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
                "optimizer": copy.deepcopy(self.rule.optimizer.state_dict()),
                **(also() if also is not None else {}),
            }

    def restore(self, state: dict[str, Any]) -> None:
        """Take a checkpoint's parameters, optimizer state and version (before serving)."""
        with self._lock:
            self.model.load_state_dict(state["model"])
            self.rule.optimizer.load_state_dict(state["optimizer"])
            self._version = int(state["version"])
            self._changes.clear()  # no deltas across a restart: the first pulls go whole
            self._snapshots.clear()
            self._deltas.clear()
            self._written = None

    # --- changing -------------------------------------------------------------------------

    def apply(
        self, gradient: Sequence[Gradient] | DenseMean, lr_scale: float = 1.0, pushes: Sequence[AppliedPush] = (),
        pull_dtypes: Sequence[torch.dtype] = (),
    ) -> int:
        """One step with `gradient` (validated; dense fp32 tensors or SparseGradients,
        applied in O(k), or a sync step's `DenseMean`), at the scheduled learning rate times
        `lr_scale`, carrying `pushes`; returns the new version. The dense tensors are handed
        over: the rule may change them (it adds weight decay in place).

        A `DenseMean` goes block by block through the rule's step where the rule can, and
        the new version's snapshots in `pull_dtypes` (what the step's workers will pull) are
        written in the same pass; not with a journal, which records the whole mean."""
        with self._lock:
            if self.finished:
                raise RunFinished(f"the run finished at version {self._version}")
            factor = self._schedule(self._version / self.steps) * lr_scale
            if isinstance(gradient, DenseMean):
                if self.journal is None and self._step_in_blocks_locked(gradient, factor, pull_dtypes):
                    self._tell_applied(pushes)
                    return self._version
                gradient = gradient.whole()
            self._journal(JournalRecord(self._version + 1, factor, list(gradient), tuple(pushes)))
            self.rule.set_lr_factor(factor)
            written = self.rule.apply(gradient)
            self._advanced_locked([_recorded(g) for g in gradient])
            if any(values is not None for values in written):
                self._written = written
            self._tell_applied(pushes)
            return self._version

    def _step_in_blocks_locked(self, mean: DenseMean, factor: float, pull_dtypes: Sequence[torch.dtype]) -> bool:
        """The step of `mean` block by block, writing the new version's snapshots in
        `pull_dtypes` as it goes; False, with nothing changed, where the rule cannot."""
        copies = [memory.empty(self._numel, dtype) for dtype in dict.fromkeys(pull_dtypes)]
        self.rule.set_lr_factor(factor)
        if not self.rule.step_blocks(self._numel, mean.block, copies):
            return False
        self._advanced_locked([None] * len(self._named))
        for snapshot in copies:
            self._keep_snapshot_locked(snapshot)
        return True

    def _tell_applied(self, pushes: Sequence[AppliedPush]) -> None:
        if self.on_applied is not None and pushes:
            self.on_applied(pushes)

    def advance(self) -> int:
        """A version that changes nothing (injected staleness fills its line with these)."""
        with self._lock:
            if self.finished:
                raise RunFinished(f"the run finished at version {self._version}")
            self._journal(JournalRecord(self._version + 1, 1.0, None))
            self._advanced_locked([torch.empty(0, dtype=torch.int64) for _ in self._named])
            return self._version

    def replay(self, record: JournalRecord) -> None:
        """Make a journaled update again (before serving): the same operation on the same
        inputs at the same learning rate, so the same result."""
        with self._lock:
            if record.version != self._version + 1:
                raise ValueError(f"journal record {record.version} does not follow version {self._version}")
            if record.gradient is not None:
                self.rule.set_lr_factor(record.lr_factor)
                self.rule.apply(record.gradient)
            self._advanced_locked(None)
            self._changes.clear()  # no deltas across a restart: the first pulls go whole
            self._tell_applied(record.pushes)

    def _journal(self, record: JournalRecord) -> None:
        if self.journal is None:
            return
        try:
            self.journal.append(record)
        except OSError as exc:  # not written: not made, and the push is not acknowledged
            raise ServerUnavailable(f"cannot write version {record.version} to the update journal: {exc}") from exc

    def _advanced_locked(self, touched: list[torch.Tensor | None] | None) -> None:
        self._version += 1
        self._written = None
        if touched is not None:
            self._changes.append((self._version, touched))
        if self._version >= self.steps:
            self.finished_at = time.monotonic()
        self._snapshots.clear()
        if self._waiters:
            finished = self.finished
            for version in [v for v in self._waiters if v <= self._version or finished]:
                self._waiters.pop(version).set()

    def current_parameters(self) -> list[torch.Tensor]:
        """The live parameters, not copied: only for a caller that serialises with `apply`."""
        return [p.detach() for _, p in self._named]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            waiters, self._waiters = self._waiters, {}
        for reached in waiters.values():
            reached.set()
        self.rule.close()
