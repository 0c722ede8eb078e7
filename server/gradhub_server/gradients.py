"""Pushed gradients as the update rules take them, and the mean of a sync step's pushes.

A dense push arrives as one tensor in its wire type (`flat_values`: fp16, bf16 or
fp32). Converting it to fp32 on arrival cost a fresh buffer per push, and summing the
step's pushes another: on this machine, filling a fresh 100 MB tensor takes over
40 ms, almost all of it the kernel's page faults, against 9 ms for a tensor already
touched. So a sync step's mean is made from the pushes' wire values (`DenseMean`): block
by block inside the update rule's step where the rule can, else whole into fp32 buffers
kept from step to step (`StepSums`). A push's fp32 gradient is only built when a policy
asks for it (`Submission.gradient`: async applies, sparse and mixed steps).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gradhub import memory
from gradhub.domain import Push
from gradhub.encoded import EncodedTensor, Layout
from gradhub_server.update_rules import Gradient, SparseGradient


def to_gradient(tensor: EncodedTensor) -> Gradient:
    """A decoded push tensor as the update rules take it: sparse stays sparse (O(k)), its
    indices unique (every index encoding's decoder refuses them otherwise)."""
    if tensor.layout is Layout.SPARSE and tensor.indices is not None:
        return SparseGradient(tensor.indices.to(torch.int64), tensor.float_values(), unique=True)
    return tensor.to_dense()


def to_gradients(tensors: Sequence[EncodedTensor], flat: torch.Tensor | None) -> list[Gradient]:
    """The push's gradient per parameter; with `flat` (its values as one tensor), views of
    that tensor in fp32 (no copy when it already is)."""
    if flat is None:
        return [to_gradient(t) for t in tensors]
    if flat.dtype != torch.float32:
        flat = memory.empty(flat.numel(), torch.float32).copy_(flat)
    parts = flat.split([t.numel for t in tensors])
    return [part.view(t.shape) for part, t in zip(parts, tensors)]


@dataclass(frozen=True)
class Submission:
    """A validated push on its way to a policy."""

    push: Push
    rank: int
    #: The push's values as one tensor in their wire type, when it is dense (`flat_values`).
    flat: torch.Tensor | None = None

    @functools.cached_property
    def gradient(self) -> list[Gradient]:
        """fp32, per parameter; built on first use (a dense sync step never needs it)."""
        return to_gradients(self.push.tensors, self.flat)


class StepSums:
    """The fp32 buffers a sync step's mean is summed into, kept from step to step.

    The mean is a view of them: valid until the next `mean`, which the caller (a policy,
    under its lock, handing the mean to a store update that keeps no reference) ensures.
    """

    def __init__(self) -> None:
        self._total: torch.Tensor | None = None
        self._cast: torch.Tensor | None = None
        #: Views of `_total` in the parameters' shapes, made once (per-call overhead on a small model).
        self._views: tuple[torch.Tensor, list[torch.Tensor]] | None = None
        #: Per lane of a block-by-block step: a block's mean, and a block's conversion buffer.
        self._lanes: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def lane_buffers(self, lane: int, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 buffers of `numel` elements (a block of a step) for `lane` alone, kept
        from step to step: one for a block's mean, one for a push's block converted."""
        buffers = self._lanes.get(lane)
        if buffers is None or buffers[0].numel() < numel:
            size = max(numel, memory.CACHE_BLOCK_ELEMENTS)
            buffers = self._lanes[lane] = (torch.empty(size), torch.empty(size))
        return buffers[0][:numel], buffers[1][:numel]

    def mean_views(self, flats: Sequence[torch.Tensor], shapes: Sequence[torch.Size]) -> list[Gradient]:
        """`mean`, as views in the parameters' shapes."""
        total = self.mean(flats)
        if self._views is None or self._views[0] is not total or [v.shape for v in self._views[1]] != list(shapes):
            parts = total.split([math.prod(s) for s in shapes])
            self._views = (total, [part.view(shape) for part, shape in zip(parts, shapes)])
        return list(self._views[1])

    def mean(self, flats: Sequence[torch.Tensor]) -> torch.Tensor:
        """The mean of `flats` (same length, any float type) in fp32, summed in the given
        order: the same additions as converting each to fp32 first, so the same result.

        A large model's mean goes block by block (`memory.cache_blocks`), so each block's
        conversion and sum stay in cache rather than making four passes over memory:
        12.1 against 18.2-18.7 ms for two fp16 pushes of 25 M, and a block-sized conversion
        buffer instead of a model-sized one."""
        if len(flats) == 1 and flats[0].dtype == torch.float32:
            return flats[0]
        numel = flats[0].numel()
        if self._total is None or self._total.numel() != numel:
            self._total = memory.empty(numel, torch.float32)
            self._cast = None
        total = self._total
        block = memory.CACHE_BLOCK_ELEMENTS
        if self._cast is not None and self._cast.numel() != min(block, numel):
            self._cast = None
        if self._cast is None and any(flat.dtype != torch.float32 for flat in flats[1:]):
            self._cast = memory.empty(min(block, numel), torch.float32)
        cast = self._cast
        if numel <= block:  # one block: no slicing (a small model's step pays per call)
            _sum_block(total, flats, cast)
            return total
        for start, stop in memory.cache_blocks(numel):
            block_cast = cast if cast is None or stop - start == block else cast[: stop - start]
            _sum_block(total[start:stop], [flat[start:stop] for flat in flats], block_cast)
        return total


def _sum_block(total: torch.Tensor, flats: Sequence[torch.Tensor], cast: torch.Tensor | None) -> None:
    """total = mean(flats) in fp32; `cast` (total's size) holds each non-fp32 part converted."""
    total.copy_(flats[0])
    for flat in flats[1:]:
        if flat.dtype != torch.float32 and cast is not None:
            # add_ of another type would convert into a fresh temporary: convert here.
            flat = cast.copy_(flat)
        total.add_(flat)
    if len(flats) > 1:
        total.div_(len(flats))


@dataclass(frozen=True)
class DenseMean:
    """The mean of a sync step's dense pushes, made where the update rule uses it.

    A rule that steps block by block (`UpdateRule.step_blocks`) asks for each block of the
    mean as it goes, so the mean of a block is made, used and dropped while it is in cache
    instead of written whole and read back: for 2 fp16 pushes of 25 M, mean, SGD step and
    fp16 snapshot together took 54 against 77-85 ms on one thread here. Any other rule
    takes it `whole`. Either way the same additions in the same (rank) order, so the same
    values bit for bit."""

    #: The pushes' values, each one tensor in its wire type, in rank order.
    flats: tuple[torch.Tensor, ...]
    shapes: tuple[torch.Size, ...]
    sums: StepSums

    def block(self, start: int, stop: int, lane: int) -> torch.Tensor:
        """The mean of elements [start, stop) in fp32, in `lane`'s buffer until its next
        block. The caller may overwrite it; a single fp32 push's block is its own memory,
        handed over like the whole mean (`StepSums.mean`)."""
        parts = [flat[start:stop] for flat in self.flats]
        if len(parts) == 1 and parts[0].dtype == torch.float32:
            return parts[0]
        out, cast = self.sums.lane_buffers(lane, stop - start)
        _sum_block(out, parts, cast)
        return out

    def whole(self) -> list[Gradient]:
        """The mean in fp32, as views in the parameters' shapes (`StepSums.mean_views`)."""
        return self.sums.mean_views(self.flats, self.shapes)


def mean_gradient(
    gradients: Sequence[Sequence[Gradient]], shapes: Sequence[torch.Size]
) -> list[Gradient]:
    """The mean of W workers' gradients, parameter by parameter, summed in the given order.

    Sparse stays sparse (the indices of all workers, values divided by W: O(W k)); a
    parameter with any dense gradient is summed densely and divided by W.
    """
    count = len(gradients)
    if count == 1:  # a mean of one: the gradient itself (no copy of its values)
        return list(gradients[0])
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
        total = dense[0] + dense[1]
        for part in dense[2:]:
            total.add_(part)
        mean.append(total.div_(count))
    return mean


def mean_of(
    submissions: Sequence[Submission], shapes: Sequence[torch.Size], sums: StepSums
) -> DenseMean | list[Gradient]:
    """A sync step's mean gradient: a `DenseMean` (made in `sums`' buffers) when every push
    is dense; otherwise parameter by parameter."""
    flats = [s.flat for s in submissions]
    if all(flat is not None for flat in flats):
        return DenseMean(tuple(flat for flat in flats if flat is not None), tuple(shapes), sums)
    return mean_gradient([s.gradient for s in submissions], shapes)
