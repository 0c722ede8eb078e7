"""Logging set-up for gradhub's processes: one line per record, tagged with the component."""

from __future__ import annotations

import logging
import os


def setup_logging(component: str, level: str | None = None) -> None:
    level = (level or os.environ.get("GRADHUB_LOG_LEVEL") or "INFO").upper()
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s {component} %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def set_torch_threads(threads: int) -> None:
    """Pin torch's intra-op threads (0 keeps torch's default).

    Several training processes on one small machine each spawning a thread per core
    fight for the cores; the launcher gives each process its share.
    """
    if threads > 0:
        import torch

        torch.set_num_threads(threads)
