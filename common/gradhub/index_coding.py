"""Compact encodings of the sorted flat indices of a sparse tensor.

- `raw`:          int32 (int64 for tensors of 2**31 elements or more), 4 or 8 bytes each
- `delta-varint`: the gaps between ascending indices (the first index itself, then
                  index[i] - index[i-1] >= 1) as LEB128 varints: 1 byte for gaps below
                  128, 2 below 16,384, ... At 0.1 % density gaps average 1,000: 2 bytes.
- `bitmap`:       one bit per element, numel/8 bytes whatever nnz: the smallest once
                  more than about 1 element in 16 is sent

`best_encoding` picks per tensor, by one of two index codings (a run setting):

- `fast` (default): raw. A cast each way, whatever the density.
- `compact`: the smallest of the three, sizes computed exactly in O(nnz). Varints save
  about 2.8 of raw's 4 bytes per index at 1 % density, but cost about 25 ns per index to
  encode and 12 to decode here (numpy, 500 k indices: 13 and 6-9 ms), against about 3 ns
  for the bytes they save at 1 GB/s; a bitmap costs about 2 ns per *element* to decode,
  more than its bytes save below about 60 % density. They pay off only on links slower
  than about 300 Mb/s (`gradhub bench indices` has the costs, `gradhub bench wire` the
  effect). Encoders and decoders are vectorised numpy: no per-element Python. Decoders
validate everything (they read bytes from the network): exact lengths, well-formed
varints, strictly increasing indices inside [0, numel).
"""

from __future__ import annotations

import enum

import numpy as np
import torch

from gradhub.errors import InvalidRequest

#: A varint of an index below 2**35 has at most 5 bytes; indices of larger tensors take 10.
_VARINT_MAX_BYTES = 10


#: Run settings for how sparse indices are coded (see the module docstring).
INDEX_CODINGS = ("fast", "compact")


class IndexEncoding(enum.Enum):
    RAW = "raw"
    DELTA_VARINT = "delta-varint"
    BITMAP = "bitmap"


def raw_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


def encoded_size(indices: torch.Tensor, numel: int, encoding: IndexEncoding) -> int:
    """Bytes `indices` (sorted, unique) take in `encoding`."""
    nnz = indices.numel()
    if encoding is IndexEncoding.RAW:
        return nnz * (4 if numel < 2**31 else 8)
    if encoding is IndexEncoding.BITMAP:
        return (numel + 7) // 8
    if nnz == 0:
        return 0
    gaps = _gaps(indices)
    return int(_varint_lengths(gaps).sum())


def best_encoding(indices: torch.Tensor, numel: int, compact: bool = False) -> IndexEncoding:
    """Raw, or (compact) the encoding with the fewest bytes for these indices (ties go to
    the simpler one)."""
    if not compact:
        return IndexEncoding.RAW
    sizes = {e: encoded_size(indices, numel, e) for e in IndexEncoding}
    return min(IndexEncoding, key=lambda e: (sizes[e], list(IndexEncoding).index(e)))


def _gaps(indices: torch.Tensor) -> np.ndarray:
    values = indices.detach().cpu().numpy().astype(np.uint64, copy=False)
    gaps = np.empty_like(values)
    if len(values):
        gaps[0] = values[0]
        np.subtract(values[1:], values[:-1], out=gaps[1:])
    return gaps


def _varint_lengths(values: np.ndarray) -> np.ndarray:
    lengths = np.ones(len(values), dtype=np.int64)
    for shift in range(7, 7 * _VARINT_MAX_BYTES, 7):
        lengths += values >= (np.uint64(1) << np.uint64(shift))
    return lengths


def encode(indices: torch.Tensor, numel: int, encoding: IndexEncoding) -> torch.Tensor:
    """The wire bytes (a uint8 tensor) of sorted, unique `indices`."""
    if encoding is IndexEncoding.RAW:
        return indices.detach().cpu().to(raw_dtype(numel)).contiguous().view(torch.uint8)
    if encoding is IndexEncoding.BITMAP:
        bits = np.zeros(numel, dtype=np.uint8)
        bits[indices.detach().cpu().numpy()] = 1
        return torch.from_numpy(np.packbits(bits, bitorder="little"))
    gaps = _gaps(indices)
    lengths = _varint_lengths(gaps)
    out = np.zeros(int(lengths.sum()), dtype=np.uint8)
    starts = np.cumsum(lengths) - lengths
    for byte in range(int(lengths.max()) if len(lengths) else 0):
        present = lengths > byte
        chunk = (gaps[present] >> np.uint64(7 * byte)) & np.uint64(0x7F)
        more = (lengths[present] > byte + 1).astype(np.uint64) << np.uint64(7)
        out[starts[present] + byte] = (chunk | more).astype(np.uint8)
    return torch.from_numpy(out)


def decode(
    data: torch.Tensor | bytes | memoryview, nnz: int, numel: int, encoding: IndexEncoding,
    what: str, raw_index_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """int64 indices from wire bytes; raises InvalidRequest on anything malformed.

    Raw indices are int32 unless `raw_index_dtype` says int64 (or the tensor needs it)."""
    raw = data.numpy() if isinstance(data, torch.Tensor) else np.frombuffer(data, dtype=np.uint8)
    if encoding is IndexEncoding.RAW:
        wide = raw_index_dtype == torch.int64 or numel >= 2**31
        dtype = np.int64 if wide else np.int32
        if len(raw) != nnz * np.dtype(dtype).itemsize:
            raise InvalidRequest(f"{what}: {len(raw)} index bytes for {nnz} raw indices")
        # Checked in their wire type, before widening (half the memory to read), and in place
        # where they lie aligned (a received payload's sections usually do).
        aligned = raw.ctypes.data % np.dtype(dtype).itemsize == 0
        wire = np.frombuffer(raw if aligned else raw.tobytes(), dtype=dtype)
        ascending = nnz < 2 or bool(np.greater(wire[1:], wire[:-1]).all())
        # Ascending, the first and last are the least and the greatest.
        low, high = (wire[0], wire[-1]) if ascending and nnz else (wire.min(initial=0), wire.max(initial=0))
        if nnz and (low < 0 or high >= numel):
            raise InvalidRequest(f"{what}: indices outside [0, {numel}) (min {low}, max {high})")
        if not ascending:  # as the other encodings enforce
            raise InvalidRequest(f"{what}: indices must be strictly increasing")
        return torch.from_numpy(wire.astype(np.int64))
    if encoding is IndexEncoding.BITMAP:
        if len(raw) != (numel + 7) // 8:
            raise InvalidRequest(f"{what}: bitmap of {len(raw)} bytes for {numel} elements")
        bits = np.unpackbits(raw, bitorder="little")
        if bits[numel:].any():
            raise InvalidRequest(f"{what}: bitmap bits set past element {numel}")
        indices = np.flatnonzero(bits[:numel]).astype(np.int64)
        if len(indices) != nnz:
            raise InvalidRequest(f"{what}: bitmap marks {len(indices)} elements, nnz is {nnz}")
        return torch.from_numpy(indices)
    return torch.from_numpy(_decode_varints(raw, nnz, numel, what))


def _decode_varints(raw: np.ndarray, nnz: int, numel: int, what: str) -> np.ndarray:
    if nnz == 0:
        if len(raw):
            raise InvalidRequest(f"{what}: {len(raw)} index bytes for no indices")
        return np.empty(0, dtype=np.int64)
    if not nnz <= len(raw) <= nnz * _VARINT_MAX_BYTES:
        raise InvalidRequest(f"{what}: {len(raw)} varint bytes cannot hold {nnz} indices")
    last = (raw & 0x80) == 0
    ends = np.flatnonzero(last)
    if len(ends) != nnz or not last[-1]:
        raise InvalidRequest(f"{what}: malformed varints ({len(ends)} complete of {nnz})")
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lengths = ends - starts + 1
    if lengths.max() > _VARINT_MAX_BYTES:
        raise InvalidRequest(f"{what}: a varint longer than {_VARINT_MAX_BYTES} bytes")
    # One gather per byte position (at most 10; a density of 1 % needs 2): about 4 times
    # faster than expanding every byte's position and reducing per varint.
    gaps = (raw[starts] & 0x7F).astype(np.uint64)
    for byte in range(1, int(lengths.max())):
        longer = np.flatnonzero(lengths > byte)
        gaps[longer] |= (raw[starts[longer] + byte] & 0x7F).astype(np.uint64) << np.uint64(7 * byte)
    # Every gap below numel keeps the running sum far from overflowing (nnz <= numel).
    if gaps.max() >= numel:
        raise InvalidRequest(f"{what}: index gap {int(gaps.max())} outside a tensor of {numel}")
    if (gaps[1:] == 0).any():
        raise InvalidRequest(f"{what}: indices must be strictly increasing")
    indices = np.cumsum(gaps, dtype=np.uint64)
    if indices[-1] >= numel:
        raise InvalidRequest(f"{what}: index {int(indices[-1])} outside [0, {numel})")
    return indices.astype(np.int64)
