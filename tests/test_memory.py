"""Large transfers reuse memory the process already touched (gradhub.memory)."""

from __future__ import annotations

import platform

import pytest
import torch

from gradhub import memory

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64])
@pytest.mark.parametrize("numel", [0, 10, memory.HUGE_PAGE_BYTES])  # below and above the huge-page size
def test_empty_gives_a_writable_1d_tensor_of_the_asked_type_and_length(dtype, numel):
    tensor = memory.empty(numel, dtype)
    assert tensor.dtype == dtype and tensor.shape == (numel,) and tensor.is_contiguous()
    tensor.fill_(3)
    assert bool((tensor == 3).all())


def test_large_tensors_from_empty_do_not_share_memory():
    a = memory.empty(memory.HUGE_PAGE_BYTES, torch.float32)
    b = memory.empty(memory.HUGE_PAGE_BYTES, torch.float32)
    a.fill_(1)
    b.fill_(2)
    assert a.data_ptr() != b.data_ptr() and float(a.sum()) == memory.HUGE_PAGE_BYTES


def test_malloc_thresholds_are_raised_where_the_c_library_is_glibc():
    assert memory.keep_freed_memory() is (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")


@pytest.mark.parametrize("numel", [0, 1, 6, 7, 8, 22])
def test_cache_blocks_cover_every_element_once_in_order(numel, monkeypatch):
    monkeypatch.setattr(memory, "CACHE_BLOCK_ELEMENTS", 7)
    blocks = list(memory.cache_blocks(numel))
    assert [i for start, stop in blocks for i in range(start, stop)] == list(range(numel))
    assert all(0 < stop - start <= 7 for start, stop in blocks)
    assert all(stop - start == 7 for start, stop in blocks[:-1])  # only the last may be partial


def test_cache_blocks_take_a_block_size_of_their_own():
    assert list(memory.cache_blocks(7, 3)) == [(0, 3), (3, 6), (6, 7)]
