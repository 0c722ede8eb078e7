"""Versioned, atomic, checksummed checkpoints of the server's state, and finding the newest good one.

A checkpoint is two files in the run folder's `checkpoints/`: `ckpt-<version>.pt` (torch.save
of plain tensors and numbers: loaded back with weights_only=True) and `ckpt-<version>.json`,
its manifest (version, byte count, SHA-256), written last. Both are written to a temporary
name, flushed to disk and renamed, so a crash leaves either a whole checkpoint or none; a
checkpoint whose bytes do not match its manifest (a torn or corrupted file) is skipped for
the one before it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

FOLDER = "checkpoints"


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def save(folder: Path, state: dict[str, Any], keep: int = 3) -> Path:
    """Write `state` (which holds "version") as the newest checkpoint; keep the `keep` newest."""
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    version = int(state["version"])
    path = folder / f"ckpt-{version:010d}.pt"
    _write_atomically(path, data)
    manifest = {"version": version, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                "written_at": time.time()}
    _write_atomically(path.with_suffix(".json"), json.dumps(manifest).encode())
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)  # the renames themselves survive a power cut
    finally:
        os.close(directory)
    for old in sorted(folder.glob("ckpt-*.json"))[:-keep]:
        old.unlink(missing_ok=True)
        old.with_suffix(".pt").unlink(missing_ok=True)
    return path


def versions(folder: Path) -> list[int]:
    """The versions of the checkpoints kept, oldest first."""
    return sorted(int(path.stem.split("-", 1)[1]) for path in folder.glob("ckpt-*.json"))


def load_newest(folder: Path) -> tuple[dict[str, Any], Path] | None:
    """The newest checkpoint whose bytes match its manifest, or None; bad ones are logged and skipped."""
    for manifest_path in sorted(folder.glob("ckpt-*.json"), reverse=True):
        path = manifest_path.with_suffix(".pt")
        try:
            manifest = json.loads(manifest_path.read_text())
            data = path.read_bytes()
        except (OSError, ValueError) as exc:
            log.warning("skipping checkpoint %s: unreadable (%s)", path.name, exc)
            continue
        if len(data) != manifest.get("bytes") or hashlib.sha256(data).hexdigest() != manifest.get("sha256"):
            log.warning("skipping checkpoint %s: its bytes do not match its manifest (torn or corrupted)", path.name)
            continue
        try:
            state = torch.load(io.BytesIO(data), weights_only=True)
        except Exception as exc:  # torch raises several types for a bad archive
            log.warning("skipping checkpoint %s: cannot be loaded (%s)", path.name, exc)
            continue
        return state, path
    return None
