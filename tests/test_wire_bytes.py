"""The bytes gradhub counts are the bytes that cross the socket.

A counting TCP proxy on loopback sits between a worker's channel and a real server;
what the socket carried (gRPC and HTTP/2 framing, headers, window updates and all)
is compared with what the server's counters report.
"""

from __future__ import annotations

import socket
import threading

import pytest

from conftest import random_gradient, small_config
from gradhub.codecs import codec_from_name
from gradhub.domain import PushMeta
from gradhub.models import build_model

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


class CountingProxy:
    """Forwards loopback TCP connections to `target`, counting bytes in each direction."""

    def __init__(self, target: tuple[str, int]) -> None:
        self._target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self.upstream = 0  # client -> server
        self.downstream = 0
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._spawn(self._accept)

    def _spawn(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self._target)
            self._sockets += [client, server]
            self._spawn(self._pump, client, server, True)
            self._spawn(self._pump, server, client, False)

    def _pump(self, source: socket.socket, sink: socket.socket, upstream: bool) -> None:
        while True:
            try:
                data = source.recv(1 << 16)
            except OSError:
                return
            if not data:
                return
            with self._lock:
                if upstream:
                    self.upstream += len(data)
                else:
                    self.downstream += len(data)
            try:
                sink.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        for sock in self._sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


def test_counted_push_bytes_match_the_socket_within_the_per_call_framing(serve, run_id):
    from gradhub_worker.client import ParameterClient

    server = serve(small_config(run_id, mode="async", workers=1, model="wide", max_staleness=10**6))
    server.register("w")
    host, port = server.address.rsplit(":", 1)
    proxy = CountingProxy((host, int(port)))
    client = ParameterClient(proxy.address, run_id, "w", max_payload_bytes=1 << 26)
    try:
        client.wait_ready(10)
        model = build_model("wide")
        codec = codec_from_name("topk:0.001")
        gradients = [[codec.encode(n, g) for n, g in random_gradient(model, seed)] for seed in range(3)]
        client.push(PushMeta(run_id, "w", 1, 0), gradients[0], timeout=10)  # warm the connection up
        before_socket = proxy.upstream
        before_counted = server.app.stats.totals()["bytes_pushed"]
        calls = 30
        for seq in range(2, 2 + calls):
            client.push(PushMeta(run_id, "w", seq, seq - 2), gradients[seq % 3], timeout=10)
        socket_bytes = proxy.upstream - before_socket
        counted = server.app.stats.totals()["bytes_pushed"] - before_counted
    finally:
        client.close()
        proxy.close()
    per_call_overhead = (socket_bytes - counted) / calls
    print(f"socket {socket_bytes} bytes, counted {counted}, per call {per_call_overhead:.0f} bytes")
    # What the server counts (messages, gRPC prefixes, HTTP/2 frame headers) never exceeds
    # what the socket carried; the rest is each call's HPACK-compressed headers.
    assert counted <= socket_bytes
    assert per_call_overhead < 100, per_call_overhead
    assert counted / socket_bytes > 0.98
