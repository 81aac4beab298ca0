"""A functional MLP whose weights arrive as a flat tensor batched over any leading dims."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .spec import ParamSpec

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "tanh": torch.tanh,
    "elu": F.elu,
}


class FunctionalNet:
    """Base of networks with no parameters of their own: ``net(params [*B, D], x) -> out``.

    ``spec`` lays out ``D``; ``init(generator)`` returns a flat initial vector ``[D]``.
    """

    spec: ParamSpec
    input_shape: tuple[int, ...]
    output_dim: int

    @property
    def num_params(self) -> int:
        return self.spec.num_params

    def init(self, generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError

    def describe(self) -> dict:
        raise NotImplementedError


class MLP(FunctionalNet):
    """Fully connected network ``sizes[0] -> ... -> sizes[-1]`` with a nonlinearity between layers.

    :param sizes: layer widths, input first (MAML's sinusoid net is ``(1, 40, 40, 1)``).
    :param activation: one of :data:`ACTIVATIONS`.

    ``forward(params, x)``: ``params [*B, D]``, ``x [*C, N, in]`` with ``*B`` and ``*C``
    broadcastable (e.g. ``B = (samples, tasks)``, ``C = (tasks,)``) -> ``[*broadcast, N, out]``.
    """

    def __init__(self, sizes: Sequence[int], activation: str = "relu"):
        sizes = tuple(int(s) for s in sizes)
        if len(sizes) < 2 or min(sizes) < 1:
            raise ValueError(f"MLP sizes must be >= 2 positive widths, got {sizes}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; known: {sorted(ACTIVATIONS)}")
        self.sizes, self.activation = sizes, activation
        self._act = ACTIVATIONS[activation]
        shapes = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            shapes += [(f"w{i}", (b, a)), (f"b{i}", (b,))]
        self.spec = ParamSpec(shapes)
        self.input_shape = (sizes[0],)
        self.output_dim = sizes[-1]

    def init(self, generator: torch.Generator | None = None) -> Tensor:
        """torch.nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases."""
        named = {}
        for name, shape in self.spec.shapes.items():
            fan_in = shape[1] if name.startswith("w") else self.spec.shapes["w" + name[1:]][1]
            bound = 1.0 / math.sqrt(fan_in)
            named[name] = (torch.rand(shape, generator=generator) * 2 - 1) * bound
        return self.spec.flatten(named)

    def __call__(self, params: Tensor, x: Tensor) -> Tensor:
        p = self.spec.unflatten(params)
        h = x
        n_layers = len(self.sizes) - 1
        for i in range(n_layers):
            w, b = p[f"w{i}"], p[f"b{i}"]  # [*B, out, in], [*B, out]
            h = torch.matmul(h, w.transpose(-1, -2)) + b.unsqueeze(-2)  # *B N out
            if i < n_layers - 1:
                h = self._act(h)
        return h

    def describe(self) -> dict:
        return {"type": "mlp", "sizes": list(self.sizes), "activation": self.activation,
                "num_params": self.num_params}
