"""Attentive neural process (Kim et al., ICLR 2019 [1]): the generative model.

Deterministic path (always): each support pair is encoded by an MLP, the encodings attend to each other
(self-attention layers), and each query input attends to the support inputs (multi-head cross-attention,
keys and queries an MLP embedding of ``x``, values the self-attended encodings), giving a query-specific
representation ``r*_tq`` ``[T, Q, W]`` instead of the CNP's one mean ``r_t``.

Latent path (``latent=True``): a global ``z_t`` per task from a mean-pooled encoder of the pairs::

    z_t  ~ p(z | support) = N(m(C_t), s(C_t)^2)     site "z", [T, 1, Z] in the tasks plate
    y_tq ~ N(mu(x_tq, r*_tq, z_t), sigma(...)^2)    site "y_query"

trained with the ELBO against ``q(z | support + query)`` (the same encoder on both sets: the guide
:class:`~pyro_meta.guides.anp.ANPGuide`); at test ``z`` comes from ``p(z | support)``. Without the latent
path the model has no latent site and ``Trace_ELBO`` is the conditional log-likelihood.

[1] Kim, Mnih, Schwarz, Garnelo, Eslami, Rosenbaum, Vinyals, Teh, Attentive Neural Processes, ICLR 2019.
[2] Le, Kim, Garnelo, Rosenbaum, Schwarz, Teh, Empirical Evaluation of Neural Process Objectives, 2018
    (the latent std ``0.1 + 0.9 sigmoid``).
"""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..tasks import TaskBatch
from .base import mlp, tasks_plate
from .cnp import GaussianDecoder, observe_gaussian

LATENT_STD_MIN = 0.1  # z's std is 0.1 + 0.9 sigmoid(raw): bounded away from 0 (a KL that cannot blow up) [2]


class MultiheadAttention(nn.Module):
    """``softmax(q k^T / sqrt(d)) v`` in ``heads`` heads of width ``d = width / heads``, projections in
    and out; any leading dims.

    :param width: model width ``W`` (inputs and output); :param heads: number of heads (divides ``W``).
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"attention width {width} must be a multiple of heads {heads}")
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(width, width) for _ in range(4))

    def _split(self, t: Tensor) -> Tensor:
        return t.unflatten(-1, (self.heads, -1)).transpose(-3, -2)  # ..., N, W -> ..., H, N, W/H

    def forward(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        """``query [..., Q, W]``, ``key``/``value [..., N, W]`` -> ``[..., Q, W]``."""
        q, k, v = self._split(self.q(query)), self._split(self.k(key)), self._split(self.v(value))
        a = F.scaled_dot_product_attention(q, k, v)  # ..., H, Q, W/H
        return self.out(a.transpose(-3, -2).flatten(-2))  # ..., Q, W


class AttentionBlock(nn.Module):
    """``LayerNorm(query + attention(query, key, value))``: the residual keeps the query's own embedding
    (a layer may only add to it), the norm keeps the stacked layers' scale fixed. ``[..., Q, W]``."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attention = MultiheadAttention(width, heads)
        self.norm = nn.LayerNorm(width)

    def forward(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        return self.norm(query + self.attention(query, key, value))


class ANPModel(nn.Module):
    """:param x_dim: inputs ``X``; :param y_dim: outputs ``O``.
    :param encoder_hidden: the pair encoder's widths (the last is the attention width ``W``).
    :param decoder_hidden: the decoder's hidden widths (the CNP's decoder).
    :param heads: attention heads; :param self_attention_layers: self-attention layers over the support.
    :param latent: add the latent path (a site ``z`` of ``latent_dim`` per task).
    """

    def __init__(self, x_dim: int, y_dim: int, encoder_hidden: Sequence[int], decoder_hidden: Sequence[int],
                 heads: int = 8, self_attention_layers: int = 2, latent: bool = False, latent_dim: int = 128):
        super().__init__()
        width = encoder_hidden[-1]
        self.x_dim, self.y_dim, self.latent, self.latent_dim = x_dim, y_dim, latent, latent_dim
        self.encoder = mlp([x_dim + y_dim, *encoder_hidden])
        self.self_attention = nn.ModuleList(AttentionBlock(width, heads) for _ in range(self_attention_layers))
        # one embedding of x for the cross-attention's keys (support) and queries (query points), so that
        # the two are compared in the same space
        self.x_embed = mlp([x_dim, width, width])
        self.cross_attention = AttentionBlock(width, heads)
        if latent:
            self.latent_encoder = mlp([x_dim + y_dim, *encoder_hidden])
            self.latent_head = mlp([width, width, 2 * latent_dim])
        self.decoder = GaussianDecoder(x_dim + width + (latent_dim if latent else 0), decoder_hidden, y_dim)

    @property
    def per_task_weights(self) -> int:
        """Values each task carries per predictive draw, for the evaluator's chunking: with the latent path
        the decoder runs once per draw on every query point (about its width times 100 query points)."""
        return self.decoder.net[0].out_features * 100 if self.latent else 0

    def deterministic(self, batch: TaskBatch) -> Tensor:
        """``r*``: the query points' attention over the support set, ``[T, Q, W]``."""
        h = self.encoder(torch.cat([batch.x_support, batch.y_support], dim=-1))  # T S W
        for block in self.self_attention:
            h = block(h, h, h)  # T S W
        keys = self.x_embed(batch.x_support)  # T S W
        queries = self.x_embed(batch.x_query)  # T Q W
        return self.cross_attention(queries, keys, h)  # T Q W

    def latent_law(self, x: Tensor, y: Tensor) -> dist.Distribution:
        """``N(m, s^2)`` of ``z`` given the pairs ``x [T, N, X]``, ``y [T, N, O]``: batch ``[T, 1]``, event ``[Z]``."""
        s = self.latent_encoder(torch.cat([x, y], dim=-1)).mean(dim=-2, keepdim=True)  # T 1 W
        loc, raw = self.latent_head(s).split(self.latent_dim, dim=-1)  # T 1 Z each
        return dist.Normal(loc, LATENT_STD_MIN + (1 - LATENT_STD_MIN) * torch.sigmoid(raw)).to_event(1)

    def forward(self, batch: TaskBatch) -> Tensor:
        r = self.deterministic(batch)  # T Q W
        with tasks_plate(batch.num_tasks):
            features = [batch.x_query, r]
            if self.latent:
                z = pyro.sample("z", self.latent_law(batch.x_support, batch.y_support))  # ..., T, 1, Z
                features.append(z)
            mu, sigma = self.decoder(features)  # ..., T, Q, O
            return observe_gaussian(batch, mu, sigma)

