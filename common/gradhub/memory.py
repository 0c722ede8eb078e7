"""Memory for large transfers: reuse what was touched, and touch new memory in huge pages.

On the development machine, page faults cost more than the copies they precede:
- 100 fresh 1 MB `bytes` took 60 ms to build, against 9 ms when glibc handed back
  memory it had already touched;
- a fresh 100 MB torch tensor took 43 ms to fill, against 10 ms for a numpy buffer,
  which Linux backs with transparent huge pages (numpy advises them for large arrays).

A pull is built as 1 MB `bytes` messages and gRPC delivers every received message as one,
so each large push or pull allocated and faulted in its whole size again. glibc's
defaults are the cause: blocks from 128 KB up are mapped fresh and unmapped on free, and
the heap's free top is given back to the kernel past 128 KB. `keep_freed_memory` moves
both limits up, so a process that moves the same sizes step after step reuses its
memory. The price: memory freed after a peak stays with the process, up to
`TRIM_THRESHOLD_BYTES` of free heap.
"""

from __future__ import annotations

import ctypes
import logging
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy
import torch

log = logging.getLogger(__name__)

#: Blocks below this come from the heap, and return to it (glibc's largest allowed value).
MMAP_THRESHOLD_BYTES = 32 << 20
#: Free heap kept by the process rather than given back to the kernel.
TRIM_THRESHOLD_BYTES = 1 << 30
#: Tensors from this size up are allocated by `empty` in huge pages (numpy's own limit).
HUGE_PAGE_BYTES = 4 << 20
#: Elements per block of a large model's elementwise passes (a sync step's mean, its SGD
#: step): 2^18 fp32 is 1 MiB per tensor, so a block's operands stay in cache from one
#: operation to the next. A bare mean of 2 x 25 M fp16 took 14.3 ms in blocks of 2^16,
#: 12.6 of 2^17, 11.6 of 2^18.
CACHE_BLOCK_ELEMENTS = 1 << 18

#: Fewest elements a lane of `BlockLanes` takes: below it, handing a range to another thread
#: costs more than that thread saves (a small model's step stays on the calling thread).
MIN_LANE_ELEMENTS = 1 << 20

# mallopt's parameter numbers (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; False where the C
    library has no `mallopt` (not glibc) or refuses the values."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
    log.debug("glibc malloc thresholds raised: %s", done)
    return done


def empty(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised 1-D CPU tensor; from `HUGE_PAGE_BYTES` up, a recycled buffer
    (`recycled`: huge pages, and memory already touched), viewed as `dtype` (numpy has no
    bfloat16, so the buffer is bytes)."""
    nbytes = numel * dtype.itemsize
    if nbytes < HUGE_PAGE_BYTES:
        return torch.empty(numel, dtype=dtype)
    return torch.from_numpy(recycled(nbytes)).view(dtype)


#: Free bytes the recycler keeps for reuse, at most (as glibc keeps freed heap: `TRIM_THRESHOLD_BYTES`).
RECYCLE_BYTES = TRIM_THRESHOLD_BYTES


class _Recycler:
    """Large byte buffers lent out, and lent again once nothing refers to them.

    Blocks this large are mapped fresh by glibc and given back on free (above 32 MB no
    `mallopt` keeps them), so every step's pushes, pulls and snapshots paid their page
    faults again: filling a fresh 50 MB buffer took 7.8 ms here, against 3.8 ms for one
    already touched.

    A buffer is free when the recycler holds the only reference to it. Every view of it
    refers to it: a numpy slice of a slice refers to the array that owns the memory, not to
    the slice it came from, and a tensor made from it (`torch.from_numpy`,
    `torch.frombuffer`) or a memoryview holds that array. So a buffer read by any tensor,
    message or snapshot is never lent again; a weak reference to a view lent out, as
    before, fired while a numpy slice of it still lived. A free buffer of exactly the size
    asked for is lent again, the one lent last first; beyond `RECYCLE_BYTES` of free
    buffers, the ones lent longest ago go back to the system."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buffers: list[numpy.ndarray] = []  # lent or free, the one lent last at the end

    def take(self, nbytes: int) -> numpy.ndarray:
        with self._lock:
            free = self._free_positions_locked()
            chosen = next((p for p in reversed(free) if self._buffers[p].nbytes == nbytes), None)
            buffer = numpy.empty(nbytes, dtype=numpy.uint8) if chosen is None else self._buffers.pop(chosen)
            self._trim_locked()
            self._buffers.append(buffer)
            return buffer

    def _free_positions_locked(self) -> list[int]:
        # getrefcount's own argument and this list's entry: nothing else refers to it.
        return [p for p in range(len(self._buffers)) if sys.getrefcount(self._buffers[p]) <= _OWN_REFERENCES]

    def _trim_locked(self) -> None:
        free = self._free_positions_locked()
        extra = sum(self._buffers[p].nbytes for p in free) - RECYCLE_BYTES
        dropped = set()
        for position in free:  # lent longest ago first
            if extra <= 0:
                break
            extra -= self._buffers[position].nbytes
            dropped.add(position)
        if dropped:
            self._buffers = [b for p, b in enumerate(self._buffers) if p not in dropped]

    def free_bytes(self) -> int:
        """Bytes of free buffers kept, after giving back those beyond `RECYCLE_BYTES`
        (`take` does that too: a buffer freed since is known free only then)."""
        with self._lock:
            self._trim_locked()
            return sum(self._buffers[p].nbytes for p in self._free_positions_locked())


#: References to a free buffer that `sys.getrefcount(self._buffers[p])` counts: the list's
#: entry and the call's argument.
_OWN_REFERENCES = 2


_recycler = _Recycler()


def recycled(nbytes: int) -> numpy.ndarray:
    """Uninitialised bytes, in a buffer given back for reuse once nothing refers to the
    array returned (nor to a tensor or view made from it)."""
    return _recycler.take(nbytes)


def cache_blocks(numel: int, block: int | None = None) -> Iterator[tuple[int, int]]:
    """(start, stop) of each block of `numel` elements (`CACHE_BLOCK_ELEMENTS` unless
    `block` says), the last one partial.

    Doing several elementwise operations on one block before the next, rather than each
    operation over the whole tensor, reads memory once instead of once per operation: the
    same arithmetic element by element, so the same result.
    """
    block = block or CACHE_BLOCK_ELEMENTS
    for start in range(0, numel, block):
        yield start, min(start + block, numel)


class BlockLanes:
    """Runs a large elementwise pass over `[0, numel)` in cache blocks on several threads at
    once: the blocks are cut into `lanes` contiguous ranges, the first run by the calling
    thread, the others by threads kept for this.

    A sync step's update of a large model runs while every worker waits for it, so the
    machine's other cores are idle; torch's kernels release the GIL, and each lane streams
    through its own part of memory. A sync step of 2 fp16 pushes of 25 M (mean, SGD step,
    fp16 snapshot, in one pass) took 35 against 54 ms on 2 lanes on the development machine
    (2 cores; memory bandwidth bounds it). Each lane's body gets its lane number, to use
    scratch buffers of its own.
    """

    def __init__(self, lanes: int) -> None:
        if lanes < 1:
            raise ValueError(f"lanes must be at least 1, not {lanes}")
        self.lanes = lanes
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def run(
        self, numel: int, body: Callable[[int, int, int], None], block: int | None = None,
        min_lane: int | None = None,
    ) -> None:
        """body(start, stop, lane) for every block of `numel` elements (a cache block unless
        `block` says; each once, in order within a lane), each lane taking at least
        `min_lane` elements (`MIN_LANE_ELEMENTS` unless given); returns when all are done,
        raising the first lane's error."""
        block = block or CACHE_BLOCK_ELEMENTS
        lanes = max(1, min(self.lanes, numel // (min_lane or MIN_LANE_ELEMENTS)))
        blocks = -(-numel // block)
        if lanes == 1 or blocks < 2:
            _run_lane(body, 0, numel, block, 0)
            return
        per_lane = -(-blocks // lanes)
        bounds = [min(numel, lane * per_lane * block) for lane in range(lanes + 1)]
        pool = self._executor()
        others = [pool.submit(_run_lane, body, bounds[lane], bounds[lane + 1], block, lane)
                  for lane in range(1, lanes) if bounds[lane] < bounds[lane + 1]]
        try:
            _run_lane(body, bounds[0], bounds[1], block, 0)
        finally:
            for future in others:  # every lane ends before the caller goes on, error or not
                future.exception()
        for future in others:
            future.result()

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.lanes - 1, thread_name_prefix="gradhub-lane")
            return self._pool

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)


def _run_lane(body: Callable[[int, int, int], None], start: int, stop: int, block: int, lane: int) -> None:
    for first, last in cache_blocks(stop - start, block):
        body(start + first, start + last, lane)
