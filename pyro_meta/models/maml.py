"""MAML (Finn et al., 2017) as a Pyro model: per-task weights with a flat (improper) prior and the
query set's likelihood. With the Delta guide of :mod:`pyro_meta.guides.maml` and a Gaussian of
std ``1/sqrt(2)``, ``-ELBO`` per task is the query mean squared error plus a constant: MAML's loss."""

from __future__ import annotations

import math

import pyro.distributions as dist
from torch.distributions import constraints

from ..likelihoods import Likelihood
from ..nn import FunctionalNet
from ..tasks import TaskBatch
from .base import WeightSpaceModel

# -log N(y | f, 1/sqrt(2)) = (y - f)^2 + log(pi)/2: the per-point loss is MAML's squared error.
MSE_NOISE_STD = 1.0 / math.sqrt(2.0)


class MAMLModel(WeightSpaceModel):
    """:param net: task network; :param likelihood: Gaussian (regression) or Categorical."""

    def __init__(self, net: FunctionalNet, likelihood: Likelihood):
        super().__init__(net, likelihood, score="query", mean_over_points=True)

    def phi_prior(self, batch: TaskBatch) -> dist.Distribution:
        d = self.net.num_params
        return dist.ImproperUniform(constraints.real, (batch.num_tasks, 1), (d,))
