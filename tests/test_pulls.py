"""Compressed pulls: a worker holding version v receives only what changed since, exactly."""

from __future__ import annotations

import pytest
import torch

from conftest import random_gradient, small_config
from gradhub.codecs import codec_from_name
from gradhub.domain import ParameterSnapshot, PushMeta
from gradhub.models import build_model

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def apply_delta(held: list[torch.Tensor], snapshot: ParameterSnapshot) -> list[torch.Tensor]:
    result = []
    for old, tensor in zip(held, snapshot.tensors):
        new = old.clone()
        if tensor.indices is None:
            new.copy_(tensor.float_values().view(tensor.shape))
        else:
            new.view(-1)[tensor.indices] = tensor.float_values()
        result.append(new)
    return result


@pytest.fixture
def server(serve, run_id):
    server = serve(small_config(run_id, mode="async", workers=1, max_staleness=100))
    server.register("w")
    return server


def push(server, run_id, seq, base, codec="topk:0.01", seed=0, delta=True):
    encoded = [codec_from_name(codec, dense_below=0).encode(n, g) for n, g in random_gradient(build_model("cnn"), seed)]
    meta = PushMeta(run_id, "w", seq, base, pull_delta=delta)
    return server.client("w").push_pull(meta, encoded, timeout=10)


def test_a_delta_carries_only_the_changed_coordinates_and_reproduces_the_parameters_exactly(server, run_id):
    held = [t.values.view(t.shape).clone() for t in server.client("w").pull(0, 10).tensors]
    result, delta = push(server, run_id, seq=1, base=0)
    assert delta.delta_from == 0 and delta.version == result.version == 1
    assert all(t.indices is not None for t in delta.tensors[:1])  # the big tensors travel sparse
    assert torch.equal(torch.cat([t.view(-1) for t in apply_delta(held, delta)]),
                       torch.cat([p.view(-1) for p in server.parameters()]))
    full = server.client("w").pull(0, 10)
    assert delta.wire_bytes < full.wire_bytes / 5


def test_a_delta_spans_several_versions_and_history_limits_fall_back_to_whole(server, run_id):
    held = [t.values.view(t.shape).clone() for t in server.client("w").pull(0, 10).tensors]
    for seq in range(1, 4):
        push(server, run_id, seq=seq, base=seq - 1, seed=seq)
    delta = server.client("w").pull(0, 10, have_version=0)
    assert delta.delta_from == 0 and delta.version == 3
    assert torch.equal(torch.cat([t.view(-1) for t in apply_delta(held, delta)]),
                       torch.cat([p.view(-1) for p in server.parameters()]))
    # Nothing changed since the current version: an empty delta.
    same = server.client("w").pull(0, 10, have_version=3)
    assert same.delta_from == 3 and all(t.nnz == 0 for t in same.tensors if t.indices is not None)
    # From a version the server no longer remembers (it keeps 64), or never had: the whole model.
    for seq in range(4, 70):
        push(server, run_id, seq=seq, base=seq - 1, seed=seq)
    assert server.client("w").pull(0, 10, have_version=1).delta_from is None
    assert server.client("w").pull(0, 10, have_version=60).delta_from == 60
    assert server.client("w").pull(0, 10, have_version=99).delta_from is None


def test_dense_pushes_make_a_delta_pull_the_whole_model_and_fp16_pulls_halve_the_bytes(server, run_id):
    # Every coordinate changed: the reply is the whole model (the snapshot all pullers share).
    _, delta = push(server, run_id, seq=1, base=0, codec="fp16")
    assert delta.delta_from is None and all(t.indices is None for t in delta.tensors)
    assert torch.equal(torch.cat([t.float_values() for t in delta.tensors]),
                       torch.cat([p.view(-1) for p in server.parameters()]))
    full32 = server.client("w").pull(0, 10)
    full16 = server.client("w").pull(0, 10, dtype=torch.float16)
    assert full16.tensors[0].values.dtype == torch.float16
    assert full16.wire_bytes < 0.55 * full32.wire_bytes


@pytest.mark.parametrize("model, one_message", [("cnn", True), ("wide", False)])
def test_a_small_models_step_is_one_unary_call_and_a_big_ones_falls_back_to_a_pull(serve, run_id, model, one_message):
    """Step: the push and the parameters in one message each way when they fit (the CNN's
    5 k parameters); the 1 M-parameter model's do not, so the reply says only what became of
    the push, and the client leaves the pull to its caller."""
    server = serve(small_config(run_id, mode="async", workers=1, max_staleness=100, model=model))
    server.register("w")
    client = server.client("w")
    client.one_message_steps = True
    gradient = random_gradient(build_model(model), 0)
    encoded = [codec_from_name("topk:0.01", dense_below=0).encode(n, g) for n, g in gradient]
    result, snapshot = client.push_pull(PushMeta(run_id, "w", 1, 0), encoded, timeout=10)
    assert result.version == 1
    if one_message:
        assert snapshot is not None and snapshot.version == 1
        assert torch.equal(torch.cat([t.float_values() for t in snapshot.tensors]),
                           torch.cat([p.view(-1) for p in server.parameters()]))
    else:
        assert snapshot is None
        assert client.pull(1, 10).version == 1
    status = server.app.stats.totals()["workers"]["w"]
    assert status["pushes_applied"] == 1
    # A pull is counted only when its bytes were sent: by Step for the CNN, by Pull for `wide`.
    assert status["bytes_pulled"] > 0


@pytest.mark.parametrize("runs", [1, 2, 5])
def test_the_union_of_changed_indices_is_sorted_and_unique_whatever_the_runs(runs):
    from gradhub_server.store import _sorted_unique, _union

    generator = torch.Generator().manual_seed(runs)
    parts = [torch.randperm(10_000, generator=generator)[:3_000].sort().values for _ in range(runs)]
    assert torch.equal(_union(parts), torch.unique(torch.cat(parts)))
    # What a step records may be in no order, with repeats (a sync step's pushes concatenated).
    unordered = parts + [torch.tensor([5, 5, 2, 9_999])]
    before = [part.clone() for part in unordered]
    assert torch.equal(_sorted_unique(unordered), torch.unique(torch.cat(unordered)))
    assert all(torch.equal(a, b) for a, b in zip(unordered, before))  # sorted a copy, not the parts
    assert _union(None) is None and _union([]).numel() == 0


def test_a_step_records_its_sparse_indices_sorted_and_unique_for_the_delta_pulls():
    from torch import nn

    from gradhub_server.schedules import schedule_from_name
    from gradhub_server.store import ParameterStore
    from gradhub_server.update_rules import SparseGradient, build_update_rule

    model = nn.Linear(10, 3)  # weight 30, bias 3
    rule = build_update_rule("sgd", list(model.parameters()), 0.1, 0.0, 0.0)
    store = ParameterStore(model, rule, steps=10, schedule=schedule_from_name("constant"))
    pushed = SparseGradient(torch.tensor([1, 4, 7]), torch.ones(3), unique=True)
    # Two workers' pushes concatenated, as a sync step's sparse mean is: repeats add up.
    mean = SparseGradient(torch.tensor([1, 4, 9, 4, 7, 0]), torch.ones(6), unique=False)
    store.apply([pushed, torch.zeros(3)])
    weight, bias = store.changed_since(0)
    assert weight is pushed.indices and bias is None  # a push's own indices, not a copy
    store.apply([mean, torch.zeros(3)])
    assert torch.equal(store.changed_since(1)[0], torch.tensor([0, 1, 4, 7, 9]))
    assert torch.equal(store.changed_since(0)[0], torch.tensor([0, 1, 4, 7, 9]))  # across two versions
    assert torch.equal(mean.indices, torch.tensor([1, 4, 9, 4, 7, 0]))  # the gradient itself untouched
