"""Child processes that cannot outlive the process that started them."""

from __future__ import annotations

import ctypes
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """`preexec_fn` for Popen (runs in the child between fork and exec): the kernel sends the
    child SIGTERM when its parent dies, even by SIGKILL, so no launcher death leaves an
    orphan (a Redis server, a worker) behind. Linux only; elsewhere a no-op. The signal
    comes when the *thread* that started the child ends: start children from a thread that
    lives as long as they should (the main thread, in our commands)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass
