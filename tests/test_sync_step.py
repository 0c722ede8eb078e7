"""A sync step with W workers applies exactly the mean of their W gradients.

Real Redis, a real gRPC server on port 0, real gradients of the real model on
real MNIST-1D batches; the expectation is computed locally with the same seed
and the same optimizer, and compared bit for bit.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn

from conftest import small_config, wait_until
from gradhub.codecs import codec_from_name
from gradhub.data import load_dataset
from gradhub.domain import PushMeta
from gradhub.errors import StalePush
from gradhub.models import build_model

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def batch_gradient(model: nn.Module, rank: int, batch: int = 50) -> list[tuple[str, torch.Tensor]]:
    data = load_dataset()
    x = data.x_train[rank * batch : (rank + 1) * batch]
    y = data.y_train[rank * batch : (rank + 1) * batch]
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    return [(name, p.grad.detach().clone()) for name, p in model.named_parameters()]


@pytest.mark.parametrize("workers", [2, 3])
def test_sync_step_applies_the_mean_of_the_workers_gradients(serve, run_id, workers):
    config = small_config(run_id, workers=workers, lr=0.1)
    server = serve(config)
    torch.manual_seed(config.seed)
    reference = build_model(config.model)  # the server built its model the same way
    initial = [p.detach().clone() for p in reference.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(initial, server.parameters()))

    ids = [f"w{rank}" for rank in range(workers)]
    ranks = [server.register(worker_id) for worker_id in ids]
    gradients = [batch_gradient(reference, rank) for rank in ranks]
    codec = codec_from_name("none")

    def push(i: int):
        client = server.client(ids[i])
        meta = PushMeta(run_id=run_id, worker_id=ids[i], seq=1, base_version=0, loss=1.0, samples=50)
        return client.push(meta, [codec.encode(n, g) for n, g in gradients[i]], timeout=30)

    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(push, range(workers)))
    # Every push of the step returns after the one step it was averaged into.
    assert [r.version for r in results] == [1] * workers

    # Expected: the mean, summed in rank order, applied by the same optimizer.
    by_rank = [g for _, g in sorted(zip(ranks, gradients), key=lambda item: item[0])]
    mean = []
    for k in range(len(initial)):
        acc = by_rank[0][k][1].clone()
        for g in by_rank[1:]:
            acc.add_(g[k][1])
        mean.append(acc.div_(workers))
    optimizer = torch.optim.SGD(reference.parameters(), lr=config.lr)
    for p, g in zip(reference.parameters(), mean):
        p.grad = g
    optimizer.step()

    pulled = server.client("observer").pull(min_version=1, timeout=10)
    assert pulled.version == 1
    for expected, got, before in zip(reference.parameters(), pulled.tensors, initial):
        value = got.values.view(got.shape)
        assert torch.equal(value, expected.detach()), f"{got.name} differs from the local mean step"
        assert not torch.equal(value, before), f"{got.name} did not move"


def test_sync_push_waits_for_every_live_worker(serve, run_id):
    server = serve(small_config(run_id, workers=2))
    server.register("a")
    server.register("b")
    model = build_model("cnn")
    codec = codec_from_name("none")
    grads = [codec.encode(n, g) for n, g in batch_gradient(model, 0)]
    client_a = server.client("a")
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(
            client_a.push, PushMeta(run_id, "a", 1, 0), grads, 30
        )
        wait_until(lambda: "a" in server.app.policy.pending(), 10, "a's push to reach the barrier")
        # While b has not pushed, the step cannot happen.
        assert server.app.store.version == 0
        assert not pending.done()
        result_b = server.client("b").push(PushMeta(run_id, "b", 1, 0), grads, timeout=30)
        result_a = pending.result(timeout=30)
    assert result_a.version == result_b.version == 1
    assert server.app.stats.totals()["pushes_applied"] == 2


def test_backup_workers_step_with_the_first_pushes_and_drop_exactly_the_late_one(serve, run_id):
    config = small_config(run_id, workers=3, backup_workers=1, lr=0.1)
    server = serve(config)
    torch.manual_seed(config.seed)
    reference = build_model(config.model)
    for worker in ("a", "b", "c"):
        server.register(worker)
    gradients = {w: batch_gradient(reference, rank) for rank, w in enumerate(("a", "b", "c"))}
    codec = codec_from_name("none")

    def push(worker: str):
        meta = PushMeta(run_id=run_id, worker_id=worker, seq=1, base_version=0)
        return server.client(worker).push(meta, [codec.encode(n, g) for n, g in gradients[worker]], timeout=30)

    # a and b are 3 - 1 of 3: their step goes ahead without waiting for c.
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(push, ["a", "b"]))
    assert [r.version for r in results] == [1, 1]
    after_step = server.parameters()
    # c's gradient for that step comes late: dropped, counted, and the model untouched.
    with pytest.raises(StalePush, match="went ahead without this gradient"):  # ABORTED on the wire
        push("c")
    assert all(torch.equal(x, y) for x, y in zip(after_step, server.parameters()))
    totals = server.app.stats.totals()
    assert totals["pushes_applied"] == 2 and totals["refused_by_reason"] == {"LatePush": 1}

    # The step was the mean of a's and b's gradients only.
    optimizer = torch.optim.SGD(reference.parameters(), lr=config.lr)
    for p, (_, ga), (_, gb) in zip(reference.parameters(), gradients["a"], gradients["b"]):
        p.grad = (ga + gb) / 2
    optimizer.step()
    for expected, got in zip(reference.parameters(), after_step):
        torch.testing.assert_close(got, expected.detach(), rtol=0, atol=1e-7)
