"""Injected delays: seeded (replayable per rank), with the stated means, and clear errors."""

from __future__ import annotations

import math
import statistics

import pytest

from gradhub.delays import StepDelay, build_delay, parse_delay, parse_slowdown
from gradhub.errors import ConfigurationError

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize("spec", ["constant:5", "exponential:5", "lognormal:5:0.5", "pareto:5:3"])
def test_each_rank_replays_its_own_sequence_from_the_seed(spec):
    draws = [[build_delay(spec, seed=1, rank=rank).draw() for _ in range(50)] for rank in (0, 0, 1)]
    assert draws[0] == draws[1]
    if not spec.startswith("constant"):
        assert draws[0] != draws[2]
    assert all(d >= 0 for d in draws[0])


@pytest.mark.parametrize("spec", ["constant:5", "exponential:5", "lognormal:5:0.5", "pareto:5:3"])
def test_the_sample_mean_matches_the_stated_mean(spec):
    model = build_delay(spec, seed=0, rank=0)
    sample = [model.draw() for _ in range(40_000)]
    assert statistics.fmean(sample) == pytest.approx(model.mean_seconds, rel=0.05)


def test_pareto_is_long_tailed_and_says_when_it_has_no_mean():
    assert build_delay("pareto:1:0.9", 0, 0).mean_seconds == math.inf
    pareto, exponential = build_delay("pareto:1:1.5", 0, 0), build_delay("exponential:1", 0, 0)
    heavy = sorted(pareto.draw() for _ in range(10_000))
    light = sorted(exponential.draw() for _ in range(10_000))
    # The far tail against the median: hundreds of times for Pareto, about ten for exponential.
    assert heavy[-1] > 100 * heavy[len(heavy) // 2]
    assert light[-1] < 20 * light[len(light) // 2]


def test_a_slowdown_stretches_the_whole_step_of_its_rank_only():
    slow = StepDelay("constant:10", "1:3", seed=0, rank=1, workers=2)
    fast = StepDelay("constant:10", "1:3", seed=0, rank=0, workers=2)
    # compute 0.02 s + delay 0.01 s = 0.03 s; three times that is 0.09 s: idle 0.07 s.
    assert slow.idle_seconds(0.02) == pytest.approx(0.07)
    assert fast.idle_seconds(0.02) == pytest.approx(0.01)
    assert not StepDelay("none", "", 0, 0, 2).active


@pytest.mark.parametrize(("spec", "message"), [
    ("gamma:3", "delay must be one of"),
    ("exponential", "expected exponential:MEAN_MS"),
    ("lognormal:5:x", "must be numbers"),
    ("pareto:5:0", "alpha must be finite and > 0"),
    ("constant:-1", "ms must be finite and >= 0"),
])
def test_a_bad_delay_says_what_is_wrong(spec, message):
    with pytest.raises(ConfigurationError, match=message):
        parse_delay(spec)


@pytest.mark.parametrize(("spec", "message"), [
    ("3", "expected RANK:FACTOR"),
    ("5:2", "rank 5 is not one of the 2 ranks"),
    ("0:0.5", "must be finite and >= 1"),
])
def test_a_bad_slowdown_says_what_is_wrong(spec, message):
    with pytest.raises(ConfigurationError, match=message):
        parse_slowdown(spec, workers=2)
