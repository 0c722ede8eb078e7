"""The worker's error feedback with DGC's options: momentum correction, masking, clipping, warm-up."""

from __future__ import annotations

import math

import pytest
import torch

from gradhub.codecs import codec_from_name
from gradhub.config import RunConfig, momentum_on_workers
from gradhub.errors import NonFiniteGradient
from gradhub_worker.error_feedback import WARMUP_START, ErrorFeedback, FeedbackOptions

pytestmark = pytest.mark.timeout(30)


def test_momentum_correction_sends_the_momentum_of_the_gradients():
    feedback = ErrorFeedback(codec_from_name("none"), FeedbackOptions(momentum=0.9))
    gradients = [torch.randn(20, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    momentum = torch.zeros(20)
    for gradient in gradients:
        momentum = 0.9 * momentum + gradient
        (sent,) = feedback.encode([("g", gradient)])
        assert torch.allclose(sent.to_dense(), momentum, atol=1e-6)


def test_weight_decay_is_added_on_the_worker_under_momentum_correction():
    feedback = ErrorFeedback(codec_from_name("none"), FeedbackOptions(momentum=0.9, weight_decay=0.1))
    parameter = torch.full((5,), 2.0)
    (sent,) = feedback.encode([("g", torch.ones(5))], [parameter])
    assert torch.allclose(sent.to_dense(), torch.full((5,), 1.2))


def test_sent_plus_residual_equals_the_accumulated_momentum_and_sent_coordinates_are_masked():
    feedback = ErrorFeedback(codec_from_name("topk:0.1", dense_below=0), FeedbackOptions(momentum=0.9, masking=True))
    generator = torch.Generator().manual_seed(0)
    contributed = torch.zeros(200, dtype=torch.float64)
    sent_total = torch.zeros(200, dtype=torch.float64)
    momentum = torch.zeros(200)
    for _ in range(5):
        gradient = torch.randn(200, generator=generator)
        momentum = 0.9 * momentum + gradient
        contributed += momentum.double()
        (sent,) = feedback.encode([("g", gradient)])
        sent_total += sent.to_dense().double()
        assert torch.allclose(sent_total + feedback.residual("g").double(), contributed, atol=1e-4)
        # Masking: the worker's momentum restarts at the coordinates just sent.
        assert torch.all(feedback.momentum("g")[sent.indices] == 0)
        momentum[sent.indices] = 0.0


def test_local_clipping_bounds_the_gradient_norm():
    feedback = ErrorFeedback(codec_from_name("none"), FeedbackOptions(clip_norm=1.0))
    sent = feedback.encode([("a", torch.full((4,), 3.0)), ("b", torch.full((4,), 4.0))])
    norm = math.sqrt(sum(float(t.to_dense().pow(2).sum()) for t in sent))
    assert math.isclose(norm, 1.0, rel_tol=1e-6)
    small = feedback.encode([("a", torch.full((4,), 0.1)), ("b", torch.zeros(4))])
    assert torch.allclose(small[0].to_dense(), torch.full((4,), 0.1))


def test_sparsity_warm_up_falls_from_a_quarter_to_the_codecs_ratio():
    feedback = ErrorFeedback(codec_from_name("topk:0.001"), FeedbackOptions(warmup_versions=100))
    keeps = [feedback.codec_at(v).keep for v in (0, 50, 99, 100, 5000)]
    assert keeps[0] == pytest.approx(WARMUP_START)
    assert keeps[0] > keeps[1] > keeps[2] > keeps[3]
    assert keeps[1] == pytest.approx(math.sqrt(WARMUP_START * 0.001))  # halfway, geometrically
    assert keeps[3] == keeps[4] == 0.001


def test_momentum_correction_is_on_by_default_for_sparsifying_codecs_only():
    assert momentum_on_workers(RunConfig(run_id="r", compression="topk:0.01"))
    assert not momentum_on_workers(RunConfig(run_id="r", compression="fp16"))
    assert not momentum_on_workers(RunConfig(run_id="r", compression="topk:0.01", optimizer="adam"))
    assert not momentum_on_workers(RunConfig(run_id="r", compression="topk:0.01", momentum_correction="off"))
    assert momentum_on_workers(RunConfig(run_id="r", compression="fp16", momentum_correction="on"))


class _PerTensor(ErrorFeedback):
    """The tensor-by-tensor path, as it ran before whole-model encoding existed."""

    def _encode_model(self, codec, gradients):  # type: ignore[no-untyped-def]
        self.options = FeedbackOptions(clip_norm=float("inf"))  # any clip_norm takes that path
        try:
            return self.encode(gradients)
        finally:
            self.options = FeedbackOptions()


@pytest.mark.parametrize("codec", ["fp16", "bf16", "none"])
def test_whole_model_encoding_sends_and_keeps_exactly_what_tensor_by_tensor_encoding_does(codec):
    generator = torch.Generator().manual_seed(0)
    shapes = {"conv.weight": (5, 1, 3), "conv.bias": (5,), "fc.weight": (4, 10), "fc.bias": (4,)}
    whole, per_tensor = ErrorFeedback(codec_from_name(codec)), _PerTensor(codec_from_name(codec))
    for step in range(6):
        gradients = [(name, torch.randn(shape, generator=generator) * 10 ** (step - 3)) for name, shape in shapes.items()]
        sent = whole.encode(gradients)
        expected = per_tensor.encode(gradients)
        assert [t.name for t in sent] == list(shapes)
        for a, b in zip(sent, expected):
            assert a.values.dtype == b.values.dtype and torch.equal(a.values, b.values) and a.shape == b.shape
        for name in shapes:
            mine, theirs = whole.residual(name), per_tensor.residual(name)
            assert (mine is None) == (theirs is None or not theirs.any())
            if mine is not None:
                assert torch.equal(mine, theirs)
        if step == 2:  # the server refused this push: both get it back
            whole.restore(sent)
            per_tensor.restore(expected)
        if step == 4:
            whole.reset()
            per_tensor.reset()


def test_whole_model_encoding_names_the_tensor_holding_nan_and_keeps_the_residual():
    feedback = ErrorFeedback(codec_from_name("fp16"))
    feedback.encode([("a", torch.full((3,), 1e-8)), ("b", torch.ones(2))])
    kept = feedback.residual("a").clone()
    with pytest.raises(NonFiniteGradient, match="'b'"):
        feedback.encode([("a", torch.ones(3)), ("b", torch.tensor([1.0, float("nan")]))])
    assert torch.equal(feedback.residual("a"), kept)


@pytest.mark.parametrize("codec", ["fp16", "bf16", "none"])
def test_tensor_by_tensor_encoding_does_the_plain_arithmetic_and_what_it_sent_stays_sent(codec):
    """Plain arithmetic: accumulated = gradient + residual, sent = accumulated in the wire's
    type (clamped to its range), residual = accumulated - sent. The worker reuses buffers
    from step to step; a push already handed out must not change under a later step."""
    wire_type = {"fp16": torch.float16, "bf16": torch.bfloat16, "none": torch.float32}[codec]
    largest = torch.finfo(wire_type).max
    generator = torch.Generator().manual_seed(1)
    shapes = {"w": (40, 30), "b": (30,)}
    feedback = _PerTensor(codec_from_name(codec))
    residuals: dict[str, torch.Tensor] = {}
    earlier: list[tuple[torch.Tensor, torch.Tensor]] = []
    for step in range(6):
        scale = 1e5 if step == 1 else 10 ** (step - 3)  # step 1 overflows fp16: the clamped path
        gradients = [(name, torch.randn(shape, generator=generator) * scale) for name, shape in shapes.items()]
        sent = feedback.encode(gradients)
        for tensor, (name, gradient) in zip(sent, gradients):
            accumulated = gradient + residuals[name] if name in residuals else gradient.clone()
            expected = accumulated.clamp(-largest, largest).to(wire_type)
            assert torch.equal(tensor.values.view(gradient.shape), expected)
            residuals[name] = accumulated - expected.to(torch.float32)
            mine = feedback.residual(name)
            assert torch.equal(mine, residuals[name]) if mine is not None else not residuals[name].any()
            earlier.append((tensor.values, tensor.values.clone()))
        if step == 2:  # the server refused this push: it goes back to the residual
            feedback.restore(sent)
            for tensor in sent:
                residuals[tensor.name] = residuals[tensor.name] + tensor.values.to(torch.float32).view(shapes[tensor.name])
    assert all(torch.equal(values, copy) for values, copy in earlier)


def test_tensor_by_tensor_encoding_names_the_tensor_holding_nan_and_keeps_the_residual():
    feedback = _PerTensor(codec_from_name("fp16"))
    feedback.encode([("a", torch.full((3,), 1e-8)), ("b", torch.ones(2))])
    feedback.encode([("a", torch.full((3,), 1e-8)), ("b", torch.ones(2))])  # buffers to reuse
    kept = feedback.residual("a").clone()
    with pytest.raises(NonFiniteGradient, match="'a'"):
        feedback.encode([("a", torch.tensor([1.0, float("nan"), 0.0])), ("b", torch.ones(2))])
    assert torch.equal(feedback.residual("a"), kept)
