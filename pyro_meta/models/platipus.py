"""PLATIPUS (Finn, Xu & Levine, "Probabilistic Model-Agnostic Meta-Learning", NeurIPS 2018) as a Pyro model.

Generative story (``D`` weights of the task network; meta-parameters mu, sigma, gamma_p)::

    for each task t (plate "tasks"):
        theta_t ~ N(mu - gamma_p * grad_mu L(mu; support_t), sigma^2)   [T, 1, D]   site "theta"
        phi_t   = K SGD steps (step size alpha) on L(.; support_t) from theta_t   (deterministic)
        y_query ~ p(y | net(phi_t, x_query))                            [T, Q]      site "y_query"

``L(w; set)`` is the mean Gaussian NLL per point of the set (``likelihood.point_loss``), the inner loss
of both the prior's gradient step and the SGD steps. The support set is conditioned on, not scored:
the model is ``p(theta, y_query | support)``. Its guide (:mod:`pyro_meta.guides.platipus`) is
``q(theta | support, query)`` in training and this conditional prior at test.

Parameterizations: sigma as ``log sigma`` (so it stays positive and Adam's steps are relative), clamped
to ``[LOG_STD_MIN, LOG_STD_MAX]`` where it is exponentiated (the paper reports KL blow-ups as sigma
shrinks); gamma_p as ``log gamma_p``: a step size must stay positive (a negative one would move the
prior's mean uphill of the support loss), and Adam's steps on its log are relative changes (~0.1% per
step at meta_lr 1e-3), where on a plain scalar initialized at 0.01 each would be ~10% of its value.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn

from ..infer import polyak_adapt, sgd_adapt
from ..likelihoods import Gaussian, Likelihood
from ..nn import FunctionalNet
from ..tasks import TaskBatch
from .base import TASK_DIM, WeightSpaceModel, observe, tasks_plate

LOG_STD_MIN, LOG_STD_MAX = -15.0, 5.0


def positive(log_value: Tensor) -> Tensor:
    """``exp(log_value)`` with the log clamped to ``[LOG_STD_MIN, LOG_STD_MAX]``."""
    return torch.exp(log_value.clamp(LOG_STD_MIN, LOG_STD_MAX))


class PlatipusModel(WeightSpaceModel):
    """:param net: the task network; :param likelihood: the observation model (Gaussian).
    :param init: the initial prior mean mu ``[D]`` (the network's initialization).
    :param prior_init_std: the initial sigma (every weight).
    :param gamma_init: the initial gamma_p.
    :param inner_steps: K in meta-training; :param inner_steps_eval: K at evaluation.
    :param inner_lr: the inner SGD step size alpha (fixed).
    :param first_order: detach the inner gradients (of the prior's step and of the K steps).
    :param noise_scaled_lr: the K steps' size is ``alpha * s^2``, ``s`` the likelihood's current noise std:
        the step on the NLL ``(y - f)^2 / (2 s^2)`` is then the step ``alpha`` on the squared error whatever
        the noise, so a learned noise that grows does not stall the adaptation (issue 28; the paper's step is
        fixed). Differentiable in ``s``.
    :param inner_step: ``"sgd"`` (the paper's fixed step alpha) or ``"polyak"`` (this library's option): each
        task's own Polyak step ``min(excess / |g|^2, alpha)`` (:func:`pyro_meta.infer.polyak_adapt`, SPS_max),
        ``excess`` the support loss above its value at a perfect fit, so a steep task takes a smaller step
        than the cap alpha (or ``alpha s^2`` with ``noise_scaled_lr``). Gaussian likelihood only.
    """

    def __init__(self, net: FunctionalNet, likelihood: Likelihood, init: Tensor, prior_init_std: float = 0.1,
                 gamma_init: float = 0.01, inner_steps: int = 5, inner_steps_eval: int = 10,
                 inner_lr: float = 0.002, first_order: bool = False, noise_scaled_lr: bool = False,
                 inner_step: str = "sgd"):
        super().__init__(net, likelihood, score="query")
        if inner_step not in ("sgd", "polyak"):
            raise ValueError(f"inner_step must be 'sgd' or 'polyak' for PLATIPUS, got {inner_step!r}")
        if inner_step == "polyak" and not isinstance(likelihood, Gaussian):
            raise ValueError("inner_step 'polyak' needs a Gaussian likelihood (the loss at a perfect fit is known)")
        self.inner_step = inner_step
        for name, v in (("prior_init_std", prior_init_std), ("gamma_init", gamma_init), ("inner_lr", inner_lr)):
            if not (v > 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be a positive finite number, got {v!r}")
        if init.shape != (net.num_params,):
            raise ValueError(f"init must be a flat weight vector [{net.num_params}], got {list(init.shape)}")
        self.mu = nn.Parameter(init.clone())
        self.log_sigma = nn.Parameter(torch.full_like(init, math.log(prior_init_std)))
        self.log_gamma_p = nn.Parameter(torch.tensor(math.log(gamma_init), dtype=init.dtype))
        self.inner_steps, self.inner_steps_eval = inner_steps, inner_steps_eval
        self.inner_lr, self.first_order, self.noise_scaled_lr = inner_lr, first_order, noise_scaled_lr

    @property
    def sigma(self) -> Tensor:
        return positive(self.log_sigma)

    @property
    def gamma_p(self) -> Tensor:
        return positive(self.log_gamma_p)

    def set_loss(self, w: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """Sum over tasks (and samples) of each task's mean NLL per point of ``(x, y)``; ``w [..., T, 1, D]``."""
        f = self.net(w.squeeze(TASK_DIM), x)  # ..., T, N, O
        return self.likelihood.point_loss(f, y).mean(-1).sum()

    def gradient_step(self, x: Tensor, y: Tensor, gamma: Tensor) -> Tensor:
        """``mu - gamma * grad_mu L(mu; (x, y))`` per task, ``[T, 1, D]``: differentiable (second order
        unless ``first_order``) in training, graph-free under ``torch.no_grad()``."""
        start = self.mu.expand(x.shape[0], 1, -1)  # T 1 D
        (loc,) = sgd_adapt(lambda w: self.set_loss(w, x, y), (start,), 1, gamma, self.first_order)
        return loc

    def conditional_prior(self, batch: TaskBatch) -> dist.Distribution:
        """``p(theta | support) = N(mu - gamma_p grad L(mu; support), sigma^2)``: batch ``[T, 1]``, event ``[D]``."""
        loc = self.gradient_step(batch.x_support, batch.y_support, self.gamma_p)
        return dist.Normal(loc, self.sigma).to_event(1)

    def adapt(self, theta: Tensor, batch: TaskBatch) -> Tensor:
        """phi: K SGD steps on the support loss from ``theta [..., T, 1, D]`` (same shape)."""
        steps = self.inner_steps if self.training else self.inner_steps_eval
        lr = self.inner_lr
        if self.noise_scaled_lr:
            lr = self.inner_lr * self.likelihood.noise_std.to(theta.dtype) ** 2
        if self.inner_step == "polyak":
            return polyak_adapt(lambda w: self.task_losses(w, batch.x_support, batch.y_support), theta, steps, lr,
                                self.first_order)
        (phi,) = sgd_adapt(lambda w: self.set_loss(w, batch.x_support, batch.y_support), (theta,), steps,
                           lr, self.first_order)
        return phi

    def task_losses(self, w: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Each task's mean NLL per point of ``(x, y)`` and its excess over a perfect fit, ``[..., T]`` each."""
        f = self.net(w.squeeze(TASK_DIM), x)  # ..., T, N, O
        loss = self.likelihood.point_loss(f, y)
        floor = self.likelihood.point_loss(y.expand_as(f), y)
        return loss.mean(-1), (loss - floor).mean(-1)

    def forward(self, batch: TaskBatch) -> Tensor:
        prior = self.conditional_prior(batch)
        with tasks_plate(batch.num_tasks):
            theta = pyro.sample("theta", prior)  # [..., T, 1, D]
            phi = self.adapt(theta, batch)
            f = self.net(phi.squeeze(TASK_DIM), batch.x_query)  # ..., T, Q, O
            observe("y_query", self.likelihood, f, batch.y_query)
        return phi
