"""The worker's side of the wire: push and pull as domain calls, failures as domain errors."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import grpc
import torch

from gradhub import auth, wire
from gradhub.domain import ParameterSnapshot, PushMeta, PushResult
from gradhub.encoded import EncodedTensor
from gradhub.errors import GradhubError, ServerUnavailable, error_for_status
from gradhub.tls import ClientTls
from gradhub.v1 import parameter_server_pb2 as pb
from gradhub.v1 import parameter_server_pb2_grpc as pb_grpc

#: Keepalive pings notice a server whose machine vanished without closing the connection.
CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.enable_retries", 0),  # retries are ours: a push must never be replayed blindly
)


def _domain_error(exc: grpc.RpcError) -> GradhubError:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return error_for_status(code, details or code.name)


class ParameterClient:
    def __init__(
        self, address: str, run_id: str, worker_id: str, max_payload_bytes: int, token: str | None = None,
        tls: ClientTls | None = None, one_message_steps: bool = False, pinned: bool = False,
    ) -> None:
        """`one_message_steps`: the model's parameters fit in one message, so a push+pull
        whose push does too goes as one unary Step call instead of a PushPull stream.
        `pinned`: received parameters are decoded into pinned memory (a CUDA worker's)."""
        self.address = address
        self.run_id = run_id
        self.worker_id = worker_id
        self.one_message_steps = one_message_steps
        self.pinned = pinned
        self._settings = (max_payload_bytes, token, tls)
        self._metadata = auth.metadata(token)
        self._limits = wire.WireLimits(max_payload_bytes=max_payload_bytes)
        if tls is None:
            self._channel = grpc.insecure_channel(address, options=list(CHANNEL_OPTIONS))
        else:
            self._channel = grpc.secure_channel(address, tls.credentials(), options=list(CHANNEL_OPTIONS))
        self._stub = pb_grpc.ParameterServerStub(self._channel)
        # The payload streams with gradhub.wire's (de)serializers: the same wire format,
        # the chunks written from the tensors and read as views (see wire.push_stream).
        self._push = self._channel.stream_unary(
            f"/{wire.SERVICE}/Push", request_serializer=wire.serialize, response_deserializer=pb.PushReply.FromString)
        self._push_pull = self._channel.stream_stream(
            f"/{wire.SERVICE}/PushPull", request_serializer=wire.serialize,
            response_deserializer=wire.parse_pull_response)
        self._step = self._channel.unary_unary(
            f"/{wire.SERVICE}/Step", request_serializer=wire.serialize,
            response_deserializer=wire.parse_pull_response)
        self._pull = self._channel.unary_stream(
            f"/{wire.SERVICE}/Pull", request_serializer=pb.PullRequest.SerializeToString,
            response_deserializer=wire.parse_pull_response)

    def wait_ready(self, timeout: float) -> None:
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError as exc:
            raise ServerUnavailable(f"server {self.address} not reachable within {timeout:g}s") from exc

    def push(self, meta: PushMeta, tensors: Sequence[EncodedTensor], timeout: float) -> PushResult:
        try:
            reply = self._push(wire.push_stream(meta, tensors), timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _domain_error(exc) from exc
        return wire.push_result(reply)

    def push_pull(
        self, meta: PushMeta, tensors: Sequence[EncodedTensor], timeout: float
    ) -> tuple[PushResult, ParameterSnapshot | None]:
        """Push, then receive the parameters of the version the push led to: one round trip.
        No parameters when the server deferred the pull (SSP), or (Step) when they did not
        fit in one message: the caller pulls them."""
        try:
            messages: Iterator[bytes] = wire.push_stream(meta, tensors)
            if self.one_message_steps:
                serialized = list(messages)
                if len(serialized) == 1:
                    reply = self._step(serialized[0], timeout=timeout, metadata=self._metadata)
                    return wire.read_push_pull([reply], self._limits, self.pinned)
                messages = iter(serialized)  # too big for one message: stream what is built
            return wire.read_push_pull(
                self._push_pull(messages, timeout=timeout, metadata=self._metadata), self._limits, self.pinned
            )
        except grpc.RpcError as exc:
            raise _domain_error(exc) from exc

    def pull(
        self, min_version: int, timeout: float, dtype: torch.dtype = torch.float32,
        have_version: int | None = None,
    ) -> ParameterSnapshot:
        request = wire.pull_request(self.run_id, self.worker_id, min_version, dtype, have_version)
        try:
            return wire.read_pull(
                self._pull(request, timeout=timeout, metadata=self._metadata), self._limits, self.pinned
            )
        except grpc.RpcError as exc:
            raise _domain_error(exc) from exc

    def status(self, timeout: float) -> pb.ServerStatus:
        try:
            return self._stub.GetStatus(pb.GetStatusRequest(), timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _domain_error(exc) from exc

    def reconnected(self, address: str) -> ParameterClient:
        """A client like this one, to another address (the server restarted elsewhere)."""
        max_payload_bytes, token, tls = self._settings
        return ParameterClient(address, self.run_id, self.worker_id, max_payload_bytes, token, tls,
                               self.one_message_steps, self.pinned)

    def close(self) -> None:
        self._channel.close()
