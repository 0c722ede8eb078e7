"""Error feedback: what a lossy codec did not send stays on the worker and is sent later.

For each parameter the worker keeps a residual. A step encodes (gradient +
residual) and keeps as the new residual exactly what the encoding dropped, so
sent + residual always equals everything accumulated. A push the server refuses
is given back whole (`restore`): nothing a worker computed is lost.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gradhub.codecs import Codec
from gradhub.encoded import EncodedTensor, Layout


class ErrorFeedback:
    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self._residuals: dict[str, torch.Tensor] = {}

    def encode(self, gradients: Sequence[tuple[str, torch.Tensor]]) -> list[EncodedTensor]:
        if self.codec.lossless and not self._residuals:
            return [self.codec.encode(name, gradient) for name, gradient in gradients]
        encoded = []
        for name, gradient in gradients:
            residual = self._residuals.get(name)
            accumulated = gradient.detach().to(torch.float32)
            if residual is not None:
                accumulated = accumulated + residual
            sent = self.codec.encode(name, accumulated)
            self._residuals[name] = self._remainder(accumulated, sent)
            encoded.append(sent)
        return encoded

    @staticmethod
    def _remainder(accumulated: torch.Tensor, sent: EncodedTensor) -> torch.Tensor:
        if sent.layout is Layout.SPARSE and sent.indices is not None:
            remainder = accumulated.detach().clone().reshape(-1)
            indices = sent.indices.to(device=remainder.device, dtype=torch.int64)
            remainder.index_add_(0, indices, -sent.float_values().to(remainder.device))
            return remainder.view(accumulated.shape)
        return accumulated - sent.to_dense().to(accumulated.device)

    def restore(self, sent: Sequence[EncodedTensor]) -> None:
        """Return a refused push to the residuals."""
        for tensor in sent:
            residual = self._residuals.get(tensor.name)
            dense = tensor.to_dense()
            if residual is None:
                self._residuals[tensor.name] = dense
            else:
                residual.add_(dense.to(residual.device))

    def reset(self) -> None:
        """Forget every residual (after a gradient the server refused as non-finite)."""
        self._residuals.clear()

    def residual(self, name: str) -> torch.Tensor | None:
        return self._residuals.get(name)
