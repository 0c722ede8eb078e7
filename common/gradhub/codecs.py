"""Gradient codecs: how a worker's gradient is put on the wire, chosen by name.

A codec is a sparsifier (which coordinates travel) composed with a value codec (in
what element type):

    none | fp32 | fp16 | bf16 | int8             every coordinate, in that type
    topk:R[+V]         the ceil(R * numel) largest magnitudes of each tensor (exact)
    approx-topk:R[+V]  about as many, selected by a threshold estimated from a sample
                       (no sort of the whole tensor: faster on tens of millions)
    randomk:R[+V]      ceil(R * numel) coordinates drawn at random (seeded)

V is the value codec of the sent coordinates (fp16 when omitted). `int8` is blockwise
absmax quantization: one float32 scale per 256 values. Sparse indices travel in the
smallest of raw, delta-varint or bitmap encodings (`gradhub.index_coding`).

Every codec states the payload bytes it expects for a tensor of n elements
(`payload_bytes`, exact for dense codecs, for spread indices otherwise), the ratio
against dense fp32, and a bound on its decoding error for a given tensor
(`error_bound`). Decoding is the EncodedTensor's own (`to_dense`), so the server
needs no codec to read what any codec wrote. Error feedback (what a lossy codec
drops is kept and sent later) lives on the worker, around a codec.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gradhub import memory
from gradhub.encoded import EncodedTensor, Layout, all_finite, dense_views, sparse
from gradhub.errors import ConfigurationError, NonFiniteGradient
from gradhub.transfer import to_host

FP16_MAX = float(torch.finfo(torch.float16).max)
BF16_MAX = float(torch.finfo(torch.bfloat16).max)
INT8_BLOCK = 256


# --- value codecs: the element type of the coordinates that travel --------------------------


class ValueCodec(ABC):
    name: str
    lossless: bool = False
    #: Values come with per-block scales, whose blocks start at each tensor's start.
    scaled: bool = False

    @abstractmethod
    def encode(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """(wire values, scales or None, scale block) for 1-D finite float32 `values`."""

    @abstractmethod
    def bytes_for(self, count: int) -> int:
        """Payload bytes of `count` values."""

    @abstractmethod
    def error_bound(self, values: torch.Tensor) -> torch.Tensor:
        """Per element, the largest |decoded - value| this codec may produce."""


class Float32Values(ValueCodec):
    name = "fp32"
    lossless = True

    def encode(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        return values.to(torch.float32).contiguous(), None, 0

    def bytes_for(self, count: int) -> int:
        return 4 * count

    def error_bound(self, values: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(values)


class _ClampedTwoByteValues(ValueCodec):
    """A 2-byte float type: round to nearest, magnitudes past the type's largest clamped
    rather than overflowing to Inf (the server refuses non-finite gradients; with error
    feedback the clamped part is sent later)."""

    dtype: torch.dtype
    largest: float
    #: Half a unit in the last place, relative; and half the smallest step, absolute.
    relative_error: float
    absolute_error: float

    def encode(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        if values.device.type == "cpu":
            # Convert first and clamp only when something overflowed: the same result (values
            # in range convert alike; larger ones round to Inf here, so they take the clamped
            # path), without a clamped fp32 copy of every gradient, and into huge pages.
            converted = memory.empty(values.numel(), self.dtype).view(values.shape).copy_(values)
            if all_finite(converted):
                return converted, None, 0
        return values.clamp(-self.largest, self.largest).to(self.dtype).contiguous(), None, 0

    def bytes_for(self, count: int) -> int:
        return 2 * count

    def error_bound(self, values: torch.Tensor) -> torch.Tensor:
        magnitude = values.abs()
        return (magnitude * self.relative_error + self.absolute_error
                + (magnitude - self.largest).clamp(min=0))


class Float16Values(_ClampedTwoByteValues):
    """IEEE half: an 11-bit significand, largest 65504, subnormals down to 2**-24."""

    name = "fp16"
    dtype = torch.float16
    largest = FP16_MAX
    relative_error = 2.0**-11
    absolute_error = 2.0**-25


class BFloat16Values(_ClampedTwoByteValues):
    """bfloat16: float32's exponent range, an 8-bit significand; only float32's
    subnormals lose more, absolutely bounded by bfloat16's smallest step."""

    name = "bf16"
    dtype = torch.bfloat16
    largest = BF16_MAX
    relative_error = 2.0**-8
    absolute_error = 2.0**-133


class Int8Values(ValueCodec):
    """Blockwise absmax: each block of 256 values shares a float32 scale absmax/127."""

    name = "int8"
    scaled = True

    def __init__(self, block: int = INT8_BLOCK) -> None:
        self.block = block

    def _scales(self, values: torch.Tensor) -> torch.Tensor:
        count = values.numel()
        blocks = -(-count // self.block)
        padded = torch.zeros(blocks * self.block, dtype=torch.float32, device=values.device)
        padded[:count] = values.abs()
        absmax = padded.view(blocks, self.block).amax(dim=1)
        # Divided by a tensor, not the number: CUDA divides by a number as a multiplication
        # by its reciprocal, which rounds differently, and a gradient must encode to the
        # same bytes on a GPU as on the CPU.
        scales = absmax / torch.full_like(absmax, 127.0)
        # Round toward zero, so that 127 * scale never exceeds absmax (nor float32's range).
        return torch.where(scales * 127.0 > absmax, torch.nextafter(scales, torch.zeros_like(scales)), scales)

    def encode(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        values = values.to(torch.float32)
        scales = self._scales(values)
        per_value = scales.repeat_interleave(self.block)[: values.numel()]
        safe = torch.where(per_value > 0, per_value, torch.ones_like(per_value))
        quantized = torch.round(values / safe).clamp(-127, 127).to(torch.int8)
        return quantized.contiguous(), scales, self.block

    def bytes_for(self, count: int) -> int:
        return count + 4 * (-(-count // self.block))

    def error_bound(self, values: torch.Tensor) -> torch.Tensor:
        per_value = self._scales(values.to(torch.float32)).repeat_interleave(self.block)[: values.numel()]
        # Half a quantization step, float32 rounding of x / scale and q * scale, and the
        # absolute error of scales that fall among float32's subnormals.
        return per_value * 0.5 + values.abs() * 2.0**-22 + 2.0**-140


_VALUE_CODECS: dict[str, type[ValueCodec]] = {
    "fp32": Float32Values,
    "fp16": Float16Values,
    "bf16": BFloat16Values,
    "int8": Int8Values,
}


# --- codecs ----------------------------------------------------------------------------------


def _dense_on_host(
    name: str, shape: tuple[int, ...], values: torch.Tensor, scales: torch.Tensor | None, block: int
) -> EncodedTensor:
    """A dense EncodedTensor of values a value codec encoded on the gradient's device: the
    wire's bytes cross to the host, not the float32 ones (gradhub.transfer)."""
    return EncodedTensor(name, shape, Layout.DENSE, to_host(values),
                         scales=None if scales is None else to_host(scales), scale_block=block)


class Codec(ABC):
    """Encodes one gradient tensor for the wire."""

    #: The name this codec is chosen by, e.g. "topk:0.01+fp16".
    name: str
    #: Decoding gives back exactly what was encoded: error feedback has nothing to keep.
    lossless: bool = False
    #: Sends a subset of the coordinates.
    sparsifying: bool = False

    def encode(self, name: str, tensor: torch.Tensor) -> EncodedTensor:
        """Encode `tensor` (any device, float) as the wire form of parameter `name`.

        Raises NonFiniteGradient for NaN or Inf: such a gradient must not be sent.
        """
        flat = tensor.detach().reshape(-1).to(torch.float32)
        if not all_finite(flat):
            raise NonFiniteGradient(f"gradient for {name!r} holds NaN or Inf: not encoded")
        return self._encode(name, tuple(tensor.shape), flat)

    @abstractmethod
    def _encode(self, name: str, shape: tuple[int, ...], flat: torch.Tensor) -> EncodedTensor:
        """Encode finite float32 `flat`."""

    @abstractmethod
    def payload_bytes(self, numel: int) -> int:
        """Payload bytes expected for a tensor of `numel` elements."""

    @abstractmethod
    def error_bound(self, tensor: torch.Tensor) -> float:
        """The largest |decode(encode(tensor)) - tensor| (any coordinate) this codec allows."""

    def ratio(self, numel: int) -> float:
        """How many times fewer payload bytes than dense fp32."""
        return (4 * numel) / max(1, self.payload_bytes(numel))

    def __repr__(self) -> str:
        return f"<codec {self.name}>"


class DenseCodec(Codec):
    def __init__(self, values: ValueCodec) -> None:
        self.values = values
        self.name = values.name
        self.lossless = values.lossless

    def _encode(self, name: str, shape: tuple[int, ...], flat: torch.Tensor) -> EncodedTensor:
        return _dense_on_host(name, shape, *self.values.encode(flat))

    @property
    def encodes_whole_models(self) -> bool:
        """`encode_model` applies: the values need no per-tensor scales."""
        return not self.values.scaled

    def encode_model(
        self, name_shapes: Sequence[tuple[str, tuple[int, ...]]], flat: torch.Tensor
    ) -> tuple[EncodedTensor, ...]:
        """Encode every tensor of a model from their float32 values back to back in `flat`:
        what `encode` gives tensor by tensor, in one call per operation rather than one per
        tensor (and one device-to-host copy). The tensors' values are views of one buffer.

        Raises NonFiniteGradient for NaN or Inf, naming the first tensor that holds one.
        """
        if not self.encodes_whole_models:
            raise ConfigurationError(f"codec {self.name} scales values per tensor: encode them one by one")
        if not all_finite(flat):
            sizes = [math.prod(shape) for _, shape in name_shapes]
            culprit = next((name for (name, _), part in zip(name_shapes, flat.split(sizes))
                            if not all_finite(part)), "?")
            raise NonFiniteGradient(f"gradient for {culprit!r} holds NaN or Inf: not encoded")
        values, _, _ = self.values.encode(flat)
        return dense_views(name_shapes, to_host(values))

    def payload_bytes(self, numel: int) -> int:
        return self.values.bytes_for(numel)

    def error_bound(self, tensor: torch.Tensor) -> float:
        flat = tensor.detach().reshape(-1).to(torch.float32).cpu()
        return float(self.values.error_bound(flat).max()) if flat.numel() else 0.0


def _spread_index_bytes(numel: int, k: int, compact: bool = False) -> int:
    """Expected index bytes of k indices at random positions among numel (smallest encoding
    of those `best_encoding` considers).

    Gaps between random positions are geometric with p = k / numel, and a gap takes one
    more varint byte for each power of 128 it reaches: E[bytes] = sum_j P(gap >= 128**j).
    """
    if k == 0:
        return 0
    raw = k * (4 if numel < 2**31 else 8)
    if not compact:
        return raw
    p = k / numel
    per_index = sum((1 - p) ** (128**j - 1) for j in range(1, 10)) + 1.0
    varint = math.ceil(k * per_index)
    return min(varint, raw, (numel + 7) // 8)


class Sparsifier(Codec):
    """Sends k = ceil(ratio * numel) coordinates (at least one of a non-empty tensor).

    Tensors of fewer than `dense_below` elements (biases, small layers) are sent whole:
    at a ratio of 0.001 a 160-element bias would get one coordinate per step and learn
    160 times slower, for a saving of a few hundred bytes.
    """

    sparsifying = True
    kind: str
    DENSE_BELOW = 4096

    def __init__(
        self, ratio: float, values: ValueCodec, seed: int = 0, dense_below: int | None = None,
        compact_indices: bool = False,
    ) -> None:
        if not 0.0 < ratio <= 1.0:
            raise ConfigurationError(f"{self.kind} ratio must be in (0, 1], got {ratio}")
        self.keep = ratio
        self.values = values
        self.seed = seed
        self.dense_below = self.DENSE_BELOW if dense_below is None else dense_below
        self.compact_indices = compact_indices
        self.name = f"{self.kind}:{ratio:g}+{values.name}"
        self._generator = torch.Generator().manual_seed(seed)

    def with_ratio(self, ratio: float) -> Sparsifier:
        """The same codec keeping another fraction (sparsity warm-up)."""
        return type(self)(ratio, self.values, self.seed, self.dense_below, self.compact_indices)

    def k_for(self, numel: int) -> int:
        if numel < self.dense_below:
            return numel
        return min(numel, max(1, math.ceil(self.keep * numel))) if numel else 0

    @abstractmethod
    def select(self, flat: torch.Tensor, k: int) -> torch.Tensor:
        """Ascending flat indices of the coordinates to send."""

    def _encode(self, name: str, shape: tuple[int, ...], flat: torch.Tensor) -> EncodedTensor:
        k = self.k_for(flat.numel())
        if k == flat.numel():
            return _dense_on_host(name, shape, *self.values.encode(flat))
        indices = self.select(flat, k) if k else torch.empty(0, dtype=torch.int64)
        values, scales, block = self.values.encode(flat[indices])
        return sparse(name, shape, to_host(indices), to_host(values),
                      scales=None if scales is None else to_host(scales), scale_block=block,
                      compact_indices=self.compact_indices)

    def payload_bytes(self, numel: int) -> int:
        k = self.k_for(numel)
        if k == numel:
            return self.values.bytes_for(numel)
        return self.values.bytes_for(k) + _spread_index_bytes(numel, k, self.compact_indices)

    def error_bound(self, tensor: torch.Tensor) -> float:
        # Anything may be left out by a sparsifier that does not rank (randomk, approximate).
        flat = tensor.detach().reshape(-1).to(torch.float32).cpu()
        if not flat.numel():
            return 0.0
        return float(flat.abs().max() + self.values.error_bound(flat).max())


def exact_topk(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Ascending indices of the k largest magnitudes."""
    _, indices = torch.topk(flat.abs(), k, sorted=False)
    return torch.sort(indices).values


class TopK(Sparsifier):
    kind = "topk"

    def select(self, flat: torch.Tensor, k: int) -> torch.Tensor:
        return exact_topk(flat, k)

    def error_bound(self, tensor: torch.Tensor) -> float:
        """A coordinate left out is no larger than the k-th largest magnitude."""
        flat = tensor.detach().reshape(-1).to(torch.float32).cpu()
        k = self.k_for(flat.numel())
        if not flat.numel():
            return 0.0
        magnitudes = torch.sort(flat.abs(), descending=True).values
        left_out = float(magnitudes[k]) if k < flat.numel() else 0.0
        return max(left_out, float(self.values.error_bound(flat).max()))


class ApproxTopK(Sparsifier):
    """Top-k by an estimated threshold (as in Deep Gradient Compression): the
    (1 - ratio) quantile of a random sample of magnitudes, then one pass over the
    tensor to keep what exceeds it. When that keeps more than k the exact top-k of the
    kept few is taken; when it keeps too few, the threshold is lowered and tried again.
    Below `EXACT_BELOW` elements the exact selection is as fast, and is used."""

    kind = "approx-topk"
    EXACT_BELOW = 1 << 16
    SAMPLE = 1 << 14

    def select(self, flat: torch.Tensor, k: int) -> torch.Tensor:
        numel = flat.numel()
        magnitudes = flat.abs()
        if numel < self.EXACT_BELOW or k * 8 > numel:
            return exact_topk(flat, k)
        sample = magnitudes[torch.randint(numel, (self.SAMPLE,), generator=self._generator)]
        fraction = k / numel
        for _ in range(4):
            rank = max(1, min(self.SAMPLE, math.ceil(self.SAMPLE * (1 - fraction))))
            threshold = sample.kthvalue(rank).values
            candidates = torch.nonzero(magnitudes >= threshold).squeeze(1)
            if candidates.numel() >= k:
                break
            fraction *= 2  # the sample was unlucky: lower the threshold
        else:
            return exact_topk(flat, k)
        if candidates.numel() > k:
            _, best = torch.topk(magnitudes[candidates], k, sorted=False)
            candidates = candidates[best]
        return torch.sort(candidates).values


class RandomK(Sparsifier):
    kind = "randomk"

    def select(self, flat: torch.Tensor, k: int) -> torch.Tensor:
        numel = flat.numel()
        if k * 4 > numel:
            chosen = torch.randperm(numel, generator=self._generator)[:k]
        else:
            # Draw with replacement and drop repeats: O(k), not O(numel); rarely a few short.
            chosen = torch.unique(torch.randint(numel, (k,), generator=self._generator))
        return torch.sort(chosen).values


_SPARSIFIERS: dict[str, type[Sparsifier]] = {"topk": TopK, "approx-topk": ApproxTopK, "randomk": RandomK}


@dataclass(frozen=True)
class CodecSpec:
    sparsifier: str | None
    ratio: float | None
    values: str


def parse_codec(spec: str) -> CodecSpec:
    text = spec.strip().lower()
    if text == "none":
        text = "fp32"
    head, plus, value_name = text.partition("+")
    kind, colon, argument = head.partition(":")
    if kind in _VALUE_CODECS and not colon and not plus:
        return CodecSpec(None, None, kind)
    if kind not in _SPARSIFIERS:
        raise ConfigurationError(
            f"unknown compression {spec!r}; choose one of {', '.join(codec_names())}"
        )
    if not colon:
        raise ConfigurationError(f"{kind} needs a ratio, e.g. {kind}:0.01")
    try:
        ratio = float(argument)
    except ValueError as exc:
        raise ConfigurationError(f"{kind} ratio must be a number, got {argument!r}") from exc
    value_name = value_name or "fp16"
    if value_name not in _VALUE_CODECS:
        raise ConfigurationError(
            f"unknown value codec {value_name!r} in {spec!r}; choose one of {', '.join(_VALUE_CODECS)}"
        )
    return CodecSpec(kind, ratio, value_name)


def codec_names() -> list[str]:
    return ["none", *_VALUE_CODECS, *(f"{s}:RATIO[+VALUES]" for s in _SPARSIFIERS)]


def codec_from_name(
    spec: str, seed: int = 0, dense_below: int | None = None, compact_indices: bool = False
) -> Codec:
    """Build a codec from its name, e.g. `fp16`, `topk:0.001`, `randomk:0.01+int8`.

    `seed` drives the randomness of approx-topk's samples and randomk's draws; sparsifiers
    send tensors of fewer than `dense_below` elements whole (default 4096), and send their
    indices raw, or in the smallest of raw, varints and a bitmap if `compact_indices`
    (see index_coding)."""
    parsed = parse_codec(spec)
    values = _VALUE_CODECS[parsed.values]()
    if parsed.sparsifier is None:
        return DenseCodec(values)
    return _SPARSIFIERS[parsed.sparsifier](parsed.ratio or 0.0, values, seed, dense_below, compact_indices)

