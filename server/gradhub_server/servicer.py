"""The gRPC servicer: protobuf in, a domain call, a status code out. Nothing else."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import grpc
import torch

from gradhub import wire
from gradhub.domain import ParameterSnapshot, Push, PushResult
from gradhub.errors import GradhubError, PullDeferred, ServerBusy, status_for
from gradhub.v1 import parameter_server_pb2 as pb
from gradhub_server.core import ParameterServerCore

#: Answer a waiting call this long before its deadline, so the client reads our precise
#: status rather than its own DEADLINE_EXCEEDED.
DEADLINE_MARGIN_S = 0.05


def _wait_budget(context: grpc.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else max(0.0, remaining - DEADLINE_MARGIN_S)


class _PullStreams:
    """Pull streams of the newest version, built once and sent to every puller.

    In sync mode every worker asks for the new version at the same instant; without
    single-flight each handler would miss the cache and encode the whole model again,
    doubling the server's CPU per step on a small machine. The first caller builds; the
    others wait on its event and read the cache."""

    def __init__(
        self,
        build: Callable[[ParameterSnapshot], list[bytes]] = wire.pull_stream,
        on_wait: Callable[[], None] | None = None,
    ) -> None:
        self._build = build
        self._on_wait = on_wait  # called as a caller starts waiting for another's build
        self._lock = threading.Lock()
        self._cache: dict[tuple[int, torch.dtype, bool, int | None], tuple[list[bytes], int]] = {}
        self._building: dict[tuple[int, torch.dtype, bool, int | None], threading.Event] = {}

    def get(self, snapshot: ParameterSnapshot, dtype: torch.dtype) -> tuple[list[bytes], int]:
        key = (snapshot.version, dtype, snapshot.finished, snapshot.delta_from)
        while True:
            with self._lock:
                hit = self._cache.get(key)
                if hit is not None:
                    return hit
                pending = self._building.get(key)
                if pending is None:
                    done = threading.Event()
                    self._building[key] = done
                    break
            if self._on_wait is not None:
                self._on_wait()
            # Bounded by one build of the stream (a few ms to a second for large models);
            # if the builder failed, the loop makes this caller the next builder.
            pending.wait()
        try:
            messages = self._build(snapshot)
            entry = (messages, sum(wire.framed_size(m) for m in messages))
            with self._lock:
                if any(k[0] != snapshot.version for k in self._cache):
                    self._cache = {k: v for k, v in self._cache.items() if k[0] == snapshot.version}
                self._cache[key] = entry
            return entry
        finally:
            with self._lock:
                del self._building[key]
            done.set()


class ParameterServerServicer:
    def __init__(self, core: ParameterServerCore, limits: wire.WireLimits, max_inflight_pushes: int) -> None:
        self._core = core
        self._limits = limits
        self._streams = _PullStreams()
        # Backpressure: at most this many pushes are read, decoded or waiting at once; the
        # next is refused before a byte of it is read, so memory stays bounded under a flood.
        self._max_inflight = max_inflight_pushes
        self._inflight = threading.BoundedSemaphore(max_inflight_pushes)

    def _push(
        self, request_iterator: Iterator[pb.PushRequest], context: grpc.ServicerContext
    ) -> tuple[Push, PushResult]:
        push: Push | None = None
        admitted = self._inflight.acquire(blocking=False)
        try:
            if not admitted:
                raise ServerBusy(
                    f"server busy: {self._max_inflight} pushes in flight; send it again after a backoff"
                )
            push = wire.read_push(request_iterator, self._limits)
            return push, self._core.push(push, _wait_budget(context))
        except GradhubError as exc:
            self._core.refused(push, push.meta.worker_id if push else "", exc)
            context.abort(status_for(exc), str(exc))
            raise  # unreachable: abort raises
        finally:
            if admitted:
                self._inflight.release()

    def _parameters(
        self, run_id: str, worker_id: str, min_version: int, dtype: torch.dtype,
        context: grpc.ServicerContext, pushed: PushResult | None = None, have_version: int | None = None,
    ) -> tuple[list[pb.PullResponse | bytes], int]:
        """The messages of the pull stream (with the push's fate when `pushed`) and their
        wire bytes; for a pull the policy defers after a push (SSP), only that fate (0 bytes
        of parameters)."""
        try:
            snapshot = self._core.pull(
                run_id, min_version, dtype, _wait_budget(context), have_version, worker_id
            )
        except GradhubError as exc:
            if isinstance(exc, PullDeferred) and pushed is not None:
                # The push stands; the worker may not read yet (SSP). Say so without
                # parameters: an error status here would read as a failed push.
                return [pb.PullResponse(pushed=wire.push_reply(pushed))], 0
            context.abort(status_for(exc), str(exc))
            raise  # unreachable: abort raises
        messages, size = self._streams.get(snapshot, dtype)
        if pushed is not None:
            messages = wire.with_push_result_serialized(messages, pushed)
        return list(messages), size

    def Push(
        self, request_iterator: Iterator[pb.PushRequest], context: grpc.ServicerContext
    ) -> pb.PushReply:
        _, result = self._push(request_iterator, context)
        return wire.push_reply(result)

    def Pull(
        self, request: pb.PullRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.PullResponse | bytes]:
        try:
            dtype = wire.pull_dtype(request.dtype)
        except GradhubError as exc:
            context.abort(status_for(exc), str(exc))
            raise  # unreachable: abort raises
        messages, size = self._parameters(
            request.run_id, request.worker_id, request.min_version, dtype, context,
            have_version=wire.have_version(request),
        )
        yield from messages
        self._core.stats.record_pull(request.worker_id, size)

    def PushPull(
        self, request_iterator: Iterator[pb.PushRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.PullResponse | bytes]:
        # Runs when gRPC asks for the first response: the push (and in sync mode the whole
        # barrier) completes before anything is sent back.
        push, result = self._push(request_iterator, context)
        meta = push.meta
        messages, size = self._parameters(
            meta.run_id, meta.worker_id, result.version, meta.pull_dtype, context, pushed=result,
            have_version=meta.base_version if meta.pull_delta else None,
        )
        yield from messages
        self._core.stats.record_pull(meta.worker_id, size)

    def Step(self, request: pb.PushRequest, context: grpc.ServicerContext) -> pb.PullResponse | bytes:
        push, result = self._push(iter([request]), context)
        meta = push.meta
        messages, size = self._parameters(
            meta.run_id, meta.worker_id, result.version, meta.pull_dtype, context, pushed=result,
            have_version=meta.base_version if meta.pull_delta else None,
        )
        if len(messages) > 1:
            # The parameters need more than one message: say what became of the push;
            # the worker pulls them with Pull.
            return pb.PullResponse(pushed=wire.push_reply(result))
        self._core.stats.record_pull(meta.worker_id, size)
        return messages[0]

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


def add_to_server(servicer: ParameterServerServicer, server: grpc.Server) -> None:
    """Register the service like the generated `add_ParameterServerServicer_to_server`,
    with the payload streams' (de)serializers from gradhub.wire: the same wire format,
    without protobuf objects for the data-only messages (one copy of the payload less
    each way, two less on the pull side)."""
    handlers = {
        "Push": grpc.stream_unary_rpc_method_handler(
            servicer.Push, request_deserializer=wire.parse_push_request,
            response_serializer=pb.PushReply.SerializeToString),
        "Pull": grpc.unary_stream_rpc_method_handler(
            servicer.Pull, request_deserializer=pb.PullRequest.FromString, response_serializer=wire.serialize),
        "PushPull": grpc.stream_stream_rpc_method_handler(
            servicer.PushPull, request_deserializer=wire.parse_push_request, response_serializer=wire.serialize),
        "Step": grpc.unary_unary_rpc_method_handler(
            servicer.Step, request_deserializer=wire.parse_push_request, response_serializer=wire.serialize),
        "GetStatus": grpc.unary_unary_rpc_method_handler(
            servicer.GetStatus, request_deserializer=pb.GetStatusRequest.FromString,
            response_serializer=pb.ServerStatus.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(wire.SERVICE, handlers),))
    server.add_registered_method_handlers(wire.SERVICE, handlers)
