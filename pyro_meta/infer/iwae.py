"""The importance-weighted bound (IWAE, Burda, Grosse & Salakhutdinov 2016) as a differentiable Pyro loss.

Pyro's :class:`~pyro.infer.RenyiELBO` at ``alpha=0`` computes this bound's value (``loss``) and steps an
optimizer through ``loss_and_grads``, but it has no ``differentiable_loss``: it calls ``backward`` itself,
and only when the trace holds ``pyro.param`` sites, which a plain ``nn.Module`` (the VAE) never has. :class:`ImportanceWeightedELBO` reuses RenyiELBO's vectorized traces (so it draws exactly the
samples RenyiELBO draws with the same seed; ``tests/test_vae.py`` checks the values agree) and returns

    L_k = sum_n log (1/k) sum_j p(x_n, z_nj) / q(z_nj | x_n),   z_nj ~ q(. | x_n)

as a tensor, with the reparameterized gradient (the normalized weights times the gradient of each log
weight, which is what RenyiELBO's surrogate gives). One term per element of the plates that every site
shares (the data plate): the bound is per data point, and the loss is the negative sum over them.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pyro.infer import RenyiELBO
from pyro.infer.util import get_dependent_plate_dims, torch_sum
from torch import Tensor


class ImportanceWeightedELBO(RenyiELBO):
    """``-L_k``, differentiable; ``k = num_particles`` (1: the ordinary single-sample ELBO).

    :param num_particles: importance samples per data point, drawn at once (vectorized) in a plate at
        ``dim = -max_plate_nesting - 1``.
    :param max_plate_nesting: plates in the model (the VAE: 1, the images).

    Do not wrap the model in ``poutine.scale``: a scale multiplies every log weight, and the bound is
    not linear in them. Divide the loss instead.
    """

    def __init__(self, num_particles: int = 5, max_plate_nesting: int = 1):
        if not isinstance(num_particles, int) or isinstance(num_particles, bool) or num_particles < 1:
            raise ValueError(f"num_particles must be a positive integer, got {num_particles!r}")
        super().__init__(alpha=0.0, num_particles=num_particles, max_plate_nesting=max_plate_nesting,
                         vectorize_particles=True)

    def log_weights(self, model: Any, guide: Any, *args: Any, **kwargs: Any) -> Tensor:
        """``log p(x, z_j) - log q(z_j | x)``: ``[k, *shared plates]`` (the VAE: ``[k, images]``)."""
        total = None
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            sum_dims = get_dependent_plate_dims(model_trace.nodes.values())
            for sign, trace in ((1.0, model_trace), (-1.0, guide_trace)):
                for site in trace.nodes.values():
                    if site["type"] != "sample":
                        continue
                    if trace is guide_trace and not getattr(site["fn"], "has_rsample", False):
                        raise NotImplementedError(
                            f"ImportanceWeightedELBO needs reparameterized guide sites; {site['name']!r} "
                            "cannot be reparameterized")
                    term = sign * torch_sum(site["log_prob"], sum_dims)
                    total = term if total is None else total + term
        if total is None:
            raise ValueError("the model and guide have no sample sites")
        if self.num_particles == 1:  # no particle plate was added: make the particle dim explicit
            total = total.unsqueeze(0)
        return total

    def bound(self, model: Any, guide: Any, *args: Any, **kwargs: Any) -> Tensor:
        """``L_k`` per element of the shared plates (the VAE: ``[images]``)."""
        lw = self.log_weights(model, guide, *args, **kwargs)
        return torch.logsumexp(lw, dim=0) - math.log(lw.shape[0])

    def differentiable_loss(self, model: Any, guide: Any, *args: Any, **kwargs: Any) -> Tensor:
        return -self.bound(model, guide, *args, **kwargs).sum()

    def loss(self, model: Any, guide: Any, *args: Any, **kwargs: Any) -> float:
        with torch.no_grad():
            return float(self.differentiable_loss(model, guide, *args, **kwargs))


def bounds_from_log_weights(log_w: Tensor, ks: tuple[int, ...]) -> dict[int, Tensor]:
    """Unbiased estimates of ``E[L_k]`` per data point from ``K`` log weights ``[K, N]``: for each ``k``
    dividing ``K``, the mean over the ``K / k`` disjoint groups of ``k`` of their log-mean-exp. ``k = 1`` is
    the ELBO's estimate (the mean log weight); ``k = K`` is the single tightest bound."""
    K = log_w.shape[0]
    out = {}
    for k in ks:
        if K % k:
            raise ValueError(f"k = {k} does not divide the {K} log weights")
        groups = log_w.reshape(K // k, k, *log_w.shape[1:])
        out[k] = (torch.logsumexp(groups, dim=1) - math.log(k)).mean(0)
    return out
