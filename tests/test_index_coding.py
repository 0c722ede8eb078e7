"""Index encodings: exact round trips, the sizes they claim, and refusal of malformed bytes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradhub import index_coding as ic
from gradhub.errors import InvalidRequest

pytestmark = pytest.mark.timeout(60)


@st.composite
def sorted_indices(draw: st.DrawFn) -> tuple[torch.Tensor, int]:
    numel = draw(st.integers(1, 5000))
    chosen = draw(st.sets(st.integers(0, numel - 1), max_size=min(numel, 400)))
    return torch.tensor(sorted(chosen), dtype=torch.int64), numel


@settings(max_examples=150, deadline=None)
@given(case=sorted_indices(), encoding=st.sampled_from(list(ic.IndexEncoding)))
def test_every_encoding_round_trips_exactly_in_the_size_it_states(case, encoding):
    indices, numel = case
    blob = ic.encode(indices, numel, encoding)
    assert blob.dtype == torch.uint8
    assert blob.numel() == ic.encoded_size(indices, numel, encoding)
    decoded = ic.decode(blob, indices.numel(), numel, encoding, "t")
    assert torch.equal(decoded, indices)


def test_best_encoding_follows_density_and_the_index_coding():
    numel = 1_000_000
    sparse = torch.arange(0, numel, 1000)  # 0.1 %: gaps of 1,000 -> 2-byte varints
    # compact: the fewest bytes; fast (the default): varints never, they cost more CPU
    # than their bytes save on a fast link (index_coding's docstring has the figures).
    assert ic.best_encoding(sparse, numel, compact=True) is ic.IndexEncoding.DELTA_VARINT
    assert ic.best_encoding(sparse, numel) is ic.IndexEncoding.RAW
    assert ic.encoded_size(sparse, numel, ic.IndexEncoding.DELTA_VARINT) == 2 * len(sparse) - 1
    dense = torch.arange(0, numel, 3)  # a third of the elements: the bitmap is smallest
    assert ic.best_encoding(dense, numel, compact=True) is ic.IndexEncoding.BITMAP
    assert ic.best_encoding(dense, numel) is ic.IndexEncoding.RAW


def test_large_gaps_and_large_tensors():
    numel = 2**34
    indices = torch.tensor([0, 5, 2**20, 2**33 + 7, numel - 1])
    blob = ic.encode(indices, numel, ic.IndexEncoding.DELTA_VARINT)
    assert torch.equal(ic.decode(blob, 5, numel, ic.IndexEncoding.DELTA_VARINT, "t"), indices)
    raw = ic.encode(indices, numel, ic.IndexEncoding.RAW)
    assert raw.numel() == 5 * 8


@pytest.mark.parametrize(
    "data, nnz, numel, message",
    [
        (bytes([0x85]), 1, 100, "malformed varints"),  # continuation bit on the last byte
        (bytes([5, 0]), 2, 100, "strictly increasing"),  # a zero gap: a repeated index
        (bytes([99, 1]), 2, 100, "outside"),  # 99 + 1 = 100 is past the end
        (bytes([0x80] * 11 + [1]), 1, 100, "cannot hold"),
        (bytes([0xFF] * 9 + [0x7F]), 1, 100, "gap"),  # a huge gap
        (bytes([1, 2, 3]), 2, 100, "malformed varints"),  # three values where two were declared
        (b"", 1, 100, "cannot hold"),
    ],
)
def test_malformed_varints_are_refused(data, nnz, numel, message):
    with pytest.raises(InvalidRequest, match=message):
        ic.decode(data, nnz, numel, ic.IndexEncoding.DELTA_VARINT, "t")


def test_malformed_bitmaps_and_raw_indices_are_refused():
    with pytest.raises(InvalidRequest, match="bits set past"):
        ic.decode(bytes([0b1000_0000]), 1, 7, ic.IndexEncoding.BITMAP, "t")
    with pytest.raises(InvalidRequest, match="marks 2 elements"):
        ic.decode(bytes([0b11]), 1, 8, ic.IndexEncoding.BITMAP, "t")
    with pytest.raises(InvalidRequest, match="bitmap of 2 bytes"):
        ic.decode(bytes(2), 0, 8, ic.IndexEncoding.BITMAP, "t")
    with pytest.raises(InvalidRequest, match="outside"):
        ic.decode(np.array([3, 100], dtype=np.int32).tobytes(), 2, 100, ic.IndexEncoding.RAW, "t")
    for unordered in ([7, 3], [3, 3]):  # raw indices, like the others, strictly increase
        with pytest.raises(InvalidRequest, match="strictly increasing"):
            ic.decode(np.array(unordered, dtype=np.int32).tobytes(), 2, 100, ic.IndexEncoding.RAW, "t")


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
@pytest.mark.parametrize("shift", [0, 1, 2, 4])
def test_raw_indices_decode_the_same_wherever_they_lie_in_the_payload(dtype, shift):
    """A payload's index section may start at any byte (after another tensor's fp16 values):
    read in place where aligned, copied where not, the same indices and the same checks."""
    indices = np.array([0, 5, 6, 99], dtype=dtype)
    payload = np.frombuffer(bytes(shift) + indices.tobytes(), dtype=np.uint8)[shift:]
    wide = torch.int64 if dtype == np.int64 else None
    decoded = ic.decode(payload.data, 4, 100, ic.IndexEncoding.RAW, "t", wide)
    assert decoded.dtype == torch.int64 and decoded.tolist() == [0, 5, 6, 99]
    for bad, message in (([0, 5, 6, 100], r"outside \[0, 100\) \(min 0, max 100\)"),
                         ([-1, 5, 6, 9], r"min -1, max 9"),
                         ([0, 6, 5, 9], "strictly increasing"),
                         ([0, 500, 5, 9], r"outside \[0, 100\) \(min 0, max 500\)")):
        shifted = np.frombuffer(bytes(shift) + np.array(bad, dtype=dtype).tobytes(), dtype=np.uint8)[shift:]
        with pytest.raises(InvalidRequest, match=message):
            ic.decode(shifted.data, 4, 100, ic.IndexEncoding.RAW, "t", wide)
