"""Exponential backoff with jitter, and waiting on a condition with a deadline.

One object instead of hand-written loops: every place that waits for something
outside its process (Redis, the server, a file) uses these, so every wait has a
deadline and none spins.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass
class Backoff:
    """Delays of initial * multiplier**n, capped at maximum, with +/- jitter (fraction)."""

    initial: float = 0.05
    maximum: float = 2.0
    multiplier: float = 2.0
    jitter: float = 0.2
    rng: random.Random | None = None

    def __post_init__(self) -> None:
        self._attempt = 0

    def next_delay(self) -> float:
        base = min(self.maximum, self.initial * self.multiplier**self._attempt)
        self._attempt += 1
        rng = self.rng or random
        return max(0.0, base * (1.0 + rng.uniform(-self.jitter, self.jitter)))

    def reset(self) -> None:
        self._attempt = 0


class Deadline:
    """A point in monotonic time; `remaining()` never goes below zero."""

    def __init__(self, seconds: float) -> None:
        self._end = time.monotonic() + seconds

    def remaining(self) -> float:
        return max(0.0, self._end - time.monotonic())

    def expired(self) -> bool:
        return time.monotonic() >= self._end


def wait_for(
    probe: Callable[[], T | None],
    timeout: float,
    what: str,
    backoff: Backoff | None = None,
    on_timeout: Callable[[str], Exception] = TimeoutError,
) -> T:
    """Call `probe` until it returns something other than None, or raise on_timeout(message)."""
    backoff = backoff or Backoff(initial=0.02, maximum=0.5)
    deadline = Deadline(timeout)
    while True:
        value = probe()
        if value is not None:
            return value
        if deadline.expired():
            raise on_timeout(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(min(backoff.next_delay(), deadline.remaining()))
