"""Conditional neural process (Garnelo et al., ICML 2018 [1]): the generative model.

A function-space learner: no per-task weights, only a predictive conditioned on the support set::

    r_t   = mean_n h(x_tn, y_tn)                   over the support pairs of task t    [T, R]
    y_tq  ~ N(mu(x_tq, r_t), sigma(x_tq, r_t)^2)   per query point (site "y_query")    [T, Q, O]

with ``h`` the per-pair encoder MLP, ``(mu, raw) = g(x, r)`` the decoder MLP and
``sigma = 0.01 + softplus(raw)`` (the floor keeps the likelihood bounded on noiseless targets). There
is no latent site, so the guide is empty and ``Trace_ELBO`` is exactly ``-log p(y_query | support)``,
the CNP's conditional log-likelihood objective.

Plates: ``tasks`` at ``dim=-2``, ``y_query_points`` at ``dim=-1``; the evaluator's ``samples`` plate at
``dim=-3`` broadcasts over the deterministic predictive.

[1] Garnelo, Rosenbaum, Maddison, Ramalho, Saxton, Shanahan, Teh, Rezende, Eslami, Conditional Neural
    Processes, ICML 2018.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..tasks import TaskBatch
from .base import POINT_DIM, full_plate, mlp, tasks_plate

MIN_STD = 0.01  # the decoder's std floor (the peer figures of issue 27 used it)


def broadcast_cat(parts: Sequence[Tensor]) -> Tensor:
    """Concatenate on the last dim after broadcasting every leading dim: ``[T, Q, X]`` and
    ``[S, T, 1, Z]`` give ``[S, T, Q, X + Z]`` (a latent draw per sample meets every query point)."""
    lead = torch.broadcast_shapes(*(p.shape[:-1] for p in parts))
    return torch.cat([p.expand(*lead, p.shape[-1]) for p in parts], dim=-1)


class GaussianDecoder(nn.Module):
    """``(x, features) -> (mu, sigma)``: an MLP ``[X + F, *hidden, 2 O]``; ``sigma = 0.01 + softplus(raw)``.

    :param in_dim: ``X + F``; :param hidden: hidden widths; :param out_dim: ``O``.
    """

    def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int, min_std: float = MIN_STD):
        super().__init__()
        self.net = mlp([in_dim, *hidden, 2 * out_dim])
        self.out_dim, self.min_std = out_dim, float(min_std)

    def forward(self, inputs: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """:param inputs: tensors ``[..., Q, *]`` broadcast and concatenated (:func:`broadcast_cat`).
        :return: ``(mu, sigma)``, ``[..., Q, O]`` each."""
        out = self.net(broadcast_cat(inputs))  # ..., Q, 2 O
        mu, raw = out.split(self.out_dim, dim=-1)
        return mu, self.min_std + F.softplus(raw)


def observe_gaussian(batch: TaskBatch, mu: Tensor, sigma: Tensor) -> Tensor:
    """Site ``y_query ~ N(mu, sigma^2)``, one factor per query point (the ``O`` outputs one event).

    :param mu: ``[..., T, Q, O]``; :param sigma: the same shape. Called inside the tasks plate."""
    with full_plate("y_query_points", mu.shape[-2], POINT_DIM):
        return pyro.sample("y_query", dist.Normal(mu, sigma).to_event(1), obs=batch.y_query)


class CNPModel(nn.Module):
    """``y_query ~ N(decoder(x_query, mean_n encoder(x_s, y_s)))``; no latent sites.

    :param x_dim: input features ``X`` (flat inputs ``[T, N, X]``); :param y_dim: outputs ``O``.
    :param encoder_hidden: the per-pair encoder's widths; the last is ``R``, the width of ``r``.
    :param decoder_hidden: the decoder's hidden widths.
    """

    def __init__(self, x_dim: int, y_dim: int, encoder_hidden: Sequence[int], decoder_hidden: Sequence[int]):
        super().__init__()
        self.x_dim, self.y_dim = x_dim, y_dim
        self.encoder = mlp([x_dim + y_dim, *encoder_hidden])
        self.decoder = GaussianDecoder(x_dim + encoder_hidden[-1], decoder_hidden, y_dim)

    def represent(self, x: Tensor, y: Tensor) -> Tensor:
        """``r = mean_n h(x_n, y_n)``: ``x [..., N, X]``, ``y [..., N, O]`` -> ``[..., 1, R]`` (order-invariant)."""
        return self.encoder(torch.cat([x, y], dim=-1)).mean(dim=-2, keepdim=True)  # ..., 1, R

    def predict(self, batch: TaskBatch) -> tuple[Tensor, Tensor]:
        """``(mu, sigma)`` at the query inputs given the support set, ``[T, Q, O]`` each."""
        r = self.represent(batch.x_support, batch.y_support)  # T 1 R
        return self.decoder([batch.x_query, r])

    def forward(self, batch: TaskBatch) -> Tensor:
        mu, sigma = self.predict(batch)  # T Q O
        with tasks_plate(batch.num_tasks):
            return observe_gaussian(batch, mu, sigma)
