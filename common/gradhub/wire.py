"""Tensors <-> protobuf: the only module that knows both.

A push or pull stream is a header that declares every tensor, then the payload
(each tensor's indices then values, back to back) in chunks of at most
`CHUNK_BYTES`, each tagged with its offset. Readers validate structure before
anything reaches domain code: declared sizes against limits and against each
other, chunk order and sizes, sparse index ranges.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy
import torch

from gradhub import index_coding
from gradhub.domain import ParameterSnapshot, Push, PushMeta, PushResult
from gradhub.encoded import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    VALUE_DTYPES,
    DenseViews,
    EncodedTensor,
    Layout,
    all_finite,
    dense_views,
    flat_values,
    numel_of,
)
from gradhub.errors import InvalidRequest, PayloadTooLarge
from gradhub.index_coding import IndexEncoding
from gradhub.transfer import receive_buffer
from gradhub.v1 import parameter_server_pb2 as pb

#: Payload bytes per message. 1 MiB measured best for gRPC Python streaming; far under
#: gRPC's default 4 MiB message limit, which is never raised.
CHUNK_BYTES = 1 << 20

_TO_PROTO_DTYPE: dict[torch.dtype, pb.DType] = {
    torch.float32: pb.DTYPE_FLOAT32,
    torch.float16: pb.DTYPE_FLOAT16,
    torch.bfloat16: pb.DTYPE_BFLOAT16,
    torch.int32: pb.DTYPE_INT32,
    torch.int64: pb.DTYPE_INT64,
    torch.uint8: pb.DTYPE_UINT8,
    torch.int8: pb.DTYPE_INT8,
}
_FROM_PROTO_DTYPE: dict[int, torch.dtype] = {v: k for k, v in _TO_PROTO_DTYPE.items()}
_TO_PROTO_LAYOUT = {Layout.DENSE: pb.LAYOUT_DENSE, Layout.SPARSE: pb.LAYOUT_SPARSE}
_TO_PROTO_INDEX_ENCODING = {
    IndexEncoding.RAW: pb.INDEX_ENCODING_RAW,
    IndexEncoding.DELTA_VARINT: pb.INDEX_ENCODING_DELTA_VARINT,
    IndexEncoding.BITMAP: pb.INDEX_ENCODING_BITMAP,
}
_FROM_PROTO_INDEX_ENCODING = {v: k for k, v in _TO_PROTO_INDEX_ENCODING.items()}
#: The longest LEB128 varint an index can take.
_VARINT_MAX_BYTES = 10
_MAX_DIMS = 8


#: gRPC prefixes every message with a flag byte and a 4-byte length.
GRPC_MESSAGE_PREFIX = 5
#: HTTP/2 carries a message in DATA frames of at most 16 KiB (the default frame size),
#: each behind a 9-byte frame header.
HTTP2_FRAME = 16384
HTTP2_FRAME_HEADER = 9


def framed_size(message: object) -> int:
    """Bytes a protobuf message (or a serialized one) takes on the socket: itself, gRPC's
    prefix, HTTP/2 frame headers. (A call's HEADERS frames, compressed by HPACK to a few
    dozen bytes once a connection is warm, are not counted: tests/test_wire_bytes.py
    measures them.)"""
    length = len(message) if isinstance(message, bytes) else message.ByteSize()  # type: ignore[attr-defined]
    size = length + GRPC_MESSAGE_PREFIX
    return size + HTTP2_FRAME_HEADER * -(-size // HTTP2_FRAME)


@dataclass(frozen=True)
class WireLimits:
    """What a reader accepts before it allocates anything."""

    max_payload_bytes: int
    max_chunk_bytes: int = CHUNK_BYTES
    max_tensors: int = 4096


def dtype_to_proto(dtype: torch.dtype) -> pb.DType:
    try:
        return _TO_PROTO_DTYPE[dtype]
    except KeyError:
        raise InvalidRequest(f"dtype {dtype} cannot travel on the wire") from None


def dtype_from_proto(value: int, what: str) -> torch.dtype:
    try:
        return _FROM_PROTO_DTYPE[value]
    except KeyError:
        raise InvalidRequest(f"{what}: unknown or unspecified dtype {value}") from None


# --- writing --------------------------------------------------------------------------------


#: Entries kept by each spec cache below (cleared when full: a model has a few dozen specs).
_SPEC_CACHE_MAX = 4096
#: Dense tensors' specs, by what they hold: the same model sends the same ones every step.
_DENSE_SPECS: dict[tuple[str, tuple[int, ...], torch.dtype, int], pb.TensorSpec] = {}


def spec_to_proto(tensor: EncodedTensor) -> pb.TensorSpec:
    if tensor.layout is Layout.DENSE and tensor.scales is None:
        key = (tensor.name, tensor.shape, tensor.values.dtype, tensor.byte_length)
        cached = _DENSE_SPECS.get(key)
        if cached is None:
            if len(_DENSE_SPECS) >= _SPEC_CACHE_MAX:
                _DENSE_SPECS.clear()
            cached = _DENSE_SPECS[key] = _new_spec(tensor)
        return cached
    return _new_spec(tensor)


def _new_spec(tensor: EncodedTensor) -> pb.TensorSpec:
    spec = pb.TensorSpec(
        name=tensor.name,
        shape=list(tensor.shape),
        dtype=dtype_to_proto(tensor.values.dtype),
        layout=_TO_PROTO_LAYOUT[tensor.layout],
        byte_length=tensor.byte_length,
    )
    if tensor.indices is not None:
        spec.nnz = tensor.nnz
        spec.index_encoding = _TO_PROTO_INDEX_ENCODING[tensor.index_encoding]
        spec.index_bytes = tensor.index_bytes
        if tensor.index_encoding is IndexEncoding.RAW:
            raw = tensor.indices.dtype if tensor.index_blob is None else index_coding.raw_dtype(tensor.numel)
            spec.index_dtype = dtype_to_proto(raw)
    if tensor.scales is not None:
        spec.scale_block = tensor.scale_block
    return spec


def _as_bytes(part: torch.Tensor) -> memoryview:
    return part.contiguous().view(torch.uint8).numpy().data


def _segments(tensors: Sequence[EncodedTensor]) -> list[memoryview]:
    """Byte views of the payload's parts, in order (indices, scales, values), without copying."""
    whole = flat_values(tensors)
    if whole is not None:  # dense values back to back: one part
        return [_as_bytes(whole)] if whole.numel() else []
    views: list[memoryview] = []
    for tensor in tensors:
        if tensor.indices is not None:
            blob = tensor.index_blob if tensor.index_blob is not None else tensor.indices
            views.append(_as_bytes(blob))
        if tensor.scales is not None:
            views.append(_as_bytes(tensor.scales.to(torch.float32)))
        views.append(_as_bytes(tensor.values))
    return [view for view in views if len(view)]


def _chunk_parts(tensors: Sequence[EncodedTensor], chunk_bytes: int) -> Iterator[tuple[int, list[memoryview]]]:
    """(offset, views) pairs covering the payload, each at most `chunk_bytes`; no copies."""
    pending: list[memoryview] = []
    pending_size = 0
    offset = 0
    for view in _segments(tensors):
        start = 0
        while start < len(view):
            take = min(len(view) - start, chunk_bytes - pending_size)
            pending.append(view[start : start + take])
            pending_size += take
            start += take
            if pending_size == chunk_bytes:
                yield offset, pending
                offset += pending_size
                pending, pending_size = [], 0
    if pending_size:
        yield offset, pending


def _chunks(tensors: Sequence[EncodedTensor], chunk_bytes: int) -> Iterator[tuple[int, bytes]]:
    """(offset, data) pairs covering the payload; one copy of each byte, none of the whole."""
    for offset, parts in _chunk_parts(tensors, chunk_bytes):
        yield offset, b"".join(parts)


# --- data-only messages without protobuf objects -----------------------------------------
#
# Every message of a stream after the first carries only (offset, data): fields 2 and 3
# of both PushRequest and PullResponse. Built and parsed through protobuf objects, each
# payload byte would be copied into a `bytes`, into the message, and out again when it is
# serialized (and as often on the way in). These are the same wire bytes, written straight
# from the tensors' memory (one copy) and read as a view of the received buffer (none):
# peers that use plain protobuf read and write them unchanged. Anything else, the first
# message included, goes through protobuf.

#: The service's full name, for registering and calling its methods by hand.
SERVICE: str = pb.DESCRIPTOR.services_by_name["ParameterServer"].full_name

_OFFSET_TAG = 0x10  # field 2, varint
_DATA_TAG = 0x1A  # field 3, length-delimited


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(data: bytes, position: int) -> tuple[int, int] | None:
    value = shift = 0
    for index in range(position, min(position + 10, len(data))):
        byte = data[index]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, index + 1
        shift += 7
    return None


@dataclass(frozen=True)
class RawChunk:
    """A parsed data-only message: `data` is a view into the received bytes."""

    offset: int
    data: memoryview
    serialized_size: int

    def HasField(self, name: str) -> bool:
        return False

    def ByteSize(self) -> int:
        return self.serialized_size


def _parse_raw_chunk(data: bytes) -> RawChunk | None:
    """The message when it is exactly [offset] data, as this module writes them; None
    for anything else (protobuf then parses it, and rejects what is malformed)."""
    position, offset = 0, 0
    if data[:1] == bytes([_OFFSET_TAG]):
        parsed = _read_varint(data, 1)
        if parsed is None:
            return None
        offset, position = parsed
    if data[position : position + 1] != bytes([_DATA_TAG]):
        return None
    parsed = _read_varint(data, position + 1)
    if parsed is None or parsed[1] + parsed[0] != len(data):
        return None
    return RawChunk(offset, memoryview(data)[parsed[1] :], len(data))


def _raw_chunks(tensors: Sequence[EncodedTensor], chunk_bytes: int) -> Iterator[bytes]:
    """The serialized data-only messages of a payload: one copy from the tensors."""
    for offset, parts in _chunk_parts(tensors, chunk_bytes):
        prefix = (bytes([_OFFSET_TAG]) + _varint(offset) if offset else b"") + bytes([_DATA_TAG])
        yield b"".join([prefix, _varint(sum(len(part) for part in parts)), *parts])


def parse_push_request(data: bytes) -> pb.PushRequest | RawChunk:
    """gRPC request deserializer of Push and PushPull."""
    return _parse_raw_chunk(data) or pb.PushRequest.FromString(data)


def parse_pull_response(data: bytes) -> pb.PullResponse | RawChunk:
    """gRPC response deserializer of Pull and PushPull."""
    return _parse_raw_chunk(data) or pb.PullResponse.FromString(data)


def serialize(message: bytes | _Serializable) -> bytes:
    """gRPC serializer for streams of protobuf messages and already serialized ones."""
    return message if isinstance(message, bytes) else message.SerializeToString()


class _Serializable(Protocol):
    def SerializeToString(self) -> bytes: ...


def push_stream(
    meta: PushMeta, tensors: Sequence[EncodedTensor], chunk_bytes: int = CHUNK_BYTES
) -> Iterator[bytes]:
    """`push_requests` serialized, the chunks straight from the tensors' memory. The header
    message and the first chunk travel as one message: serialized protobuf messages
    concatenated are the message with both messages' fields."""
    header = pb.PushRequest(header=_push_header(meta, tensors)).SerializeToString()
    chunks = _raw_chunks(tensors, chunk_bytes)
    yield header + next(chunks, b"")
    yield from chunks


def pull_stream(snapshot: ParameterSnapshot, chunk_bytes: int = CHUNK_BYTES) -> list[bytes]:
    """`pull_responses` serialized, built once per version and shared by every puller."""
    header = pb.PullResponse(header=_pull_header(snapshot)).SerializeToString()
    chunks = _raw_chunks(snapshot.tensors, chunk_bytes)
    return [header + next(chunks, b""), *chunks]


def with_push_result_serialized(messages: Sequence[bytes], result: PushResult) -> list[bytes]:
    """A pull stream for PushPull: the same messages, the first one also saying what became
    of the push (prepended: serialized messages concatenated merge). Only the first message
    is copied (one message for a small model: every message of a server stream costs a send
    round trip in gRPC Python)."""
    return [pb.PullResponse(pushed=push_reply(result)).SerializeToString() + messages[0], *messages[1:]]


def _push_header(meta: PushMeta, tensors: Sequence[EncodedTensor]) -> pb.PushHeader:
    return pb.PushHeader(
        run_id=meta.run_id,
        worker_id=meta.worker_id,
        seq=meta.seq,
        base_version=meta.base_version,
        tensors=[spec_to_proto(t) for t in tensors],
        payload_bytes=sum(t.byte_length for t in tensors),
        loss=meta.loss,
        samples=meta.samples,
        pull_dtype=dtype_to_proto(meta.pull_dtype),
        pull_delta=meta.pull_delta,
    )


def _pull_header(snapshot: ParameterSnapshot) -> pb.PullHeader:
    header = pb.PullHeader(
        version=snapshot.version,
        tensors=[spec_to_proto(t) for t in snapshot.tensors],
        payload_bytes=sum(t.byte_length for t in snapshot.tensors),
        finished=snapshot.finished,
    )
    if snapshot.delta_from is not None:
        header.delta_from = snapshot.delta_from
    return header


def push_requests(
    meta: PushMeta, tensors: Sequence[EncodedTensor], chunk_bytes: int = CHUNK_BYTES
) -> Iterator[pb.PushRequest]:
    """The client stream of one push: the header rides with the first chunk."""
    header = _push_header(meta, tensors)
    first = True
    for offset, data in _chunks(tensors, chunk_bytes):
        if first:
            yield pb.PushRequest(header=header, offset=offset, data=data)
            first = False
        else:
            yield pb.PushRequest(offset=offset, data=data)
    if first:
        yield pb.PushRequest(header=header)


def pull_responses(
    snapshot: ParameterSnapshot, chunk_bytes: int = CHUNK_BYTES
) -> list[pb.PullResponse]:
    """The server stream of one pull as protobuf messages (what `pull_stream` serializes)."""
    header = _pull_header(snapshot)
    messages: list[pb.PullResponse] = []
    for offset, data in _chunks(snapshot.tensors, chunk_bytes):
        if not messages:
            messages.append(pb.PullResponse(header=header, offset=offset, data=data))
        else:
            messages.append(pb.PullResponse(offset=offset, data=data))
    if not messages:
        messages.append(pb.PullResponse(header=header))
    return messages


def push_reply(result: PushResult) -> pb.PushReply:
    return pb.PushReply(
        version=result.version, staleness=result.staleness, finished=result.finished
    )


def push_result(reply: pb.PushReply) -> PushResult:
    return PushResult(version=reply.version, staleness=reply.staleness, finished=reply.finished)


def pull_request(
    run_id: str, worker_id: str, min_version: int, dtype: torch.dtype, have_version: int | None = None
) -> pb.PullRequest:
    request = pb.PullRequest(
        run_id=run_id,
        worker_id=worker_id,
        min_version=min_version,
        dtype=dtype_to_proto(dtype),
    )
    if have_version is not None:
        request.have_version = have_version
    return request


def have_version(request: pb.PullRequest) -> int | None:
    return request.have_version if request.HasField("have_version") else None


def pull_dtype(value: int) -> torch.dtype:
    """The parameters' element type a Pull (`dtype`) or PushPull (`pull_dtype`) asks for."""
    if value == pb.DTYPE_UNSPECIFIED:
        return torch.float32
    dtype = dtype_from_proto(value, "pull")
    if dtype not in FLOAT_DTYPES:
        raise InvalidRequest(f"parameters cannot be pulled as {dtype}")
    return dtype


# --- reading --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Declared:
    """A validated TensorSpec: what the header declares for one tensor."""

    name: str
    shape: tuple[int, ...]
    layout: Layout
    dtype: torch.dtype
    count: int  # values (and indices, when sparse)
    index_encoding: IndexEncoding
    index_dtype: torch.dtype | None
    index_bytes: int
    scale_block: int
    scale_count: int
    byte_length: int


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


#: Specs already validated, by their serialized bytes: a model's specs repeat on every push
#: and pull, and serializing one costs a tenth of checking it field by field.
_DECLARED: dict[bytes, _Declared] = {}


def _declared(spec: pb.TensorSpec, position: int) -> _Declared:
    key = spec.SerializeToString()
    declared = _DECLARED.get(key)
    if declared is None:
        declared = _read_spec(spec, position)  # raises for a bad spec: never cached
        if len(_DECLARED) >= _SPEC_CACHE_MAX:
            _DECLARED.clear()
        _DECLARED[key] = declared
    return declared


def _read_spec(spec: pb.TensorSpec, position: int) -> _Declared:
    what = f"tensor {position} ({spec.name!r})"
    if len(spec.shape) > _MAX_DIMS or any(d < 0 for d in spec.shape):
        raise InvalidRequest(f"{what}: bad shape {list(spec.shape)}")
    shape = tuple(int(d) for d in spec.shape)
    numel = numel_of(shape)
    dtype = dtype_from_proto(spec.dtype, what)
    if dtype not in VALUE_DTYPES:
        raise InvalidRequest(f"{what}: values must be float32, float16, bfloat16 or int8, not {dtype}")
    if spec.layout == pb.LAYOUT_DENSE:
        if spec.nnz or spec.index_dtype or spec.index_encoding or spec.index_bytes:
            raise InvalidRequest(f"{what}: a dense tensor declares no indices")
        layout, count, encoding, index_dtype, index_bytes = Layout.DENSE, numel, IndexEncoding.RAW, None, 0
    elif spec.layout == pb.LAYOUT_SPARSE:
        if spec.nnz > numel:
            raise InvalidRequest(f"{what}: nnz {spec.nnz} exceeds its {numel} elements")
        layout, count, index_bytes = Layout.SPARSE, int(spec.nnz), int(spec.index_bytes)
        try:
            encoding = _FROM_PROTO_INDEX_ENCODING[spec.index_encoding]
        except KeyError:
            raise InvalidRequest(f"{what}: unknown index encoding {spec.index_encoding}") from None
        index_dtype = None
        if encoding is IndexEncoding.RAW:
            index_dtype = dtype_from_proto(spec.index_dtype, f"{what} indices")
            if index_dtype not in INDEX_DTYPES:
                raise InvalidRequest(f"{what}: indices must be int32 or int64, not {index_dtype}")
            expected = count * _itemsize(index_dtype)
        elif encoding is IndexEncoding.BITMAP:
            expected = (numel + 7) // 8
        else:
            expected = index_bytes if count <= index_bytes <= _VARINT_MAX_BYTES * count else -1
        if index_bytes != expected:
            raise InvalidRequest(
                f"{what}: {index_bytes} index bytes do not fit {count} indices in {encoding.value}"
            )
    else:
        raise InvalidRequest(f"{what}: unknown or unspecified layout {spec.layout}")
    scale_block = int(spec.scale_block)
    if (dtype == torch.int8) != (scale_block > 0):
        raise InvalidRequest(f"{what}: int8 values need a scale block, and only they have one")
    scale_count = -(-count // scale_block) if scale_block else 0
    needed = index_bytes + 4 * scale_count + count * _itemsize(dtype)
    if spec.byte_length != needed:
        raise InvalidRequest(
            f"{what}: declares {spec.byte_length} bytes, its shape and encodings need {needed}"
        )
    return _Declared(
        spec.name, shape, layout, dtype, count, encoding, index_dtype, index_bytes,
        scale_block, scale_count, needed,
    )


def _read_specs(
    specs: Sequence[pb.TensorSpec], payload_bytes: int, limits: WireLimits
) -> list[_Declared]:
    if len(specs) > limits.max_tensors:
        raise InvalidRequest(f"{len(specs)} tensors declared, at most {limits.max_tensors}")
    if payload_bytes > limits.max_payload_bytes:
        raise PayloadTooLarge(
            f"payload of {payload_bytes} bytes declared, this server accepts at most "
            f"{limits.max_payload_bytes}"
        )
    layouts = [_declared(spec, i) for i, spec in enumerate(specs)]
    declared = sum(layout.byte_length for layout in layouts)
    if declared != payload_bytes:
        raise InvalidRequest(
            f"payload_bytes is {payload_bytes} but the tensors declare {declared} bytes"
        )
    return layouts


class _Chunk(Protocol):
    offset: int
    data: bytes


class _Assembler:
    """Collects a payload from chunks that must arrive in order and fill it exactly.

    With `finite_dtype` (a payload of values of that float type alone), it also checks
    that they are finite as they come, each chunk's while it is still in cache: a push's
    check over its whole payload afterwards read it all from memory again (6 ms for 25 M
    fp16 here)."""

    def __init__(
        self, size: int, limits: WireLimits, pinned: bool = False, finite_dtype: torch.dtype | None = None
    ) -> None:
        # Uninitialised: every byte is written by a chunk before it is read (finish() checks),
        # so zero-filling tens of megabytes first would only cost time.
        self._buffer = receive_buffer(size, pinned)
        self._view = self._buffer.data
        self._received = 0
        self._limits = limits
        self._finite_dtype = finite_dtype
        self._checked = 0  # elements checked so far
        #: Every value checked so far is finite (None: not checking).
        self.finite: bool | None = None if finite_dtype is None else True

    def add(self, chunk: _Chunk) -> None:
        size = len(chunk.data)
        if chunk.offset != self._received:
            raise InvalidRequest(
                f"chunk at offset {chunk.offset}, expected {self._received}: chunks lost or reordered"
            )
        if size > self._limits.max_chunk_bytes:
            raise InvalidRequest(
                f"chunk of {size} bytes, at most {self._limits.max_chunk_bytes} per message"
            )
        if self._received + size > len(self._buffer):
            raise InvalidRequest(
                f"chunks exceed the declared payload of {len(self._buffer)} bytes"
            )
        self._view[self._received : self._received + size] = chunk.data
        self._received += size
        if self.finite and self._finite_dtype is not None:
            whole = self._received // self._finite_dtype.itemsize  # a value may straddle two chunks
            if whole > self._checked:
                values = torch.frombuffer(self._buffer, dtype=self._finite_dtype, count=whole - self._checked,
                                          offset=self._checked * self._finite_dtype.itemsize)
                self.finite = all_finite(values)
                self._checked = whole

    def finish(self) -> numpy.ndarray:
        if self._received != len(self._buffer):
            raise InvalidRequest(
                f"stream ended after {self._received} of {len(self._buffer)} payload bytes"
            )
        return self._buffer


def _one_float_type(declared: Sequence[_Declared]) -> torch.dtype | None:
    """The float type of a payload of dense tensors all of that type; None for any other."""
    if declared and all(d.layout is Layout.DENSE and d.dtype == declared[0].dtype and d.dtype in FLOAT_DTYPES
                        for d in declared):
        return declared[0].dtype
    return None


def _decode(
    buffer: numpy.ndarray, declared: Sequence[_Declared], finite: bool | None = None
) -> tuple[EncodedTensor, ...]:
    """The tensors of a payload; `finite`: what a check of its values as they came found."""
    dtype = _one_float_type(declared)
    if dtype is not None:
        # Every tensor dense in one float type: the payload is their values back to back,
        # decoded as views of one tensor so that `flat_values` finds the whole model.
        flat = torch.frombuffer(buffer, dtype=dtype) if len(buffer) else torch.empty(0, dtype=dtype)
        views = dense_views([(d.name, d.shape) for d in declared], flat)
        if isinstance(views, DenseViews):
            views.finite = finite
        return views
    tensors: list[EncodedTensor] = []
    offset = 0

    def take(dtype: torch.dtype, count: int) -> torch.Tensor:
        nonlocal offset
        if count == 0:
            return torch.empty(0, dtype=dtype)
        part = torch.frombuffer(buffer, dtype=dtype, count=count, offset=offset)
        offset += part.numel() * part.element_size()
        return part

    for d in declared:
        indices = blob = None
        if d.layout is Layout.SPARSE:
            blob = take(torch.uint8, d.index_bytes)
            indices = index_coding.decode(
                blob, d.count, numel_of(d.shape), d.index_encoding, f"tensor {d.name!r}", d.index_dtype
            )
        scales = take(torch.float32, d.scale_count) if d.scale_block else None
        values = take(d.dtype, d.count)
        tensors.append(
            EncodedTensor(
                d.name, d.shape, d.layout, values, indices, d.index_encoding,
                index_blob=blob, scales=scales, scale_block=d.scale_block,
            )
        )
    return tuple(tensors)


class _Message(_Chunk, Protocol):
    def HasField(self, name: str) -> bool: ...

    def ByteSize(self) -> int: ...


def _read_payload(
    first: _Message, rest: Iterator[_Message], specs: Sequence[pb.TensorSpec], payload_bytes: int,
    limits: WireLimits, what: str, pinned: bool = False, check_finite: bool = False,
) -> tuple[tuple[EncodedTensor, ...], int]:
    """The tensors a stream's header declares, from its chunks; and the stream's wire bytes.
    `pinned`: decode into pinned memory (for a CUDA worker, gradhub.transfer). `check_finite`:
    check a payload of dense floats for NaN and Inf as it arrives (`DenseViews.finite`)."""
    layouts = _read_specs(specs, payload_bytes, limits)
    assembler = _Assembler(payload_bytes, limits, pinned, _one_float_type(layouts) if check_finite else None)
    wire_bytes = framed_size(first)
    if first.data or first.offset:
        assembler.add(first)
    for message in rest:
        if message.HasField("header"):
            raise InvalidRequest(f"only the first message of a {what} may carry a header")
        wire_bytes += framed_size(message)
        assembler.add(message)
    return _decode(assembler.finish(), layouts, assembler.finite), wire_bytes


def read_push(requests: Iterable[pb.PushRequest], limits: WireLimits) -> Push:
    """Validate and decode a push stream; raises InvalidRequest or PayloadTooLarge."""
    iterator = iter(requests)
    first = next(iterator, None)
    if first is None:
        raise InvalidRequest("empty push stream")
    if not first.HasField("header"):
        raise InvalidRequest("the first message of a push must carry its header")
    header = first.header
    if not header.run_id or not header.worker_id:
        raise InvalidRequest("a push must name its run and worker")
    if header.seq < 1:
        raise InvalidRequest("push sequence numbers start at 1")
    tensors, wire_bytes = _read_payload(
        first, iterator, header.tensors, header.payload_bytes, limits, "push", check_finite=True
    )
    meta = PushMeta(
        run_id=header.run_id,
        worker_id=header.worker_id,
        seq=header.seq,
        base_version=header.base_version,
        loss=header.loss,
        samples=header.samples,
        pull_dtype=pull_dtype(header.pull_dtype),
        pull_delta=header.pull_delta,
    )
    return Push(meta=meta, tensors=tensors, wire_bytes=wire_bytes)


def read_push_pull(
    responses: Iterable[pb.PullResponse], limits: WireLimits, pinned: bool = False
) -> tuple[PushResult, ParameterSnapshot | None]:
    """Validate and decode a PushPull stream: the push's fate, then the parameters; None
    for them when the server deferred the pull (SSP: the worker must pull again)."""
    iterator = iter(responses)
    first = next(iterator, None)
    if first is None or not first.HasField("pushed"):
        raise InvalidRequest("the first message of a PushPull must say what became of the push")
    if not first.HasField("header"):
        if next(iterator, None) is not None:
            raise InvalidRequest("a deferred PushPull must end after saying what became of the push")
        return push_result(first.pushed), None
    return push_result(first.pushed), read_pull(itertools.chain([first], iterator), limits, pinned)


def read_pull(responses: Iterable[pb.PullResponse], limits: WireLimits, pinned: bool = False) -> ParameterSnapshot:
    """Validate and decode a pull stream (the worker's side); into pinned memory if `pinned`."""
    iterator = iter(responses)
    first = next(iterator, None)
    if first is None or not first.HasField("header"):
        raise InvalidRequest("the first message of a pull must carry its header")
    header = first.header
    tensors, wire_bytes = _read_payload(
        first, iterator, header.tensors, header.payload_bytes, limits, "pull", pinned
    )
    return ParameterSnapshot(
        version=header.version, tensors=tensors, finished=header.finished, wire_bytes=wire_bytes,
        delta_from=header.delta_from if header.HasField("delta_from") else None,
    )
