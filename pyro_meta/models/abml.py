"""ABML (Ravi & Beatson, ICLR 2019) generative model.

Hierarchy (``D`` weights of the task network)::

    mu_theta  ~ N(0, 1)            [D]   hyperprior on the prior means      (site "prior_loc")
    tau_theta ~ Gamma(1, 0.01)     [D]   hyperprior on the prior precisions (site "prior_precision")
    for each task t (plate "tasks"):
        phi_t ~ N(mu_theta, tau_theta^{-1/2})            [T, 1, D]
        y_t   ~ p(y | net(phi_t, x))  on support and query

Which sets the training objective scores is ``objective`` (:data:`ABML_OBJECTIVES`): the paper's
(support + query under a support-only q), ``"support"`` or ``"joint"`` (the guide conditions on both
sets in training); see :mod:`pyro_meta.methods.abml` for what each optimizes.

theta = (mu_theta, tau_theta) is a MAP estimate (Delta guide sites in :mod:`pyro_meta.guides.abml`).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

from ..distributions import PrecisionNormal
from ..likelihoods import Likelihood
from ..nn import FunctionalNet
from ..tasks import TaskBatch
from .base import WeightSpaceModel, scaled

HYPER_LOC_STD = 1.0
GAMMA_CONCENTRATION = 1.0
GAMMA_RATE = 0.01
# objective -> the sets the model scores in training
ABML_OBJECTIVES = ("paper", "support", "joint", "predictive")
# "predictive": the ELBO scores the support; PredictiveELBO adds the query's log predictive itself
_SCORED = {"paper": "support+query", "support": "support", "joint": "support+query", "predictive": "support"}


class ABMLModel(WeightSpaceModel):
    """:param net: task network; :param likelihood: observation model;
    :param kl_weight: weight of the outer KL term (1 = the paper's ELBO);
    :param objective: one of :data:`ABML_OBJECTIVES` (the guide must use the same).
    :param hyperprior_weight: ``w``, the scale of ``log p(theta)`` in one meta-batch's objective (which is
        divided by the ``T`` tasks with the rest). ``1`` counts the hyperprior once per meta-batch, as if
        the ``T`` tasks were the whole data set; the whole-data objective ``sum_t ELBO_t + log p(theta)``
        over ``M`` training tasks needs ``w = T / M`` (``1 / steps`` for a stream that draws
        ``T x steps`` tasks)."""

    def __init__(self, net: FunctionalNet, likelihood: Likelihood, kl_weight: float = 1.0, objective: str = "paper",
                 hyperprior_weight: float = 1.0):
        if objective not in ABML_OBJECTIVES:
            raise ValueError(f"objective must be one of {ABML_OBJECTIVES}, got {objective!r}")
        super().__init__(net, likelihood, score=_SCORED[objective], kl_weight=kl_weight)
        self.objective, self.hyperprior_weight = objective, hyperprior_weight
        self._hyperprior: dict = {}

    def hyperprior(self, like: torch.Tensor) -> tuple[dist.Distribution, dist.Distribution]:
        """``(p(mu_theta), p(tau_theta))``, built once per dtype and device (they have no parameters)."""
        key = (like.dtype, like.device)
        if key not in self._hyperprior:
            z = like.new_zeros(self.net.num_params)
            self._hyperprior[key] = (dist.Normal(z, HYPER_LOC_STD).to_event(1),
                                     dist.Gamma(z + GAMMA_CONCENTRATION, z + GAMMA_RATE).to_event(1))
        return self._hyperprior[key]

    def phi_prior(self, batch: TaskBatch) -> dist.Distribution:
        loc_prior, prec_prior = self.hyperprior(batch.x_support)
        with scaled(self.hyperprior_weight):
            loc = pyro.sample("prior_loc", loc_prior)  # [..., D]
            precision = pyro.sample("prior_precision", prec_prior)  # [..., D]
        # batch shape [] (or [S, 1, 1] under an outer samples plate) broadcasts over the tasks plate
        return PrecisionNormal(loc, precision).to_event(1)
