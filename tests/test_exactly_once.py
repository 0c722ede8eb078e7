"""Exactly-once pushes through cut connections, stalled replies and retries.

The invariant users rely on: with plain SGD at a fixed learning rate, the final parameters
are the initial ones minus lr times the sum of every gradient the server acknowledged,
no more (no update applied twice) and no less (none acknowledged and then lost).
"""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest
import torch

from chaos_proxy import ChaosProxy
from conftest import small_config
from gradhub.codecs import codec_from_name
from gradhub.domain import PushMeta
from gradhub.errors import GradhubError
from gradhub.models import build_model
from gradhub_worker.client import ParameterClient
from gradhub_worker.worker import Worker, WorkerSettings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

PUSHES_PER_WORKER = 30
LR = 0.1
#: The client's deadline per call, and the proxy's stall: longer, so a stalled reply times out.
RPC_TIMEOUT_S = 1.0
STALL_S = 1.5


def gradient_for(model: torch.nn.Module, worker: int, k: int) -> list[tuple[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1000 * worker + k)
    return [(name, 0.01 * torch.randn(p.shape, generator=generator)) for name, p in model.named_parameters()]


def test_final_parameters_are_initial_minus_lr_times_every_acknowledged_gradient(serve, run_id, redis_url):
    config = replace(small_config(run_id, mode="async", workers=2, steps=100_000, lr=LR), max_staleness=1000)
    server = serve(config)
    torch.manual_seed(config.seed)
    reference = build_model(config.model)  # the server built its model the same way
    expected = {name: p.detach().double().clone() for name, p in reference.named_parameters()}
    host, port = server.address.rsplit(":", 1)
    proxy = ChaosProxy((host, int(port)), seed=7, cut_probability=0.02, stall_probability=0.05,
                       stall_seconds=STALL_S)
    codec = codec_from_name("none")
    acknowledged: list[list[tuple[str, torch.Tensor]]] = []
    refused: list[str] = []
    workers: list[Worker] = []
    lock = threading.Lock()

    def push_all(index: int) -> None:
        worker_id = f"w{index}"
        server.register(worker_id)
        # The proxy's address given explicitly: a worker follows the address in Redis only
        # when it was not told where the server is.
        worker = Worker(WorkerSettings(redis_url=redis_url, run_id=run_id, worker_id=worker_id, server=proxy.address,
                                       rpc_timeout=RPC_TIMEOUT_S, give_up_after=60.0), server.coordinator)
        client = ParameterClient(proxy.address, run_id, worker_id, max_payload_bytes=1 << 26)
        base = 0
        try:
            for k in range(1, PUSHES_PER_WORKER + 1):
                gradient = gradient_for(reference, index, k)
                encoded = [codec.encode(name, g) for name, g in gradient]
                meta = PushMeta(run_id=run_id, worker_id=worker_id, seq=k, base_version=base)
                try:
                    # The worker's own retry loop: same sequence number until answered.
                    result, _ = worker._push_until_answered(client, meta, encoded)
                except GradhubError as exc:  # a refusal: not applied, and the worker knows it
                    with lock:
                        refused.append(f"{worker_id}/{k}: {exc}")
                    continue
                base = result.version
                with lock:
                    acknowledged.append(gradient)
        finally:
            client.close()
            with lock:
                workers.append(worker)

    threads = [threading.Thread(target=push_all, args=(i,)) for i in (0, 1)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=150)
        assert not any(t.is_alive() for t in threads)
    finally:
        proxy.close()

    for gradient in acknowledged:
        for name, g in gradient:
            expected[name] -= LR * g.double()
    final = dict(zip([n for n, _ in reference.named_parameters()], server.parameters()))
    for name, value in final.items():
        # A doubled or lost update would be off by lr * |g| ~ 1e-3; fp32 rounding is ~1e-7.
        torch.testing.assert_close(value.double(), expected[name], atol=2e-6, rtol=0)
    totals = server.app.stats.totals()
    assert totals["pushes_applied"] == len(acknowledged) == server.app.store.version
    assert len(acknowledged) + len(refused) == 2 * PUSHES_PER_WORKER
    # The faults happened, and some pushes were answered only on a retry of an applied copy.
    assert proxy.faults.cuts > 0 and proxy.faults.stalls > 0
    assert sum(w.pushes_retried for w in workers) > 0
    assert server.app.core.receipts.replayed > 0
    print(f"faults: {proxy.faults}; acknowledged {len(acknowledged)}, refused {refused}, "
          f"retries {sum(w.pushes_retried for w in workers)}, replayed {server.app.core.receipts.replayed}")


def test_a_restarted_worker_with_the_same_id_numbers_its_pushes_above_its_earlier_life():
    """A Kubernetes pod restarted in place keeps its name (its worker id) and gets a new lease."""
    from gradhub_worker.worker import next_seq

    first_life = [next_seq(0, token=7)]
    for _ in range(999):
        first_life.append(next_seq(first_life[-1], token=7))
    assert first_life == sorted(set(first_life)) and first_life[0] == (7 << 32) + 1
    restarted = next_seq(0, token=8)  # fencing tokens only grow
    assert restarted > first_life[-1]
    # A re-registration within one life (lease lost) also jumps above what was sent.
    assert next_seq(first_life[-1], token=9) > first_life[-1]
