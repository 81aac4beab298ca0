"""ABML's guide (Ravi & Beatson, ICLR 2019).

- theta = (mu_theta, tau_theta): MAP point estimates (Delta sites ``prior_loc``, ``prior_precision``).
- q(phi_t) = N(mu_t, exp(s_t)): K SGD steps on the support-set ELBO
  ``E_q[-log p(y_support | phi)] + KL(q || N(mu_theta, tau_theta^{-1/2}))``, started at
  ``(mu_theta, -log(tau_theta)/2)``, i.e. at the prior.

Variance parameterization: q keeps a log std ``s`` (clamped to [LOG_STD_MIN, LOG_STD_MAX] where it is
exponentiated), the prior a precision ``tau = exp(r) + PRECISION_FLOOR`` (``r`` clamped at
LOG_PRECISION_MAX). Neither can go
negative, and the closed-form KL multiplies by tau instead of dividing by a variance.
"""

from __future__ import annotations

import pyro
import torch
from torch import Tensor, nn

from ..distributions import LogScaleNormal, PointMass
from ..infer import sgd_adapt
from ..models.base import TASK_DIM, WeightSpaceModel, conditioning_set, scaled, tasks_plate
from ..tasks import TaskBatch

LOG_STD_MIN, LOG_STD_MAX = -15.0, 5.0
PRECISION_FLOOR = 1e-6
LOG_PRECISION_MAX = 40.0
# natural inner step: the precision may shrink by at most this factor per step (an MC curvature
# estimate can be negative)
PRECISION_STEP_FLOOR = 0.1


def gaussian_kl(mu: Tensor, log_std: Tensor, loc: Tensor, precision: Tensor,
                log_precision: Tensor | None = None) -> Tensor:
    """Elementwise ``KL(N(mu, exp(s)) || N(loc, precision^{-1/2}))`` with ``s = log_std`` clamped to
    [LOG_STD_MIN, LOG_STD_MAX] (the same clamp as the sampled std, so KL(p || p) = 0 everywhere)."""
    s = log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)
    log_prec = torch.log(precision) if log_precision is None else log_precision
    return 0.5 * (precision * (torch.exp(2 * s) + (mu - loc) ** 2) - 1.0 - log_prec - 2 * s)


class ABMLGuide(nn.Module):
    """:param model: an :class:`~pyro_meta.models.ABMLModel` (its ``net`` and ``likelihood``).
    :param init_loc: initial prior mean ``[D]``; :param init_prior_std: initial prior std (a scalar, or
        one per weight ``[D]``).
    :param inner_steps: K in meta-training; :param inner_steps_eval: K at evaluation.
    :param inner_lr: SGD step size on (mu, log std); the inner loss is the support ELBO divided by the
        number of support points, so the step size does not depend on the shot count.
    :param inner_samples: Monte Carlo samples of the expected log-likelihood in the inner loop.
    :param kl_weight_inner: weight of the inner KL (1 = the exact support ELBO).
    :param first_order: detach the inner gradients.
    :param noise_scaled_lr: multiply the inner step size by the likelihood's current noise variance
        sigma^2 (Gaussian only), so a learned sigma does not shrink the steps in weight space as it
        grows. Plain SGD (False) is the paper's; True is this library's option.
    :param inner_step: ``"sgd"`` (the paper's): plain SGD on ``(mu, s)`` with step ``inner_lr``.
        ``"natural"`` (this library's; the variational online-Newton idea of Khan et al., ICML 2018): a
        natural-gradient step of size ``rho = inner_lr`` on q's precision ``lambda = exp(-2 s)``, then
        on its mean with the new variance. With ``g_s, g_mu`` the gradients of the task's negative ELBO
        (the per-point loss's times the number of points), ``g_s = var * (tau + H) - 1`` for a curvature
        estimate ``H``, so ``lambda <- lambda * (1 + rho * g_s) = (1 - rho) lambda + rho (tau + H)``
        (the factor floored at :data:`PRECISION_STEP_FLOOR`, and ``lambda`` at ``tau``: a Gauss-Newton
        curvature is never negative, a one-sample estimate often is) and ``mu <- mu - rho * var_new * g_mu``.
        The mean's step is then at most a Newton step, whatever the prior's or the data's scale (plain
        SGD diverges once ``inner_lr * tau / shots > 2``); with a Gaussian likelihood linear in the
        weights and ``rho = 1`` one step lands on the exact posterior.
    :param objective: ``"joint"``: in training (``self.training`` and query labels given) q conditions on
        support + query; otherwise (and always at evaluation) on the support set alone.
    """

    def __init__(self, model: WeightSpaceModel, init_loc: Tensor, init_prior_std: float | Tensor = 0.1,
                 inner_steps: int = 5, inner_steps_eval: int = 5, inner_lr: float = 0.01,
                 inner_samples: int = 1, kl_weight_inner: float = 1.0, first_order: bool = False,
                 noise_scaled_lr: bool = False, objective: str = "paper", inner_step: str = "sgd"):
        super().__init__()
        std = torch.as_tensor(init_prior_std, dtype=init_loc.dtype)
        if not bool((std > 0).all()):
            raise ValueError(f"init_prior_std must be positive, got {init_prior_std}")
        # a reference, not a submodule: the model's parameters belong to the model alone
        object.__setattr__(self, "model", model)
        self.loc = nn.Parameter(init_loc.clone())
        # log-precision: Adam's steps are then relative changes of the precision, at any scale
        self.log_precision = nn.Parameter((-2.0 * torch.log(std)).expand_as(init_loc).clone())
        self.inner_steps, self.inner_steps_eval, self.inner_lr = inner_steps, inner_steps_eval, inner_lr
        self.inner_samples, self.kl_weight_inner, self.first_order = inner_samples, kl_weight_inner, first_order
        if inner_step not in ("sgd", "natural"):
            raise ValueError(f"inner_step must be 'sgd' or 'natural', got {inner_step!r}")
        self.noise_scaled_lr, self.objective, self.inner_step = noise_scaled_lr, objective, inner_step

    @property
    def precision(self) -> Tensor:
        return torch.exp(self.log_precision.clamp(max=LOG_PRECISION_MAX)) + PRECISION_FLOOR

    def support_loss(self, mu: Tensor, log_std: Tensor, x: Tensor, y: Tensor, loc: Tensor, prec: Tensor,
                     log_prec: Tensor | None = None) -> Tensor:
        """Sum over tasks of each task's ELBO loss per point of ``(x [T, N, ...], y)``, the set q
        conditions on; ``mu, log_std [T, 1, D]``."""
        eps = torch.randn((self.inner_samples,) + mu.shape, dtype=mu.dtype, device=mu.device)  # M T 1 D
        phi = mu + torch.exp(log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)) * eps
        f = self.model.net(phi.squeeze(TASK_DIM), x)  # M T N O
        nll = self.model.likelihood.point_loss(f, y).sum(-1).mean(0)  # T
        kl = gaussian_kl(mu, log_std, loc, prec, log_prec).sum(-1).squeeze(-1)  # T
        return ((nll + self.kl_weight_inner * kl) / x.shape[1]).sum()

    def conditioning_set(self, batch: TaskBatch) -> tuple[Tensor, Tensor]:
        """``(x, y)`` that q conditions on: the support set; with objective ``"joint"`` in training, support
        and query together."""
        return conditioning_set(batch, self.objective == "joint" and self.training)

    def adapt(self, batch: TaskBatch) -> tuple[Tensor, Tensor]:
        """``(mu, log_std)`` of each task's q, ``[T, 1, D]`` each."""
        x, y = self.conditioning_set(batch)
        return self.fit_q(x, y)

    def fit_q(self, x: Tensor, y: Tensor, precision: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """K SGD steps on the ELBO of ``(x, y)`` from the prior -> ``(mu, log_std)``, ``[T, 1, D]`` each.
        ``precision``: the prior's, when the caller has computed it already."""
        loc, prec = self.loc, self.precision if precision is None else precision
        log_prec = torch.log(prec)  # once per adaptation, not once per inner step
        steps = self.inner_steps if self.training else self.inner_steps_eval
        shape = (x.shape[0], 1, loc.shape[-1])
        mu0 = loc.expand(shape)
        s0 = (-0.5 * log_prec).expand(shape)
        lr = self.inner_lr
        if self.noise_scaled_lr:
            lr = self.inner_lr * self.model.likelihood.noise_std.to(self.loc.dtype) ** 2
        update = None
        if self.inner_step == "natural":
            n = x.shape[1]

            def update(cur, grads):
                (m, s), (gm, gs) = cur, grads  # gradients of the per-point loss: x n for the task's
                factor = (1 + lr * n * gs).clamp(min=PRECISION_STEP_FLOOR)  # lambda_new / lambda
                # lambda >= tau: a Gauss-Newton curvature is >= 0, so q is never wider than the prior
                s_new = torch.minimum(s - 0.5 * torch.log(factor), s0)
                var = torch.exp(2 * s_new.clamp(LOG_STD_MIN, LOG_STD_MAX))
                return m - (lr * n) * var * gm, s_new

        return sgd_adapt(lambda m, s: self.support_loss(m, s, x, y, loc, prec, log_prec), (mu0, s0), steps,
                         lr, self.first_order, update=update)

    def forward(self, batch: TaskBatch) -> Tensor:
        precision = self.precision
        pyro.sample("prior_loc", PointMass(self.loc, event_dim=1))
        pyro.sample("prior_precision", PointMass(precision, event_dim=1))
        mu, log_std = self.fit_q(*self.conditioning_set(batch), precision)
        with tasks_plate(batch.num_tasks), scaled(self.model.kl_weight):
            q = LogScaleNormal(mu, log_std.clamp(LOG_STD_MIN, LOG_STD_MAX))  # N(mu, exp(s)^2)
            return pyro.sample("phi", q.to_event(1))

    def prior_summary(self) -> dict[str, Tensor]:
        return {"prior_loc": self.loc.detach(), "prior_std": self.precision.detach().rsqrt()}
