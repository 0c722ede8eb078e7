"""Server update rules: a sparse gradient is applied at its coordinates only, in O(k)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gradhub import memory
from gradhub.domain import Push, PushMeta
from gradhub.encoded import dense_views
from gradhub.models import flatten_parameters
from gradhub_server import update_rules
from gradhub_server.gradients import DenseMean, StepSums, Submission, mean_gradient, mean_of
from gradhub_server.journal import UpdateJournal
from gradhub_server.schedules import schedule_from_name
from gradhub_server.store import ParameterStore
from gradhub_server.update_rules import SparseGradient, build_update_rule

pytestmark = pytest.mark.timeout(30)


def params(seed: int = 0) -> list[nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(50, 40, generator=generator)), nn.Parameter(torch.randn(40, generator=generator))]


def sparse_gradient(numel: int, k: int, seed: int) -> SparseGradient:
    generator = torch.Generator().manual_seed(seed)
    indices = torch.sort(torch.randperm(numel, generator=generator)[:k]).values
    return SparseGradient(indices, torch.randn(k, generator=generator))


def test_plain_sgd_applies_a_sparse_gradient_like_its_dense_form():
    dense_params, sparse_params = params(), params()
    grads = [sparse_gradient(2000, 30, 1), sparse_gradient(40, 3, 2)]
    build_update_rule("sgd", dense_params, 0.1, 0.0, 0.0).apply(
        [g.to_dense(p.shape) for g, p in zip(grads, dense_params)]
    )
    build_update_rule("sgd", sparse_params, 0.1, 0.0, 0.0).apply(grads)
    for a, b, g in zip(dense_params, sparse_params, grads):
        # The same arithmetic up to the last bit (torch's dense kernel may fuse multiply-add).
        assert torch.allclose(a, b, rtol=2**-22, atol=0)
        untouched = torch.ones(a.numel(), dtype=torch.bool)
        untouched[g.indices] = False
        assert torch.equal(a.view(-1)[untouched], b.view(-1)[untouched])


@pytest.mark.parametrize(("block", "lanes"), [(None, 1), (7, 1), (7, 3)],
                         ids=["one-block", "blocks-of-7", "blocks-of-7-on-3-lanes"])
def test_a_sparse_step_at_unique_indices_equals_the_scatter_add_and_returns_what_it_wrote(block, lanes, monkeypatch):
    """A push's indices are unique: the step adds them and reads them back (in blocks, on
    several lanes at once), the same additions as one scatter_add_; the values it wrote
    are the next delta pull's."""
    if block is not None:  # 30 indices in blocks of 7: whole blocks and a partial one
        monkeypatch.setattr(update_rules, "ADD_BLOCK_INDICES", block)
        monkeypatch.setattr(update_rules, "ADD_LANE_INDICES", 8)  # lanes of 8 or more
    scattered, written = params(), params()
    scatter_rule = build_update_rule("sgd", scattered, 0.1, 0.0, 0.0)
    unique_rule = build_update_rule("sgd", written, 0.1, 0.0, 0.0, lanes=lanes)
    for seed in range(3):
        grads = [sparse_gradient(2000, 30, seed), sparse_gradient(40, 3, seed + 10)]
        assert scatter_rule.apply(grads) == [None, None]  # indices that may repeat: nothing returned
        after = unique_rule.apply([SparseGradient(g.indices, g.values, unique=True) for g in grads])
        for a, b, g, values in zip(scattered, written, grads, after):
            assert torch.equal(a, b)
            assert values is not None and torch.equal(values, b.detach().view(-1)[g.indices])


def test_a_dense_step_and_a_lazy_sparse_step_return_no_written_values():
    ps = params()
    assert build_update_rule("sgd", ps, 0.1, 0.0, 0.0).apply([torch.ones(50, 40), torch.ones(40)]) == [None, None]
    lazy = build_update_rule("sgd", ps, 0.1, 0.9, 0.0)
    grads = [sparse_gradient(2000, 30, 1), sparse_gradient(40, 3, 2)]
    assert lazy.apply([SparseGradient(g.indices, g.values, unique=True) for g in grads]) == [None, None]


@pytest.mark.parametrize("optimizer, momentum, decay", [("sgd", 0.9, 5e-4), ("adam", 0.0, 0.0), ("adam", 0.0, 1e-2)])
def test_stateful_rules_are_lazy_touching_only_the_named_coordinates(optimizer, momentum, decay):
    ps = params()
    rule = build_update_rule(optimizer, ps, 0.1, momentum, decay)
    first, second = sparse_gradient(2000, 40, 3), sparse_gradient(2000, 40, 4)
    rule.apply([first, SparseGradient(torch.empty(0, dtype=torch.int64), torch.empty(0))])
    after_first = ps[0].detach().clone()
    rule.apply([second, SparseGradient(torch.empty(0, dtype=torch.int64), torch.empty(0))])
    moved = (ps[0].detach() != after_first).view(-1)
    # Only the second gradient's coordinates moved in the second step: untouched ones keep still,
    # even those with momentum from the first.
    assert set(torch.nonzero(moved).view(-1).tolist()) <= set(second.indices.tolist())
    assert moved[second.indices].any()
    assert torch.equal(ps[1], params()[1])  # a parameter with no coordinates sent never moves
    state = rule.optimizer.state[ps[0]]
    buffer = state.get("momentum_buffer", state.get("exp_avg"))
    touched = set(first.indices.tolist()) | set(second.indices.tolist())
    assert set(torch.nonzero(buffer.view(-1)).view(-1).tolist()) <= touched


def test_lazy_momentum_matches_dense_momentum_where_every_coordinate_is_sent():
    dense_params, sparse_params = params(), params()
    dense_rule = build_update_rule("sgd", dense_params, 0.05, 0.9, 0.0)
    sparse_rule = build_update_rule("sgd", sparse_params, 0.05, 0.9, 0.0)
    everything = torch.arange(2000)
    for seed in range(3):
        values = torch.randn(2000, generator=torch.Generator().manual_seed(seed))
        grads = [SparseGradient(everything, values), SparseGradient(torch.arange(40), torch.zeros(40))]
        sparse_rule.apply(grads)
        dense_rule.apply([g.to_dense(p.shape) for g, p in zip(grads, dense_params)])
    assert torch.allclose(dense_params[0], sparse_params[0], atol=1e-6)


def test_the_mean_of_sparse_gradients_stays_sparse_and_sums_overlaps():
    a = SparseGradient(torch.tensor([1, 5]), torch.tensor([2.0, 4.0]))
    b = SparseGradient(torch.tensor([5, 7]), torch.tensor([6.0, 8.0]))
    (mean,) = mean_gradient([[a], [b]], [torch.Size([10])])
    assert isinstance(mean, SparseGradient) and mean.indices.numel() == 4
    assert mean.to_dense((10,)).tolist() == [0, 1, 0, 0, 0, 5, 0, 4, 0, 0]
    (mixed,) = mean_gradient([[a], [torch.ones(10)]], [torch.Size([10])])
    assert torch.equal(mixed, (a.to_dense((10,)) + torch.ones(10)) / 2)


def _flats(dtypes: list[torch.dtype], seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(1000, generator=generator).to(dtype) for dtype in dtypes]


@pytest.mark.parametrize("dtypes", [
    [torch.float16, torch.float16],
    [torch.bfloat16, torch.float16, torch.float32],
    [torch.float32, torch.float32, torch.float32, torch.float32],
    [torch.float16],
])
@pytest.mark.parametrize("block", [None, 64], ids=["one-block", "blocks"])
def test_a_sync_steps_mean_from_wire_values_equals_the_mean_of_fp32_gradients_bit_for_bit(
    dtypes, block, monkeypatch
):
    if block is not None:  # 1,000 elements in blocks of 64: 15 whole blocks and a partial one
        monkeypatch.setattr(memory, "CACHE_BLOCK_ELEMENTS", block)
    sums = StepSums()
    for seed in range(3):  # the buffers are reused: every step's mean must be its own
        flats = _flats(dtypes, seed)
        converted = [flat.to(torch.float32) for flat in flats]
        expected = converted[0] if len(converted) == 1 else sum(converted[1:], converted[0]) / len(converted)
        before = [flat.clone() for flat in flats]
        mean = sums.mean(flats)
        assert mean.dtype == torch.float32
        assert torch.equal(mean, expected)
        assert all(torch.equal(a, b) for a, b in zip(flats, before))  # the pushes are untouched


def test_mean_of_dense_submissions_is_whole_and_split_into_the_parameters_shapes():
    shapes = [torch.Size([3, 4]), torch.Size([4])]
    sums = StepSums()
    flats = _flats([torch.float16, torch.float16], 7)
    submissions = [
        Submission(push=Push(PushMeta("run", f"w{rank}", 1, 0), tensors=tuple(dense_views(
            [("weight", (3, 4)), ("bias", (4,))], flat[:16]))), rank=rank, flat=flat[:16])
        for rank, flat in enumerate(flats)
    ]
    mean = mean_of(submissions, shapes, sums)
    assert isinstance(mean, DenseMean)
    whole = mean.whole()
    assert [g.shape for g in whole] == shapes
    per_parameter = mean_gradient([s.gradient for s in submissions], shapes)
    assert all(torch.equal(a, b) for a, b in zip(whole, per_parameter))
    flat_mean = torch.cat([g.reshape(-1) for g in per_parameter])
    # Block by block (a lane's buffer, overwritten by its next block): the same values.
    assert all(torch.equal(mean.block(start, stop, lane=0), flat_mean[start:stop])
               for start, stop in [(0, 5), (5, 16)])


def flattened(ps: list[nn.Parameter]) -> list[nn.Parameter]:
    """The parameters moved into one buffer, as the server's store keeps them."""
    flatten_parameters(nn.ParameterList(ps))
    return ps


@pytest.mark.parametrize("flat", [False, True, "blocks"], ids=["separate", "one-buffer", "one-buffer-in-blocks"])
@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_dense_steps_with_weight_decay_equal_torchs_optimizer_bit_for_bit(name, flat, monkeypatch):
    """The rule adds weight decay to the gradients in place and steps without it (no
    model-sized copy per step), on one flat tensor when the parameters are one buffer
    (a large one block by block): the same arithmetic as torch's own step with decay."""
    ours, theirs = params(3), params(3)
    if flat:
        ours = flattened(ours)
    if flat == "blocks":  # blocks of 7 elements: whole ones and a partial last one
        monkeypatch.setattr(memory, "CACHE_BLOCK_ELEMENTS", 7)
        assert sum(p.numel() for p in ours) % 7
    rule = build_update_rule(name, ours, 0.05, 0.9, 5e-3)
    reference = (torch.optim.SGD(theirs, lr=0.05, momentum=0.9, weight_decay=5e-3, foreach=True) if name == "sgd"
                 else torch.optim.Adam(theirs, lr=0.05, weight_decay=5e-3, foreach=True))
    generator = torch.Generator().manual_seed(4)
    for _ in range(4):
        gradients = [torch.randn(p.shape, generator=generator) for p in ours]
        for p, g in zip(theirs, gradients):
            p.grad = g.clone()
        reference.step()
        rule.apply(gradients)
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    assert rule.optimizer.param_groups[0]["weight_decay"] == 5e-3
    if name == "sgd":
        state = rule.optimizer.state
        assert all(torch.equal(state[a]["momentum_buffer"], reference.state[b]["momentum_buffer"])
                   for a, b in zip(ours, theirs))


def test_one_buffer_sgd_resumes_from_a_loaded_optimizer_state_bit_for_bit():
    """A restore replaces the optimizer's momentum buffers (load_state_dict): the flat step
    takes them up, and goes on as the rule that never stopped."""
    generator = torch.Generator().manual_seed(5)
    steps = [[torch.randn(p.shape, generator=generator) for p in params()] for _ in range(6)]
    running = flattened(params(3))
    rule = build_update_rule("sgd", running, 0.05, 0.9, 5e-3)
    for gradients in steps[:3]:
        rule.apply([g.clone() for g in gradients])
    saved = [p.detach().clone() for p in running], copy.deepcopy(rule.optimizer.state_dict())
    restored = flattened(params(0))
    resumed = build_update_rule("sgd", restored, 0.05, 0.9, 5e-3)
    with torch.no_grad():
        for p, value in zip(restored, saved[0]):
            p.copy_(value)
    resumed.optimizer.load_state_dict(saved[1])
    for gradients in steps[3:]:
        rule.apply([g.clone() for g in gradients])
        resumed.apply([g.clone() for g in gradients])
    assert all(torch.equal(a, b) for a, b in zip(running, restored))


def test_a_mixed_step_between_flat_steps_keeps_sgd_momentum_exact():
    """A step with a sparse parameter goes through torch and the lazy path; the flat steps
    around it see the buffers those made."""
    flat, separate = flattened(params(3)), params(3)
    rules = [build_update_rule("sgd", ps, 0.05, 0.9, 0.0) for ps in (flat, separate)]
    generator = torch.Generator().manual_seed(6)
    for step in range(5):
        dense = [torch.randn(p.shape, generator=generator) for p in flat]
        if step == 2:
            gradient: list = [dense[0], sparse_gradient(40, 5, 7)]
        else:
            gradient = dense
        for rule in rules:
            rule.apply([g.clone() if isinstance(g, torch.Tensor) else g for g in gradient])
    assert all(torch.equal(a, b) for a, b in zip(flat, separate))


def _step_store(momentum: float, decay: float, lanes: int) -> ParameterStore:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 20), nn.ReLU(), nn.Linear(20, 5))  # 725 parameters
    rule = build_update_rule("sgd", list(model.parameters()), 0.05, momentum, decay, lanes=lanes)
    return ParameterStore(model, rule, steps=100, schedule=schedule_from_name("cosine"))


@pytest.mark.parametrize("dtypes", [
    [torch.float16, torch.float16],
    [torch.bfloat16, torch.float16, torch.float32],
    [torch.float32],
])
@pytest.mark.parametrize(("momentum", "decay"), [(0.0, 0.0), (0.9, 5e-3)])
@pytest.mark.parametrize("lanes", [1, 3])
def test_a_sync_step_block_by_block_equals_the_whole_mean_step_and_its_snapshot_bit_for_bit(
    dtypes, momentum, decay, lanes, monkeypatch
):
    """The step that makes the mean, steps and writes the pulls' snapshot a block at a time
    (on several lanes at once) ends exactly where the mean made whole, then stepped, then
    snapshotted ends: parameters, momentum and every pulled value."""
    # 725 elements in blocks of 7 (whole ones and a partial last), lanes of at least 100.
    monkeypatch.setattr(memory, "CACHE_BLOCK_ELEMENTS", 7)
    monkeypatch.setattr(memory, "MIN_LANE_ELEMENTS", 100)
    blockwise, whole = _step_store(momentum, decay, lanes), _step_store(momentum, decay, 1)
    ran: list[bool] = []
    step_blocks = blockwise.rule.step_blocks
    monkeypatch.setattr(blockwise.rule, "step_blocks", lambda *a: ran.append(step_blocks(*a)) or ran[-1])
    sums, whole_sums = StepSums(), StepSums()
    generator = torch.Generator().manual_seed(8)
    for _ in range(4):
        flats = tuple(torch.randn(blockwise.numel, generator=generator).to(dtype) for dtype in dtypes)
        copies = tuple(f.clone() for f in flats)  # a lone fp32 push is handed over: decay goes into it
        blockwise.apply(DenseMean(flats, tuple(blockwise.shapes), sums), pull_dtypes=[torch.float16, torch.float32])
        whole.apply(DenseMean(copies, tuple(whole.shapes), whole_sums).whole())
        assert blockwise.version == whole.version
        for dtype in (torch.float16, torch.float32):
            ours, theirs = blockwise.snapshot(dtype), whole.snapshot(dtype)
            assert ours.version == theirs.version
            assert all(torch.equal(a.values, b.values) for a, b in zip(ours.tensors, theirs.tensors))
        assert all(torch.equal(a, b) for a, b in zip(blockwise.model.parameters(), whole.model.parameters()))
    if momentum:
        state, reference = blockwise.rule.optimizer.state, whole.rule.optimizer.state
        assert all(torch.equal(state[a]["momentum_buffer"], reference[b]["momentum_buffer"])
                   for a, b in zip(blockwise.model.parameters(), whole.model.parameters()))
    # With momentum, the first step goes through torch, which starts the buffers; then blocks.
    assert ran == ([False] if momentum else [True]) + [True] * 3
    blockwise.close()


def test_a_sync_step_block_by_block_makes_the_snapshots_it_is_asked_for_with_the_new_version():
    store = _step_store(0.0, 0.0, 1)
    flats = (torch.ones(store.numel, dtype=torch.float16),)
    store.apply(DenseMean(flats, tuple(store.shapes), StepSums()), pull_dtypes=[torch.float16, torch.float16])
    assert set(store._snapshots) == {torch.float16}  # made once, with the step
    snapshot = store._snapshots[torch.float16]
    assert snapshot.version == store.version == 1
    assert store.snapshot(torch.float16) is snapshot  # the pull takes it as it is
    store.close()


def test_a_journaled_sync_step_records_the_whole_mean_it_applied(tmp_path):
    """The journal records the gradient as the rule takes it, before the step: a journaled
    store makes the mean whole, and its replay ends on the same parameters."""
    store = _step_store(0.9, 5e-3, 2)
    store.journal = UpdateJournal(tmp_path)
    generator = torch.Generator().manual_seed(9)
    sums = StepSums()
    for _ in range(3):
        flats = tuple(torch.randn(store.numel, generator=generator).half() for _ in range(2))
        store.apply(DenseMean(flats, tuple(store.shapes), sums))
    store.journal.close()
    replayed = _step_store(0.9, 5e-3, 1)
    for record in UpdateJournal(tmp_path).records_after(0, replayed.shapes):
        assert record.gradient is not None and all(isinstance(g, torch.Tensor) for g in record.gradient)
        replayed.replay(record)
    assert replayed.version == store.version == 3
    assert all(torch.equal(a, b) for a, b in zip(store.model.parameters(), replayed.model.parameters()))
    store.close()


@pytest.mark.parametrize("lanes", [1, 3])
@pytest.mark.parametrize("count", [0, 1, 30, 31])
def test_a_gather_on_lanes_is_index_select(lanes, count, monkeypatch):
    monkeypatch.setattr(update_rules, "ADD_LANE_INDICES", 8)  # lanes of 8 indices or more
    generator = torch.Generator().manual_seed(count)
    flat = torch.randn(500, generator=generator)
    indices = torch.sort(torch.randperm(500, generator=generator)[:count]).values
    runner = memory.BlockLanes(lanes)
    try:
        assert torch.equal(update_rules.gather(flat, indices, runner), flat.index_select(0, indices))
    finally:
        runner.close()
