"""Codecs: what they put on the wire, their ratios, their errors; and error feedback."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradhub.codecs import FP16_MAX, Float16Codec, Float32Codec, TopKCodec, codec_from_name
from gradhub.encoded import Layout
from gradhub.errors import ConfigurationError
from gradhub_worker.error_feedback import ErrorFeedback

pytestmark = pytest.mark.timeout(60)


def test_codecs_are_chosen_by_name():
    assert isinstance(codec_from_name("none"), Float32Codec)
    assert isinstance(codec_from_name("fp16"), Float16Codec)
    topk = codec_from_name("topk:0.01")
    assert isinstance(topk, TopKCodec) and topk.name == "topk:0.01"
    for bad, message in [("gzip", "unknown compression"), ("topk", "needs a ratio"),
                         ("topk:2", r"in \(0, 1\]"), ("topk:x", "must be a number"),
                         ("fp16:3", "takes no argument")]:
        with pytest.raises(ConfigurationError, match=message):
            codec_from_name(bad)


def test_float32_is_exact_and_float16_within_half_precision():
    x = torch.randn(1000)
    assert torch.equal(Float32Codec().encode("x", x).to_dense(), x)
    decoded = Float16Codec().encode("x", x).to_dense()
    assert torch.allclose(decoded, x, rtol=2**-10, atol=2**-24)


def test_float16_clamps_instead_of_overflowing_to_inf():
    encoded = Float16Codec().encode("x", torch.tensor([1e6, -1e6, 1.0]))
    assert torch.isfinite(encoded.values).all()
    assert encoded.values[0].item() == FP16_MAX


def test_topk_keeps_exactly_the_largest_magnitudes():
    x = torch.tensor([0.1, -5.0, 0.2, 3.0, -0.3, 0.0, 4.0, -0.05])
    encoded = TopKCodec(0.375).encode("x", x)  # k = 3
    assert encoded.layout is Layout.SPARSE
    assert encoded.indices is not None
    assert encoded.indices.tolist() == [1, 3, 6]
    assert encoded.values.tolist() == [-5.0, 3.0, 4.0]
    assert encoded.indices.dtype == torch.int32 and encoded.values.dtype == torch.float16


@pytest.mark.parametrize("ratio", [0.001, 0.01, 0.1, 1.0])
def test_topk_states_its_ratio_and_keeps_it(ratio):
    codec = TopKCodec(ratio)
    numel = 100_000
    encoded = codec.encode("x", torch.randn(numel))
    assert encoded.byte_length == codec.payload_bytes(numel)
    assert math.isclose(codec.ratio(numel), 4 * numel / encoded.byte_length)
    assert encoded.nnz == math.ceil(ratio * numel)


def test_empty_tensors_encode_to_nothing():
    for codec in (Float32Codec(), Float16Codec(), TopKCodec(0.1)):
        encoded = codec.encode("e", torch.empty(0, 3))
        assert encoded.byte_length == 0 and encoded.to_dense().shape == (0, 3)


@settings(max_examples=50, deadline=None)
@given(
    ratio=st.sampled_from([0.01, 0.1, 0.5]),
    steps=st.integers(1, 6),
    size=st.integers(1, 300),
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([1e-3, 1.0, 1e5]),
)
def test_error_feedback_sent_plus_residual_equals_everything_accumulated(ratio, steps, size, seed, scale):
    generator = torch.Generator().manual_seed(seed)
    feedback = ErrorFeedback(TopKCodec(ratio))
    total = torch.zeros(size, dtype=torch.float64)
    sent = torch.zeros(size, dtype=torch.float64)
    for _ in range(steps):
        gradient = torch.randn(size, generator=generator) * scale
        total += gradient.double()
        (encoded,) = feedback.encode([("g", gradient)])
        sent += encoded.to_dense().double()
        residual = feedback.residual("g")
        assert residual is not None
        # fp32 accumulation: equal up to float32 rounding of the running sums.
        assert torch.allclose(sent + residual.double(), total, rtol=1e-5, atol=1e-5 * scale * steps)


def test_a_lossless_codec_keeps_no_residual_until_a_push_is_refused():
    feedback = ErrorFeedback(Float32Codec())
    gradient = torch.randn(10)
    (sent,) = feedback.encode([("g", gradient)])
    assert torch.equal(sent.to_dense(), gradient) and feedback.residual("g") is None
    feedback.restore([sent])  # refused: it must still reach the server later
    (again,) = feedback.encode([("g", gradient)])
    assert torch.allclose(again.to_dense(), 2 * gradient)


def test_a_refused_push_returns_whole_to_the_residual():
    feedback = ErrorFeedback(TopKCodec(0.1))
    gradient = torch.randn(100)
    (encoded,) = feedback.encode([("g", gradient)])
    feedback.restore([encoded])
    residual = feedback.residual("g")
    assert residual is not None
    assert torch.allclose(residual, gradient, atol=1e-3)
