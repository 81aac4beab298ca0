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
        # per layer (out, in), and the flat vector's split sizes (w0, b0, w1, b1, ...), for __call__
        self._layers = [(b, a) for a, b in zip(sizes[:-1], sizes[1:])]
        self._sizes = [b - a for a, b in self.spec.offsets.values()]
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

    def __call__(self, params: Tensor, x: Tensor, context: Tensor | None = None) -> Tensor:
        """``context`` (the support inputs, which normalize ``x`` in a conv trunk) is unused: no statistics."""
        if params.shape[-1] != self.num_params:
            raise ValueError(f"expected weights [..., {self.num_params}], got {tuple(params.shape)}")
        if params.dim() == 2 and x.dim() == 3 and x.shape[0] == params.shape[0]:
            batch, nb, p, h = params.shape[:1], params.shape[0], params, x  # already B D and B N in
        else:
            batch = torch.broadcast_shapes(params.shape[:-1], x.shape[:-2])
            nb = math.prod(batch)
            # flatten every leading dim into one so each layer is a single fused batched matmul-add
            p = params.expand(*batch, self.num_params).reshape(nb, self.num_params)  # B D
            h = x.expand(*batch, *x.shape[-2:]).reshape(nb, *x.shape[-2:])  # B N in
        # one split, not a slice per tensor: a slice's backward fills a zero [B, D] gradient each (and
        # the inner loop's double backward again); a split's backward is one concatenation
        parts = p.split(self._sizes, dim=-1)
        last = len(self._layers) - 1
        for i, (out_dim, in_dim) in enumerate(self._layers):
            w = parts[2 * i].view(nb, out_dim, in_dim)  # B out in
            h = torch.baddbmm(parts[2 * i + 1].unsqueeze(1), h, w.transpose(1, 2))  # B N out
            if i < last:
                h = self._act(h)
        return h.reshape(*batch, *h.shape[-2:])  # *batch N out

    def describe(self) -> dict:
        return {"type": "mlp", "sizes": list(self.sizes), "activation": self.activation,
                "num_params": self.num_params}
