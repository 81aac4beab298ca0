"""PLATIPUS's guides (Finn, Xu & Levine, NeurIPS 2018).

- Training, :class:`PlatipusGuide`: ``q(theta | support, query) = N(mu - gamma_q grad_mu L(mu; query), v_q)``
  (``v_q`` a learned diagonal variance, ``gamma_q`` a learned step size). It reads the query labels by
  design: the ELBO's KL then pulls the support-conditioned prior ``p(theta | support)`` of
  :class:`~pyro_meta.models.PlatipusModel` towards where the query set says theta should be.
- Test, :class:`PlatipusPredictiveGuide`: ``theta ~ p(theta | support)``, the model's conditional prior
  itself (no query labels anywhere), declared as the learner's ``predictive_guide``.

Parameterizations: ``log v_q`` (log variance, clamped where exponentiated) and ``log gamma_q``, for the
reasons given in :mod:`pyro_meta.models.platipus`.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn

from ..models.base import tasks_plate
from ..models.platipus import PlatipusModel, positive
from ..tasks import TaskBatch


class PlatipusGuide(nn.Module):
    """:param model: the :class:`~pyro_meta.models.PlatipusModel` (its mu, net and likelihood).
    :param prior_init_std: q's initial std ``sqrt(v_q)`` (every weight); the model's sigma starts there
        too, so the KL starts from its mean term alone.
    :param gamma_init: the initial gamma_q.
    """

    def __init__(self, model: PlatipusModel, prior_init_std: float = 0.1, gamma_init: float = 0.01):
        super().__init__()
        for name, v in (("prior_init_std", prior_init_std), ("gamma_init", gamma_init)):
            if not (v > 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be a positive finite number, got {v!r}")
        # a reference, not a submodule: the model's parameters belong to the model alone
        object.__setattr__(self, "model", model)
        self.log_v_q = nn.Parameter(torch.full_like(model.mu.detach(), 2.0 * math.log(prior_init_std)))
        self.log_gamma_q = nn.Parameter(torch.tensor(math.log(gamma_init), dtype=model.mu.dtype))

    @property
    def q_std(self) -> Tensor:
        """``sqrt(v_q)`` ``[D]``."""
        return positive(0.5 * self.log_v_q)

    @property
    def gamma_q(self) -> Tensor:
        return positive(self.log_gamma_q)

    def forward(self, batch: TaskBatch) -> Tensor:
        if batch.y_query is None:
            raise ValueError("PLATIPUS's training guide q(theta | support, query) needs the query labels "
                             "(batch.y_query is None); to predict from the support set alone use "
                             "PlatipusPredictiveGuide (the learner's predictive_guide)")
        loc = self.model.gradient_step(batch.x_query, batch.y_query, self.gamma_q)  # T 1 D
        with tasks_plate(batch.num_tasks):
            return pyro.sample("theta", dist.Normal(loc, self.q_std).to_event(1))

    def prior_summary(self) -> dict[str, Tensor]:
        m = self.model
        return {"mu": m.mu.detach(), "sigma": m.sigma.detach(), "gamma_p": m.gamma_p.detach(),
                "gamma_q": self.gamma_q.detach(), "q_std": self.q_std.detach()}


class PlatipusPredictiveGuide(nn.Module):
    """``theta ~ p(theta | support)``: the model's conditional prior; never reads ``batch.y_query``.

    :param model: the :class:`~pyro_meta.models.PlatipusModel`. No parameters of its own.
    """

    def __init__(self, model: PlatipusModel):
        super().__init__()
        object.__setattr__(self, "model", model)

    def forward(self, batch: TaskBatch) -> Tensor:
        prior = self.model.conditional_prior(batch)
        with tasks_plate(batch.num_tasks):
            return pyro.sample("theta", prior)  # [..., T, 1, D]
