"""DC-ASGD (Zheng et al., ICML 2017): correct a stale gradient with a cheap Hessian term.

A gradient g computed on w_base, applied when the model is at w_now, is replaced by

    g + lambda_t * g * g * (w_now - w_base)          (elementwise)

with the paper's adaptive lambda_t = lambda_0 / sqrt(MeanSquare(g)), MeanSquare an
exponential average (0.95) of g*g per coordinate, like RMSProp. A coordinate's average
starts at its first g*g, not at zero: from zero, the first twenty or so updates would
divide by a mean square twenty times too small and multiply lambda by about 4.5, which
made runs with large staleness diverge within a hundred steps. Sparse pushes are
corrected and their mean squares updated on the coordinates they carry only: O(k).

Where w_base comes from: the server keeps a mirror of what each worker holds (the
paper's "backup" per worker), updated from the very snapshots it sends, deltas and
fp16 rounding included, so w_base is exactly the worker's copy. That costs one model
copy per worker on the server, and nothing on the wire; the alternative (workers
sending w_base with every push) would double the push. A push whose base the mirror
does not hold (a worker that just re-joined) is applied uncompensated, and counted.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gradhub.domain import ParameterSnapshot
from gradhub_server.update_rules import Gradient, SparseGradient

#: The decay of the per-coordinate mean square, and its floor, as in the paper.
MEAN_SQUARE_DECAY = 0.95
EPSILON = 1e-7


@dataclass
class _Mirror:
    version: int
    tensors: list[torch.Tensor]
    #: Whether each tensor is ours to write (else shared with a cached snapshot).
    owned: list[bool]


class WorkerMirrors:
    """Per worker, the parameters it holds: the server's copy of its `_load`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._mirrors: dict[str, _Mirror] = {}

    def update(self, worker_id: str, snapshot: ParameterSnapshot) -> None:
        with self._lock:
            mirror = self._mirrors.get(worker_id)
            if snapshot.delta_from is None:
                tensors = [t.float_values().view(t.shape) for t in snapshot.tensors]
                self._mirrors[worker_id] = _Mirror(snapshot.version, tensors, [False] * len(tensors))
                return
            if mirror is None or mirror.version != snapshot.delta_from:
                self._mirrors.pop(worker_id, None)  # cannot follow this worker any more
                return
            for i, tensor in enumerate(snapshot.tensors):
                if tensor.indices is None:
                    mirror.tensors[i] = tensor.float_values().view(tensor.shape)
                    mirror.owned[i] = False
                    continue
                if not mirror.owned[i]:
                    mirror.tensors[i] = mirror.tensors[i].clone()
                    mirror.owned[i] = True
                mirror.tensors[i].view(-1).index_copy_(0, tensor.indices.to(torch.int64), tensor.float_values())
            mirror.version = snapshot.version

    def holding(self, worker_id: str, version: int) -> list[torch.Tensor] | None:
        """The worker's parameters if it holds `version`, frozen: the next delta copies
        before it writes. The caller must not write them."""
        with self._lock:
            mirror = self._mirrors.get(worker_id)
            if mirror is None or mirror.version != version:
                return None
            mirror.owned = [False] * len(mirror.tensors)  # the next delta copies first
            return list(mirror.tensors)

    def keep_only(self, workers: set[str]) -> None:
        with self._lock:
            for worker in [w for w in self._mirrors if w not in workers]:
                del self._mirrors[worker]


def _averaged(mean_square: torch.Tensor, square: torch.Tensor) -> torch.Tensor:
    """The next mean square; a coordinate never seen (zero) starts at its first square."""
    decayed = MEAN_SQUARE_DECAY * mean_square + (1 - MEAN_SQUARE_DECAY) * square
    return torch.where(mean_square == 0, square, decayed)


class DelayCompensation:
    def __init__(self, shapes: Sequence[torch.Size], lambda0: float) -> None:
        self._lambda0 = lambda0
        self._mean_square = [torch.zeros(shape) for shape in shapes]
        self.compensated = 0
        self.uncompensated = 0

    def apply(
        self, gradient: Sequence[Gradient], now: Sequence[torch.Tensor], base: Sequence[torch.Tensor] | None
    ) -> list[Gradient]:
        """The gradient to apply; every gradient feeds the mean squares, compensated or not."""
        out: list[Gradient] = []
        for position, (g, ms) in enumerate(zip(gradient, self._mean_square)):
            if isinstance(g, SparseGradient):
                flat_ms = ms.view(-1)
                square = g.values * g.values
                flat_ms[g.indices] = _averaged(flat_ms[g.indices], square)
                if base is None:
                    out.append(g)
                    continue
                lam = self._lambda0 / torch.sqrt(flat_ms[g.indices] + EPSILON)
                drift = (now[position].reshape(-1).index_select(0, g.indices)
                         - base[position].reshape(-1).index_select(0, g.indices))
                out.append(SparseGradient(g.indices, g.values + lam * square * drift, unique=g.unique))
                continue
            square = g * g
            ms.copy_(_averaged(ms, square))
            if base is None:
                out.append(g)
                continue
            lam = self._lambda0 / torch.sqrt(ms + EPSILON)
            out.append(g + lam * square * (now[position] - base[position]))
        if base is None:
            self.uncompensated += 1
        else:
            self.compensated += 1
        return out

    def report(self) -> dict[str, Any]:
        return {"compensated": self.compensated, "uncompensated": self.uncompensated}
