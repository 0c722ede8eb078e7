"""The benchmark suites' helper processes: waiting for their results without hanging on
one that died. Kept free of torch, so that a reference measured in processes of its own
(bare gRPC) starts them without importing it."""

from __future__ import annotations

import queue
import time
from typing import Any


def collect_results(results: Any, processes: list[Any], timeout: float) -> list[Any]:
    """One result per process; a process that died without one is an error, not a hang."""
    collected: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(collected) < len(processes):
        try:
            collected.append(results.get(timeout=0.5))
            continue
        except queue.Empty:
            pass
        dead = [p for p in processes if p.exitcode not in (None, 0)]
        if dead:
            raise RuntimeError(f"benchmark process {dead[0].name} died with exit code {dead[0].exitcode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"benchmark processes gave no result within {timeout:g}s")
    return collected
