"""A loopback TCP proxy that injects faults, seeded: cut connections and stalled replies.

It sits between a gRPC client and server. Each chunk it forwards may, by a seeded draw,
cut the connection (both sockets closed: the calls on it fail with UNAVAILABLE, whether
or not the server already handled them) or, for replies, be held back longer than the
client's deadline (DEADLINE_EXCEEDED while the server has answered). The stall is the
fault itself, not synchronisation. Every connection and thread ends at `close()`.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from dataclasses import dataclass


@dataclass
class Faults:
    cuts: int = 0
    stalls: int = 0
    connections: int = 0


class ChaosProxy:
    def __init__(self, target: tuple[str, int], seed: int, cut_probability: float, stall_probability: float,
                 stall_seconds: float) -> None:
        self._target = target
        self._random = random.Random(seed)
        self._cut_p, self._stall_p, self._stall_s = cut_probability, stall_probability, stall_seconds
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self.faults = Faults()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._closed = threading.Event()
        self._spawn(self._accept)

    def _spawn(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _draw(self) -> float:
        with self._lock:
            return self._random.random()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self._target, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._sockets += [client, server]
                self.faults.connections += 1
            self._spawn(self._pump, client, server, False)
            self._spawn(self._pump, server, client, True)

    def _cut(self, *sockets: socket.socket) -> None:
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _pump(self, source: socket.socket, sink: socket.socket, replies: bool) -> None:
        while not self._closed.is_set():
            try:
                data = source.recv(1 << 16)
            except OSError:
                return
            if not data:
                self._cut(source, sink)
                return
            draw = self._draw()
            if draw < self._cut_p:
                with self._lock:
                    self.faults.cuts += 1
                self._cut(source, sink)
                return
            if replies and draw < self._cut_p + self._stall_p:
                with self._lock:
                    self.faults.stalls += 1
                if self._closed.wait(self._stall_s):  # the injected stall; ends early on close
                    return
            try:
                sink.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        with self._lock:
            sockets = list(self._sockets)
        self._cut(*sockets)
        deadline = time.monotonic() + 5
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
