"""Child processes that cannot outlive the process that started them."""

from __future__ import annotations

import ctypes
import signal
from typing import NoReturn

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


def exit_now(code: int) -> NoReturn:
    """Flush what the process has to say, then end it without interpreter teardown.

    A worker that is done has released its lease and closed its channel. What is left is
    the C++ runtime of gRPC and torch, whose threads can abort the process while static
    objects are destroyed at exit ("terminate called without an active exception", seen
    once in CI): the exit status must be the run's, not that.
    """
    import logging
    import os
    import sys

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
