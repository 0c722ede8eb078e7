"""What a push and a pull carry, as plain dataclasses (no protobuf, no gRPC)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gradhub.encoded import EncodedTensor


@dataclass(frozen=True)
class PushMeta:
    """Who pushed, which of their pushes this is, and what it was computed on."""

    run_id: str
    worker_id: str
    seq: int
    base_version: int
    loss: float = float("nan")
    samples: int = 0
    #: PushPull only: the element type wanted for the parameters sent back.
    pull_dtype: torch.dtype = torch.float32
    #: PushPull only: the worker holds `base_version`'s parameters; send what changed since.
    pull_delta: bool = False


@dataclass(frozen=True)
class Push:
    meta: PushMeta
    tensors: tuple[EncodedTensor, ...]
    #: Serialized size of every message of the stream, framing included.
    wire_bytes: int = 0

    @property
    def dense_bytes(self) -> int:
        """What the same gradient costs as dense fp32."""
        return sum(4 * t.numel for t in self.tensors)


@dataclass(frozen=True)
class PushResult:
    #: Server version once the push took effect.
    version: int
    #: Server version at arrival minus the push's base version.
    staleness: int
    finished: bool = False


@dataclass(frozen=True)
class ParameterSnapshot:
    """The model's parameters at one version."""

    version: int
    tensors: tuple[EncodedTensor, ...]
    finished: bool = False
    #: Serialized size of the stream that carried it (set by readers).
    wire_bytes: int = 0
    #: When set, a delta against version `delta_from`: sparse tensors list the coordinates
    #: that changed since, with their current values (set, not add); dense ones are whole.
    delta_from: int | None = None
