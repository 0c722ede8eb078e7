"""The parent model: parameters, the server-side optimizer, and the version counter.

Everything that changes the model goes through `apply`, under one lock, after
the caller validated the gradient with `validate`: a push that fails validation
never reaches the parameters. Pullers get immutable snapshots, built once per
(version, dtype) and shared, so W workers pulling one version copy the model once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import torch
from torch import nn

from gradhub.config import RunConfig
from gradhub.domain import ParameterSnapshot
from gradhub.encoded import EncodedTensor, dense
from gradhub.errors import ConfigurationError, InvalidRequest, NonFiniteGradient, RunFinished
from gradhub_server.schedules import Schedule, constant


def build_optimizer(config: RunConfig, params: Sequence[nn.Parameter]) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    raise ConfigurationError(f"unknown optimizer {config.optimizer!r}")


class ParameterStore:
    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        steps: int,
        schedule: Schedule = constant,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.steps = steps
        self._schedule = schedule
        self._base_lrs = [group["lr"] for group in optimizer.param_groups]
        self._named = [(name, p) for name, p in model.named_parameters()]
        self._shapes = {name: tuple(p.shape) for name, p in self._named}
        self._version = 0
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._snapshots: dict[torch.dtype, ParameterSnapshot] = {}
        self._closed = False
        #: time.monotonic() of the update that reached the last step.
        self.finished_at: float | None = None

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
    def numel(self) -> int:
        return sum(p.numel() for _, p in self._named)

    def validate(self, tensors: Sequence[EncodedTensor]) -> None:
        """Raise unless `tensors` is a finite gradient for exactly this model's parameters."""
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
            if not tensor.is_finite():
                raise NonFiniteGradient(f"gradient for {name!r} holds NaN or Inf")

    def snapshot(self, dtype: torch.dtype = torch.float32) -> ParameterSnapshot:
        with self._lock:
            cached = self._snapshots.get(dtype)
            if cached is not None:
                return cached
            tensors = tuple(dense(name, p.detach().clone(), dtype) for name, p in self._named)
            snap = ParameterSnapshot(version=self._version, tensors=tensors, finished=self.finished)
            self._snapshots[dtype] = snap
            return snap

    def wait_for_version(self, version: int, timeout: float) -> bool:
        """True once the store reached `version` or finished; False on timeout or close."""
        with self._changed:
            self._changed.wait_for(
                lambda: self._version >= version or self.finished or self._closed, timeout
            )
            return self._version >= version or self.finished

    def state_dict(self) -> dict[str, torch.Tensor]:
        with self._lock:
            return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def versioned_parameters(self) -> tuple[int, list[torch.Tensor]]:
        """A copy of the parameters with the version they belong to, read atomically."""
        with self._lock:
            return self._version, [p.detach().clone() for _, p in self._named]

    # --- changing -------------------------------------------------------------------------

    def apply(self, gradient: Sequence[torch.Tensor]) -> int:
        """One optimizer step with `gradient` (dense fp32, validated); returns the new version."""
        with self._lock:
            if self.finished:
                raise RunFinished(f"the run finished at version {self._version}")
            factor = self._schedule(self._version / self.steps)
            for group, base in zip(self.optimizer.param_groups, self._base_lrs):
                group["lr"] = base * factor
            for (_, param), grad in zip(self._named, gradient):
                param.grad = grad
            self.optimizer.step()
            for _, param in self._named:
                param.grad = None
            self._version += 1
            if self._version >= self.steps:
                self.finished_at = time.monotonic()
            self._snapshots.clear()
            self._changed.notify_all()
            return self._version

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()
