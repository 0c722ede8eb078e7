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


def test_concurrent_pullers_of_one_version_share_one_build() -> None:
    waiting = threading.Semaphore(0)
    builds: list[int] = []

    def build(snap: ParameterSnapshot) -> list[bytes]:
        builds.append(snap.version)
        if len(builds) == 1:
            # Hold the first build until every other puller waits for it.
            for _ in range(PULLERS - 1):
                assert waiting.acquire(timeout=10), "a puller neither built nor waited"
        return wire.pull_stream(snap)

    streams = _PullStreams(build=build, on_wait=waiting.release)
    snap = snapshot(7)
    with ThreadPoolExecutor(PULLERS) as pool:
        results = list(pool.map(lambda _: streams.get(snap, torch.float32), range(PULLERS)))
    assert builds == [7]
    assert all(r is results[0] for r in results)
    assert results[0][0] == wire.pull_stream(snap)


def test_a_failed_build_lets_a_waiter_build() -> None:
    waiting = threading.Semaphore(0)
    builds: list[int] = []

    def build(snap: ParameterSnapshot) -> list[bytes]:
        builds.append(snap.version)
        if len(builds) == 1:
            assert waiting.acquire(timeout=10)
            raise MemoryError("first build fails")
        return wire.pull_stream(snap)

    streams = _PullStreams(build=build, on_wait=waiting.release)
    snap = snapshot(3)
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(streams.get, snap, torch.float32) for _ in range(2)]
        outcomes = [f.exception(timeout=10) or f.result() for f in futures]
    assert builds == [3, 3]
    assert sum(isinstance(o, MemoryError) for o in outcomes) == 1
    assert [o[0] for o in outcomes if not isinstance(o, BaseException)] == [wire.pull_stream(snap)]


def test_a_newer_version_evicts_the_older_streams() -> None:
    streams = _PullStreams()
    old = streams.get(snapshot(1), torch.float32)
    streams.get(snapshot(2), torch.float32)
    assert streams.get(snapshot(1), torch.float32) is not old
