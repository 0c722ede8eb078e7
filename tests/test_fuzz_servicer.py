"""Hostile pushes, generated: each gets a precise status, the model stays bit-for-bit, and the
server answers the next valid push. A real server with a token, real gRPC, hypothesis draws
the attack and its parameters (which chunk, which field, by how much).
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import random_gradient, small_config
from gradhub import auth, wire
from gradhub.codecs import codec_from_name
from gradhub.domain import PushMeta
from gradhub.encoded import EncodedTensor, Layout
from gradhub.models import build_model
from gradhub.v1 import parameter_server_pb2 as pb
from gradhub.v1 import parameter_server_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

TOKEN = "fuzz-token-0123456789abcdef"
CHUNK = 4096
MAX_STALENESS = 2
Codes = grpc.StatusCode


@dataclass
class Attack:
    name: str
    #: (the valid stream, a hypothesis data object, the server's version) -> the hostile stream
    mutate: Callable[[list[pb.PushRequest], st.DataObject, int], list[pb.PushRequest]]
    expected: grpc.StatusCode
    metadata: tuple[tuple[str, str], ...] = auth.metadata(TOKEN)


def _copy(messages: list[pb.PushRequest]) -> list[pb.PushRequest]:
    copies = []
    for message in messages:
        copy = pb.PushRequest()
        copy.CopyFrom(message)
        copies.append(copy)
    return copies


def _index(data: st.DataObject, messages: list[pb.PushRequest], first: int = 0) -> int:
    return data.draw(st.integers(first, len(messages) - 1))


def drop_chunk(m, data, version):
    m = _copy(m)
    del m[_index(data, m, 1)]
    return m


def reorder_chunks(m, data, version):
    m = _copy(m)
    i = _index(data, m, 1)
    j = data.draw(st.integers(1, len(m) - 1).filter(lambda k: m[k].offset != m[i].offset))
    m[i].offset, m[j].offset = m[j].offset, m[i].offset  # data stays: offsets now lie
    return m


def repeat_chunk(m, data, version):
    m = _copy(m)
    i = _index(data, m, 1)
    m.insert(i, m[i])
    return m


def no_header(m, data, version):
    m = _copy(m)
    m[0].ClearField("header")
    return m


def wrong_shape(m, data, version):
    m = _copy(m)
    spec = m[0].header.tensors[_index_of_tensor(data, m)]
    dim = data.draw(st.integers(0, len(spec.shape) - 1))
    spec.shape[dim] += data.draw(st.integers(1, 3))
    return m


def wrong_dtype(m, data, version):
    m = _copy(m)
    spec = m[0].header.tensors[_index_of_tensor(data, m)]
    spec.dtype = data.draw(st.sampled_from([pb.DTYPE_FLOAT16, pb.DTYPE_BFLOAT16, pb.DTYPE_INT8, 99]))
    return m


def lying_length(m, data, version):
    m = _copy(m)
    spec = m[0].header.tensors[_index_of_tensor(data, m)]
    spec.byte_length += data.draw(st.sampled_from([-4, 4, 8, 1 << 20]))
    return m


def huge_declared_size(m, data, version):
    m = _copy(m)
    m[0].header.payload_bytes = data.draw(st.integers(1 << 30, 1 << 62))
    return m


def not_finite(m, data, version):
    m = _copy(m)
    i = _index(data, m)
    chunk = bytearray(m[i].data)
    slot = data.draw(st.integers(0, len(chunk) // 4 - 1))
    chunk[4 * slot: 4 * slot + 4] = struct.pack("<f", data.draw(st.sampled_from([float("nan"), float("inf"), -float("inf")])))
    m[i].data = bytes(chunk)
    return m


def future_version(m, data, version):
    m = _copy(m)
    m[0].header.base_version = version + data.draw(st.integers(1, 1 << 40))
    return m


def stale_version(m, data, version):
    m = _copy(m)
    # The draw must not depend on the server's state (hypothesis replays choices): a lag,
    # clamped to the version, which is always above the bound here.
    lag = data.draw(st.integers(MAX_STALENESS + 1, 1000))
    m[0].header.base_version = version - min(lag, version)
    return m


def unknown_worker(m, data, version):
    m = _copy(m)
    m[0].header.worker_id = data.draw(st.text(min_size=1, max_size=20).filter(lambda w: w != "good"))
    return m


def other_run(m, data, version):
    m = _copy(m)
    m[0].header.run_id = data.draw(st.text(min_size=1, max_size=20).filter(lambda r: r != m[0].header.run_id))
    return m


def index_out_of_range(m, data, version):
    """The same push as sparse top-k pairs, one index past its tensor's end (or negative)."""
    header = m[0].header
    meta = PushMeta(run_id=header.run_id, worker_id=header.worker_id, seq=header.seq, base_version=header.base_version)
    victim = _index_of_tensor(data, m)
    beyond = data.draw(st.sampled_from([0, 1, 1 << 20, -1]))
    tensors = []
    for i, spec in enumerate(header.tensors):
        numel = 1
        for dim in spec.shape:
            numel *= dim
        index = numel + beyond if beyond >= 0 else -1
        tensors.append(EncodedTensor(spec.name, tuple(spec.shape), Layout.SPARSE, torch.ones(1),
                                     torch.tensor([index if i == victim else 0], dtype=torch.int32)))
    return list(wire.push_requests(meta, tensors, chunk_bytes=CHUNK))


def same(m, data, version):
    return _copy(m)


def _index_of_tensor(data: st.DataObject, m: list[pb.PushRequest]) -> int:
    return data.draw(st.integers(0, len(m[0].header.tensors) - 1))


ATTACKS = [
    Attack("drop a chunk", drop_chunk, Codes.INVALID_ARGUMENT),
    Attack("reorder chunks", reorder_chunks, Codes.INVALID_ARGUMENT),
    Attack("repeat a chunk", repeat_chunk, Codes.INVALID_ARGUMENT),
    Attack("no header", no_header, Codes.INVALID_ARGUMENT),
    Attack("wrong shape", wrong_shape, Codes.INVALID_ARGUMENT),
    Attack("wrong dtype", wrong_dtype, Codes.INVALID_ARGUMENT),
    Attack("lying byte length", lying_length, Codes.INVALID_ARGUMENT),
    Attack("huge declared size", huge_declared_size, Codes.RESOURCE_EXHAUSTED),
    Attack("NaN or Inf", not_finite, Codes.INVALID_ARGUMENT),
    Attack("sparse index out of range", index_out_of_range, Codes.INVALID_ARGUMENT),
    Attack("version from the future", future_version, Codes.INVALID_ARGUMENT),
    Attack("stale version", stale_version, Codes.ABORTED),
    Attack("unknown worker", unknown_worker, Codes.NOT_FOUND),
    Attack("another run", other_run, Codes.FAILED_PRECONDITION),
    Attack("no token", same, Codes.UNAUTHENTICATED, metadata=()),
    Attack("wrong token", same, Codes.UNAUTHENTICATED, metadata=auth.metadata("not-the-token-0123456789")),
]


@pytest.fixture
def target(serve, run_id) -> Iterator[tuple[object, pb_grpc.ParameterServerStub]]:
    server = serve(small_config(run_id, mode="async", workers=1, steps=1_000_000, max_staleness=MAX_STALENESS),
                   auth_token=TOKEN)
    server.register("good")
    with grpc.insecure_channel(server.address) as channel:
        yield server, pb_grpc.ParameterServerStub(channel)


def test_hostile_pushes_get_precise_statuses_and_leave_the_model_untouched(target, run_id):
    server, stub = target
    codec = codec_from_name("none")
    gradient = [codec.encode(n, g) for n, g in random_gradient(build_model("cnn"), seed=3)]
    seqs = itertools.count(1)
    seen: dict[str, int] = {}

    def valid(version: int) -> list[pb.PushRequest]:
        meta = PushMeta(run_id=run_id, worker_id="good", seq=next(seqs), base_version=version)
        return list(wire.push_requests(meta, gradient, chunk_bytes=CHUNK))

    # Three valid pushes first, so that a stale version exists to forge.
    for _ in range(MAX_STALENESS + 1):
        stub.Push(iter(valid(server.app.store.version)), timeout=10, metadata=auth.metadata(TOKEN))

    @settings(max_examples=120, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(data=st.data())
    def attack(data: st.DataObject) -> None:
        chosen = data.draw(st.sampled_from(ATTACKS), label="attack")
        version = server.app.store.version
        before = [p.clone() for p in server.parameters()]
        hostile = chosen.mutate(valid(version), data, version)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Push(iter(hostile), timeout=10, metadata=chosen.metadata)
        assert refused.value.code() == chosen.expected, f"{chosen.name}: {refused.value.details()}"
        assert refused.value.details()  # a message that says what was wrong
        after = server.parameters()
        assert all(torch.equal(a, b) for a, b in zip(before, after)), chosen.name
        assert server.app.store.version == version
        # The server answers the next valid push.
        reply = stub.Push(iter(valid(version)), timeout=10, metadata=auth.metadata(TOKEN))
        assert reply.version == version + 1
        seen[chosen.name] = seen.get(chosen.name, 0) + 1

    attack()
    assert set(seen) == {a.name for a in ATTACKS}, f"attacks never drawn: {set(a.name for a in ATTACKS) - set(seen)}"
