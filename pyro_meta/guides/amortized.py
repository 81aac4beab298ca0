"""Amortized variational inference over the task network: the guide, an encoder of the task's set of
``(x, y)`` pairs that outputs a Gaussian over the per-task weights ``phi`` (all of the task MLP's
weights, or its last layer's)::

    h_i   = MLP(concat(x_i, y_i))                         per pair,    [T, N, H]  (``hidden`` widths)
    z     = ReLU(Linear(mean_i h_i))                      pooled,      [T, H]
    loc   = mu_p + Linear_loc(z)                                       [T, 1, D_phi]
    std   = sigma_p / sqrt(1 + N * softplus(Linear_prec(z)))           [T, 1, D_phi]
    q(phi_t) = N(loc, std^2)                               site "phi" in the tasks plate

``(mu_p, sigma_p)`` is the model's prior. Mean pooling makes q invariant to the order of the pairs and
lets one encoder serve any number of points. The set size ``N`` enters the precision: q's precision is
the prior's plus ``N`` times a per-point precision (relative to the prior's) that the encoder
predicts, the form of a conjugate Gaussian posterior. So q sharpens as points are added, even at a
set size never seen in training (objective ``"joint"`` trains on ``S + Q`` points and predicts from
``S``), and it is never wider than the prior.

Initialization: ``Linear_loc`` has small weights and a bias that puts q's mean at the network's
initial weights (the learned prior's initial mean; under a fixed ``N(0, s^2)`` prior the bias holds
them, so q does not start at an all-zero network); the per-point precision starts at 1
(``std = sigma_p / sqrt(1 + N)``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.amortized import LOG_STD_MIN, AmortizedModel
from ..models.base import conditioning_set, tasks_plate
from ..tasks import TaskBatch

HEAD_INIT_SCALE = 0.1  # the output heads' initial weights, times torch's default initialization
INIT_POINT_PRECISION = 1.0  # each point's initial precision contribution, in units of the prior's


class AmortizedGuide(nn.Module):
    """:param model: the :class:`~pyro_meta.models.amortized.AmortizedModel` (its prior and net).
    :param init: the network's initial flat weights ``[D]``: q's initial mean is their ``phi`` part.
    :param hidden: widths of the per-pair ReLU layers; the pooled layer has the last width.
    :param objective: ``"joint"``: in training (``self.training`` and query labels given) q conditions on
        support + query; otherwise (and always at evaluation) on the support set alone.
    """

    def __init__(self, model: AmortizedModel, init: Tensor, hidden: Sequence[int] = (128, 128),
                 objective: str = "joint"):
        super().__init__()
        hidden = [int(h) for h in hidden]
        if not hidden or min(hidden) < 1:
            raise ValueError(f"hidden must be a non-empty list of positive widths, got {hidden}")
        # a reference, not a submodule: the prior and the shared weights belong to the model alone
        object.__setattr__(self, "model", model)
        self.objective = objective
        net = model.net
        widths = [net.input_shape[0] + net.output_dim, *hidden]  # input: x features and y outputs
        self.pair = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.pooled = nn.Linear(widths[-1], widths[-1])
        self.loc_head = nn.Linear(widths[-1], model.phi_dim)
        self.prec_head = nn.Linear(widths[-1], model.phi_dim)
        with torch.no_grad():
            init_phi = init[init.shape[-1] - model.phi_dim:]
            prior_loc, _ = model.prior_params(init_phi)
            self.loc_head.weight.mul_(HEAD_INIT_SCALE)
            self.loc_head.bias.copy_(init_phi - prior_loc)
            self.prec_head.weight.mul_(HEAD_INIT_SCALE)
            self.prec_head.bias.fill_(math.log(math.expm1(INIT_POINT_PRECISION)))  # softplus^-1

    def conditioning_set(self, batch: TaskBatch) -> tuple[Tensor, Tensor]:
        """``(x, y)`` that q conditions on: the support set; with objective ``"joint"`` in training, support
        and query together."""
        return conditioning_set(batch, self.objective == "joint" and self.training)

    def posterior(self, batch: TaskBatch) -> tuple[Tensor, Tensor]:
        """``(loc, scale)`` of each task's q, ``[T, 1, D_phi]`` each."""
        x, y = self.conditioning_set(batch)
        h = torch.cat([x, y], dim=-1)  # T N F+O
        for layer in self.pair:
            h = F.relu(layer(h))  # T N H
        z = F.relu(self.pooled(h.mean(-2)))  # T H
        prior_loc, prior_log_std = self.model.prior_params(z)
        loc = prior_loc + self.loc_head(z)  # T D_phi
        rel_precision = 1.0 + x.shape[-2] * F.softplus(self.prec_head(z))  # T D_phi, >= 1
        log_std = (prior_log_std - 0.5 * torch.log(rel_precision)).clamp(min=LOG_STD_MIN)
        return loc.unsqueeze(-2), log_std.exp().unsqueeze(-2)  # T 1 D_phi

    def forward(self, batch: TaskBatch) -> Tensor:
        loc, scale = self.posterior(batch)
        with tasks_plate(batch.num_tasks):
            return pyro.sample("phi", dist.Normal(loc, scale).to_event(1))  # ..., T, 1, D_phi
