"""A tensor as it travels: dense or sparse, in a wire element type.

This is the meeting point of codecs (which produce and read it) and the wire
module (which turns it into protobuf and back); it knows torch, not protobuf.

Values are float32, float16, bfloat16, or int8 with one float32 scale per
`scale_block` values (blockwise absmax quantization). A sparse tensor's indices
are kept as int64 for computing and as `index_blob`, their bytes in an
`IndexEncoding`, for the wire.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gradhub.errors import InvalidRequest
from gradhub.index_coding import IndexEncoding, best_encoding
from gradhub.index_coding import encode as encode_indices


class Layout(enum.Enum):
    DENSE = "dense"
    SPARSE = "sparse"


# Element types that may cross the wire, by their names in the protocol.
WIRE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int32": torch.int32,
    "int64": torch.int64,
    "uint8": torch.uint8,
    "int8": torch.int8,
}
FLOAT_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16})
#: Element types of values: floats, or int8 with scales.
VALUE_DTYPES = FLOAT_DTYPES | {torch.int8}
INDEX_DTYPES = frozenset({torch.int32, torch.int64})


def numel_of(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


@dataclass(frozen=True)
class EncodedTensor:
    """One named tensor in wire form.

    `values` (and `indices`) are 1-D and contiguous. A dense tensor has numel(shape)
    values and no indices; a sparse one has nnz values at nnz ascending flat indices.
    """

    name: str
    shape: tuple[int, ...]
    layout: Layout
    values: torch.Tensor
    indices: torch.Tensor | None = None
    index_encoding: IndexEncoding = IndexEncoding.RAW
    #: The indices' bytes in `index_encoding` (what the wire carries).
    index_blob: torch.Tensor | None = None
    #: int8 values only: one float32 scale per `scale_block` values.
    scales: torch.Tensor | None = None
    scale_block: int = 0

    def __post_init__(self) -> None:
        # Runs for every tensor of every push and pull (8 per message for the default CNN):
        # the common case is checked first, in as few torch calls as possible.
        values = self.values
        if values.dim() != 1 or not values.is_contiguous():
            raise InvalidRequest(f"tensor {self.name!r}: values must be 1-D and contiguous")
        dtype = values.dtype
        if dtype not in VALUE_DTYPES:
            raise InvalidRequest(f"tensor {self.name!r}: values of dtype {dtype} cannot travel")
        count = values.numel()
        if self.layout is Layout.DENSE and self.scales is None and dtype != torch.int8:
            if self.indices is not None:
                raise InvalidRequest(f"tensor {self.name!r}: a dense tensor has no indices")
            if count != self.numel:
                raise InvalidRequest(
                    f"tensor {self.name!r}: {count} values for shape {list(self.shape)} ({self.numel} elements)"
                )
            return
        self._check_rest(count)

    @classmethod
    def _dense_view(cls, name: str, shape: tuple[int, ...], values: torch.Tensor) -> EncodedTensor:
        """A dense tensor whose checks `dense_views` made once for the flat tensor it views:
        building the frozen dataclass field by field and checking it again cost more than
        the rest of a small model's push (8 tensors in every push and pull)."""
        tensor = object.__new__(cls)
        tensor.__dict__.update(
            name=name, shape=shape, layout=Layout.DENSE, values=values, indices=None,
            index_encoding=IndexEncoding.RAW, index_blob=None, scales=None, scale_block=0,
        )
        return tensor

    def _check_rest(self, count: int) -> None:
        what = f"tensor {self.name!r}"
        if (self.values.dtype == torch.int8) != (self.scales is not None):
            raise InvalidRequest(f"{what}: int8 values, and only they, come with scales")
        if self.scales is not None:
            blocks = -(-count // self.scale_block) if self.scale_block > 0 else -1
            if self.scales.dim() != 1 or self.scales.numel() != blocks:
                raise InvalidRequest(
                    f"{what}: {self.scales.numel()} scales for {count} values "
                    f"in blocks of {self.scale_block}"
                )
        if self.layout is Layout.DENSE:
            if self.indices is not None:
                raise InvalidRequest(f"{what}: a dense tensor has no indices")
            if count != self.numel:
                raise InvalidRequest(
                    f"{what}: {count} values for shape {list(self.shape)} ({self.numel} elements)"
                )
        else:
            if self.indices is None or self.indices.dim() != 1:
                raise InvalidRequest(f"{what}: a sparse tensor needs 1-D indices")
            if self.indices.numel() != count:
                raise InvalidRequest(f"{what}: {self.indices.numel()} indices but {count} values")

    @property
    def numel(self) -> int:
        return numel_of(self.shape)

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def index_bytes(self) -> int:
        if self.indices is None:
            return 0
        if self.index_blob is not None:
            return self.index_blob.numel()
        return self.indices.numel() * self.indices.element_size()

    @property
    def byte_length(self) -> int:
        size = self.values.numel() * self.values.element_size() + self.index_bytes
        if self.scales is not None:
            size += self.scales.numel() * self.scales.element_size()
        return size

    def is_finite(self) -> bool:
        """No NaN or Inf among the values or their scales."""
        if self.values.is_floating_point() and not all_finite(self.values):
            return False
        return self.scales is None or all_finite(self.scales)

    def float_values(self) -> torch.Tensor:
        """The values as float32 (int8 values dequantized)."""
        if self.scales is None:
            return self.values.to(torch.float32)
        scales = self.scales.to(torch.float32).repeat_interleave(self.scale_block)[: self.nnz]
        return self.values.to(torch.float32) * scales

    def to_dense(self) -> torch.Tensor:
        """The fp32 dense tensor this stands for."""
        values = self.float_values()
        if self.layout is Layout.DENSE:
            return values.view(self.shape)
        if self.indices is None:  # unreachable: __post_init__ checks it
            raise InvalidRequest(f"tensor {self.name!r}: sparse without indices")
        flat = torch.zeros(self.numel, dtype=torch.float32)
        flat.index_add_(0, self.indices.to(torch.int64), values)
        return flat.view(self.shape)


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf in `tensor`, exactly, at the cost of one vectorised sum.

    NaN and Inf propagate through a sum (Inf - Inf is NaN), so a finite sum proves every
    element finite. Only a non-finite sum (a NaN or Inf, or finite values whose sum
    overflows) takes the exact elementwise test, which on a 10 M-element tensor costs
    about 20 times the sum (isfinite allocates a mask and reduces it).
    """
    if tensor.numel() == 0:
        return True
    # In the tensor's own type: sum(dtype=float32) of fp16 converts the whole tensor first
    # (17.6 against 0.7 ms for 10 M here). A 2-byte sum that overflows is not finite, and
    # only sends this to the exact test below: a finite sum is proof either way.
    if math.isfinite(float(tensor.sum())):
        return True
    return bool(torch.isfinite(tensor).all())


def back_to_back(tensors: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The tensors as one 1-D view, without copying, when they are contiguous, of one type
    and device, and lie back to back in one buffer in this order; otherwise None."""
    if not tensors:
        return None
    first = tensors[0]
    storage = first.untyped_storage().data_ptr()
    end = first.data_ptr()
    total = 0
    for tensor in tensors:
        if (tensor.dtype != first.dtype or tensor.data_ptr() != end or not tensor.is_contiguous()
                or tensor.untyped_storage().data_ptr() != storage or tensor.device != first.device):
            return None
        end += tensor.numel() * tensor.element_size()
        total += tensor.numel()
    return first.as_strided((total,), (1,))


def flat_values(tensors: Sequence[EncodedTensor]) -> torch.Tensor | None:
    """All the tensors' values as one 1-D tensor, without copying, when they are dense, of
    one float type, and lie back to back in one buffer (as the wire decodes a dense push
    or pull, and as a snapshot or a dense encode builds them); otherwise None.

    For a small model, per-tensor work is mostly per-call overhead (the default CNN has 8
    parameters): one finiteness check, one conversion and one copy over the whole model
    cost about what one of them costs per tensor.
    """
    if isinstance(tensors, DenseViews):
        return tensors.flat
    if not tensors or tensors[0].values.dtype not in FLOAT_DTYPES:
        return None
    if any(tensor.layout is not Layout.DENSE for tensor in tensors):
        return None
    return back_to_back([tensor.values for tensor in tensors])


class DenseViews(tuple[EncodedTensor, ...]):
    """Dense EncodedTensors that view one flat tensor of floats, carrying it, so that
    `flat_values` (a push's finiteness check and mean, a pull's load, a stream's one
    segment) takes it back without re-checking every tensor's address."""

    flat: torch.Tensor
    #: Whether every value of `flat` is finite, where that is known already (the wire
    #: checks a push's values chunk by chunk as they arrive); None: not checked.
    finite: bool | None = None


def values_finite(tensors: Sequence[EncodedTensor], flat: torch.Tensor) -> bool:
    """`all_finite(flat)` for `flat = flat_values(tensors)`, taken from the check made as
    the values arrived where there was one (`DenseViews.finite`)."""
    if isinstance(tensors, DenseViews) and tensors.finite is not None and tensors.flat is flat:
        return tensors.finite
    return all_finite(flat)


def dense_views(name_shapes: Sequence[tuple[str, tuple[int, ...]]], flat: torch.Tensor) -> tuple[EncodedTensor, ...]:
    """Dense EncodedTensors of consecutive slices of one flat tensor, in order: views, so
    `flat_values` gives `flat` back."""
    sizes = [numel_of(shape) for _, shape in name_shapes]
    if sum(sizes) != flat.numel():
        raise InvalidRequest(f"{flat.numel()} values for tensors of {sum(sizes)} elements")
    if not name_shapes or flat.dtype not in FLOAT_DTYPES or flat.dim() != 1 or not flat.is_contiguous():
        return tuple(
            EncodedTensor(name=name, shape=shape, layout=Layout.DENSE, values=part)
            for (name, shape), part in zip(name_shapes, flat.split(sizes))
        )
    # Checked once above for all of them (1-D contiguous floats, sizes adding up): each
    # slice is a 1-D contiguous float tensor of its shape's size. split_with_sizes, not
    # split: the same views without torch's Python wrapper (3.8 against 6.7 µs here).
    tensors = tuple(
        EncodedTensor._dense_view(name, shape, part) for (name, shape), part in zip(name_shapes, flat.split_with_sizes(sizes))
    )
    views = DenseViews(tensors)
    views.flat = flat
    return views


def dense(name: str, tensor: torch.Tensor, dtype: torch.dtype = torch.float32) -> EncodedTensor:
    """A dense EncodedTensor of `tensor` converted to `dtype` (no copy when it already is)."""
    flat = tensor.detach().reshape(-1).to(device="cpu", dtype=dtype).contiguous()
    return EncodedTensor(name=name, shape=tuple(tensor.shape), layout=Layout.DENSE, values=flat)


def sparse(
    name: str,
    shape: tuple[int, ...],
    indices: torch.Tensor,
    values: torch.Tensor,
    encoding: IndexEncoding | None = None,
    scales: torch.Tensor | None = None,
    scale_block: int = 0,
    compact_indices: bool = False,
) -> EncodedTensor:
    """A sparse EncodedTensor; `indices` ascending and unique. The index encoding is the
    smallest for these indices (varints considered only if `compact_indices`) unless one
    is given."""
    numel = numel_of(shape)
    indices = indices.detach().to(device="cpu", dtype=torch.int64).contiguous()
    chosen = encoding or best_encoding(indices, numel, compact_indices)
    return EncodedTensor(
        name=name,
        shape=shape,
        layout=Layout.SPARSE,
        values=values.detach().cpu().contiguous(),
        indices=indices,
        index_encoding=chosen,
        index_blob=encode_indices(indices, numel, chosen),
        scales=scales,
        scale_block=scale_block,
    )
