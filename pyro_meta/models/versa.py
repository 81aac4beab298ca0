"""VERSA (Gordon, Bronskill, Bauer, Nowozin & Turner, "Meta-Learning Probabilistic Inference for
Prediction", ICLR 2019) as a Pyro model.

A shared feature extractor ``theta`` (a point estimate, a parameter of this module) maps every image
to ``F`` features. Each task ``t`` has, for each of its ``C`` classes, a linear classifier column
``psi_tc = (w_tc [F], b_tc)`` with the prior ``N(0, I)``::

    for each task t (plate "tasks", dim -2):
        for each class c (plate "classes", dim -1):
            psi_tc ~ N(0, prior_std^2 I)                        [T, C, F+1]   (site "psi")
        for each query point q (plate "y_query_points", dim -1):
            y_tq ~ Categorical(logits_tqc = h(x_tq; theta) . w_tc + b_tc)

The guide (:mod:`pyro_meta.guides.versa`) amortizes ``q(psi_tc | support of class c)``. The paper's
objective, ML-PIP, is :class:`pyro_meta.infer.losses.MLPIP`; it needs no prior. ``Trace_ELBO`` on this
model is the amortized-VI variant, for which the ``N(0, I)`` prior is the one the paper names.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn

from ..likelihoods import Categorical
from ..nn import FunctionalNet, call_net
from ..tasks import TaskBatch
from .base import TASK_DIM, full_plate, observe, tasks_plate

CLASS_DIM = -1  # the classes plate, nested inside the tasks plate (dim -2)


def num_classes(batch: TaskBatch) -> int:
    """``C`` of the tasks in ``batch``: the episode sampler's ``info["classes"] [T, C]`` when present,
    else one more than the largest support label."""
    classes = batch.info.get("classes")
    if classes is not None and classes.dim() == 2:
        return int(classes.shape[1])
    return int(batch.y_support.max()) + 1


def classes_plate(num: int) -> pyro.plate:
    return full_plate("classes", num, CLASS_DIM)


class VERSAModel(nn.Module):
    """:param features: the shared feature extractor (e.g. ``Conv4(out_dim=None)``); its weights
        ``theta`` are this module's parameter, initialized from ``init``.
    :param init: initial ``theta [D]``.
    :param prior_std: std of the ``N(0, prior_std^2 I)`` prior on each class's ``psi`` (used by the
        ELBO variant and by prior predictive checks; ML-PIP ignores it).
    """

    def __init__(self, features: FunctionalNet, init: Tensor, prior_std: float = 1.0):
        super().__init__()
        if not prior_std > 0:
            raise ValueError(f"prior_std must be positive, got {prior_std!r}")
        self.net = features  # named like the weight-space models' task net, for inspect/arviz
        self.theta = nn.Parameter(init.clone())
        self.likelihood = Categorical()
        self.prior_std = float(prior_std)
        self.feature_dim = int(features.output_dim)

    @property
    def psi_dim(self) -> int:
        return self.feature_dim + 1

    def features(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """``x [T, N, *image]`` -> ``[T, N, F]``; ``context``: the support images, whose statistics normalize
        ``x`` in the trunk's support-statistics modes (``"task"``: statistics per task and per set)."""
        return call_net(self.net, self.theta, x, context)

    def logits(self, h: Tensor, psi: Tensor) -> Tensor:
        """``h [T, Q, F]``, ``psi [..., T, C, F+1]`` -> logits ``[..., T, Q, C]``."""
        w, b = psi[..., :-1], psi[..., -1]
        return torch.einsum("tqf,...tcf->...tqc", h, w) + b.unsqueeze(-2)  # ..., T, Q, C

    def logit_moments(self, batch: TaskBatch, loc: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and variance of each query logit under ``psi ~ N(loc, scale^2)``, the local
        reparameterization (Kingma, Salimans & Welling 2015): ``a_tqc = h_tq . w_tc + b_tc`` is Gaussian
        with mean ``h . mu_w + mu_b`` and variance ``h^2 . sigma_w^2 + sigma_b^2``.

        ``loc, scale [T, C, F+1]`` -> ``(mean, var)``, each ``[T, Q, C]``."""
        h = self.features(batch.x_query, batch.x_support)  # T Q F
        mean = self.logits(h, loc)  # T Q C
        var = self.logits(h * h, scale * scale)  # T Q C
        return mean, var

    def site_coords(self, name: str) -> list[str] | None:
        """Readable coordinates of a latent site's event dim (the ArviZ export uses them)."""
        if name == "psi":
            return [f"w[{i}]" for i in range(self.feature_dim)] + ["b"]
        return None

    def forward(self, batch: TaskBatch) -> Tensor:
        c = num_classes(batch)
        h = self.features(batch.x_query, batch.x_support)  # T Q F
        zero = h.new_zeros(self.psi_dim)
        with tasks_plate(batch.num_tasks):
            with classes_plate(c):
                psi = pyro.sample("psi", dist.Normal(zero, self.prior_std).to_event(1))  # ..., T, C, F+1
            observe("y_query", self.likelihood, self.logits(h, psi), batch.y_query)
        return psi


__all__ = ["CLASS_DIM", "TASK_DIM", "VERSAModel", "classes_plate", "num_classes"]
