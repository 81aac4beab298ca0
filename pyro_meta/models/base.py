"""What the weight-space models share: per-task weights in a tasks plate feeding a functional net.

Plate layout (every built-in model and guide uses it; a user model should too, so the evaluator and
the ArviZ export can add a samples dimension on the left):

- ``tasks``: ``dim=-2``, size ``T``; per-task weight sites have batch shape ``[T, 1]`` and event
  ``[D]`` (value ``[T, 1, D]``).
- ``<site>_points``: ``dim=-1``, size ``N``; one observation factor per data point.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.transforms import ExpTransform
from torch import Tensor, nn

from ..likelihoods import Likelihood
from ..nn import FunctionalNet, call_net
from ..tasks import TaskBatch

TASK_DIM = -2
POINT_DIM = -1
SCORE_CHOICES = ("query", "support+query", "support")


def log_gamma_dist(concentration: float, rate: float, like: Tensor) -> dist.Distribution:
    """The law of ``log g`` for ``g ~ Gamma(concentration, rate)``, density ``Gamma(e^u) e^u``: a precision
    carried in log space (BMAML's particles, the SVGD Bayesian network). ``like``: dtype and device.

    Built once per setting, dtype and device (its parameters are constants): a fresh one per step would copy
    its two scalars from the host on a GPU."""
    return _log_gamma_dist(float(concentration), float(rate), like.dtype, like.device)


@functools.lru_cache(maxsize=64)
def _log_gamma_dist(concentration: float, rate: float, dtype: torch.dtype, device: torch.device) -> dist.Distribution:
    base = dist.Gamma(torch.tensor(concentration, dtype=dtype, device=device),
                      torch.tensor(rate, dtype=dtype, device=device))
    return dist.TransformedDistribution(base, [ExpTransform().inv])


@functools.lru_cache(maxsize=256)
def full_plate(name: str, size: int, dim: int) -> pyro.plate:
    """``pyro.plate(name, size, dim=dim)`` without subsampling, built once per ``(name, size, dim)`` and
    reused (a plate is a reusable context manager): building one costs more than entering it (about
    15 vs 1.3 microseconds here), and a meta-training step enters several. It is built outside every
    handler, so no trace records its subsample site (the full index range, which carries no density
    and which every ELBO drops), the first no more than the later ones."""
    with poutine.block():
        return pyro.plate(name, size, dim=dim)


def tasks_plate(num_tasks: int) -> pyro.plate:
    return full_plate("tasks", num_tasks, TASK_DIM)


def scaled(scale: float | Tensor) -> Any:  # noqa: ANN401 - a context manager
    """``poutine.scale(scale)``, or no messenger for a scale of 1: the same trace (a site's scale is 1
    by default), one handler fewer for every site inside."""
    return nullcontext() if isinstance(scale, (int, float)) and scale == 1 else poutine.scale(scale=scale)


def masked(mask: bool | Tensor) -> Any:  # noqa: ANN401 - a context manager
    """``poutine.mask(mask)``, or no messenger for ``mask=True`` (which masks nothing)."""
    return nullcontext() if mask is True else poutine.mask(mask=mask)


def conditioning_set(batch: TaskBatch, with_query: bool) -> tuple[Tensor, Tensor]:
    """``(x, y)`` a guide conditions on: the support set, or with ``with_query`` (a training-time guide
    of a joint objective, when the labels are there) support and query together, ``[T, S (+ Q), ...]``."""
    if with_query and batch.y_query is not None:
        return torch.cat([batch.x_support, batch.x_query], 1), torch.cat([batch.y_support, batch.y_query], 1)
    return batch.x_support, batch.y_support


def observe(name: str, likelihood: Likelihood, f: Tensor, y: Tensor | None, mean: bool = False) -> Tensor:
    """Observation site ``name``: ``y ~ likelihood(f)`` with one factor per point.

    :param f: network outputs ``[..., T, N, O]``; :param y: ``[T, N, O]`` / ``[T, N]`` or ``None``.
    :param mean: average over the ``N`` points instead of summing (MAML's mean-squared-error loss).
    """
    n = f.shape[-2]
    with full_plate(f"{name}_points", n, POINT_DIM), scaled(1.0 / n if mean else 1.0):
        return pyro.sample(name, likelihood(f), obs=y)


class WeightSpaceModel(nn.Module):
    """``phi_t ~ prior`` per task; ``y ~ p(y | net(phi_t, x))`` for the scored sets.

    Subclasses provide :meth:`phi_prior` (which may sample global sites first, e.g. a hyperprior).

    :param net: the functional task network.
    :param likelihood: the observation model.
    :param score: ``"query"`` (MAML: the outer loss scores the query set), ``"support+query"``
        (ABML: the ELBO of the whole task) or ``"support"`` (the support set's ELBO; the query labels
        are masked out of the objective). ``y_query`` is always a site, so prediction works.
    :param mean_over_points: average each set's log-likelihood over its points (MAML's MSE).
    :param kl_weight: scale on the ``phi`` site's prior and guide terms (1 = the exact ELBO).
    """

    def __init__(
        self,
        net: FunctionalNet,
        likelihood: Likelihood,
        score: str = "support+query",
        mean_over_points: bool = False,
        kl_weight: float = 1.0,
    ):
        super().__init__()
        if score not in SCORE_CHOICES:
            raise ValueError(f"score must be one of {SCORE_CHOICES}, got {score!r}")
        self.net, self.likelihood = net, likelihood
        self.score, self.mean_over_points, self.kl_weight = score, mean_over_points, kl_weight

    def phi_prior(self, batch: TaskBatch) -> dist.Distribution:
        """The prior over one task's flat weights: batch shape ``[..., 1, 1]`` or ``[]``, event ``[D]``."""
        raise NotImplementedError

    @property
    def per_task_weights(self) -> int:
        """Network weights each task draws per posterior draw (the evaluator's chunking reads it)."""
        return self.net.num_params

    def weights(self, phi: Tensor) -> Tensor:
        """The task network's full flat weights ``[..., D]`` from one task's latent ``phi [..., D_phi]``:
        ``phi`` itself here; a model whose latent is part of the weights (amortized VI's last layer) maps it."""
        return phi

    def forward(self, batch: TaskBatch) -> Tensor:
        prior = self.phi_prior(batch)
        with tasks_plate(batch.num_tasks):
            with scaled(self.kl_weight):
                phi = pyro.sample("phi", prior)  # [..., T, 1, D_phi]
            w = self.weights(phi.squeeze(TASK_DIM))  # ..., T, D
            if self.score != "query" and getattr(self.net, "batch_norm", "none") in ("none", "instance"):
                # one network pass over support and query together (only without batch statistics,
                # which must come from each set on its own or from the support set)
                s = batch.num_support
                f = self.net(w, torch.cat([batch.x_support, batch.x_query], dim=1))  # ..., T, S+Q, O
                observe("y_support", self.likelihood, f[..., :s, :], batch.y_support, self.mean_over_points)
                f_query = f[..., s:, :]
            elif self.score != "query":
                f_support = self.net(w, batch.x_support)  # ..., T, S, O
                observe("y_support", self.likelihood, f_support, batch.y_support, self.mean_over_points)
                f_query = call_net(self.net, w, batch.x_query, batch.x_support)
            else:
                f_query = call_net(self.net, w, batch.x_query, batch.x_support)
            with masked(self.score != "support"):
                observe("y_query", self.likelihood, f_query, batch.y_query, self.mean_over_points)
        return phi


def mlp(sizes: Sequence[int]) -> nn.Sequential:
    """Linear layers ``sizes[0] -> ... -> sizes[-1]`` with ReLU between them (none after the last)."""
    if len(sizes) < 2 or any(not (isinstance(s, int) and s >= 1) for s in sizes):
        raise ValueError(f"mlp sizes must be at least two positive integers, got {list(sizes)!r}")
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)
