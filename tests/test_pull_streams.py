"""The server builds each version's pull stream once, however many workers ask at once."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from gradhub import wire
from gradhub.codecs import codec_from_name
from gradhub.domain import ParameterSnapshot
from gradhub_server.servicer import _PullStreams

pytestmark = pytest.mark.timeout(30)

PULLERS = 4


def snapshot(version: int) -> ParameterSnapshot:
    tensor = codec_from_name("fp32").encode("w", torch.arange(12, dtype=torch.float32))
    return ParameterSnapshot(version=version, tensors=(tensor,))


class HeldBuilds:
    """A pull-stream builder whose first build waits until `waiters` callers wait for it
    (told by the streams' `on_wait`), then fails if `fail_first`: deterministic, no sleeps."""

    def __init__(self, waiters: int, fail_first: bool = False) -> None:
        self.waiting = threading.Semaphore(0)
        self.builds: list[int] = []
        self._waiters = waiters
        self._fail_first = fail_first

    def __call__(self, snap: ParameterSnapshot) -> list[bytes]:
        self.builds.append(snap.version)
        if len(self.builds) == 1:
            for _ in range(self._waiters):
                assert self.waiting.acquire(timeout=10), "a puller neither built nor waited"
            if self._fail_first:
                raise MemoryError("first build fails")
        return wire.pull_stream(snap)

    def streams(self) -> _PullStreams:
        return _PullStreams(build=self, on_wait=self.waiting.release)


def test_concurrent_pullers_of_one_version_share_one_build() -> None:
    held = HeldBuilds(waiters=PULLERS - 1)
    streams, snap = held.streams(), snapshot(7)
    with ThreadPoolExecutor(PULLERS) as pool:
        results = list(pool.map(lambda _: streams.get(snap, torch.float32), range(PULLERS)))
    assert held.builds == [7]
    assert all(r is results[0] for r in results)
    assert results[0][0] == wire.pull_stream(snap)


def test_a_failed_build_lets_a_waiter_build() -> None:
    held = HeldBuilds(waiters=1, fail_first=True)
    streams, snap = held.streams(), snapshot(3)
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(streams.get, snap, torch.float32) for _ in range(2)]
        outcomes = [f.exception(timeout=10) or f.result() for f in futures]
    assert held.builds == [3, 3]
    assert sum(isinstance(o, MemoryError) for o in outcomes) == 1
    assert [o[0] for o in outcomes if not isinstance(o, BaseException)] == [wire.pull_stream(snap)]


def test_a_newer_version_evicts_the_older_streams() -> None:
    streams = _PullStreams()
    old = streams.get(snapshot(1), torch.float32)
    streams.get(snapshot(2), torch.float32)
    assert streams.get(snapshot(1), torch.float32) is not old
