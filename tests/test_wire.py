"""Round trips through the wire format, chunking, and the structural checks of readers."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradhub import wire
from gradhub.codecs import codec_from_name
from gradhub.domain import ParameterSnapshot, PushMeta, PushResult
from gradhub.encoded import EncodedTensor, Layout, dense, dense_views, flat_values, values_finite
from gradhub.errors import InvalidRequest, PayloadTooLarge

pytestmark = pytest.mark.timeout(60)

LIMITS = wire.WireLimits(max_payload_bytes=1 << 28)
META = PushMeta(run_id="r", worker_id="w", seq=1, base_version=4, loss=0.25, samples=50)


def assert_same(a: EncodedTensor, b: EncodedTensor) -> None:
    assert (a.name, a.shape, a.layout) == (b.name, b.shape, b.layout)
    assert a.values.dtype == b.values.dtype and torch.equal(a.values, b.values)
    if a.indices is None:
        assert b.indices is None
    else:
        assert b.indices is not None and torch.equal(a.indices, b.indices)


shapes = st.lists(st.integers(0, 6), min_size=0, max_size=3).map(tuple)


@settings(max_examples=60, deadline=None)
@given(
    shapes=st.lists(shapes, min_size=1, max_size=5),
    codec=st.sampled_from([codec_from_name("none"), codec_from_name("fp16"), codec_from_name("topk:0.3", dense_below=0),
                           codec_from_name("topk:1.0", dense_below=0)]),
    chunk=st.integers(1, 64),
    seed=st.integers(0, 2**16),
)
def test_push_round_trip_any_shapes_codecs_and_chunk_sizes(shapes, codec, chunk, seed):
    generator = torch.Generator().manual_seed(seed)
    tensors = [codec.encode(f"t{i}", torch.randn(s, generator=generator)) for i, s in enumerate(shapes)]
    messages = list(wire.push_requests(META, tensors, chunk_bytes=chunk))
    assert all(len(m.data) <= chunk for m in messages)
    assert messages[0].HasField("header") and not any(m.HasField("header") for m in messages[1:])
    push = wire.read_push(messages, wire.WireLimits(max_payload_bytes=1 << 20, max_chunk_bytes=chunk))
    assert push.meta == META
    assert push.wire_bytes == sum(wire.framed_size(m) for m in messages)
    for a, b in zip(tensors, push.tensors):
        assert_same(a, b)


def test_large_tensor_streams_in_chunks_of_at_most_one_mib():
    big = dense("big", torch.randn(3_000_000))  # 12 MB
    messages = list(wire.push_requests(META, [big]))
    assert len(messages) == 12
    assert max(len(m.data) for m in messages) == wire.CHUNK_BYTES
    # Every message stays far below gRPC's default 4 MiB limit: no limit needs raising.
    assert max(m.ByteSize() for m in messages) < 2 * wire.CHUNK_BYTES
    push = wire.read_push(messages, LIMITS)
    assert torch.equal(push.tensors[0].values, big.values)


def test_pull_round_trip_keeps_version_and_finished_flag():
    snapshot = ParameterSnapshot(
        version=17, finished=True,
        tensors=(dense("a", torch.randn(4, 5)), dense("b", torch.randn(3), torch.float16)),
    )
    read = wire.read_pull(wire.pull_responses(snapshot, chunk_bytes=16), LIMITS)
    assert (read.version, read.finished) == (17, True)
    for a, b in zip(snapshot.tensors, read.tensors):
        assert_same(a, b)


def test_push_pull_stream_carries_the_push_result_in_its_first_message():
    snapshot = ParameterSnapshot(version=3, tensors=(dense("a", torch.randn(300)),))
    serialized = wire.with_push_result_serialized(wire.pull_stream(snapshot, chunk_bytes=256), PushResult(3, 1, False))
    messages = [wire.parse_pull_response(m) for m in serialized]
    assert len(messages) == 5 and messages[0].HasField("pushed") and messages[0].HasField("header")
    result, read = wire.read_push_pull(messages, LIMITS)
    assert result == PushResult(version=3, staleness=1, finished=False)
    assert read.version == 3 and torch.equal(read.tensors[0].values, snapshot.tensors[0].values)
    with pytest.raises(InvalidRequest, match="what became of the push"):
        wire.read_push_pull(wire.pull_responses(snapshot), LIMITS)


def test_declared_payload_over_the_limit_is_refused_before_allocation():
    tensors = [dense("a", torch.randn(1000))]
    messages = list(wire.push_requests(META, tensors))
    with pytest.raises(PayloadTooLarge, match="accepts at most 100"):
        wire.read_push(messages, wire.WireLimits(max_payload_bytes=100))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda h: setattr(h.tensors[0], "dtype", 99), "unknown or unspecified dtype"),
        (lambda h: setattr(h.tensors[0], "dtype", 4), "values must be float32"),
        (lambda h: setattr(h.tensors[0], "layout", 0), "unknown or unspecified layout"),
        (lambda h: setattr(h, "payload_bytes", h.payload_bytes + 1), "payload_bytes is"),
        (lambda h: h.tensors[0].shape.append(-1), "bad shape"),
        (lambda h: setattr(h, "seq", 0), "start at 1"),
        (lambda h: setattr(h, "worker_id", ""), "name its run and worker"),
    ],
)
def test_inconsistent_headers_are_refused(mutate, message):
    messages = list(wire.push_requests(META, [dense("a", torch.randn(10))]))
    mutate(messages[0].header)
    with pytest.raises(InvalidRequest, match=message):
        wire.read_push(messages, LIMITS)


def test_sparse_nnz_beyond_numel_is_refused():
    sparse = EncodedTensor("s", (2,), Layout.SPARSE, torch.ones(3, dtype=torch.float16),
                           torch.tensor([0, 1, 1], dtype=torch.int32))
    messages = list(wire.push_requests(META, [sparse]))
    with pytest.raises(InvalidRequest, match="nnz 3 exceeds"):
        wire.read_push(messages, LIMITS)


def _sparse_push(codec: str, numel: int = 5000, compact: bool = True) -> list:
    """A push of one sparse tensor; compact (varint indices at 1 %) unless told otherwise."""
    from gradhub.codecs import codec_from_name as make

    tensor = make(codec, dense_below=0, compact_indices=compact).encode("s", torch.randn(numel, generator=torch.Generator().manual_seed(1)))
    return list(wire.push_requests(META, [tensor]))


@pytest.mark.parametrize(
    "codec, mutate, message",
    [
        ("topk:0.01", lambda s: setattr(s, "index_bytes", s.index_bytes + 1), "declares"),
        ("topk:0.01", lambda s: setattr(s, "index_bytes", 3), "index bytes do not fit"),
        ("topk:0.01", lambda s: setattr(s, "index_encoding", 7), "unknown index encoding"),
        ("topk:0.5", lambda s: setattr(s, "index_bytes", 9), "index bytes do not fit"),  # a bitmap
        ("topk:0.01+int8", lambda s: setattr(s, "scale_block", 0), "need a scale block"),
        ("topk:0.01", lambda s: setattr(s, "scale_block", 16), "need a scale block"),
        ("int8", lambda s: setattr(s, "scale_block", 128), "declares"),
        ("fp16", lambda s: setattr(s, "index_bytes", 4), "declares no indices"),
    ],
)
def test_inconsistent_index_and_scale_declarations_are_refused(codec, mutate, message):
    messages = _sparse_push(codec)
    mutate(messages[0].header.tensors[0])
    with pytest.raises(InvalidRequest, match=message):
        wire.read_push(messages, LIMITS)


def test_corrupted_varint_indices_are_refused():
    messages = _sparse_push("topk:0.01")
    spec = messages[0].header.tensors[0]
    assert spec.index_encoding == 1  # delta-varint
    data = bytearray(messages[0].data)
    data[0] |= 0x80  # a continuation bit where a varint ended: the count no longer matches
    messages[0].data = bytes(data)
    with pytest.raises(InvalidRequest, match="tensor 's'"):
        wire.read_push(messages, LIMITS)


@settings(max_examples=40, deadline=None)
@given(
    shapes=st.lists(shapes, min_size=1, max_size=4),
    sparse=st.booleans(),
    chunk=st.integers(1, 300),
    seed=st.integers(0, 2**16),
)
def test_serialized_streams_are_the_protobuf_streams_bytes_and_read_back_the_same(shapes, sparse, chunk, seed):
    """push_stream / pull_stream write the data-only messages without protobuf objects: the
    bytes must be exactly what protobuf writes (any peer reads them), and what the parsers
    turn them into must decode to the same push and pull."""
    generator = torch.Generator().manual_seed(seed)
    codec = codec_from_name("topk:0.3+fp16", dense_below=0) if sparse else codec_from_name("none")
    tensors = [codec.encode(f"t{i}", torch.randn(s, generator=generator)) for i, s in enumerate(shapes)]
    messages = list(wire.push_requests(META, tensors, chunk_bytes=chunk))
    serialized = list(wire.push_stream(META, tensors, chunk_bytes=chunk))
    assert len(serialized) == len(messages)
    for raw, message in zip(serialized, messages):
        assert wire.pb.PushRequest.FromString(raw) == message
        if not message.HasField("header"):
            assert raw == message.SerializeToString()
    parsed = [wire.parse_push_request(raw) for raw in serialized]
    assert all(isinstance(p, wire.RawChunk) for p in parsed[1:])
    limits = wire.WireLimits(max_payload_bytes=1 << 20, max_chunk_bytes=chunk)
    push = wire.read_push(parsed, limits)
    assert push.meta == META and push.wire_bytes == sum(wire.framed_size(m) for m in messages)
    for a, b in zip(tensors, push.tensors):
        assert_same(a, b)

    snapshot = ParameterSnapshot(version=7, tensors=tuple(tensors), finished=False)
    pulled = wire.pull_stream(snapshot, chunk_bytes=chunk)
    assert [wire.pb.PullResponse.FromString(raw) for raw in pulled] == wire.pull_responses(snapshot, chunk)
    result, read = wire.read_push_pull(
        [wire.parse_pull_response(raw) for raw in wire.with_push_result_serialized(pulled, PushResult(8, 1, False))],
        limits)
    assert result == PushResult(8, 1, False) and read.version == 7
    for a, b in zip(tensors, read.tensors):
        assert_same(a, b)


def test_a_malformed_data_only_message_goes_to_protobuf_which_refuses_it():
    from google.protobuf.message import DecodeError

    good = next(iter(wire.push_stream(META, [dense("a", torch.randn(400))], chunk_bytes=100)))
    chunk = list(wire.push_stream(META, [dense("a", torch.randn(400))], chunk_bytes=100))[1]
    assert isinstance(wire.parse_push_request(chunk), wire.RawChunk)
    for broken in (chunk[:-1], chunk + b"\x00", b"\x10\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff", b"\x1a\x05ab"):
        with pytest.raises(DecodeError):
            wire.parse_push_request(broken)
    assert not isinstance(wire.parse_push_request(good), wire.RawChunk)  # the header's goes to protobuf


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dense_views_are_the_tensors_built_one_by_one_and_carry_their_flat_tensor(dtype):
    name_shapes = [("a", (3, 4)), ("b", (0,)), ("c", (5,))]
    flat = torch.arange(17, dtype=torch.float32).to(dtype)
    views = dense_views(name_shapes, flat)
    one_by_one = [EncodedTensor(name, shape, Layout.DENSE, part)
                  for (name, shape), part in zip(name_shapes, flat.split([12, 0, 5]))]
    assert len(views) == len(one_by_one)
    for view, built in zip(views, one_by_one):
        assert_same(view, built)
        assert (view.index_encoding, view.index_blob, view.scales, view.scale_block) == (
            built.index_encoding, built.index_blob, built.scales, built.scale_block)
    assert flat_values(views) is flat
    # A stream of them is one segment, byte for byte the stream of the tensors one by one.
    assert list(wire.push_stream(META, views, chunk_bytes=7)) == list(wire.push_stream(META, one_by_one, chunk_bytes=7))
    with pytest.raises(InvalidRequest, match="16 values for tensors of 17"):
        dense_views(name_shapes, flat[:16])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [None, 0, 4, 5, 13, 19])  # first, at and across chunk boundaries, last
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_dense_push_is_checked_for_nan_and_inf_chunk_by_chunk_as_it_arrives(dtype, bad, value):
    """Chunks of 5 bytes: 2-byte and 4-byte values straddle them; the check must see every
    value whole exactly once, wherever the bad one lies."""
    values = torch.linspace(-3, 3, 20)
    if bad is not None:
        values[bad] = value
    tensors = [dense("a", values[:12].view(3, 4), dtype), dense("b", values[12:], dtype)]
    push = wire.read_push(list(wire.push_requests(META, tensors, chunk_bytes=5)),
                          wire.WireLimits(max_payload_bytes=1 << 20, max_chunk_bytes=5))
    assert push.tensors.finite is (bad is None)
    assert values_finite(push.tensors, flat_values(push.tensors)) is (bad is None)


def test_only_pushes_of_dense_floats_are_checked_as_they_arrive():
    sparse_push = [codec_from_name("topk:0.5", dense_below=0).encode("a", torch.randn(10))]
    push = wire.read_push(list(wire.push_requests(META, sparse_push)), LIMITS)
    assert getattr(push.tensors, "finite", None) is None  # checked per tensor by the server
    snapshot = ParameterSnapshot(version=1, tensors=(dense("a", torch.full((4,), float("nan"))),))
    pulled = wire.read_pull(wire.pull_responses(snapshot), LIMITS)  # a pull is not a gradient
    assert pulled.tensors.finite is None
    assert not values_finite(pulled.tensors, flat_values(pulled.tensors))
