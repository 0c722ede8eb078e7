"""Injected delays: how long a worker idles each step, drawn from a seeded distribution.

A delay model is one small class behind `DelayModel`, chosen by name in the run's
`delay` setting (`constant:MS`, `exponential:MEAN_MS`, `lognormal:MEDIAN_MS:SIGMA`,
`pareto:SCALE_MS:ALPHA`). Each worker draws from its own generator seeded by (run
seed, rank), so the sequence of delays of a run is replayed exactly by the same seed;
the compute times around them are real and vary as they do.

A slowdown factor f for a rank (`slowdown: "0:3"`) makes that worker take f times as
long per step: after computing its gradient in c seconds and drawing a delay d, it
idles d + (f - 1)(c + d). A factor is relative to the worker's own measured compute,
so "3x slower" holds on any machine.
"""

from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod

from gradhub.errors import ConfigurationError


class DelayModel(ABC):
    """Seconds to idle per step."""

    name: str

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    @abstractmethod
    def draw(self) -> float: ...

    @property
    @abstractmethod
    def mean_seconds(self) -> float:
        """The distribution's mean (inf when it has none)."""


class NoDelay(DelayModel):
    name = "none"

    def draw(self) -> float:
        return 0.0

    @property
    def mean_seconds(self) -> float:
        return 0.0


class ConstantDelay(DelayModel):
    name = "constant"

    def __init__(self, rng: random.Random, ms: float) -> None:
        super().__init__(rng)
        self._seconds = ms / 1000

    def draw(self) -> float:
        return self._seconds

    @property
    def mean_seconds(self) -> float:
        return self._seconds


class ExponentialDelay(DelayModel):
    name = "exponential"

    def __init__(self, rng: random.Random, mean_ms: float) -> None:
        super().__init__(rng)
        self._mean = mean_ms / 1000

    def draw(self) -> float:
        return self._rng.expovariate(1 / self._mean) if self._mean > 0 else 0.0

    @property
    def mean_seconds(self) -> float:
        return self._mean


class LognormalDelay(DelayModel):
    """Long-tailed with every moment finite: exp(N(ln median, sigma^2))."""

    name = "lognormal"

    def __init__(self, rng: random.Random, median_ms: float, sigma: float) -> None:
        super().__init__(rng)
        self._mu = math.log(median_ms / 1000)
        self._sigma = sigma

    def draw(self) -> float:
        return self._rng.lognormvariate(self._mu, self._sigma)

    @property
    def mean_seconds(self) -> float:
        return math.exp(self._mu + self._sigma**2 / 2)


class ParetoDelay(DelayModel):
    """Heavy-tailed: scale * Pareto(alpha), at least `scale`; infinite mean for alpha <= 1."""

    name = "pareto"

    def __init__(self, rng: random.Random, scale_ms: float, alpha: float) -> None:
        super().__init__(rng)
        self._scale = scale_ms / 1000
        self._alpha = alpha

    def draw(self) -> float:
        return self._scale * self._rng.paretovariate(self._alpha)

    @property
    def mean_seconds(self) -> float:
        return self._scale * self._alpha / (self._alpha - 1) if self._alpha > 1 else math.inf


#: name -> (class, parameter names, whether each must be > 0 (else >= 0))
_MODELS: dict[str, tuple[type[DelayModel], tuple[str, ...], tuple[bool, ...]]] = {
    "none": (NoDelay, (), ()),
    "constant": (ConstantDelay, ("ms",), (False,)),
    "exponential": (ExponentialDelay, ("mean_ms",), (False,)),
    "lognormal": (LognormalDelay, ("median_ms", "sigma"), (True, False)),
    "pareto": (ParetoDelay, ("scale_ms", "alpha"), (True, True)),
}


def parse_delay(spec: str) -> tuple[str, tuple[float, ...]]:
    """`name:p1:p2` -> (name, parameters), or ConfigurationError saying what is wrong."""
    name, *raw = spec.strip().split(":")
    if name not in _MODELS:
        raise ConfigurationError(f"delay must be one of {sorted(_MODELS)} with parameters, got {spec!r}")
    _, names, positive = _MODELS[name]
    if len(raw) != len(names):
        form = ":".join([name, *(n.upper() for n in names)])
        raise ConfigurationError(f"delay {spec!r}: expected {form}")
    try:
        values = tuple(float(v) for v in raw)
    except ValueError as exc:
        raise ConfigurationError(f"delay {spec!r}: parameters must be numbers") from exc
    for value, param, strict in zip(values, names, positive):
        if not math.isfinite(value) or value < 0 or (strict and value == 0):
            bound = "> 0" if strict else ">= 0"
            raise ConfigurationError(f"delay {spec!r}: {param} must be finite and {bound}")
    return name, values


def build_delay(spec: str, seed: int, rank: int) -> DelayModel:
    """The delay model of one rank, with its own generator: replayable from (seed, rank)."""
    name, values = parse_delay(spec)
    cls = _MODELS[name][0]
    rng = random.Random(f"gradhub-delay-{seed}-{rank}")
    return cls(rng, *values)  # type: ignore[call-arg]


def parse_slowdown(spec: str, workers: int) -> dict[int, float]:
    """`"0:3,2:1.5"` -> {0: 3.0, 2: 1.5}; ranks must exist and factors be >= 1."""
    factors: dict[int, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        rank_text, sep, factor_text = part.partition(":")
        try:
            rank, factor = int(rank_text), float(factor_text)
        except ValueError:
            sep = ""
        if not sep:
            raise ConfigurationError(f"slowdown {spec!r}: expected RANK:FACTOR[,RANK:FACTOR...], e.g. 0:3")
        if not 0 <= rank < workers:
            raise ConfigurationError(f"slowdown {spec!r}: rank {rank} is not one of the {workers} ranks")
        if not (math.isfinite(factor) and factor >= 1):
            raise ConfigurationError(f"slowdown {spec!r}: factor {factor} must be finite and >= 1")
        factors[rank] = factor
    return factors


class StepDelay:
    """What one worker idles after each step's compute: its delay draw, stretched by its slowdown."""

    def __init__(self, spec: str, slowdown: str, seed: int, rank: int, workers: int) -> None:
        self._model = build_delay(spec, seed, rank)
        self.factor = parse_slowdown(slowdown, workers).get(rank, 1.0)

    @property
    def active(self) -> bool:
        return self.factor != 1.0 or not isinstance(self._model, NoDelay)

    def idle_seconds(self, compute_seconds: float) -> float:
        drawn = self._model.draw()
        return drawn + (self.factor - 1.0) * (compute_seconds + drawn)
