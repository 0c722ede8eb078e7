"""Learning-rate schedules of the server-side optimizer, chosen by name.

A schedule maps training progress (model version / planned steps, in [0, 1]) to a
factor of the base learning rate. The server owns the optimizer, so it owns the
schedule: workers never see a learning rate.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from gradhub.errors import ConfigurationError

Schedule = Callable[[float], float]

#: Where `step` decays, and by how much.
STEP_AT = 0.75
STEP_FACTOR = 0.1


def constant(progress: float) -> float:
    return 1.0


def step(progress: float) -> float:
    """Full rate, then a tenth for the last quarter: settles the final model's noise."""
    return 1.0 if progress < STEP_AT else STEP_FACTOR


def cosine(progress: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, progress))))


SCHEDULES: dict[str, Schedule] = {"constant": constant, "step": step, "cosine": cosine}


def schedule_from_name(name: str) -> Schedule:
    try:
        return SCHEDULES[name]
    except KeyError:
        raise ConfigurationError(
            f"unknown lr schedule {name!r}; choose one of {', '.join(sorted(SCHEDULES))}"
        ) from None
