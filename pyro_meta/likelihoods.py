"""Observation models p(y | f): network outputs ``f [..., T, N, O]`` -> a distribution with batch
shape ``[..., T, N]`` (one factor per data point, so Pyro's plates and per-point log-likelihoods line up)."""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .distributions import HALF_LOG_2PI


def _inv_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


class Likelihood(nn.Module):
    """Base class: ``forward(f)`` returns ``p(y | f)`` with batch shape ``f.shape[:-1]``."""

    def forward(self, f: Tensor) -> dist.Distribution:  # pragma: no cover - interface
        raise NotImplementedError

    def point_loss(self, f: Tensor, y: Tensor) -> Tensor:
        """``-log p(y | f)`` per point: ``[..., T, N]``."""
        return -self(f).log_prob(y)

    def describe(self) -> dict:
        raise NotImplementedError


def _gaussian_nll(f: Tensor, y: Tensor, sigma: Tensor | float, sign: float = 1.0) -> Tensor:
    """``-log N(y | f, sigma^2 I)`` over the last dim (``sign=-1``: the log density): the squared error
    first, then one scale and one shift, the sign folded into both (the fewest graph nodes: this runs in
    every inner step and in every observation site)."""
    d = y - f
    sq = (d * d).sum(-1)
    log_sigma = torch.log(sigma) if isinstance(sigma, Tensor) else math.log(sigma)
    return sq * (sign * 0.5 / (sigma * sigma)) + sign * f.shape[-1] * (log_sigma + HALF_LOG_2PI)


class PointNormal(dist.Normal):
    """``y ~ N(f, sigma^2 I_O)`` per data point: the law of ``dist.Normal(f, sigma).to_event(1)`` with the
    ``O`` outputs as one event, for the observation sites that every meta-training step visits.

    It is a :class:`~pyro.distributions.Normal` (``loc``, ``scale``, ``mean``, ``stddev``, sampling work as
    there, with ``scale`` expanded to ``loc``'s shape) built without broadcasting or argument checks; its
    ``expand`` to its own batch shape returns itself (Pyro's plates expand every site's distribution), and
    its ``log_prob`` sums the closed form over the event.

    :param loc: ``f [..., N, O]``; :param sigma: the noise std, a float or a 0-dim tensor.
    """

    def __init__(self, loc: Tensor, sigma: Tensor | float):
        self.loc, self.sigma = loc, sigma
        torch.distributions.Distribution.__init__(self, loc.shape[:-1], loc.shape[-1:], validate_args=False)

    @property
    def scale(self) -> Tensor:  # type: ignore[override]
        s = self.sigma
        return s.expand(self.loc.shape) if isinstance(s, Tensor) else self.loc.new_full(self.loc.shape, s)

    @property
    def support(self):  # type: ignore[override]
        return torch.distributions.constraints.independent(torch.distributions.constraints.real, 1)

    def expand(self, batch_shape, _instance=None) -> PointNormal:  # type: ignore[override]
        batch_shape = torch.Size(batch_shape)
        if batch_shape == self.batch_shape:
            return self
        return PointNormal(self.loc.expand(batch_shape + self.event_shape), self.sigma)

    def log_prob(self, value: Tensor) -> Tensor:
        return _gaussian_nll(self.loc, value, self.sigma, sign=-1.0)

    def entropy(self) -> Tensor:
        return super().entropy().sum(-1)


class Gaussian(Likelihood):
    """``y ~ Normal(f, sigma)`` over ``O`` outputs (an event of size ``O``).

    :param noise_std: the fixed noise std, or the initial one when ``learn_noise``.
    :param learn_noise: make sigma a meta-parameter, ``sigma = softplus(r) + min_noise`` so it is
        always positive and never reaches zero.
    :param min_noise: the floor of a learned sigma.
    """

    def __init__(self, noise_std: float = 1.0, learn_noise: bool = False, min_noise: float = 1e-3):
        super().__init__()
        if not noise_std > 0 or not math.isfinite(noise_std):
            raise ValueError(f"noise_std must be a positive finite number, got {noise_std!r}")
        self.learn_noise, self.min_noise = learn_noise, min_noise
        if learn_noise:
            if noise_std <= min_noise:
                raise ValueError(f"initial noise_std {noise_std} must exceed min_noise {min_noise}")
            self.raw_noise = nn.Parameter(torch.tensor(_inv_softplus(noise_std - min_noise)))
        else:
            # a Python float, not a float32 buffer: exact in float64 too (1/sqrt(2) for MAML's MSE)
            self.fixed_noise = float(noise_std)

    @property
    def noise_std(self) -> Tensor:
        """sigma as a 0-dim tensor (float64 when fixed, so 1/sqrt(2) stays exact)."""
        s = self._sigma()
        return s if isinstance(s, Tensor) else torch.tensor(s, dtype=torch.float64)

    def _sigma(self) -> Tensor | float:
        if self.learn_noise:
            return F.softplus(self.raw_noise) + self.min_noise
        return self.fixed_noise

    def forward(self, f: Tensor) -> dist.Distribution:
        sigma = self._sigma()
        return PointNormal(f, sigma.to(f.dtype) if isinstance(sigma, Tensor) else sigma)

    def point_loss(self, f: Tensor, y: Tensor) -> Tensor:
        """``-log N(y | f, sigma)`` summed over outputs, in closed form (no distribution object:
        this runs K times per step inside inner loops)."""
        return _gaussian_nll(f, y, self._sigma())

    def describe(self) -> dict:
        return {"type": "gaussian", "noise_std": float(self.noise_std),
                "learn_noise": self.learn_noise, "min_noise": self.min_noise if self.learn_noise else None}


class Categorical(Likelihood):
    """``y ~ Categorical(logits=f)``; ``f [..., T, N, C]``, labels ``[T, N]``."""

    def forward(self, f: Tensor) -> dist.Distribution:
        return dist.Categorical(logits=f)

    def point_loss(self, f: Tensor, y: Tensor) -> Tensor:
        """``-log softmax(f)[y]`` per point, ``[..., T, N]``, without a distribution object (inner loops)."""
        logp = torch.log_softmax(f, dim=-1)  # ..., T, N, C
        idx = y.expand(logp.shape[:-1]).unsqueeze(-1)  # ..., T, N, 1
        return -logp.gather(-1, idx).squeeze(-1)

    def describe(self) -> dict:
        return {"type": "categorical"}


def make_likelihood(spec: dict) -> Likelihood:
    """Build from a ``describe()``-style dict (used when a run is reloaded)."""
    kind = spec.get("type")
    if kind == "gaussian":
        return Gaussian(spec["noise_std"], spec.get("learn_noise", False), spec.get("min_noise") or 1e-3)
    if kind == "categorical":
        return Categorical()
    raise ValueError(f"unknown likelihood {kind!r}; known: gaussian, categorical")
