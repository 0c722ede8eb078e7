"""One progress line for a run, from the status the server publishes in Redis.

On a terminal the line is redrawn in place; in a log (CI, a file) a new line is
printed every `log_interval` seconds instead, so logs stay readable.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any

BAR_WIDTH = 24


def format_status(status: dict[str, Any], workers_planned: int) -> str:
    version = int(status.get("version", 0))
    steps = max(1, int(status.get("steps", 1)))
    done = min(1.0, version / steps)
    filled = int(done * BAR_WIDTH)
    bar = "#" * filled + "-" * (BAR_WIDTH - filled)
    parts = [f"[{status.get('mode', '?')}] step {version}/{steps} [{bar}] {100 * done:3.0f}%"]
    loss = status.get("train_loss")
    parts.append(f"loss {loss:.3f}" if isinstance(loss, (int, float)) else "loss -")
    acc = status.get("test_accuracy")
    parts.append(f"test acc {100 * acc:.1f}%" if isinstance(acc, (int, float)) else "test acc -")
    parts.append(f"{status.get('pushes_per_second', 0):.0f} pushes/s")
    parts.append(
        f"staleness {status.get('staleness_mean', 0):.2f} (max {status.get('staleness_max', 0)})"
    )
    refused = status.get("pushes_refused", 0)
    if refused:
        parts.append(f"refused {refused}")
    parts.append(f"workers {len(status.get('live_workers', []))}/{workers_planned}")
    parts.append(f"{status.get('wall_seconds', 0):.0f}s")
    return " | ".join(parts)


class ProgressLine:
    def __init__(self, stream: IO[str] | None = None, log_interval: float = 5.0) -> None:
        self._stream = stream or sys.stderr
        self._tty = self._stream.isatty()
        self._interval = log_interval
        self._last_print = 0.0
        self._last_key: object = None
        self._width = 0

    def update(self, line: str, key: object = None) -> None:
        """Show `line`. In a log, a line whose `key` (default: the line itself) equals the
        last written one's is not written again: a rate that moved at the same step is
        not progress."""
        if self._tty:
            padded = line.ljust(self._width)
            self._width = len(line)
            self._stream.write("\r" + padded)
            self._stream.flush()
            return
        now = time.monotonic()
        if now - self._last_print >= self._interval:
            self._last_print = now
            self._write_line(line, key)

    def _write_line(self, line: str, key: object) -> None:
        key = line if key is None else key
        if key != self._last_key:
            self._last_key = key
            self._stream.write(line + "\n")
            self._stream.flush()

    def finish(self, line: str | None = None, key: object = None) -> None:
        if line is not None:
            if self._tty:
                self._stream.write("\r" + line.ljust(self._width) + "\n")
            else:
                self._write_line(line, key)
        elif self._tty and self._width:
            self._stream.write("\n")
        self._stream.flush()
        self._width = 0

    def message(self, text: str) -> None:
        """A line that must not be overwritten (a worker died, a restart)."""
        if self._tty and self._width:
            self._stream.write("\r" + " " * self._width + "\r")
            self._width = 0
        self._stream.write(text + "\n")
        self._stream.flush()
