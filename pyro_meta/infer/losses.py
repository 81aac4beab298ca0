"""Objectives that are not a plain ELBO, with Pyro's ``differentiable_loss(model, guide, *args)``
interface so :class:`~pyro_meta.learner.MetaLearner` and the trainer use them like ``Trace_ELBO``."""

from __future__ import annotations

import math
from typing import Any

import pyro
import torch
from pyro import poutine
from torch import Tensor

QUERY_SITE = "y_query"
PARTICLES_DIM = -3  # left of the tasks (-2) and points / classes (-1) plates


def log_mean_exp(log_p: Tensor, dim: int = 0) -> Tensor:
    """``log( (1/L) sum_l exp(log_p_l) )`` along ``dim``, stably."""
    return torch.logsumexp(log_p, dim=dim) - math.log(log_p.shape[dim])


def _per_task_mean(lme: Tensor) -> Tensor:
    """``[..., T, Q]`` -> mean over query points, ``[..., T]``."""
    return lme.mean(-1)


class _Objective:
    """What the objectives here share with Pyro's ELBOs besides ``differentiable_loss``: ``loss``, the value
    without a graph."""

    def differentiable_loss(self, model: Any, guide: Any, batch: Any) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def loss(self, model: Any, guide: Any, batch: Any) -> float:
        with torch.no_grad():
            return float(self.differentiable_loss(model, guide, batch))


class MLPIP(_Objective):
    """VERSA's ML-PIP objective (Gordon et al., ICLR 2019, eq. 4): for each task, the average over its
    query points of the log of the Monte Carlo predictive,

        L_t = (1/Q) sum_q log( (1/L) sum_l p(y_tq | x_tq, psi_l) ),   psi_l ~ q(psi | support_t),

    averaged over tasks; the loss is ``-L``. There is no KL term and no prior.

    :param num_samples: ``L`` (the paper: 10).
    :param local_reparam: sample the logits instead of the weights (the paper's estimator): each query
        point gets its own draws of ``a = h . w + b`` from the Gaussian that ``q(psi)`` induces, via the
        model's ``logit_moments(batch, loc, scale)`` and the guide's Normal site ``psi``. ``False``, or a
        model without ``logit_moments``, draws ``L`` weight samples for the whole task instead (one
        vectorized ``plate("particles", L)`` around guide and model), which works for any model whose
        query site is ``"y_query"``.

    The task weighting follows the trainer's ``poutine.scale(1/T)``: the loss of a meta-batch is the
    mean of ``-L_t`` over its tasks.
    """

    def __init__(self, num_samples: int = 10, local_reparam: bool = True, site: str = "psi"):
        if not (isinstance(num_samples, int) and num_samples >= 1):
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        self.num_samples, self.local_reparam, self.site = num_samples, local_reparam, site

    # -------------------------------------------------------------- estimators
    def _local_reparam(self, model: Any, guide: Any, batch: Any) -> Tensor:
        guide_tr = poutine.trace(guide).get_trace(batch)
        node = guide_tr.nodes.get(self.site)
        if node is None:
            raise ValueError(f"local reparameterization needs a guide site named {self.site!r}")
        base = node["fn"]
        while isinstance(base, torch.distributions.Independent):
            base = base.base_dist
        if not isinstance(base, torch.distributions.Normal):
            raise ValueError(f"local reparameterization needs a Normal guide at {self.site!r}, got "
                             f"{type(base).__name__}")
        mean, var = model.logit_moments(batch, base.loc, base.scale)  # T Q C
        eps = torch.randn((self.num_samples,) + mean.shape, dtype=mean.dtype, device=mean.device)  # L T Q C
        logits = mean + var.sqrt() * eps  # L T Q C
        logp = torch.log_softmax(logits, -1)
        y = batch.y_query.expand(logits.shape[:-1]).unsqueeze(-1)  # L T Q 1
        log_lik = logp.gather(-1, y).squeeze(-1)  # L T Q
        per_task = _per_task_mean(log_mean_exp(log_lik, 0))  # T
        return -(node["scale"] * per_task).sum()

    def _weight_samples(self, model: Any, guide: Any, batch: Any) -> Tensor:
        with pyro.plate("particles", self.num_samples, dim=PARTICLES_DIM):
            guide_tr = poutine.trace(guide).get_trace(batch)
            model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(batch)
        if QUERY_SITE not in model_tr.nodes:
            raise ValueError(f"ML-PIP scores the model's {QUERY_SITE!r} site; the model has none")
        site = model_tr.nodes[QUERY_SITE]
        log_lik = site["fn"].log_prob(site["value"])  # L T Q (or 1 T Q when no latent depends on L)
        log_lik = log_lik.expand((self.num_samples,) + log_lik.shape[1:])
        per_task = _per_task_mean(log_mean_exp(log_lik, 0))  # T
        return -(site["scale"] * per_task).sum()

    def differentiable_loss(self, model: Any, guide: Any, batch: Any) -> Tensor:
        if batch.y_query is None:
            raise ValueError("ML-PIP needs query labels; this TaskBatch has y_query=None")
        if self.local_reparam and hasattr(model, "logit_moments"):
            return self._local_reparam(model, guide, batch)
        return self._weight_samples(model, guide, batch)

    def __repr__(self) -> str:
        return f"MLPIP(num_samples={self.num_samples}, local_reparam={self.local_reparam})"


class PredictiveELBO(_Objective):
    """The ELBO of the support set plus the log posterior-predictive density of the query set:

        L_t = E_q[log p(y_s | phi) + log p(phi | theta) - log q(phi)]
              + log( (1/L) sum_l prod_q p(y_tq | x_tq, phi_l) ),      phi_l ~ q(phi | support_t),

    averaged over tasks, plus ``log p(theta)`` once per meta-batch; the loss is ``-L``. With the exact
    posterior as ``q`` and ``L -> inf`` this is ``log p(y_s | theta) + log p(y_q | y_s, theta) =
    log p(D_t | theta)``, so, unlike scoring ``E_q[log p(y_q | phi)]``, its optimum over the prior is the
    empirical-Bayes one; and it trains exactly the path that predicts at test (q from the support set).
    It is ABML's objective ``"predictive"`` (this library's; not the paper's).

    The model must observe the support at an ELBO-scored site and have ``y_query`` as a site that the
    ELBO does not score (a ``WeightSpaceModel`` with ``score="support"`` masks it); the query term is
    computed here from that site's distribution. One vectorized ``plate("particles", L, dim=-3)`` runs
    guide and model once for both terms.

    :param num_samples: ``L`` (the ELBO term is the average over the same ``L`` draws).
    """

    def __init__(self, num_samples: int = 10):
        if not (isinstance(num_samples, int) and num_samples >= 1):
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        self.num_samples = num_samples

    def differentiable_loss(self, model: Any, guide: Any, batch: Any) -> Tensor:
        if batch.y_query is None:
            raise ValueError("the predictive objective scores the query labels; this TaskBatch has y_query=None")
        with pyro.plate("particles", self.num_samples, dim=PARTICLES_DIM):
            guide_tr = poutine.trace(guide).get_trace(batch)
            model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(batch)
        if QUERY_SITE not in model_tr.nodes:
            raise ValueError(f"the predictive objective scores the model's {QUERY_SITE!r} site; the model has none")
        model_tr.compute_log_prob()
        guide_tr.compute_log_prob()
        elbo = 0.0
        for name, site in model_tr.nodes.items():
            if site["type"] == "sample" and name != QUERY_SITE:
                elbo = elbo + site["log_prob_sum"]
        for site in guide_tr.nodes.values():
            if site["type"] == "sample" and not site["is_observed"]:
                elbo = elbo - site["log_prob_sum"]
        elbo = elbo / self.num_samples  # the particles plate sums over the L draws
        site = model_tr.nodes[QUERY_SITE]
        log_lik = site["fn"].log_prob(site["value"])  # L T Q
        log_lik = log_lik.expand((self.num_samples,) + log_lik.shape[1:]).sum(-1)  # L T
        predictive = log_mean_exp(log_lik, 0)  # T
        return -(elbo + (site["scale"] * predictive).sum())

    def __repr__(self) -> str:
        return f"PredictiveELBO(num_samples={self.num_samples})"


def _check_particle_method(model: Any, guide: Any, batch: Any, what: str) -> None:
    if batch.y_query is None:
        raise ValueError(f"{what} scores the query labels; this TaskBatch has y_query=None")
    for obj, attr in ((guide, "follow"), (model, "log_likelihood")):
        if not hasattr(obj, attr):
            raise TypeError(f"{what} needs a particle guide with follow() and a model with log_likelihood() "
                            f"(BMAMLGuide / BMAMLModel); {type(obj).__name__} has no {attr}()")


class ChaserLoss(_Objective):
    """BMAML's chaser loss (Yoon et al., NeurIPS 2018, eq. 6): the follower ``Theta_n`` (``n`` SVGD steps
    on the support set from the meta-learned initial particles) chases the leader ``Theta_{n+s}`` (``s``
    more steps on support + query, gradient stopped):

        L = (1/T) sum_t sum_m || w_tm^(n) - stopgrad(w_tm^(n+s)) ||^2,

    over the network weights only (the particles' log precisions are left out of the distance, as in
    the authors' code). The task mean comes from the trainer's ``1/T`` scale (the enclosing
    ``poutine.scale``), as for every other objective here; no ELBO is involved.

    :param include_precisions: put the log precisions in the distance too (this library's option,
        objective ``"chaser-full"``: then the initial noise and weight precisions are pulled towards
        the leader's, not only moved by the inner loop).
    """

    def __init__(self, include_precisions: bool = False):
        self.include_precisions = include_precisions

    def differentiable_loss(self, model: Any, guide: Any, batch: Any) -> Tensor:
        _check_particle_method(model, guide, batch, "the chaser loss")
        follower = guide.follow(batch.x_support, batch.y_support)  # M T 1 P
        leader = guide.lead(follower, batch)
        d = follower.shape[-1] if self.include_precisions else model.num_weights
        dist2 = (follower[..., :d] - leader[..., :d]).pow(2).sum(-1)  # M T 1
        return _task_scale() * dist2.sum(0).sum()

    def __repr__(self) -> str:
        return f"ChaserLoss(include_precisions={self.include_precisions})"


class BFALoss(_Objective):
    """BMAML's Bayesian fast adaptation objective (Yoon et al., eq. 4): the log predictive of the query set
    under the follower's particles (``n`` SVGD steps on the support set), an equal-weight mixture,

        L = -(1/T) sum_t log( (1/M) sum_m prod_q p(y_tq | x_tq, theta_tm) ),

    each particle with its own noise precision (regression)."""

    def differentiable_loss(self, model: Any, guide: Any, batch: Any) -> Tensor:
        _check_particle_method(model, guide, batch, "the BFA objective")
        follower = guide.follow(batch.x_support, batch.y_support)  # M T 1 P
        log_lik = model.log_likelihood(follower, batch.x_query, batch.y_query, batch.x_support)  # M T
        return -_task_scale() * log_mean_exp(log_lik, 0).sum()

    def __repr__(self) -> str:
        return "BFALoss()"


def _task_scale() -> float:
    """The product of the enclosing ``poutine.scale`` factors (the trainer's ``1/T``), so a loss that is not
    an ELBO weights tasks like one (the mean over the meta-batch's tasks)."""
    from pyro.poutine.runtime import _PYRO_STACK
    from pyro.poutine.scale_messenger import ScaleMessenger

    scale = 1.0
    for frame in _PYRO_STACK:
        if isinstance(frame, ScaleMessenger):
            scale = scale * float(frame.scale)
    return scale
