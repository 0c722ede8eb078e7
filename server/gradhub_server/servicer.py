"""The gRPC servicer: protobuf in, a domain call, a status code out. Nothing else."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
import torch

from gradhub import wire
from gradhub.domain import ParameterSnapshot, Push
from gradhub.errors import GradhubError, status_for
from gradhub.v1 import parameter_server_pb2 as pb
from gradhub.v1 import parameter_server_pb2_grpc as pb_grpc
from gradhub_server.core import ParameterServerCore

#: Answer a waiting call this long before its deadline, so the client reads our precise
#: status rather than its own DEADLINE_EXCEEDED.
DEADLINE_MARGIN_S = 0.05


def _wait_budget(context: grpc.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else max(0.0, remaining - DEADLINE_MARGIN_S)


class _PullStreams:
    """Pull streams of the newest version, built once and sent to every puller."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cache: dict[tuple[int, torch.dtype, bool], tuple[list[pb.PullResponse], int]] = {}

    def get(self, snapshot: ParameterSnapshot, dtype: torch.dtype) -> tuple[list[pb.PullResponse], int]:
        key = (snapshot.version, dtype, snapshot.finished)
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None:
            return hit
        messages = wire.pull_responses(snapshot)
        entry = (messages, sum(m.ByteSize() for m in messages))
        with self._lock:
            if any(k[0] != snapshot.version for k in self._cache):
                self._cache = {k: v for k, v in self._cache.items() if k[0] == snapshot.version}
            self._cache[key] = entry
        return entry


class ParameterServerServicer(pb_grpc.ParameterServerServicer):
    def __init__(self, core: ParameterServerCore, limits: wire.WireLimits) -> None:
        self._core = core
        self._limits = limits
        self._streams = _PullStreams()

    def Push(
        self, request_iterator: Iterator[pb.PushRequest], context: grpc.ServicerContext
    ) -> pb.PushReply:
        push: Push | None = None
        try:
            push = wire.read_push(request_iterator, self._limits)
            result = self._core.push(push, _wait_budget(context))
        except GradhubError as exc:
            self._core.refused(push, push.meta.worker_id if push else "", exc)
            context.abort(status_for(exc), str(exc))
        return wire.push_reply(result)

    def Pull(
        self, request: pb.PullRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.PullResponse]:
        try:
            dtype = wire.pull_dtype(request)
            snapshot = self._core.pull(
                request.run_id, request.min_version, dtype, _wait_budget(context)
            )
        except GradhubError as exc:
            context.abort(status_for(exc), str(exc))
        messages, size = self._streams.get(snapshot, dtype)
        yield from messages
        self._core.stats.record_pull(request.worker_id, size)

    def GetStatus(
        self, request: pb.GetStatusRequest, context: grpc.ServicerContext
    ) -> pb.ServerStatus:
        status = self._core.status()
        return pb.ServerStatus(
            run_id=status["run_id"],
            mode=status["mode"],
            version=status["version"],
            steps=status["steps"],
            finished=status["finished"],
            live_workers=[w["worker_id"] for w in status["live_workers"]],
            pushes_applied=status["pushes_applied"],
            pushes_refused=status["pushes_refused"],
        )
