"""Codecs: property tests for every codec, their ratios, their refusals; and error feedback.

Every codec is run through the real wire (encode, stream, read back, decode), so what is
checked is what the server receives.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradhub import wire
from gradhub.codecs import FP16_MAX, codec_from_name
from gradhub.domain import PushMeta
from gradhub.encoded import Layout
from gradhub.errors import ConfigurationError, NonFiniteGradient
from gradhub_worker.error_feedback import ErrorFeedback

pytestmark = pytest.mark.timeout(120)

CODECS = [
    "none", "fp16", "bf16", "int8",
    "topk:0.1", "topk:0.1+fp32", "topk:0.1+bf16", "topk:0.1+int8", "topk:1",
    "approx-topk:0.1", "randomk:0.1", "randomk:0.25+int8",
]
LIMITS = wire.WireLimits(max_payload_bytes=1 << 26)
META = PushMeta(run_id="r", worker_id="w", seq=1, base_version=0)


def through_the_wire(codec_name: str, tensor: torch.Tensor):
    codec = codec_from_name(codec_name, seed=1, dense_below=0)
    encoded = codec.encode("t", tensor)
    (received,) = wire.read_push(list(wire.push_requests(META, [encoded], chunk_bytes=97)), LIMITS).tensors
    return codec, encoded, received


finite32 = st.floats(allow_nan=False, allow_infinity=False, width=32)
extreme = st.sampled_from([0.0, -0.0, 1e-45, -3e-42, 6e-8, 65504.0, 65520.0, -1e5, 3.4e38, -3.4028235e38])


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    shape = tuple(draw(st.lists(st.integers(0, 7), min_size=1, max_size=3)))
    numel = math.prod(shape)
    values = draw(st.lists(st.one_of(finite32, extreme), min_size=numel, max_size=numel))
    return torch.tensor(values, dtype=torch.float32).reshape(shape)


@pytest.mark.parametrize("codec_name", CODECS)
@settings(max_examples=60, deadline=None)
@given(tensor=tensors())
def test_decoding_stays_within_the_codecs_stated_bound(codec_name, tensor):
    codec, encoded, received = through_the_wire(codec_name, tensor)
    decoded = received.to_dense()
    assert decoded.shape == tensor.shape and decoded.dtype == torch.float32
    assert torch.isfinite(decoded).all()
    error = float((decoded - tensor).abs().max()) if tensor.numel() else 0.0
    assert error <= codec.error_bound(tensor), f"{codec_name}: error {error} over its bound"
    if codec.lossless:
        assert torch.equal(decoded, tensor)
    assert received.byte_length == encoded.byte_length
    if codec.sparsifying:
        assert received.nnz <= codec.k_for(tensor.numel())


@pytest.mark.parametrize("codec_name", CODECS)
def test_all_zero_and_empty_tensors(codec_name):
    for tensor in (torch.zeros(5, 4), torch.empty(0), torch.empty(3, 0)):
        _, _, received = through_the_wire(codec_name, tensor)
        assert torch.equal(received.to_dense(), tensor)


@pytest.mark.parametrize("codec_name", CODECS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_inf_are_refused_with_a_clear_error(codec_name, bad):
    tensor = torch.ones(10)
    tensor[3] = bad
    with pytest.raises(NonFiniteGradient, match="'grad' holds NaN or Inf"):
        codec_from_name(codec_name).encode("grad", tensor)


def test_fp16_clamps_overflow_instead_of_sending_inf():
    encoded = codec_from_name("fp16").encode("x", torch.tensor([1e6, -1e6, 1.0]))
    assert torch.isfinite(encoded.values).all() and encoded.values[0].item() == FP16_MAX


def test_topk_keeps_exactly_the_largest_magnitudes():
    x = torch.tensor([0.1, -5.0, 0.2, 3.0, -0.3, 0.0, 4.0, -0.05])
    encoded = codec_from_name("topk:0.375+fp32", dense_below=0).encode("x", x)  # k = 3
    assert encoded.layout is Layout.SPARSE and encoded.indices is not None
    assert encoded.indices.tolist() == [1, 3, 6]
    assert encoded.values.tolist() == [-5.0, 3.0, 4.0]


@pytest.mark.parametrize(
    "name, numel, tolerance",
    [("none", 10_000, 0), ("fp16", 10_000, 0), ("bf16", 10_000, 0), ("int8", 10_000, 0),
     ("topk:0.001", 1_000_000, 0.05), ("topk:0.01+int8", 1_000_000, 0.1), ("randomk:0.001", 1_000_000, 0.05)],
)
def test_codecs_state_their_payload_and_ratio(name, numel, tolerance):
    codec = codec_from_name(name)
    encoded = codec.encode("x", torch.randn(numel, generator=torch.Generator().manual_seed(0)))
    expected = codec.payload_bytes(numel)
    assert abs(encoded.byte_length - expected) <= tolerance * expected
    assert math.isclose(codec.ratio(numel), 4 * numel / expected)


def test_small_tensors_travel_whole_under_sparsifiers():
    codec = codec_from_name("topk:0.001")
    assert codec.encode("bias", torch.randn(160)).layout is Layout.DENSE
    assert codec.encode("weight", torch.randn(10_000)).nnz == 10
    assert codec_from_name("topk:0.001", dense_below=0).encode("bias", torch.randn(160)).nnz == 1


def test_sparse_indices_travel_in_two_bytes_at_a_thousandth_when_compact():
    encoded = codec_from_name("topk:0.001", compact_indices=True).encode("x", torch.randn(1_000_000))
    assert encoded.index_encoding.value == "delta-varint"
    assert encoded.index_bytes / encoded.nnz < 2.0
    assert 4 * 1_000_000 / encoded.byte_length > 1000  # fp16 values + varint indices
    # The default (fast) index coding sends them raw: 4 bytes, next to no CPU.
    fast = codec_from_name("topk:0.001").encode("x", torch.randn(1_000_000))
    assert fast.index_encoding.value == "raw" and fast.index_bytes == 4 * fast.nnz
    assert codec_from_name("topk:0.001").payload_bytes(1_000_000) == fast.byte_length


@pytest.mark.parametrize("distribution", ["normal", "heavy-tailed", "mostly-zero"])
def test_approximate_topk_selects_the_exact_topk_when_magnitudes_are_not_tied(distribution: str):
    # The estimated threshold only narrows the search: whenever at least k magnitudes pass
    # it (lowered and retried until they do), the exact top-k of those is the exact top-k.
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2_000_000, generator=generator)
    if distribution == "heavy-tailed":
        x = x / torch.rand(x.shape, generator=generator).clamp_min(1e-6)  # a Cauchy-like tail
    elif distribution == "mostly-zero":
        x[torch.rand(x.shape, generator=generator) < 0.9995] = 0.0  # ~1,000 non-zeros: the rest of the top-k are tied zeros
    for seed in range(3):
        exact = codec_from_name("topk:0.001").encode("x", x)
        approx = codec_from_name("approx-topk:0.001", seed=seed).encode("x", x)
        assert approx.nnz == exact.nnz == 2000
        if distribution != "mostly-zero":  # there, zeros tie at the k-th magnitude
            assert torch.equal(approx.indices, exact.indices)
        assert torch.equal(x[approx.indices].abs().sort().values, x[exact.indices].abs().sort().values)


def test_codec_names_and_their_errors():
    assert codec_from_name("topk:0.01").name == "topk:0.01+fp16"
    assert codec_from_name("randomk:0.5+int8").name == "randomk:0.5+int8"
    assert codec_from_name("none").name == "fp32"
    for bad, message in [("gzip", "unknown compression"), ("topk", "needs a ratio"),
                         ("topk:2", r"in \(0, 1\]"), ("topk:x", "must be a number"),
                         ("topk:0.1+fp8", "unknown value codec"), ("fp16+fp16", "unknown compression")]:
        with pytest.raises(ConfigurationError, match=message):
            codec_from_name(bad)


@pytest.mark.parametrize("codec_name", ["topk:0.01", "topk:0.05+int8", "randomk:0.1", "fp16", "bf16", "int8"])
@settings(max_examples=25, deadline=None)
@given(steps=st.integers(1, 6), size=st.integers(1, 400), seed=st.integers(0, 2**16),
       scale=st.sampled_from([1e-3, 1.0, 1e4]))
def test_error_feedback_sent_plus_residual_equals_everything_accumulated(codec_name, steps, size, seed, scale):
    generator = torch.Generator().manual_seed(seed)
    feedback = ErrorFeedback(codec_from_name(codec_name, seed=seed, dense_below=0))
    total = torch.zeros(size, dtype=torch.float64)
    sent = torch.zeros(size, dtype=torch.float64)
    for _ in range(steps):
        gradient = torch.randn(size, generator=generator) * scale
        total += gradient.double()
        (encoded,) = feedback.encode([("g", gradient)])
        sent += encoded.to_dense().double()
        residual = feedback.residual("g")
        assert residual is not None
        # Equal up to float32 rounding of the running sums.
        assert torch.allclose(sent + residual.double(), total, rtol=1e-5, atol=1e-5 * scale * steps)


def test_a_lossless_codec_keeps_no_residual_until_a_push_is_refused():
    feedback = ErrorFeedback(codec_from_name("none"))
    gradient = torch.randn(10)
    (sent,) = feedback.encode([("g", gradient)])
    assert torch.equal(sent.to_dense(), gradient) and feedback.residual("g") is None
    feedback.restore([sent])  # refused: it must still reach the server later
    (again,) = feedback.encode([("g", gradient)])
    assert torch.allclose(again.to_dense(), 2 * gradient)


def test_a_refused_push_returns_whole_to_the_residual():
    feedback = ErrorFeedback(codec_from_name("topk:0.1", dense_below=0))
    gradient = torch.randn(100)
    (encoded,) = feedback.encode([("g", gradient)])
    feedback.restore([encoded])
    residual = feedback.residual("g")
    assert residual is not None
    assert torch.allclose(residual, gradient, atol=1e-3)
