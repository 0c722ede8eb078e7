"""Error feedback, and Deep Gradient Compression's additions, on the worker.

What a lossy codec does not send stays on the worker and is added to the next
gradient: a per-parameter residual. Each step encodes (contribution + residual) and
keeps as the new residual exactly what the encoding dropped, so sent + residual
always equals everything contributed. A push the server refuses is given back whole
(`restore`): nothing a worker computed is lost.

DGC's options (Lin et al., ICLR 2018), set from the run's configuration:

- momentum correction: the worker keeps the momentum u <- m u + (g + wd w) and
  contributes u, so momentum acts on what is eventually sent, not on each sparse
  piece; the server then takes plain SGD steps.
- momentum factor masking: the momentum of coordinates just sent is zeroed, so a
  stale momentum does not push them again.
- local gradient clipping: the worker scales its gradient to an L2 norm of at most
  `clip_norm` before anything else.
- sparsity warm-up: for the first `warmup_versions` model versions the kept fraction
  falls exponentially from 25 % to the codec's ratio.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gradhub.codecs import Codec, DenseCodec, Sparsifier
from gradhub.encoded import EncodedTensor, Layout, flat_values
from gradhub.transfer import to_device

#: Sparsity warm-up starts by keeping this fraction.
WARMUP_START = 0.25
#: Largest model (elements) encoded whole by a dense codec. The whole-model path saves the
#: per-tensor calls (fp16: 208 against 78 us for the 5,210-parameter CNN, 1.9 against 1.1 ms
#: at 1 M) but copies the gradient once more, which costs more from a few million on
#: (11 against 19 ms at 4.2 M).
WHOLE_MODEL_MAX = 1 << 21


@dataclass(frozen=True)
class FeedbackOptions:
    #: Momentum correction: the momentum the worker keeps (0: off, the server has momentum).
    momentum: float = 0.0
    #: With momentum correction, weight decay is added to the gradient on the worker.
    weight_decay: float = 0.0
    masking: bool = True
    clip_norm: float = 0.0
    warmup_versions: int = 0


class ErrorFeedback:
    def __init__(self, codec: Codec, options: FeedbackOptions | None = None) -> None:
        self.codec = codec
        self.options = options or FeedbackOptions()
        self._residuals: dict[str, torch.Tensor] = {}
        self._momenta: dict[str, torch.Tensor] = {}
        #: A dense codec's residuals as one tensor (of these names and shapes), kept apart
        #: from _residuals: per-tensor views each step would cost what the flat path saves.
        self._flat_residual: torch.Tensor | None = None
        self._flat_names: tuple[str, ...] = ()
        self._flat_shapes: list[tuple[int, ...]] = []
        #: Per tensor, the buffer the next step accumulates into (the residual before last).
        self._spares: dict[str, torch.Tensor] = {}
        #: fp32 room for the sent values, reused by every tensor of every step.
        self._cast: torch.Tensor | None = None

    def codec_at(self, version: int) -> Codec:
        """The codec for a gradient computed on `version` (sparsity warm-up)."""
        warmup = self.options.warmup_versions
        if not (warmup and isinstance(self.codec, Sparsifier)) or version >= warmup:
            return self.codec
        target = self.codec.keep
        if target >= WARMUP_START:
            return self.codec
        keep = math.exp(math.log(WARMUP_START) + (math.log(target) - math.log(WARMUP_START)) * version / warmup)
        return self.codec.with_ratio(keep)

    def encode(
        self,
        gradients: Sequence[tuple[str, torch.Tensor]],
        parameters: Sequence[torch.Tensor] | None = None,
        version: int = 0,
    ) -> Sequence[EncodedTensor]:
        """Encode one step's gradients (with the parameters they came from, for weight decay)."""
        options = self.options
        codec = self.codec_at(version)
        if (isinstance(codec, DenseCodec) and codec.encodes_whole_models and not options.momentum
                and not options.clip_norm and sum(g.numel() for _, g in gradients) <= WHOLE_MODEL_MAX):
            return self._encode_model(codec, gradients)
        self._spill()
        grads = [g.detach().to(torch.float32) for _, g in gradients]
        if options.clip_norm > 0:
            norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
            if norm > options.clip_norm:
                grads = [g * (options.clip_norm / norm) for g in grads]
        if codec.lossless and not self._residuals and not options.momentum:
            return [codec.encode(name, g) for (name, _), g in zip(gradients, grads)]
        encoded = []
        for position, ((name, _), gradient) in enumerate(zip(gradients, grads)):
            contribution = gradient
            if options.momentum:
                if options.weight_decay and parameters is not None:
                    contribution = contribution + options.weight_decay * parameters[position].detach()
                momentum = self._momenta.get(name)
                momentum = contribution.clone() if momentum is None else momentum.mul_(options.momentum).add_(contribution)
                self._momenta[name] = momentum
                contribution = momentum
            residual = self._residuals.get(name)
            if residual is None:
                accumulated = contribution.clone()
            else:
                # Into the buffer of the residual before this one: a fresh tensor per step
                # costs its page faults again (gradhub.memory). The residual itself stays
                # as it was until the encode succeeded.
                accumulated = torch.add(contribution, residual, out=self._spare_like(name, residual))
            sent = codec.encode(name, accumulated)
            self._residuals[name] = self._remainder(accumulated, sent)
            if residual is not None:
                self._spares[name] = residual
            if options.momentum and options.masking and sent.indices is not None:
                self._momenta[name].view(-1)[sent.indices.to(accumulated.device)] = 0.0
            encoded.append(sent)
        return encoded

    def _encode_model(
        self, codec: DenseCodec, gradients: Sequence[tuple[str, torch.Tensor]]
    ) -> Sequence[EncodedTensor]:
        """A dense codec over the whole model at once: the same arithmetic as tensor by
        tensor (contribution + residual, encode, keep the remainder), on one flat tensor,
        whose residual stays one flat tensor until something asks for it by name."""
        names = tuple(name for name, _ in gradients)
        shapes = [tuple(g.shape) for _, g in gradients]
        # One copy of the whole gradient, ours: the residual is added and taken in place.
        accumulated = torch.cat([g.detach().reshape(-1) for _, g in gradients]).to(torch.float32)
        if self._flat_residual is not None and self._flat_names == names:
            accumulated.add_(self._flat_residual)
        else:
            self._spill()
            if self._residuals:
                for name, part in zip(names, accumulated.split([math.prod(shape) for shape in shapes])):
                    residual = self._residuals.get(name)
                    if residual is not None:
                        part.add_(residual.reshape(-1).to(part.device))
        sent = codec.encode_model(list(zip(names, shapes)), accumulated)
        for name in names:
            self._residuals.pop(name, None)
        if codec.lossless:  # nothing dropped, nothing kept (a restored push was just sent)
            self._flat_residual = None
        else:
            whole = flat_values(sent)
            values = whole if whole is not None else torch.cat([t.values for t in sent])
            # Widened on the gradient's device: the bus carries the wire's bytes.
            self._flat_residual = accumulated.sub_(to_device(values, accumulated.device, torch.float32))
            self._flat_names, self._flat_shapes = names, shapes
        return sent

    def _flat_views(self) -> dict[str, torch.Tensor]:
        if self._flat_residual is None:
            return {}
        parts = self._flat_residual.split([math.prod(shape) for shape in self._flat_shapes])
        return {name: part.view(shape) for name, part, shape in zip(self._flat_names, parts, self._flat_shapes)}

    def _spill(self) -> None:
        """Residuals by name again: the flat residual becomes per-tensor views of it."""
        self._residuals.update(self._flat_views())
        self._flat_residual = None

    def _spare_like(self, name: str, like: torch.Tensor) -> torch.Tensor:
        spare = self._spares.pop(name, None)
        if spare is None or spare.shape != like.shape or spare.dtype != like.dtype or spare.device != like.device:
            spare = torch.empty_like(like)
        return spare

    def _remainder(self, accumulated: torch.Tensor, sent: EncodedTensor) -> torch.Tensor:
        """What was not sent; `accumulated` is ours alone, and becomes it in place."""
        if sent.layout is Layout.SPARSE and sent.indices is not None:
            remainder = accumulated.reshape(-1)
            indices = sent.indices.to(device=remainder.device, dtype=torch.int64)
            remainder.index_add_(0, indices, -sent.float_values().to(remainder.device))
            return remainder.view(accumulated.shape)
        if sent.scales is None and sent.values.dtype != accumulated.dtype:
            # The sent values in fp32 through a buffer kept between steps: the same
            # subtraction as of `to_dense()`, without a fresh fp32 tensor (or a hidden one,
            # as a subtraction of another type makes). Not for fp32 values, which may be
            # `accumulated` itself.
            numel = accumulated.numel()
            if self._cast is None or self._cast.numel() < numel or self._cast.device != accumulated.device:
                self._cast = torch.empty(numel, dtype=torch.float32, device=accumulated.device)
            sent_values = to_device(sent.values, accumulated.device)  # widened below, on the device
            cast = self._cast[:numel].view(accumulated.shape).copy_(sent_values.view(accumulated.shape))
            return accumulated.sub_(cast)
        return accumulated - sent.to_dense().to(accumulated.device)

    def restore(self, sent: Sequence[EncodedTensor]) -> None:
        """Return a refused push to the residuals."""
        self._spill()
        for tensor in sent:
            residual = self._residuals.get(tensor.name)
            dense = tensor.to_dense()
            if residual is None:
                # A copy: fp32 values decode to themselves, and a residual must be ours
                # alone (later steps accumulate into it in place).
                self._residuals[tensor.name] = dense.clone()
            else:
                residual.add_(dense.to(residual.device))

    def reset(self) -> None:
        """Forget residuals and momenta (after a gradient the server refused as non-finite)."""
        self._residuals.clear()
        self._flat_residual = None
        self._momenta.clear()
        self._spares.clear()

    def residual(self, name: str) -> torch.Tensor | None:
        if self._flat_residual is not None and name in self._flat_names:
            return self._flat_views()[name]
        return self._residuals.get(name)

    def momentum(self, name: str) -> torch.Tensor | None:
        return self._momenta.get(name)
