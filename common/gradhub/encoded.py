"""A tensor as it travels: dense or sparse, in a wire element type.

This is the meeting point of codecs (which produce and read it) and the wire
module (which turns it into protobuf and back); it knows torch, not protobuf.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch

from gradhub.errors import InvalidRequest


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
VALUE_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16})
INDEX_DTYPES = frozenset({torch.int32, torch.int64})


def numel_of(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


@dataclass(frozen=True)
class EncodedTensor:
    """One named tensor in wire form.

    `values` and `indices` are 1-D and contiguous. A dense tensor has numel(shape)
    values and no indices; a sparse one has nnz flat indices and nnz values.
    """

    name: str
    shape: tuple[int, ...]
    layout: Layout
    values: torch.Tensor
    indices: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.values.dim() != 1 or not self.values.is_contiguous():
            raise InvalidRequest(f"tensor {self.name!r}: values must be 1-D and contiguous")
        if self.layout is Layout.DENSE:
            if self.indices is not None:
                raise InvalidRequest(f"tensor {self.name!r}: a dense tensor has no indices")
            if self.values.numel() != self.numel:
                raise InvalidRequest(
                    f"tensor {self.name!r}: {self.values.numel()} values for shape "
                    f"{list(self.shape)} ({self.numel} elements)"
                )
        else:
            if self.indices is None or self.indices.dim() != 1:
                raise InvalidRequest(f"tensor {self.name!r}: a sparse tensor needs 1-D indices")
            if self.indices.numel() != self.values.numel():
                raise InvalidRequest(
                    f"tensor {self.name!r}: {self.indices.numel()} indices but "
                    f"{self.values.numel()} values"
                )

    @property
    def numel(self) -> int:
        return numel_of(self.shape)

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def byte_length(self) -> int:
        size = self.values.numel() * self.values.element_size()
        if self.indices is not None:
            size += self.indices.numel() * self.indices.element_size()
        return size

    def to_dense(self) -> torch.Tensor:
        """The fp32 dense tensor this stands for (duplicate sparse indices add up)."""
        if self.layout is Layout.DENSE:
            return self.values.to(torch.float32).view(self.shape)
        if self.indices is None:  # unreachable: __post_init__ checks it
            raise InvalidRequest(f"tensor {self.name!r}: sparse without indices")
        flat = torch.zeros(self.numel, dtype=torch.float32)
        flat.index_add_(0, self.indices.to(torch.int64), self.values.to(torch.float32))
        return flat.view(self.shape)


def dense(name: str, tensor: torch.Tensor, dtype: torch.dtype = torch.float32) -> EncodedTensor:
    """A dense EncodedTensor of `tensor` converted to `dtype` (no copy when it already is)."""
    flat = tensor.detach().reshape(-1).to(device="cpu", dtype=dtype).contiguous()
    return EncodedTensor(name=name, shape=tuple(tensor.shape), layout=Layout.DENSE, values=flat)
