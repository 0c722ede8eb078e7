"""The shared token: every parameter-server RPC carries it or is refused UNAUTHENTICATED."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import torch

from conftest import random_gradient, small_config
from gradhub import auth
from gradhub.codecs import codec_from_name
from gradhub.domain import PushMeta
from gradhub.errors import ConfigurationError, Unauthenticated
from gradhub.models import build_model
from gradhub_cli.health import check
from gradhub_worker.client import ParameterClient

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

TOKEN = "s3cret-token-of-the-run-0123456789"


def test_calls_without_the_token_are_refused_and_change_nothing(serve, run_id):
    server = serve(small_config(run_id, mode="async", workers=1), auth_token=TOKEN)
    server.register("w")
    before = [p.clone() for p in server.parameters()]
    codec = codec_from_name("none")
    gradient = [codec.encode(n, g) for n, g in random_gradient(build_model("cnn"), seed=2)]
    for token, reason in ((None, "no auth token"), ("another-token-0123456789", "wrong auth token")):
        client = ParameterClient(server.address, run_id, "w", max_payload_bytes=1 << 26, token=token)
        try:
            with pytest.raises(Unauthenticated, match=reason):
                client.push(PushMeta(run_id, "w", 1, 0), gradient, timeout=10)
            with pytest.raises(Unauthenticated, match=reason):
                client.pull(0, timeout=10)
            with pytest.raises(Unauthenticated, match=reason):
                client.status(timeout=10)
        finally:
            client.close()
    assert all(torch.equal(a, b) for a, b in zip(before, server.parameters()))
    # Probes carry no secrets: health stays open.
    assert check(server.address) == "SERVING"
    # With the token, the same push goes through.
    result = server.client("w").push(PushMeta(run_id, "w", 1, 0), gradient, timeout=10)
    assert result.version == 1
    totals = server.app.stats.totals()
    assert totals["refused_by_reason"] == {"Unauthenticated": 6} and totals["pushes_applied"] == 1


def test_the_unauthenticated_status_is_what_a_raw_grpc_caller_sees(serve, run_id):
    from gradhub.v1 import parameter_server_pb2 as pb
    from gradhub.v1 import parameter_server_pb2_grpc as pb_grpc

    server = serve(small_config(run_id, workers=1), auth_token=TOKEN)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ParameterServerStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.GetStatus(pb.GetStatusRequest(), timeout=10,
                           metadata=(("authorization", "Basic " + TOKEN),))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        reply = stub.GetStatus(pb.GetStatusRequest(), timeout=10, metadata=auth.metadata(TOKEN))
        assert reply.run_id == run_id


def test_tokens_come_from_a_file_or_the_environment_and_must_be_long(tmp_path: Path, monkeypatch):
    monkeypatch.delenv(auth.ENV_VAR, raising=False)
    assert auth.load_token() is None
    monkeypatch.setenv(auth.ENV_VAR, f"  {TOKEN}\n")
    assert auth.load_token() == TOKEN
    token_file = tmp_path / "token"
    token_file.write_text("from-the-file-0123456789\n")
    assert auth.load_token(token_file) == "from-the-file-0123456789"
    token_file.write_text("short")
    with pytest.raises(ConfigurationError, match="at least 16"):
        auth.load_token(token_file)
    with pytest.raises(ConfigurationError, match="cannot read"):
        auth.load_token(tmp_path / "missing")
    assert len(auth.new_token()) >= auth.MIN_TOKEN_CHARS and auth.new_token() != auth.new_token()
