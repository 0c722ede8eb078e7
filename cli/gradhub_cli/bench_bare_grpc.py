"""The bare-gRPC reference of `gradhub bench wire`: a sync step's bytes through gRPC Python
with nothing of gradhub in the way, measured in the same run as the cluster.

Raw TCP says what the socket can carry, and gloo what DDP's wire takes; neither says what
gRPC Python itself costs on this machine, which a parameter server built on it cannot go
below. So: W client processes each stream the bytes of one push to a bare gRPC server (1 MiB
messages, as gradhub's are), the server reads them, waits until every client's have arrived
(the sync step's barrier, with no step), then streams the bytes of one pull back to each.
The time is the slowest client's round trip, median over the repeats, as for the cluster.
What the cluster takes beyond it is gradhub's own work: decoding, checking, the mean, the
update, the snapshot, and its own copies.
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc

from gradhub_cli.bench_processes import collect_results

_METHOD = "/gradhub.bench.Bare/RoundTrip"


def _messages(nbytes: int, chunk_bytes: int) -> list[bytes]:
    """`nbytes` in messages of at most `chunk_bytes` (at least one message, as a stream has)."""
    sizes = [chunk_bytes] * (nbytes // chunk_bytes) + ([nbytes % chunk_bytes] if nbytes % chunk_bytes else [])
    return [bytes(size) for size in sizes] or [b""]


def _identity(data: bytes) -> bytes:
    return data


class _Barrier:
    """Every client's upload of a round is in before any download of it starts."""

    def __init__(self, parties: int) -> None:
        self._parties = parties
        self._arrived = 0
        self._round = 0
        self._cond = threading.Condition()

    def wait(self, timeout: float) -> None:
        with self._cond:
            round_ = self._round
            self._arrived += 1
            if self._arrived == self._parties:
                self._arrived = 0
                self._round += 1
                self._cond.notify_all()
                return
            if not self._cond.wait_for(lambda: self._round != round_, timeout):
                raise TimeoutError(f"bare gRPC barrier: {self._parties} clients did not all arrive")


def _serve(ports: Any, stop: Any, workers: int, pull_bytes: int, chunk_bytes: int) -> None:
    barrier = _Barrier(workers)
    pull = _messages(pull_bytes, chunk_bytes)

    def round_trip(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        for _ in requests:
            pass
        barrier.wait(600)
        yield from pull

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers + 4))
    handler = grpc.stream_stream_rpc_method_handler(
        round_trip, request_deserializer=_identity, response_serializer=_identity)
    service, method = _METHOD.strip("/").split("/")
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, {method: handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    ports.put(port)
    stop.wait(3600)
    server.stop(grace=None)


def _client(
    rank: int, port: int, push_bytes: int, chunk_bytes: int, repeats: int, start: Any, results: Any
) -> None:
    push = _messages(push_bytes, chunk_bytes)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.stream_stream(_METHOD, request_serializer=_identity, response_deserializer=_identity)
        times = []
        for attempt in range(repeats + 1):
            start.wait()
            started = time.perf_counter()
            for _ in call(iter(push), timeout=600):
                pass
            if attempt:  # the first is a warm-up
                times.append(time.perf_counter() - started)
    results.put((rank, times))


def bare_grpc_round_trip_seconds(
    push_bytes: int, pull_bytes: int, workers: int, repeats: int, chunk_bytes: int
) -> float:
    """Median over repeats of the slowest of `workers` clients' round trip: `push_bytes` up,
    a barrier, `pull_bytes` down, through a bare gRPC Python server."""
    context = mp.get_context("spawn")
    ports, results, stop = context.Queue(), context.Queue(), context.Event()
    start = context.Barrier(workers)
    server = context.Process(target=_serve, args=(ports, stop, workers, pull_bytes, chunk_bytes), daemon=True)
    server.start()
    clients: list[Any] = []
    try:
        port = ports.get(timeout=120)
        clients = [context.Process(target=_client, args=(r, port, push_bytes, chunk_bytes, repeats, start, results),
                                   daemon=True) for r in range(workers)]
        for process in clients:
            process.start()
        per_client = dict(collect_results(results, clients, 1800))
    finally:
        stop.set()
        for process in [*clients, server]:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
                process.join()
    return statistics.median(max(per_client[r][i] for r in per_client) for i in range(repeats))
