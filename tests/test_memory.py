"""Large transfers reuse memory the process already touched (gradhub.memory)."""

from __future__ import annotations

import platform
import threading

import numpy
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


@pytest.mark.parametrize("numel", [0, 1, 699, 700, 2101])
@pytest.mark.parametrize("lanes", [1, 3])
def test_block_lanes_cover_every_element_once_each_block_on_one_lane(numel, lanes, monkeypatch):
    monkeypatch.setattr(memory, "CACHE_BLOCK_ELEMENTS", 100)
    monkeypatch.setattr(memory, "MIN_LANE_ELEMENTS", 200)
    runner = memory.BlockLanes(lanes)
    seen: list[tuple[int, int, int, str]] = []
    lock = threading.Lock()

    def body(start: int, stop: int, lane: int) -> None:
        with lock:
            seen.append((start, stop, lane, threading.current_thread().name))

    try:
        runner.run(numel, body)
    finally:
        runner.close()
    covered = sorted(i for start, stop, _, _ in seen for i in range(start, stop))
    assert covered == list(range(numel))
    assert all(0 < stop - start <= 100 for start, stop, _, _ in seen)
    used = {lane for _, _, lane, _ in seen}
    # A lane takes at least MIN_LANE_ELEMENTS; lane 0 is the caller's own thread.
    assert used == set(range(max(1, min(lanes, numel // 200)))) or numel == 0
    assert {name for _, _, lane, name in seen if lane == 0} <= {threading.current_thread().name}
    for lane in used:  # a lane's blocks are one contiguous range, in order
        mine = [(start, stop) for start, stop, owner, _ in seen if owner == lane]
        assert all(a[1] == b[0] for a, b in zip(mine, mine[1:]))


def test_block_lanes_raise_a_lanes_error_once_every_lane_has_ended(monkeypatch):
    monkeypatch.setattr(memory, "CACHE_BLOCK_ELEMENTS", 10)
    monkeypatch.setattr(memory, "MIN_LANE_ELEMENTS", 10)
    runner = memory.BlockLanes(2)
    finished: list[int] = []
    second_lane_started = threading.Event()

    def body(start: int, stop: int, lane: int) -> None:
        if lane == 1:
            second_lane_started.set()
            raise ValueError(f"block {start}")
        # lane 0 goes on only once lane 1 has failed: its error must wait for this lane
        assert second_lane_started.wait(10)
        finished.append(start)

    with pytest.raises(ValueError, match="block 20"):
        runner.run(40, body)
    assert finished == [0, 10]  # the caller's lane ran to its end before the error came up
    runner.close()


def test_block_lanes_refuse_fewer_than_one_lane():
    with pytest.raises(ValueError, match="at least 1"):
        memory.BlockLanes(0)


def test_a_recycled_buffer_is_lent_again_only_once_nothing_refers_to_it():
    nbytes = memory.HUGE_PAGE_BYTES + 3  # a size no other test recycles
    first = memory.recycled(nbytes)
    address = first.ctypes.data
    tensor = torch.frombuffer(first, dtype=torch.uint8)[5:9]  # a view of a view keeps it lent
    del first
    second = memory.recycled(nbytes)
    assert second.ctypes.data != address  # still read through `tensor`: a fresh buffer
    del tensor
    third = memory.recycled(nbytes)
    assert third.ctypes.data == address  # given back when the last view went
    assert second.ctypes.data != third.ctypes.data  # and never to two holders at once


@pytest.mark.parametrize("make_view", [
    lambda a: a[5:9][1:],  # numpy refers a slice of a slice to the owner, not to the slice
    lambda a: a.view(numpy.float32)[2:],
    lambda a: memoryview(a)[3:],
    lambda a: torch.from_numpy(a).view(torch.int32)[1:],
    lambda a: torch.frombuffer(a, dtype=torch.float16, offset=2, count=4),
], ids=["numpy-slice-of-slice", "numpy-other-type", "memoryview", "from_numpy", "frombuffer"])
def test_a_recycled_buffer_stays_lent_while_any_kind_of_view_of_it_lives(make_view):
    nbytes = memory.HUGE_PAGE_BYTES + 8  # a size no other test recycles
    first = memory.recycled(nbytes)
    address = first.ctypes.data
    view = make_view(first)
    del first
    second = memory.recycled(nbytes)
    assert second.ctypes.data != address  # the view still reads the first
    del view
    third = memory.recycled(nbytes)
    assert third.ctypes.data == address  # free once the view is gone (`second` is still held)


def test_the_recycler_keeps_at_most_its_limit_of_free_bytes(monkeypatch):
    monkeypatch.setattr(memory, "RECYCLE_BYTES", 3 * memory.HUGE_PAGE_BYTES)
    recycler = memory._Recycler()
    lent = [recycler.take(memory.HUGE_PAGE_BYTES + i) for i in range(5)]
    while lent:  # given back in the order they were lent
        lent.pop(0)
    assert recycler.free_bytes() <= 3 * memory.HUGE_PAGE_BYTES
    kept = recycler.free_bytes()
    assert kept == sum(memory.HUGE_PAGE_BYTES + i for i in (3, 4))  # the last given back stay
