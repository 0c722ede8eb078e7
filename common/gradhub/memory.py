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
from collections.abc import Iterator

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
    """An uninitialised 1-D CPU tensor; from `HUGE_PAGE_BYTES` up, numpy's memory (huge
    pages), viewed as `dtype` (numpy has no bfloat16, so the buffer is bytes)."""
    nbytes = numel * torch.empty(0, dtype=dtype).element_size()
    if nbytes < HUGE_PAGE_BYTES:
        return torch.empty(numel, dtype=dtype)
    return torch.from_numpy(numpy.empty(nbytes, dtype=numpy.uint8)).view(dtype)


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
