"""Bad pushes get a precise gRPC status, leave the model bit-for-bit untouched, and the
server answers the next valid request. Real Redis, a real gRPC server, real sockets."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
import torch

from conftest import random_gradient, small_config
from gradhub import wire
from gradhub.codecs import codec_from_name
from gradhub.domain import PushMeta
from gradhub.encoded import EncodedTensor, Layout, dense
from gradhub.errors import InvalidRequest, StalePush
from gradhub.models import build_model
from gradhub.v1 import parameter_server_pb2 as pb
from gradhub.v1 import parameter_server_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

CODEC = codec_from_name("none")


@pytest.fixture
def async_server(serve, run_id):
    server = serve(small_config(run_id, mode="async", workers=2, max_staleness=2))
    server.register("good")
    return server


@pytest.fixture
def stub(async_server) -> Iterator[pb_grpc.ParameterServerStub]:
    with grpc.insecure_channel(async_server.address) as channel:
        yield pb_grpc.ParameterServerStub(channel)


def gradient(seed: int = 0) -> list[EncodedTensor]:
    return [CODEC.encode(n, g) for n, g in random_gradient(build_model("cnn"), seed)]


def requests(meta: PushMeta, tensors: list[EncodedTensor], chunk: int = wire.CHUNK_BYTES) -> list[pb.PushRequest]:
    return list(wire.push_requests(meta, tensors, chunk_bytes=chunk))


def expect_refusal(stub, messages, code: grpc.StatusCode, text: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.Push(iter(messages), timeout=10)
    assert info.value.code() == code, info.value.details()
    assert text in info.value.details()


def meta(run_id: str, seq: int, base: int = 0, worker: str = "good") -> PushMeta:
    return PushMeta(run_id=run_id, worker_id=worker, seq=seq, base_version=base, loss=0.5, samples=50)


def test_each_bad_push_gets_a_precise_status_and_changes_nothing(async_server, stub, run_id):
    before = async_server.parameters()
    good = gradient()
    wrong_shape = list(good)
    wrong_shape[0] = dense(good[0].name, torch.zeros(3, 3))
    with_nan = list(good)
    values = good[1].values.clone()
    values[0] = float("nan")
    with_nan[1] = EncodedTensor(good[1].name, good[1].shape, Layout.DENSE, values)
    with_inf = list(good)
    with_inf[2] = dense(good[2].name, torch.full(good[2].shape, float("inf")))
    reordered = list(reversed(good))

    cases = [
        (requests(meta(run_id, 1), wrong_shape), grpc.StatusCode.INVALID_ARGUMENT, "has shape [3, 3]"),
        (requests(meta(run_id, 1), with_nan), grpc.StatusCode.INVALID_ARGUMENT, "NaN or Inf"),
        (requests(meta(run_id, 1), with_inf), grpc.StatusCode.INVALID_ARGUMENT, "NaN or Inf"),
        (requests(meta(run_id, 1), good[:-1]), grpc.StatusCode.INVALID_ARGUMENT, "model has 8 parameters"),
        (requests(meta(run_id, 1), reordered), grpc.StatusCode.INVALID_ARGUMENT, "parameter order"),
        (requests(meta(run_id, 1, worker="stranger"), good), grpc.StatusCode.NOT_FOUND, "holds no lease"),
        (requests(PushMeta("another-run", "good", 1, 0), good), grpc.StatusCode.FAILED_PRECONDITION,
         "this server serves"),
        (requests(meta(run_id, 1, base=7), good), grpc.StatusCode.INVALID_ARGUMENT, "server is at version 0"),
    ]
    for messages, code, text in cases:
        expect_refusal(stub, messages, code, text)
    assert async_server.app.store.version == 0
    after = async_server.parameters()
    assert all(torch.equal(a, b) for a, b in zip(before, after)), "a refused push changed the model"

    # The server still serves: the next valid push is applied.
    reply = stub.Push(iter(requests(meta(run_id, 1), good)), timeout=10)
    assert reply.version == 1
    totals = async_server.app.stats.totals()
    assert totals["pushes_applied"] == 1
    assert totals["pushes_refused"] == len(cases)
    assert totals["refused_by_reason"]["InvalidRequest"] == 3
    assert totals["refused_by_reason"]["NonFiniteGradient"] == 2


def test_malformed_streams_are_refused_before_anything_is_allocated(async_server, stub, run_id):
    before = async_server.parameters()
    good = gradient()
    # Small chunks so the payload spans several messages.
    chunked = requests(meta(run_id, 1), good, chunk=4096)
    assert len(chunked) > 3
    truncated = chunked[:-1]
    swapped = [chunked[0], chunked[2], chunked[1], *chunked[3:]]
    headerless = chunked[1:]
    oversized = [pb.PushRequest(header=pb.PushHeader(
        run_id=run_id, worker_id="good", seq=1, payload_bytes=1 << 40,
        tensors=[pb.TensorSpec(name="conv1.weight", shape=[1 << 18, 1 << 20], dtype=pb.DTYPE_FLOAT32,
                               layout=pb.LAYOUT_DENSE, byte_length=1 << 40)]))]
    lying = requests(meta(run_id, 1), good)
    lying[0].header.tensors[0].byte_length += 4
    out_of_range = requests(meta(run_id, 1), [
        EncodedTensor(t.name, t.shape, Layout.SPARSE, t.values[:1].clone(),
                      torch.tensor([t.numel + 5], dtype=torch.int32)) for t in good])
    cases = [
        (truncated, grpc.StatusCode.INVALID_ARGUMENT, "stream ended after"),
        (swapped, grpc.StatusCode.INVALID_ARGUMENT, "lost or reordered"),
        (headerless, grpc.StatusCode.INVALID_ARGUMENT, "must carry its header"),
        (oversized, grpc.StatusCode.RESOURCE_EXHAUSTED, "accepts at most"),
        (lying, grpc.StatusCode.INVALID_ARGUMENT, "declares"),
        (out_of_range, grpc.StatusCode.INVALID_ARGUMENT, "indices outside"),
    ]
    for messages, code, text in cases:
        expect_refusal(stub, messages, code, text)
    after = async_server.parameters()
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert stub.Push(iter(chunked), timeout=10).version == 1
    # A stream refused before it was whole is charged to no worker: the per-worker table
    # lists only workers that pushed something readable.
    totals = async_server.app.stats.totals()
    assert totals["pushes_refused"] == totals["pushes_refused_unattributed"] == len(cases)
    assert list(totals["workers"]) == ["good"]


def test_stale_duplicate_and_retried_pushes_are_answered_once_and_counted(async_server, stub, run_id):
    good = gradient()
    for seq in (1, 2, 3):  # version 0 -> 3
        stub.Push(iter(requests(meta(run_id, seq, base=seq - 1), good)), timeout=10)
    before = async_server.parameters()
    # A retry of the last push (its answer was lost): the same answer, not a second update.
    retried = stub.Push(iter(requests(meta(run_id, 3, base=2), good)), timeout=10)
    assert (retried.version, retried.staleness) == (3, 0)
    # Computed on version 0, server at 3: staleness 3 > max_staleness 2.
    expect_refusal(stub, requests(meta(run_id, 4, base=0), good), grpc.StatusCode.ABORTED,
                   "3 versions stale")
    # seq 4 was taken by the refused push: a retry of it gets the same refusal (counted once).
    expect_refusal(stub, requests(meta(run_id, 4, base=3), good), grpc.StatusCode.ABORTED,
                   "3 versions stale")
    # An older seq is a late copy: refused.
    expect_refusal(stub, requests(meta(run_id, 2, base=3), good), grpc.StatusCode.ALREADY_EXISTS,
                   "older than its last")
    after = async_server.parameters()
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert async_server.app.store.version == 3
    reply = stub.Push(iter(requests(meta(run_id, 5, base=1), good)), timeout=10)
    assert (reply.version, reply.staleness) == (4, 2)  # staleness 2 is within the bound
    totals = async_server.app.stats.totals()
    assert totals["refused_by_reason"] == {"StalePush": 1, "DuplicatePush": 1}
    assert totals["pushes_applied"] == 4 and async_server.app.core.receipts.replayed == 2
    assert totals["staleness"]["histogram"] == {"0": 3, "2": 1}


def test_pull_for_another_run_or_bad_dtype_is_refused(async_server, stub, run_id):
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Pull(pb.PullRequest(run_id="nope", worker_id="x"), timeout=10))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Pull(pb.PullRequest(run_id=run_id, worker_id="x", dtype=pb.DTYPE_INT64), timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Pull(pb.PullRequest(run_id=run_id, worker_id="x", min_version=5), timeout=1.0))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "not reached" in info.value.details()
    snapshot = wire.read_pull(stub.Pull(pb.PullRequest(run_id=run_id, worker_id="x"), timeout=10),
                              wire.WireLimits(max_payload_bytes=1 << 24))
    assert snapshot.version == 0


def test_push_pull_returns_the_parameters_its_push_led_to_or_the_same_refusal(async_server, run_id):
    client = async_server.client("good")
    good = gradient()
    result, snapshot = client.push_pull(meta(run_id, 1), good, timeout=10)
    assert (result.version, result.staleness, snapshot.version) == (1, 0, 1)
    for got, expected in zip(snapshot.tensors, async_server.parameters()):
        assert torch.equal(got.values.view(got.shape), expected)
    client.push_pull(meta(run_id, 2, base=1), good, timeout=10)
    client.push_pull(meta(run_id, 3, base=2), good, timeout=10)
    before = async_server.parameters()
    with pytest.raises(StalePush, match="3 versions stale"):
        client.push_pull(meta(run_id, 4, base=0), good, timeout=10)
    with pytest.raises(InvalidRequest, match="NaN or Inf"):
        client.push_pull(meta(run_id, 5, base=3), [dense(t.name, torch.full(t.shape, float("nan"))) for t in good], 10)
    assert all(torch.equal(a, b) for a, b in zip(before, async_server.parameters()))
