"""A CUDA worker's path to and from the host: pinned memory, conversions on the GPU.

The CUDA tests need a GPU and skip without one (CI has none); they were run on an H100
(README, "GPU workers"). What they hold to: a gradient encoded on the GPU travels as the
same bytes as one encoded on the CPU, error feedback keeps the same residuals, and a
cluster of CUDA workers trains.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from gradhub import wire
from gradhub.codecs import codec_from_name
from gradhub.domain import ParameterSnapshot
from gradhub.encoded import EncodedTensor, dense, dense_views, sparse
from gradhub.errors import InvalidRequest
from gradhub.transfer import Landing, receive_buffer, to_device, to_host
from gradhub_worker.error_feedback import ErrorFeedback, FeedbackOptions
from gradhub_worker.loading import ModelLoader

pytestmark = pytest.mark.timeout(60)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on a GPU machine)")

CODECS = ["none", "fp16", "bf16", "int8", "topk:0.01+fp16", "topk:0.01+int8", "approx-topk:0.01+bf16",
          "randomk:0.01+fp32"]


def gradient(numel: int, seed: int) -> torch.Tensor:
    """Random values, a few past fp16's range (the clamped path), no ties in magnitude."""
    values = torch.randn(numel, generator=torch.Generator().manual_seed(seed))
    values[:: max(1, numel // 7)] *= 1e5
    return values


def same_encoding(a: EncodedTensor, b: EncodedTensor) -> bool:
    def same(x: torch.Tensor | None, y: torch.Tensor | None) -> bool:
        return (x is None and y is None) or (
            x is not None and y is not None and x.dtype == y.dtype and torch.equal(x.cpu(), y.cpu()))

    return (a.name == b.name and a.shape == b.shape and a.layout is b.layout and same(a.values, b.values)
            and same(a.indices, b.indices) and same(a.scales, b.scales) and same(a.index_blob, b.index_blob))


# --- on the CPU: every function is the identity or plain memory ------------------------------


def test_on_the_cpu_tensors_stay_where_they_are():
    tensor = torch.arange(6, dtype=torch.float16)
    assert to_host(tensor) is tensor
    assert to_device(tensor, torch.device("cpu")) is tensor
    widened = to_device(tensor, torch.device("cpu"), torch.float32)
    assert widened.dtype == torch.float32 and torch.equal(widened, tensor.float())
    buffer = receive_buffer(1000, pinned=False)
    assert buffer.nbytes == 1000
    Landing().hold(torch.device("cpu"), tensor)  # nothing to wait for


def test_a_pull_decodes_into_ordinary_memory_unless_asked_for_pinned():
    snapshot = ParameterSnapshot(version=3, tensors=(dense("w", torch.randn(4, 5)),))
    messages = [wire.parse_pull_response(m) for m in wire.pull_stream(snapshot)]
    received = wire.read_pull(messages, wire.WireLimits(max_payload_bytes=1 << 20))
    assert received.version == 3 and torch.equal(received.tensors[0].values, snapshot.tensors[0].values)
    if torch.cuda.is_available():
        assert not received.tensors[0].values.is_pinned()


def through_the_wire(snapshot: ParameterSnapshot, device: torch.device) -> ParameterSnapshot:
    """The snapshot as a worker on `device` receives it (pinned on a GPU worker)."""
    messages = [wire.parse_pull_response(m) for m in wire.pull_stream(snapshot)]
    return wire.read_pull(messages, wire.WireLimits(max_payload_bytes=1 << 24), pinned=device.type == "cuda")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_the_model_loads_whole_snapshots_fp16_ones_and_deltas(device: str):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 20), nn.Linear(20, 5)).to(device)
    loader = ModelLoader(model)
    name_shapes = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    total = sum(p.numel() for p in model.parameters())

    def parameters() -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1).cpu() for p in model.parameters()])

    whole = torch.randn(total)
    loader.load(through_the_wire(ParameterSnapshot(1, dense_views(name_shapes, whole)), loader.flat.device))
    assert loader.held == 1 and torch.equal(parameters(), whole)

    halves = torch.randn(total).half()
    loader.load(through_the_wire(ParameterSnapshot(2, dense_views(name_shapes, halves)), loader.flat.device))
    assert loader.held == 2 and torch.equal(parameters(), halves.float())

    expected = [p.detach().cpu().clone() for p in model.parameters()]
    changes = []
    for (name, shape), now in zip(name_shapes, expected):
        at = torch.tensor([0, now.numel() // 2, now.numel() - 1])
        values = torch.randn(3).half()
        now.view(-1)[at] = values.float()
        changes.append(sparse(name, shape, at, values))
    delta = ParameterSnapshot(3, tuple(changes), delta_from=2)
    loader.load(through_the_wire(delta, loader.flat.device))
    assert loader.held == 3 and torch.equal(parameters(), torch.cat([e.reshape(-1) for e in expected]))

    with pytest.raises(InvalidRequest, match="delta from version 2, this worker holds 3"):
        loader.load(delta)
    with pytest.raises(InvalidRequest, match="different models"):
        loader.load(ParameterSnapshot(4, dense_views(name_shapes[:2], torch.zeros(30 * 20 + 20))))
    assert loader.held == 3 and torch.equal(parameters(), torch.cat([e.reshape(-1) for e in expected]))


# --- on a GPU ------------------------------------------------------------------------------


@cuda
def test_to_host_copies_into_pinned_memory_and_to_device_converts_on_the_device():
    on_gpu = torch.randn(1000, device="cuda").half()
    host = to_host(on_gpu)
    assert host.device.type == "cpu" and host.is_pinned() and torch.equal(host, on_gpu.cpu())
    widened = to_device(host, torch.device("cuda"), torch.float32)
    assert widened.device.type == "cuda" and widened.dtype == torch.float32
    assert torch.equal(widened.cpu(), host.float())


@cuda
def test_a_pull_for_a_cuda_worker_decodes_into_pinned_memory():
    snapshot = ParameterSnapshot(version=1, tensors=(
        dense("w", torch.randn(300, 7), torch.float16),
        sparse("b", (1000,), torch.tensor([3, 50, 999]), torch.tensor([1.0, -2.0, 3.0])),
    ))
    messages = [wire.parse_pull_response(m) for m in wire.pull_stream(snapshot)]
    received = wire.read_pull(messages, wire.WireLimits(max_payload_bytes=1 << 20), pinned=True)
    for mine, sent in zip(received.tensors, snapshot.tensors):
        assert mine.values.is_pinned() and same_encoding(mine, sent)


@cuda
@pytest.mark.parametrize("name", CODECS)
def test_a_gradient_encoded_on_the_gpu_travels_as_the_same_bytes_as_on_the_cpu(name: str):
    values = gradient(300_007, seed=1)
    on_cpu = codec_from_name(name, seed=5, dense_below=0).encode("g", values)
    on_gpu = codec_from_name(name, seed=5, dense_below=0).encode("g", values.cuda())
    assert same_encoding(on_gpu, on_cpu)
    assert on_gpu.values.device.type == "cpu" and on_gpu.values.is_pinned()


@cuda
@pytest.mark.parametrize("name", ["fp16", "bf16", "topk:0.01+fp16", "int8"])
@pytest.mark.parametrize("sizes", [[5000, 40, 3000], [1_500_000, 1_000_000]], ids=["whole-model", "per-tensor"])
def test_error_feedback_on_the_gpu_sends_and_keeps_what_it_does_on_the_cpu(name: str, sizes: list[int]):
    """Five steps, with momentum correction for the sparsifier, and a refused push given
    back: sent values and residuals bit for bit, residuals kept on the GPU."""
    options = FeedbackOptions(momentum=0.9, weight_decay=1e-4) if name.startswith("topk") else FeedbackOptions()
    on_cpu = ErrorFeedback(codec_from_name(name, seed=3, dense_below=0), options)
    on_gpu = ErrorFeedback(codec_from_name(name, seed=3, dense_below=0), options)
    names = [f"p{i}" for i in range(len(sizes))]
    parameters = [gradient(size, seed=100 + i) for i, size in enumerate(sizes)]
    for step in range(5):
        grads = [gradient(size, seed=10 * step + i) for i, size in enumerate(sizes)]
        sent_cpu = on_cpu.encode(list(zip(names, grads)), parameters, step)
        sent_gpu = on_gpu.encode(list(zip(names, [g.cuda() for g in grads])), [p.cuda() for p in parameters], step)
        assert all(same_encoding(a, b) for a, b in zip(sent_gpu, sent_cpu))
        if step == 2:
            on_cpu.restore(sent_cpu)
            on_gpu.restore(sent_gpu)
        for n in names:
            mine, theirs = on_gpu.residual(n), on_cpu.residual(n)
            assert (mine is None) == (theirs is None)
            if mine is not None and theirs is not None:
                assert mine.device.type == "cuda" and torch.equal(mine.cpu(), theirs)


@cuda
@pytest.mark.integration
@pytest.mark.timeout(300)
@pytest.mark.parametrize("flags", [
    ["--mode", "sync", "--workers", "2"],
    ["--mode", "async", "--workers", "2", "--model", "wide", "--compression", "topk:0.01+fp16",
     "--pull-compression", "delta+fp16", "--steps", "1500"],
], ids=["default-sync", "wide-topk-delta-fp16-pulls"])
def test_a_cluster_of_cuda_workers_trains(tmp_path: Path, flags: list[str]):
    """Real processes: Redis, the server (CPU) and workers on the GPU, each path of the
    worker's loading (whole model, per tensor, sparse deltas, fp16) exercised."""
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "gradhub_cli", "run", "--out", str(out), "--no-progress", "--device", "cuda", *flags],
        capture_output=True, text=True, timeout=280,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["pushes_applied"] >= summary["steps"]
    # On the CPU these end at 95 % and 89 %.
    assert summary["final_test_accuracy"] >= (0.92 if "sync" in flags else 0.8), summary
    logs = "".join((out / "logs" / f"worker-{rank}.log").read_text() for rank in range(2))
    assert logs.count("device cuda") == 2
