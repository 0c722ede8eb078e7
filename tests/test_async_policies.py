"""Async policies apply each push on arrival, at the learning rate their rule gives it.

Real Redis and a real gRPC server on port 0; with plain SGD at a constant rate, the
parameters after a push are computed locally and compared to an ulp.
"""

from __future__ import annotations

import pytest
import torch

from conftest import random_gradient, small_config
from gradhub.codecs import codec_from_name
from gradhub.domain import PushMeta
from gradhub.models import build_model

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

LR = 0.1


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    # The optimizer's fused update may round differently from this expression by an ulp;
    # a wrong rate (lr against lr / 4) is off by 0.075 * |g|.
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)


def push(server, run_id: str, worker: str, seq: int, base: int, seed: int):
    gradient = random_gradient(build_model("cnn"), seed)
    encoded = [codec_from_name("none").encode(name, g) for name, g in gradient]
    result = server.client(worker).push(PushMeta(run_id, worker, seq, base), encoded, timeout=10)
    return result, [g for _, g in gradient]


@pytest.mark.parametrize(("mode", "rate_at"), [
    ("async", lambda staleness: LR),
    ("async-sa", lambda staleness: LR / max(1, staleness)),
])
def test_a_push_is_applied_at_the_rate_its_staleness_gives(serve, run_id, mode, rate_at):
    server = serve(small_config(run_id, mode=mode, workers=2, lr=LR, max_staleness=10))
    server.register("fresh")
    server.register("late")
    # Four fresh pushes move the model to version 4; then one computed on version 0 arrives.
    for seq in range(1, 5):
        before = server.parameters()
        result, gradient = push(server, run_id, "fresh", seq, base=seq - 1, seed=seq)
        assert result.staleness == 0
        for old, new, g in zip(before, server.parameters(), gradient):
            close(new, old - LR * g)  # a fresh push gets the full rate in both
    before = server.parameters()
    result, gradient = push(server, run_id, "late", 1, base=0, seed=99)
    assert result.staleness == 4 and result.version == 5
    for old, new, g in zip(before, server.parameters(), gradient):
        close(new, old - rate_at(4) * g)
