"""The update journal: a write-ahead log of every version, so an acknowledged update
survives a killed server.

A checkpoint holds the state at some version; what the server applied after it
would be lost with the process. So each update is appended here, under the store's
lock and *before* it touches the parameters: the gradient exactly as the update
rule takes it (fp32 values, int64 indices), the learning-rate factor it ran at, and
the pushes it carried (worker, sequence number, staleness). Only then is the push
answered. A restarted server loads its newest good checkpoint and replays the
journal after it, and ends where the killed one was: the same parameters and
optimizer state (the same operations on the same inputs), the same counters, and
receipts for every applied push, so a worker's retry of a push the dead server
applied but never answered is answered, not applied twice.

Records go straight to the file descriptor (no user-space buffer), so they survive
SIGKILL once `append` returns; with `fsync` they also survive a power cut, at the
cost of a disk flush per version.

Layout: `<run folder>/journal/seg-<first version>.log`, a new segment after each
checkpoint; segments wholly covered by the oldest checkpoint kept are deleted.
A record is `GHJ1`, then header length, body length and CRC-32 of both (little-endian
u32), a JSON header and the raw tensor bytes. Reading stops at the first record that
is torn (the process died mid-write: never acknowledged) or fails its CRC; the torn
tail is cut off so new records follow good ones, and segments after a gap are set
aside as `.bad` (they cannot be replayed without what is missing).
"""

from __future__ import annotations

import json
import logging
import os
import struct
import threading
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from gradhub_server.applied import AppliedPush
from gradhub_server.update_rules import Gradient, SparseGradient

log = logging.getLogger(__name__)

FOLDER = "journal"
MAGIC = b"GHJ1"
_FRAME = struct.Struct("<4sIII")


@dataclass(frozen=True)
class JournalRecord:
    version: int
    #: The factor the update rule's learning rates ran at (schedule x policy scale).
    lr_factor: float
    #: Per parameter; None for a version that changed nothing (injected staleness).
    gradient: list[Gradient] | None
    pushes: tuple[AppliedPush, ...] = ()


def _segment_name(first_version: int) -> str:
    return f"seg-{first_version:010d}.log"


def _first_version(path: Path) -> int:
    return int(path.stem.split("-", 1)[1])


def encode(record: JournalRecord) -> bytes:
    layout: list[list[object]] | None = None
    parts: list[bytes] = []
    if record.gradient is not None:
        layout = []
        for g in record.gradient:
            if isinstance(g, SparseGradient):
                layout.append(["s", int(g.indices.numel())])
                parts.append(g.indices.to(torch.int64).contiguous().numpy().tobytes())
                parts.append(g.values.to(torch.float32).contiguous().numpy().tobytes())
            else:
                layout.append(["d", int(g.numel())])
                parts.append(g.detach().to(torch.float32).contiguous().numpy().tobytes())
    header = json.dumps(
        {"v": record.version, "lr": record.lr_factor, "g": layout, "p": [p.as_list() for p in record.pushes]},
        separators=(",", ":"),
    ).encode()
    body = b"".join(parts)
    crc = zlib.crc32(body, zlib.crc32(header))
    return _FRAME.pack(MAGIC, len(header), len(body), crc) + header + body


def _decode_body(layout: list[list[object]], body: bytes, shapes: Sequence[torch.Size]) -> list[Gradient]:
    gradient: list[Gradient] = []
    offset = 0
    for (kind, count), shape in zip(layout, shapes, strict=True):
        n = int(str(count))
        if kind == "s":
            indices = torch.frombuffer(bytearray(body[offset:offset + 8 * n]), dtype=torch.int64)
            offset += 8 * n
            values = torch.frombuffer(bytearray(body[offset:offset + 4 * n]), dtype=torch.float32)
            offset += 4 * n
            gradient.append(SparseGradient(indices, values))
        else:
            dense = torch.frombuffer(bytearray(body[offset:offset + 4 * n]), dtype=torch.float32)
            offset += 4 * n
            gradient.append(dense.view(shape))
    if offset != len(body):
        raise ValueError(f"record body holds {len(body)} bytes; its layout names {offset}")
    return gradient


def _read_segment(path: Path, shapes: Sequence[torch.Size]) -> tuple[list[JournalRecord], int, str | None]:
    """The good records, the byte length they span, and why reading stopped early (or None)."""
    data = path.read_bytes()
    records: list[JournalRecord] = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < _FRAME.size:
            return records, offset, "a torn record frame"
        magic, header_len, body_len, crc = _FRAME.unpack_from(data, offset)
        start = offset + _FRAME.size
        end = start + header_len + body_len
        if magic != MAGIC:
            return records, offset, "a bad record marker"
        if end > len(data):
            return records, offset, "a torn record"
        header, body = data[start:start + header_len], data[start + header_len:end]
        if zlib.crc32(body, zlib.crc32(header)) != crc:
            return records, offset, "a record that fails its CRC"
        try:
            fields = json.loads(header)
            layout = fields["g"]
            records.append(JournalRecord(
                version=int(fields["v"]),
                lr_factor=float(fields["lr"]),
                gradient=None if layout is None else _decode_body(layout, body, shapes),
                pushes=tuple(AppliedPush.from_list(p) for p in fields["p"]),
            ))
        except (ValueError, KeyError, TypeError) as exc:
            return records, offset, f"an unreadable record ({exc})"
        offset = end
    return records, offset, None


class UpdateJournal:
    def __init__(self, folder: Path, fsync: bool = False) -> None:
        self.folder = folder
        self.fsync = fsync
        self._lock = threading.Lock()
        self._fd: int | None = None
        #: Bytes written since the last rotation: the checkpoint loop bounds the journal with it.
        self.bytes_since_rotation = 0

    def append(self, record: JournalRecord) -> None:
        """Write one record; it is on the file (and with fsync on the disk) when this returns."""
        data = encode(record)
        with self._lock:
            if self._fd is None:
                self.folder.mkdir(parents=True, exist_ok=True)
                path = self.folder / _segment_name(record.version)
                self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            if self.fsync:
                os.fsync(self._fd)
            self.bytes_since_rotation += len(data)

    def rotate(self) -> None:
        """The next record starts a new segment (called after a checkpoint)."""
        with self._lock:
            self._close_locked()
            self.bytes_since_rotation = 0

    def prune(self, covered_up_to: int) -> None:
        """Delete segments whose every record is at or below `covered_up_to` (the oldest
        checkpoint kept), judged by where the next segment starts."""
        segments = sorted(self.folder.glob("seg-*.log"))
        for segment, following in zip(segments, segments[1:], strict=False):
            if _first_version(following) - 1 <= covered_up_to:
                segment.unlink(missing_ok=True)

    def records_after(self, version: int, shapes: Sequence[torch.Size]) -> Iterator[JournalRecord]:
        """The records after `version`, in order and without gaps, repairing the journal
        as it goes (a torn tail is cut off; segments after a gap are set aside)."""
        segments = sorted(self.folder.glob("seg-*.log"))
        expected = version + 1
        for index, segment in enumerate(segments):
            records, good_bytes, problem = _read_segment(segment, shapes)
            for record in records:
                if record.version < expected:
                    continue  # in the checkpoint already
                if record.version > expected:
                    problem = f"a gap (version {expected} missing, {record.version} next)"
                    break
                expected += 1
                yield record
            if problem is not None:
                log.warning("journal %s: stopped at %s after version %d", segment.name, problem, expected - 1)
                if problem.startswith("a gap"):
                    self._set_aside(segments[index:])
                else:
                    os.truncate(segment, good_bytes)
                    self._set_aside(segments[index + 1:])
                return

    def discard(self) -> None:
        """Set every segment aside (a journal with no checkpoint to replay it onto)."""
        self._set_aside(sorted(self.folder.glob("seg-*.log")))

    def _set_aside(self, segments: Sequence[Path]) -> None:
        for segment in segments:
            log.warning("journal %s set aside as %s.bad: it cannot be replayed", segment.name, segment.name)
            segment.replace(segment.with_name(segment.name + ".bad"))

    def close(self) -> None:
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
