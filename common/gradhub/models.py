"""Model specs shared by server and workers: a built-in name or `module:function`.

Both sides build the same architecture from the same spec; the server's seeded
initialisation is the one that counts (workers pull it before their first step).
A custom model is any importable callable returning an `nn.Module` that maps a
batch of signals [B, 40] to logits [B, 10], called with the run's model kwargs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from gradhub.errors import ConfigurationError

ModelFactory = Callable[..., nn.Module]
_BUILTIN: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    def decorate(factory: ModelFactory) -> ModelFactory:
        _BUILTIN[name] = factory
        return factory

    return decorate


class ConvBase(nn.Module):
    """The CNN of the MNIST-1D paper (Greydanus 2020): three strided convolutions, one linear."""

    def __init__(self, output_size: int = 10, channels: int = 25, linear_in: int = 125) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, 5, stride=2, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.linear = nn.Linear(linear_in, output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(-1, 1, x.shape[-1])
        h = self.conv1(x).relu()
        h = self.conv2(h).relu()
        h = self.conv3(h).relu()
        return self.linear(h.view(h.shape[0], -1))


class MLP(nn.Module):
    """The MLP of the MNIST-1D paper: two hidden layers."""

    def __init__(self, input_size: int = 40, output_size: int = 10, hidden_size: int = 100) -> None:
        super().__init__()
        self.linear1 = nn.Linear(input_size, hidden_size)
        self.linear2 = nn.Linear(hidden_size, hidden_size)
        self.linear3 = nn.Linear(hidden_size, output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear1(x).relu()
        h = self.linear2(h).relu()
        return self.linear3(h)


class WideCNN(nn.Module):
    """A wide CNN for MNIST-1D where compression matters: about a million parameters,
    most of them in the hidden layer after the convolutions; dropout keeps so many
    parameters from overfitting 4,000 training signals."""

    def __init__(self, channels: int = 160, hidden: int = 1100, dropout: float = 0.3, output_size: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, 5, stride=2, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.hidden = nn.Linear(channels * 5, hidden)
        self.out = nn.Linear(hidden, output_size)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.view(-1, 1, x.shape[-1])
        h = self.conv1(h).relu()
        h = self.conv2(h).relu()
        h = self.conv3(h).relu()
        h = self.hidden(self.dropout(h.flatten(1))).relu()
        return self.out(self.dropout(h))


@register_model("cnn")
def cnn(channels: int = 25) -> nn.Module:
    # Length 40 -> 19 -> 10 -> 5 after the three stride-2 convolutions.
    return ConvBase(channels=channels, linear_in=channels * 5)


@register_model("mlp")
def mlp(hidden_size: int = 100) -> nn.Module:
    return MLP(hidden_size=hidden_size)


@register_model("wide")
def wide(channels: int = 160, hidden: int = 1100, dropout: float = 0.3) -> nn.Module:
    return WideCNN(channels=channels, hidden=hidden, dropout=dropout)


@register_model("linear")
def linear() -> nn.Module:
    return nn.Linear(40, 10)


def builtin_models() -> list[str]:
    return sorted(_BUILTIN)


def resolve_factory(spec: str) -> ModelFactory:
    if spec in _BUILTIN:
        return _BUILTIN[spec]
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigurationError(
            f"unknown model {spec!r}: use one of {', '.join(builtin_models())} or module:function"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"model {spec!r}: cannot import {module_name!r}: {exc}") from exc
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ConfigurationError(f"model {spec!r}: {module_name} has no callable {attribute!r}")
    return factory  # type: ignore[no-any-return]


def build_model(spec: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    factory = resolve_factory(spec)
    try:
        model = factory(**(kwargs or {}))
    except TypeError as exc:
        raise ConfigurationError(f"model {spec!r} with kwargs {kwargs}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ConfigurationError(f"model {spec!r} returned {type(model).__name__}, not nn.Module")
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flatten_parameters(model: nn.Module) -> torch.Tensor:
    """Move the model's parameters into one flat tensor, in `parameters()` order, and make
    each a view of it; returns the flat tensor.

    A whole set of parameters then loads with one copy (`flat.copy_`), where a small model
    spent its time in one call per tensor. Call it after moving the model to its device.
    """
    params = list(model.parameters())
    if not params:
        return torch.empty(0)
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    offset = 0
    with torch.no_grad():
        for p in params:
            p.data = flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
    return flat
