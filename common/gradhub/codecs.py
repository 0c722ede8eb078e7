"""Gradient codecs: how a worker's gradient is put on the wire, chosen by name.

A codec turns one fp32 tensor into an EncodedTensor and states its ratio against
dense fp32. Decoding is the EncodedTensor's own (`to_dense`), so the server needs
no codec to read what any codec wrote. Error feedback (what a lossy codec drops
is kept and sent later) lives on the worker, around a codec.

Names: `none` (fp32), `fp16`, `topk:RATIO` (the RATIO largest-magnitude
coordinates of each tensor, values in fp16, int32 indices).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

from gradhub.encoded import EncodedTensor, Layout, dense
from gradhub.errors import ConfigurationError

FP16_MAX = float(torch.finfo(torch.float16).max)


class Codec(ABC):
    """Encodes one gradient tensor for the wire."""

    #: The name this codec is chosen by (with its argument, e.g. "topk:0.01").
    name: str
    #: Decoding gives back exactly what was encoded: error feedback has nothing to keep.
    lossless: bool = False

    @abstractmethod
    def encode(self, name: str, tensor: torch.Tensor) -> EncodedTensor:
        """Encode `tensor` (any device, float) as the wire form of parameter `name`."""

    @abstractmethod
    def payload_bytes(self, numel: int) -> int:
        """Payload bytes this codec puts on the wire for a tensor of `numel` elements."""

    def ratio(self, numel: int) -> float:
        """How many times fewer payload bytes than dense fp32."""
        return (4 * numel) / max(1, self.payload_bytes(numel))

    def __repr__(self) -> str:
        return f"<codec {self.name}>"


def _to_fp16(values: torch.Tensor) -> torch.Tensor:
    # Clamp rather than overflow to Inf: the server refuses non-finite gradients, and with
    # error feedback the clipped part is kept by the worker and sent later.
    return values.clamp(-FP16_MAX, FP16_MAX).to(torch.float16)


class Float32Codec(Codec):
    name = "none"
    lossless = True

    def encode(self, name: str, tensor: torch.Tensor) -> EncodedTensor:
        return dense(name, tensor, torch.float32)

    def payload_bytes(self, numel: int) -> int:
        return 4 * numel


class Float16Codec(Codec):
    name = "fp16"

    def encode(self, name: str, tensor: torch.Tensor) -> EncodedTensor:
        flat = tensor.detach().reshape(-1).to(device="cpu", dtype=torch.float32)
        return EncodedTensor(
            name=name,
            shape=tuple(tensor.shape),
            layout=Layout.DENSE,
            values=_to_fp16(flat).contiguous(),
        )

    def payload_bytes(self, numel: int) -> int:
        return 2 * numel


class TopKCodec(Codec):
    """The k = ceil(ratio * numel) largest-magnitude coordinates, fp16 values."""

    def __init__(self, ratio: float) -> None:
        if not 0.0 < ratio <= 1.0:
            raise ConfigurationError(f"topk ratio must be in (0, 1], got {ratio}")
        self.keep = ratio
        self.name = f"topk:{ratio:g}"

    def k_for(self, numel: int) -> int:
        return min(numel, max(1, math.ceil(self.keep * numel)))

    def encode(self, name: str, tensor: torch.Tensor) -> EncodedTensor:
        flat = tensor.detach().reshape(-1).to(dtype=torch.float32)
        numel = flat.numel()
        index_dtype = torch.int32 if numel < 2**31 else torch.int64
        if numel == 0:
            empty = torch.empty(0)
            return EncodedTensor(
                name=name,
                shape=tuple(tensor.shape),
                layout=Layout.SPARSE,
                values=empty.to(torch.float16),
                indices=empty.to(index_dtype),
            )
        k = self.k_for(numel)
        _, indices = torch.topk(flat.abs(), k, sorted=False)
        indices, _ = torch.sort(indices)  # ascending indices: friendlier to later index coding
        values = flat[indices]
        return EncodedTensor(
            name=name,
            shape=tuple(tensor.shape),
            layout=Layout.SPARSE,
            values=_to_fp16(values).cpu().contiguous(),
            indices=indices.to(device="cpu", dtype=index_dtype).contiguous(),
        )

    def payload_bytes(self, numel: int) -> int:
        index_size = 4 if numel < 2**31 else 8
        return self.k_for(numel) * (2 + index_size) if numel else 0


_FACTORIES: dict[str, Callable[[str | None], Codec]] = {}


def register_codec(name: str, factory: Callable[[str | None], Codec]) -> None:
    """Make `factory(argument)` available as `--compression name[:argument]`."""
    _FACTORIES[name] = factory


def _no_argument(cls: type[Codec]) -> Callable[[str | None], Codec]:
    def make(argument: str | None) -> Codec:
        if argument is not None:
            raise ConfigurationError(f"codec {cls.name!r} takes no argument, got {argument!r}")
        return cls()

    return make


def _topk(argument: str | None) -> Codec:
    if argument is None:
        raise ConfigurationError("topk needs a ratio, e.g. topk:0.01")
    try:
        ratio = float(argument)
    except ValueError as exc:
        raise ConfigurationError(f"topk ratio must be a number, got {argument!r}") from exc
    return TopKCodec(ratio)


register_codec("none", _no_argument(Float32Codec))
register_codec("fp16", _no_argument(Float16Codec))
register_codec("topk", _topk)


def codec_names() -> list[str]:
    return sorted(_FACTORIES)


def codec_from_name(spec: str) -> Codec:
    """Build a codec from `name` or `name:argument`, e.g. `fp16` or `topk:0.01`."""
    name, _, argument = spec.partition(":")
    factory = _FACTORIES.get(name.strip().lower())
    if factory is None:
        raise ConfigurationError(
            f"unknown compression {spec!r}; choose one of {', '.join(codec_names())}"
            " (topk takes a ratio, e.g. topk:0.01)"
        )
    return factory(argument.strip() if argument else None)
