"""Server-side update rules: how a (mean) gradient changes the parameters, dense or sparse.

A sparse gradient (flat indices and values) is applied in O(k), k its number of
coordinates, never O(model size):

- SGD without momentum and weight decay (the server's rule under DGC momentum
  correction, where momentum lives on the workers): a scatter-add of -lr * values.
  This is the dense update of the same gradient (equal up to the last bit, where
  torch's dense kernel fuses the multiply-add). A push's indices are unique (the wire
  enforces it), so its step reads, adds and writes back block by block instead, and
  the values it wrote are the delta pull's that follows (`apply` returns them).
- SGD with momentum or weight decay, and Adam: *lazy*. Optimizer state (momentum
  buffer, Adam's moments) and weight decay touch only the coordinates the gradient
  names, like TensorFlow's LazyAdam. Untouched coordinates keep their state and do
  not move, where a dense step would have kept moving them with their momentum;
  a dense step of every coordinate is what O(k) rules out.

Dense gradients go through torch.optim (SGD, Adam) unchanged. Both kinds may mix
within one step, one parameter at a time.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gradhub import memory
from gradhub.encoded import back_to_back
from gradhub.errors import ConfigurationError


@dataclass(frozen=True)
class SparseGradient:
    """A gradient that is zero except at `indices` (flat, int64; repeats add up)."""

    indices: torch.Tensor
    values: torch.Tensor  # float32, same length
    #: The indices strictly increase (no repeats): true of every decoded push.
    unique: bool = False

    def coalesced(self) -> SparseGradient:
        """Unique indices with their values summed: what stateful rules need."""
        unique, inverse = torch.unique(self.indices, return_inverse=True)
        values = torch.zeros(unique.numel(), dtype=self.values.dtype).index_add_(0, inverse, self.values)
        return SparseGradient(unique, values, unique=True)

    def to_dense(self, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        flat = torch.zeros(math.prod(shape), dtype=torch.float32)
        flat.index_add_(0, self.indices, self.values)
        return flat.view(shape)


Gradient = torch.Tensor | SparseGradient

#: A whole flat model's gradient, a block at a time: (start, stop, lane) -> its fp32 values
#: of [start, stop), which the rule may overwrite (`gradients.DenseMean.block`); `lane` says
#: which of the concurrent lanes asks (`memory.BlockLanes`).
GradientBlocks = Callable[[int, int, int], torch.Tensor]


class UpdateRule(ABC):
    def __init__(
        self, params: Sequence[nn.Parameter], optimizer: torch.optim.Optimizer, lanes: int = 1
    ) -> None:
        self.params = list(params)
        self.optimizer = optimizer
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        #: Threads a large step runs on at once (`memory.BlockLanes`).
        self.lanes = memory.BlockLanes(lanes)

    def close(self) -> None:
        self.lanes.close()

    def set_lr_factor(self, factor: float) -> None:
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def apply(self, gradients: Sequence[Gradient]) -> list[torch.Tensor | None]:
        """One step: dense gradients through the optimizer, sparse ones in O(k). Dense
        gradients are the caller's to give away: weight decay is added to them in place.

        Returns, per parameter, its new values at its sparse gradient's indices (flat,
        fp32) where the step had them at hand, else None."""
        after: list[torch.Tensor | None] = [None] * len(self.params)
        dense = [(p, g) for p, g in zip(self.params, gradients) if not isinstance(g, SparseGradient)]
        if dense:
            self._dense_step(dense)
        if len(dense) == len(self.params):
            return after
        with torch.no_grad():
            for position, (param, gradient) in enumerate(zip(self.params, gradients)):
                if isinstance(gradient, SparseGradient) and gradient.indices.numel():
                    after[position] = self._apply_sparse(param, gradient, self.optimizer.state[param])
        return after

    def step_blocks(self, numel: int, gradient: GradientBlocks, copies: Sequence[torch.Tensor]) -> bool:
        """One dense step of every parameter, the gradient taken block by block over the
        parameters as one flat tensor of `numel` elements, and each block's new values also
        written into `copies` (flat, any float type: the pulls' snapshots) while in cache.
        False, having changed nothing, where this rule cannot (the caller then steps with
        the whole gradient)."""
        return False

    def _dense_step(self, dense: list[tuple[nn.Parameter, torch.Tensor]]) -> None:
        """The optimizer's step over the parameters in `dense` (the others hold no gradient,
        and torch skips them), with its weight decay added to the gradients here, in place.

        torch adds it into a fresh copy of every gradient (`_foreach_add`): a model-sized
        allocation per step, which costs its page faults again each time (gradhub.memory).
        The same sum in place, then a step without decay, is the same arithmetic.
        """
        for param in self.params:
            param.grad = None
        for param, gradient in dense:
            param.grad = gradient
        try:
            (group,) = self.optimizer.param_groups  # build_update_rule makes one group
            decay = group["weight_decay"]
            if not decay:
                self.optimizer.step()
                return
            with torch.no_grad():
                torch._foreach_add_([g for _, g in dense], [p.detach() for p, _ in dense], alpha=decay)
            group["weight_decay"] = 0.0
            try:
                self.optimizer.step()
            finally:
                group["weight_decay"] = decay
        finally:
            for param in self.params:
                param.grad = None

    @abstractmethod
    def _apply_sparse(
        self, param: nn.Parameter, gradient: SparseGradient, state: dict[str, Any]
    ) -> torch.Tensor | None:
        """Update `param` at the gradient's coordinates only; return its new values at
        `gradient.indices` if the update computed them anyway (None otherwise)."""


def _sgd_block(
    gradient: torch.Tensor, params: torch.Tensor, buffer: torch.Tensor | None, momentum: float, decay: float,
    lr: float,
) -> None:
    """torch's SGD (no dampening, no Nesterov) on flat tensors: decay into the gradient,
    momentum, step; the gradient is overwritten."""
    if decay:
        gradient.add_(params, alpha=decay)
    if buffer is not None:
        gradient = buffer.mul_(momentum).add_(gradient)
    params.add_(gradient, alpha=-lr)


class SGDRule(UpdateRule):
    """SGD; a step where every parameter's gradient is dense runs on one flat tensor when
    the parameters lie back to back in one buffer (`models.flatten_parameters`, as the
    server's store keeps them).

    torch.optim's step costs a fixed ~0.1 ms of Python and per-tensor dispatch, most of
    the server's update of a small model (the default CNN has 8 parameters). On one flat
    tensor the same three operations (decay, momentum, step) run once each: the same
    elementwise arithmetic as torch's foreach kernels, bit for bit (tests). The momentum
    buffers become views of one flat buffer, installed in the optimizer's state, so
    checkpoints, the sparse path and torch's own step see them as before.
    """

    def __init__(self, params: Sequence[nn.Parameter], optimizer: torch.optim.Optimizer, lanes: int = 1) -> None:
        super().__init__(params, optimizer, lanes)
        self._flat_params: torch.Tensor | None = None
        self._param_ptrs: list[int] = []
        self._flat_momentum: torch.Tensor | None = None
        self._momentum_views: list[torch.Tensor] = []

    def _flat_state(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The parameters as one flat tensor, and the momentum buffers as one (None without
        momentum), when a step can run on them; None when it must go through torch: the
        parameters are not one buffer, the SGD variant has no flat form here, or a first
        step with momentum (torch starts each buffer as the gradient)."""
        (group,) = self.optimizer.param_groups
        flat_params = self._params_back_to_back()
        if flat_params is None or group["nesterov"] or group["dampening"] or group["maximize"]:
            return None
        buffer = self._momentum_buffer() if group["momentum"] else None
        if group["momentum"] and buffer is None:
            return None
        return flat_params, buffer

    def step_blocks(self, numel: int, gradient: GradientBlocks, copies: Sequence[torch.Tensor]) -> bool:
        state = self._flat_state()
        if state is None or state[0].numel() != numel:
            return False
        self._step_flat(state, numel, gradient, copies)
        return True

    def _step_flat(
        self, state: tuple[torch.Tensor, torch.Tensor | None], numel: int, gradient: GradientBlocks,
        copies: Sequence[torch.Tensor],
    ) -> None:
        """`step_blocks` on the flat state `_flat_state` returned."""
        flat_params, buffer = state
        (group,) = self.optimizer.param_groups
        momentum, decay, lr = group["momentum"], group["weight_decay"], group["lr"]

        def step(start: int, stop: int, lane: int) -> None:
            params = flat_params[start:stop]
            _sgd_block(gradient(start, stop, lane), params, None if buffer is None else buffer[start:stop],
                       momentum, decay, lr)
            for copy in copies:
                copy[start:stop].copy_(params)

        with torch.no_grad():
            self.lanes.run(numel, step)

    def _dense_step(self, dense: list[tuple[nn.Parameter, torch.Tensor]]) -> None:
        """Every parameter's gradient dense: one flat step, block by block (`step_blocks`),
        where the rule allows it; else torch's."""
        state = self._flat_state() if len(dense) == len(self.params) else None
        if state is None:
            super()._dense_step(dense)
            return
        gradients = [g for _, g in dense]
        flat = back_to_back(gradients)
        if flat is None:
            flat = torch.cat([g.reshape(-1) for g in gradients])
        self._step_flat(state, flat.numel(), lambda start, stop, lane: flat[start:stop], ())

    def _params_back_to_back(self) -> torch.Tensor | None:
        """The parameters as one flat view, when they are one buffer (checked by address:
        `load_state_dict` copies into them, so they stay where they were)."""
        if self._flat_params is None or [p.data_ptr() for p in self.params] != self._param_ptrs:
            self._flat_params = back_to_back([p.detach() for p in self.params])
            self._param_ptrs = [p.data_ptr() for p in self.params]
        return self._flat_params

    def _momentum_buffer(self) -> torch.Tensor | None:
        """The momentum buffers as one flat tensor whose views are the optimizer's state
        (rebuilt from the state after a restore replaced them); None before every
        parameter has one."""
        states = [self.optimizer.state[p] for p in self.params]
        if self._flat_momentum is not None and all(
            state.get("momentum_buffer") is view for state, view in zip(states, self._momentum_views)
        ):
            return self._flat_momentum
        buffers = [state.get("momentum_buffer") for state in states]
        if any(buffer is None for buffer in buffers):
            return None
        flat = torch.cat([b.detach().reshape(-1) for b in buffers if b is not None])
        views = [part.view_as(p) for part, p in zip(flat.split([p.numel() for p in self.params]), self.params)]
        for state, view in zip(states, views):
            state["momentum_buffer"] = view
        self._flat_momentum, self._momentum_views = flat, views
        return flat

    def _apply_sparse(
        self, param: nn.Parameter, gradient: SparseGradient, state: dict[str, Any]
    ) -> torch.Tensor | None:
        group = self.optimizer.param_groups[0]
        lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
        flat = param.data.view(-1)
        if not momentum and not decay:
            scaled = gradient.values * -lr
            if gradient.unique:
                return _add_at_unique(flat, gradient.indices, scaled, self.lanes)
            # scatter_add_ of the scaled values: the same sums in the same order as
            # index_add_(alpha=-lr), equal bit for bit, in 5.5 against 8.4 ms for 500 k of 50 M.
            flat.scatter_add_(0, gradient.indices, scaled)
            return None
        g = gradient.coalesced()
        step = g.values
        if decay:
            step = step + decay * flat[g.indices]
        if momentum:
            buffer = state.get("momentum_buffer")
            if buffer is None:
                buffer = state["momentum_buffer"] = torch.zeros_like(param.data)
            flat_buffer = buffer.view(-1)
            step = flat_buffer[g.indices] * momentum + step
            flat_buffer[g.indices] = step
        flat[g.indices] -= lr * step
        return None


#: Indices per block of `_add_at_unique`: the cache lines a block of scattered indices
#: touches are still cached when they are read back. At 500 k of 50 M: 4.6 ms in blocks of
#: 8 K, 5.0-5.3 in blocks of 16-128 K, on one lane.
ADD_BLOCK_INDICES = 1 << 13
#: Fewest indices a lane of `_add_at_unique` takes (scattered accesses cost about 10 ns
#: each: a lane of 64 K is worth a thread hand-off).
ADD_LANE_INDICES = 1 << 16


def _add_at_unique(
    flat: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, lanes: memory.BlockLanes
) -> torch.Tensor:
    """flat[indices] += values for unique `indices`; returns the new flat[indices], in `values`.

    The same one addition per element as one scatter_add_, so the same result bit for bit,
    then the sums read back while their cache lines are still cached, a block of indices
    at a time: the delta pull that follows a step needs exactly these new values, and
    gathered again later from a model much larger than the cache they cost a pass of
    scattered reads of their own. Unique indices make the blocks independent, so they
    run on several lanes at once: each access waits on memory, and two threads keep
    twice as many in flight (500 k of 50 M: 2.3 against 3.8 ms on 2 lanes here; the
    earlier gather-add-`scatter_` took 8.7: on this machine `scatter_` costs 6 ms to
    `scatter_add_`'s 2.3)."""

    def add(start: int, stop: int, lane: int) -> None:
        block, out = indices[start:stop], values[start:stop]
        flat.scatter_add_(0, block, out)
        torch.index_select(flat, 0, block, out=out)

    lanes.run(indices.numel(), add, ADD_BLOCK_INDICES, ADD_LANE_INDICES)
    return values


def gather(flat: torch.Tensor, indices: torch.Tensor, lanes: memory.BlockLanes) -> torch.Tensor:
    """flat[indices] (`index_select`), on lanes: scattered reads from a model much larger
    than the cache each wait on memory, and several threads keep more of them in flight
    (983 k of 49 M: 5.6 against 9.7 ms on 2 lanes here)."""
    out = torch.empty(indices.numel(), dtype=flat.dtype)

    def take(start: int, stop: int, lane: int) -> None:
        torch.index_select(flat, 0, indices[start:stop], out=out[start:stop])

    # One call per lane: unlike the add, a gather has no cache lines to come back to.
    lanes.run(indices.numel(), take, max(1, -(-indices.numel() // lanes.lanes)), ADD_LANE_INDICES)
    return out


class AdamRule(UpdateRule):
    def _apply_sparse(
        self, param: nn.Parameter, gradient: SparseGradient, state: dict[str, Any]
    ) -> torch.Tensor | None:
        group = self.optimizer.param_groups[0]
        lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(param.data)
            state["exp_avg_sq"] = torch.zeros_like(param.data)
        state["step"] += 1
        t = float(state["step"])
        g = gradient.coalesced()
        flat = param.data.view(-1)
        values = g.values + decay * flat[g.indices] if decay else g.values
        m = state["exp_avg"].view(-1)
        v = state["exp_avg_sq"].view(-1)
        m_i = m[g.indices] * beta1 + (1 - beta1) * values
        v_i = v[g.indices] * beta2 + (1 - beta2) * values * values
        m[g.indices] = m_i
        v[g.indices] = v_i
        denominator = (v_i / (1 - beta2**t)).sqrt() + eps
        flat[g.indices] -= (lr / (1 - beta1**t)) * m_i / denominator
        return None


def build_update_rule(
    optimizer_name: str, params: Sequence[nn.Parameter], lr: float, momentum: float, weight_decay: float,
    lanes: int = 1,
) -> UpdateRule:
    # foreach: one call over all parameters rather than a Python loop of them (torch's
    # default on CUDA only); the same arithmetic per element.
    if optimizer_name == "sgd":
        return SGDRule(params, torch.optim.SGD(
            params, lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=True), lanes)
    if optimizer_name == "adam":
        return AdamRule(params, torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, foreach=True), lanes)
    raise ConfigurationError(f"unknown optimizer {optimizer_name!r}")
