"""VERSA's guide (Gordon et al., ICLR 2019): an amortization network, applied to each class on its own,
maps the mean-pooled features of that class's support images to a Gaussian over the class's linear
classifier column ``psi_tc = (w_tc, b_tc)``.

    pooled_tc = mean of h(x; theta) over the support points of class c        [T, C, F]
    z_tc      = ELU(Linear(ELU(Linear(ELU(Linear(pooled_tc))))))                 (``hidden`` widths)
    q(w_tc)   = N(W_mu z + a_mu,  exp(W_lv z + a_lv)^(1/2))                      [F] each
    q(b_tc)   = N(V_mu z + c_mu,  exp(V_lv z + c_lv)^(1/2))                      [1] each

Mean pooling makes ``q`` invariant to the order of the support set and lets one network serve any
number of shots; applying it per class makes it serve any number of ways.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.base import tasks_plate
from ..models.versa import VERSAModel, classes_plate, num_classes
from ..tasks import TaskBatch

# log-variances are clamped where exponentiated: a std in [e^-10, e^5] (keeps an untrained network
# from producing a zero or overflowing variance; the bounds were never reached in our runs)
LOGVAR_MIN, LOGVAR_MAX = -20.0, 10.0


def class_means(h: Tensor, y: Tensor, num: int) -> Tensor:
    """Mean of the features of each class: ``h [T, S, F]``, labels ``y [T, S]`` -> ``[T, C, F]``.
    A class with no support point gets zeros (never the case for episodes from the sampler)."""
    onehot = F.one_hot(y, num).to(h.dtype)  # T S C
    counts = onehot.sum(1).clamp(min=1.0)  # T C
    return torch.einsum("tsc,tsf->tcf", onehot, h) / counts.unsqueeze(-1)  # T C F


class VERSAGuide(nn.Module):
    """:param model: the :class:`~pyro_meta.models.versa.VERSAModel` (its feature extractor is shared).
    :param hidden: widths of the amortization network's ELU layers (the paper: three of 256).
    """

    def __init__(self, model: VERSAModel, hidden: Sequence[int] = (256, 256, 256)):
        super().__init__()
        hidden = [int(h) for h in hidden]
        if not hidden or min(hidden) < 1:
            raise ValueError(f"hidden must be a non-empty list of positive widths, got {hidden}")
        # a reference, not a submodule: theta belongs to the model alone
        object.__setattr__(self, "model", model)
        f = model.feature_dim
        widths = [f, *hidden]
        self.trunk = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.w_mean = nn.Linear(widths[-1], f)
        self.w_logvar = nn.Linear(widths[-1], f)
        self.b_mean = nn.Linear(widths[-1], 1)
        self.b_logvar = nn.Linear(widths[-1], 1)

    def posterior(self, batch: TaskBatch) -> tuple[Tensor, Tensor]:
        """``(loc, scale)`` of ``q(psi_tc)``, each ``[T, C, F+1]`` (weights first, bias last)."""
        c = num_classes(batch)
        h = self.model.features(batch.x_support)  # T S F
        z = class_means(h, batch.y_support, c)  # T C F
        for layer in self.trunk:
            z = F.elu(layer(z))  # T C H
        loc = torch.cat([self.w_mean(z), self.b_mean(z)], dim=-1)  # T C F+1
        logvar = torch.cat([self.w_logvar(z), self.b_logvar(z)], dim=-1).clamp(LOGVAR_MIN, LOGVAR_MAX)
        return loc, torch.exp(0.5 * logvar)

    def forward(self, batch: TaskBatch) -> Tensor:
        loc, scale = self.posterior(batch)
        with tasks_plate(batch.num_tasks), classes_plate(loc.shape[-2]):
            return pyro.sample("psi", dist.Normal(loc, scale).to_event(1))  # ..., T, C, F+1
