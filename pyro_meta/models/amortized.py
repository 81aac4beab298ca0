"""Amortized variational inference over the task network: the generative model.

``D_phi`` per-task weights: every weight of the task MLP (``amortize="all"``), or only the last
layer's weights and bias (``amortize="last"``; the hidden layers are then shared point estimates,
meta-parameters of this module)::

    for each task t (plate "tasks", dim -2):
        phi_t ~ N(mu, diag(sigma^2))                      [T, 1, D_phi]   (site "phi")
        y_t   ~ p(y | net(w(phi_t), x))                    on the scored sets

``(mu, sigma)`` is learned (``mu`` starts at the network's initial weights, ``sigma`` at
``prior_std``) or fixed at ``(0, prior_std)``. ``w(phi)`` is the full flat weight vector: ``phi``
itself, or the shared hidden weights followed by ``phi`` (an MLP's flat vector ends with its last
layer's weights and bias, :class:`pyro_meta.nn.MLP`).

Which sets are scored is ``objective`` (:data:`AMORTIZED_OBJECTIVES`): ``"joint"`` observes support
and query (the guide then conditions on both in training), ``"query"`` the query set only.
"""

from __future__ import annotations

import itertools
import math

import pyro.distributions as dist
import torch
from torch import Tensor, nn

from ..likelihoods import Likelihood
from ..nn import MLP, FunctionalNet
from ..tasks import TaskBatch
from .base import WeightSpaceModel

AMORTIZED_OBJECTIVES = ("joint", "query")
AMORTIZE_CHOICES = ("all", "last")
_SCORED = {"joint": "support+query", "query": "query"}
LOG_STD_MIN, LOG_STD_MAX = -15.0, 5.0  # where the prior's log std is exponentiated


class AmortizedModel(WeightSpaceModel):
    """:param net: the task network, with flat inputs (an :class:`~pyro_meta.nn.MLP` for ``amortize="last"``);
    :param likelihood: observation model;
    :param init: the network's initial flat weights ``[D]`` (the learned prior's initial mean and the
        shared hidden weights' initial value).
    :param prior_std: the prior std (initial value when ``learned_prior``).
    :param learned_prior: learn the prior's mean and log std; else ``N(0, prior_std^2)``.
    :param amortize: ``"all"`` or ``"last"`` (:data:`AMORTIZE_CHOICES`).
    :param objective: one of :data:`AMORTIZED_OBJECTIVES` (the guide must use the same).
    """

    def __init__(self, net: FunctionalNet, likelihood: Likelihood, init: Tensor, prior_std: float = 0.1,
                 learned_prior: bool = True, amortize: str = "all", objective: str = "joint"):
        if objective not in AMORTIZED_OBJECTIVES:
            raise ValueError(f"objective must be one of {AMORTIZED_OBJECTIVES}, got {objective!r}")
        if amortize not in AMORTIZE_CHOICES:
            raise ValueError(f"amortize must be one of {AMORTIZE_CHOICES}, got {amortize!r}")
        if not prior_std > 0:
            raise ValueError(f"prior_std must be positive, got {prior_std!r}")
        if amortize == "last" and not isinstance(net, MLP):
            raise ValueError("amortize='last' needs an MLP (its flat weights end with the last layer)")
        super().__init__(net, likelihood, score=_SCORED[objective])
        self.objective, self.amortize, self.learned_prior = objective, amortize, learned_prior
        self.phi_dim = self._last_layer_size() if amortize == "last" else net.num_params
        shared = net.num_params - self.phi_dim
        # the shared hidden weights (amortize="last"): a meta-learned point estimate
        self.shared = nn.Parameter(init[:shared].clone()) if shared else None
        if learned_prior:
            self.prior_loc = nn.Parameter(init[shared:].clone())
            self.prior_log_std = nn.Parameter(torch.full((self.phi_dim,), math.log(prior_std)))
        else:
            self.prior_std = float(prior_std)

    def _last_layer_size(self) -> int:
        last = len(self.net.sizes) - 2
        return self.net.num_params - self.net.spec.offsets[f"w{last}"][0]

    def prior_params(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """``(loc, log_std)`` of the prior, ``[D_phi]`` each."""
        if self.learned_prior:
            return self.prior_loc, self.prior_log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)
        z = like.new_zeros(self.phi_dim)
        return z, z + math.log(self.prior_std)

    def phi_prior(self, batch: TaskBatch) -> dist.Distribution:
        loc, log_std = self.prior_params(batch.x_support)
        return dist.Normal(loc, log_std.exp()).to_event(1)  # batch shape [], broadcast over the plates

    def weights(self, phi: Tensor) -> Tensor:
        """The full flat weights ``[..., D]`` of per-task weights ``phi [..., D_phi]`` (the shared hidden
        weights first with ``amortize="last"``); :meth:`WeightSpaceModel.forward` runs the net on them."""
        if self.shared is None:
            return phi
        shared = self.shared.expand(*phi.shape[:-1], self.shared.shape[-1])  # ..., D - D_phi
        return torch.cat([shared, phi], dim=-1)  # ..., D

    def site_coords(self, name: str) -> list[str] | None:
        """Names of ``phi``'s coordinates with ``amortize="last"`` (the ArviZ export uses them)."""
        if name != "phi" or self.shared is None:
            return None
        names = []
        for key, shape in self.net.spec.shapes.items():
            if self.net.spec.offsets[key][0] >= self.shared.shape[-1]:
                names += [f"{key}[{','.join(map(str, i))}]" for i in itertools.product(*map(range, shape))]
        return names
