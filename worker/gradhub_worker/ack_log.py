"""An append-only record of every push the server acknowledged, for audits.

Each line is written straight to the file descriptor as the acknowledgement arrives,
so the file survives the worker being killed: together with the server's update
journal it shows whether anything acknowledged was lost or applied twice (the
chaos test compares the two). One JSON object per line: worker_id, seq, version.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


class AckLog:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def record(self, worker_id: str, seq: int, version: int) -> None:
        line = json.dumps({"worker_id": worker_id, "seq": seq, "version": version}) + "\n"
        os.write(self._fd, line.encode())  # one short O_APPEND write: whole lines, even shared

    def close(self) -> None:
        os.close(self._fd)
