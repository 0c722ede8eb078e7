"""The staleness laboratory's policies on a real server: SSP's bound, injected staleness
tau, DC-ASGD's compensation. Real Redis, real gRPC on port 0, workers as threads."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest
import torch

from conftest import random_gradient, small_config
from gradhub.codecs import codec_from_name
from gradhub.delays import StepDelay
from gradhub.domain import PushMeta
from gradhub.errors import VersionNotReached
from gradhub.models import build_model
from gradhub_server.delay_compensation import EPSILON, MEAN_SQUARE_DECAY

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

LR = 0.1


def encoded_gradient(seed: int):
    gradient = random_gradient(build_model("cnn"), seed)
    return [codec_from_name("none").encode(n, g) for n, g in gradient], [g for _, g in gradient]


def test_ssp_keeps_every_worker_within_the_bound_under_random_seeded_delays(serve, run_id):
    workers, bound, pushes = 4, 2, 24
    server = serve(small_config(run_id, mode="ssp", workers=workers, ssp_bound=bound, max_staleness=1000,
                                steps=10_000))
    names = [f"w{rank}" for rank in range(workers)]
    for name in names:
        server.register(name)
    encoded, _ = encoded_gradient(0)
    lock = threading.Lock()
    started = dict.fromkeys(names, 0)  # pushes begun: never below the server's clock
    acked = dict.fromkeys(names, 0)
    leads: list[int] = []
    errors: list[BaseException] = []

    def work(rank: int) -> None:
        name = names[rank]
        # Seeded exponential delays, rank 0 five times slower: the others must hit the bound.
        delay = StepDelay("exponential:2", "0:5", seed=11, rank=rank, workers=workers)
        client = server.client(name)
        try:
            held = client.pull(0, 10).version
            for seq in range(1, pushes + 1):
                time.sleep(delay.idle_seconds(0.001))  # the injected straggling under test
                with lock:
                    started[name] += 1
                result, snapshot = client.push_pull(PushMeta(run_id, name, seq, held), encoded, 10)
                with lock:
                    acked[name] += 1
                if snapshot is None:  # held back at the bound: pull again
                    snapshot = client.pull(result.version, 10)
                with lock:  # allowed to read: not more than `bound` ahead of anyone
                    leads.append(acked[name] - min(started[n] for n in names if n != name))
                held = snapshot.version
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(rank,)) for rank in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=90)
    assert not errors, errors
    assert len(leads) == workers * pushes
    assert max(leads) <= bound, sorted(leads)[-5:]
    report = server.app.policy.report()
    assert report["max_lead"] == bound, report  # the bound was reached, so it was tested
    assert sum(w["waits"] for w in server.app.stats.totals()["workers"].values()) > 0
    assert server.app.stats.totals()["pushes_applied"] == workers * pushes


def test_an_ssp_pull_held_at_the_bound_is_released_when_the_slowest_worker_dies(serve, run_id):
    server = serve(small_config(run_id, mode="ssp", workers=2, ssp_bound=1, max_staleness=100))
    server.register("fast")
    server.register("dead")
    fast = server.client("fast")
    fast.pull(0, 10)
    server.client("dead").pull(0, 10)
    encoded, _ = encoded_gradient(1)
    result, snapshot = fast.push_pull(PushMeta(run_id, "fast", 1, 0), encoded, timeout=10)
    assert snapshot is not None and snapshot.version == 1  # one ahead of "dead": within the bound
    # A second push puts fast two ahead: the push stands, its read is deferred...
    result, snapshot = fast.push_pull(PushMeta(run_id, "fast", 2, 1), encoded, timeout=1)
    assert snapshot is None and result.version == 2
    with pytest.raises(VersionNotReached):
        fast.pull(result.version, timeout=1)
    # ... and a dead worker holds nobody back.
    server.leave("dead")
    assert fast.pull(result.version, timeout=10).version == 2
    assert server.app.stats.totals()["pushes_applied"] == 2


def test_injected_staleness_applies_every_gradient_exactly_tau_versions_late(serve, run_id):
    tau, pushes = 3, 8
    server = serve(small_config(run_id, mode="async", workers=1, lr=LR, inject_staleness=tau,
                                max_staleness=tau))
    server.register("w")
    client = server.client("w")
    initial = server.parameters()
    sent: list[list[torch.Tensor]] = []
    held = client.pull(0, 10).version
    for seq in range(1, pushes + 1):
        encoded, gradient = encoded_gradient(seq)
        sent.append(gradient)
        result, snapshot = client.push_pull(PushMeta(run_id, "w", seq, held), encoded, timeout=10)
        assert snapshot is not None and snapshot.version == seq
        held = snapshot.version
        applied = sent[: max(0, seq - tau)]  # the last tau are still in the line
        for p0, now, *gs in zip(initial, server.parameters(), *applied) if applied else []:
            torch.testing.assert_close(now, p0 - LR * sum(gs), rtol=0, atol=1e-5)
        if not applied:
            assert all(torch.equal(a, b) for a, b in zip(initial, server.parameters()))
    assert server.app.stats.totals()["staleness"]["histogram"] == {str(tau): pushes - tau}


def test_dc_asgd_adds_the_compensation_term_against_the_worker_s_own_copy(serve, run_id):
    lam = 2.0
    server = serve(small_config(run_id, mode="dc-asgd", workers=2, lr=LR, dc_lambda=lam, max_staleness=10))
    server.register("a")
    server.register("b")
    w0 = server.parameters()
    assert server.client("a").pull(0, 10).version == 0  # the server now mirrors a's copy: w0
    enc_b, g_b = encoded_gradient(1)
    enc_a, g_a = encoded_gradient(2)
    # b never pulled: its push is applied as it is (no base to compensate against).
    server.client("b").push(PushMeta(run_id, "b", 1, 0), enc_b, timeout=10)
    w1 = server.parameters()
    for p0, p1, g in zip(w0, w1, g_b):
        torch.testing.assert_close(p1, p0 - LR * g, rtol=0, atol=1e-6)
    # a's gradient, computed on w0, arrives at w1: g + lambda_t * g*g*(w1 - w0).
    server.client("a").push(PushMeta(run_id, "a", 1, 0), enc_a, timeout=10)
    for p0, p1, p2, gb, ga in zip(w0, w1, server.parameters(), g_b, g_a):
        # The mean square starts at b's g*g (not at zero), then decays towards a's.
        mean_square = MEAN_SQUARE_DECAY * gb * gb + (1 - MEAN_SQUARE_DECAY) * ga * ga
        compensated = ga + lam / torch.sqrt(mean_square + EPSILON) * ga * ga * (p1 - p0)
        torch.testing.assert_close(p2, p1 - LR * compensated, rtol=1e-5, atol=1e-6)
    report = server.app.policy.report()
    assert (report["compensated"], report["uncompensated"]) == (1, 1), report


@pytest.mark.timeout(120)
def test_a_run_whose_training_diverges_ends_as_diverged_with_a_summary(tmp_path):
    # DC-ASGD with a large lambda under tau = 16 blows up within a few hundred steps
    # (found by sweeping; see docs/lab): the worker's gradients turn non-finite and stay so.
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "gradhub_cli", "run", "--workers", "1", "--mode", "dc-asgd", "--dc-lambda", "0.5",
         "--inject-staleness", "16", "--max-staleness", "40", "--steps", "1500", "--out", str(out),
         "--no-progress"],
        capture_output=True, text=True, timeout=110,
    )
    assert result.returncode == 3, result.stderr  # gradhub run's exit status for "diverged"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["steps"] < 1500, summary
    assert "NaN or Inf" in summary["diverged"]["reason"]
    assert " diverged in " in result.stdout
