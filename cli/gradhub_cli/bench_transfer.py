"""`gradhub bench transfer`: a CUDA worker's side of a step, between the GPU and the host.

For each model size and codec: the worker's encode of a whole gradient (error feedback,
compression and the copy to the host), beside two references measured in the same run:
the bare DMA of the wire's bytes into pinned memory (the bus's limit), and the plain
`.cpu()` of the fp32 gradient, compression aside. For each pull type: loading the
pulled parameters into the model (from the pinned buffer the wire decodes into), beside
the bare DMA of the same bytes and a plain `copy_` from ordinary memory.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

#: The pull types a worker can ask for, as the wire carries them.
PULL_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def _median_ms(repeats: int, fn: Callable[[], object]) -> float:
    """Median wall time of `fn` with the device drained before and after each call."""
    fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def _dma_ms(repeats: int, nbytes: int, to_device: bool) -> float:
    """The bare copy of `nbytes` between pinned host memory and the GPU."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    device = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    if to_device:
        return _median_ms(repeats, lambda: device.copy_(host, non_blocking=True))
    return _median_ms(repeats, lambda: host.copy_(device, non_blocking=True))


def _encode_rows(parameters: int, codecs: list[str], repeats: int) -> list[dict[str, Any]]:
    from gradhub.codecs import codec_from_name
    from gradhub.models import build_model
    from gradhub_cli.bench_wire import hidden_for
    from gradhub_worker.error_feedback import ErrorFeedback

    torch.manual_seed(0)
    model = build_model("wide", {"hidden": hidden_for(parameters)}).cuda()
    named = list(model.named_parameters())
    gradients = [(name, torch.randn_like(p) * 1e-3) for name, p in named]
    weights = [p.detach() for _, p in named]
    count = sum(p.numel() for _, p in named)
    rows = []
    for name in codecs:
        feedback = ErrorFeedback(codec_from_name(name, seed=1))
        sent = feedback.encode(gradients, weights, 0)
        wire_bytes = sum(t.byte_length for t in sent)
        encode = _median_ms(repeats, lambda f=feedback: f.encode(gradients, weights, 0))  # type: ignore[misc]
        naive = _median_ms(repeats, lambda: [g.cpu() for _, g in gradients])
        dma = _dma_ms(repeats, wire_bytes, to_device=False)
        rows.append({"kind": "push", "parameters": count, "what": name, "wire_bytes": wire_bytes,
                     "ms": encode, "plain_ms": naive, "dma_ms": dma,
                     "of_dma": dma / encode, "speedup_vs_plain": naive / encode})
    return rows


def _load_rows(parameters: int, pull_dtypes: list[str], repeats: int) -> list[dict[str, Any]]:
    from gradhub import wire
    from gradhub.domain import ParameterSnapshot
    from gradhub.encoded import dense_views, flat_values
    from gradhub.models import build_model
    from gradhub_cli.bench_wire import hidden_for
    from gradhub_worker.loading import ModelLoader

    model = build_model("wide", {"hidden": hidden_for(parameters)}).cuda()
    loader = ModelLoader(model)
    name_shapes = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    count = loader.flat.numel()
    limits = wire.WireLimits(max_payload_bytes=4 * count + (1 << 20))
    rows = []
    for dtype_name in pull_dtypes:
        values = torch.randn(count).to(PULL_DTYPES[dtype_name])
        # As the client's deserializer reads them (typed loosely there too: raw chunks or messages).
        messages: list[Any] = [wire.parse_pull_response(m)
                               for m in wire.pull_stream(ParameterSnapshot(1, dense_views(name_shapes, values)))]
        pinned = wire.read_pull(messages, limits, pinned=True)
        ordinary = wire.read_pull(messages, limits, pinned=False)
        ordinary_values = flat_values(ordinary.tensors)
        assert ordinary_values is not None  # dense and back to back, as decoded

        def load(snapshot: ParameterSnapshot = pinned) -> None:
            loader.held = None  # load it again, as a new version would be
            loader.load(snapshot)

        wire_bytes = values.numel() * values.element_size()
        loaded = _median_ms(repeats, load)
        plain = _median_ms(repeats, lambda v=ordinary_values: loader.flat.copy_(v))  # type: ignore[misc]
        dma = _dma_ms(repeats, wire_bytes, to_device=True)
        rows.append({"kind": "pull", "parameters": count, "what": dtype_name, "wire_bytes": wire_bytes,
                     "ms": loaded, "plain_ms": plain, "dma_ms": dma,
                     "of_dma": dma / loaded, "speedup_vs_plain": plain / loaded})
    return rows


def bench_transfer(args: Any) -> tuple[list[dict[str, Any]], str]:
    if not torch.cuda.is_available():
        raise SystemExit("gradhub bench transfer measures a CUDA worker: no CUDA device here")
    rows: list[dict[str, Any]] = []
    for parameters in args.sizes:
        rows += _encode_rows(parameters, args.codecs, args.repeats)
        rows += _load_rows(parameters, args.pull_dtypes, args.repeats)
    return rows, table(rows, torch.cuda.get_device_name())


def table(rows: list[dict[str, Any]], device: str) -> str:
    lines = [
        f"{device}; medians. push: the worker's encode of the whole gradient (error feedback, codec, "
        "copy to the host); pull: loading the pulled parameters into the model. DMA: the bare copy of "
        "the same wire bytes between pinned memory and the GPU. Plain: `.cpu()` of the fp32 gradient, "
        "nothing else (push); `copy_` from ordinary memory, as the worker did before (pull).",
        "",
        "| parameters | step | codec or pull type | wire bytes | time | bare DMA | DMA / time | plain way | speed-up |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['parameters'] / 1e6:.1f} M | {r['kind']} | {r['what']} | {r['wire_bytes'] / 1e6:.1f} MB "
            f"| {r['ms']:.2f} ms | {r['dma_ms']:.2f} ms | {100 * r['of_dma']:.0f} % | {r['plain_ms']:.2f} ms "
            f"| {r['speedup_vs_plain']:.1f}x |"
        )
    return "\n".join(lines)
