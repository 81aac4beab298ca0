"""Bayesian neural-network regression as in SVGD's UCI experiments (Liu & Wang, 2016 [1], after the
setup of Hernandez-Lobato & Adams, 2015 [2]): one hidden ReLU layer and

    y_i ~ N(f(x_i; W), 1 / gamma),    W_j ~ N(0, 1 / lambda),    gamma, lambda ~ Gamma(a0, rate b0),

with ``a0 = 1, b0 = 0.1``. Every network is *one* latent site ``theta``, a vector

    theta = [w1 (d * H, row-major [d, H]), b1 (H), w2 (H), b2 (1), log gamma, log lambda],

whose prior :class:`BNNPrior` is the hierarchical prior above with both precisions in log space (the
log-Jacobian included), as in the authors' code. One site is what ``pyro.infer.SVGD`` needs: it packs
its particles site by site (``[site 1 of every particle, site 2 of every particle, ...]``) and then
reshapes that vector to ``[num_particles, -1]``, which keeps each particle's coordinates together only
when the model has a single latent site (checked in ``tests/test_bnn.py``).

Example::

    model = BNNRegression(in_dim=13)
    pyro.param("svgd_particles", model.init_particles(20, x, y).reshape(-1))
    svgd = SVGD(model, ScalarRBFKernel(), RMSprop({"lr": 1e-3, "alpha": 0.9, "eps": 1e-6}), 20,
                max_plate_nesting=1, mode="multivariate")
    for _ in range(2000):
        svgd.step(x, y, subsample_size=100)
    theta = pyro.param("svgd_particles").detach().reshape(20, -1)  # M P
    rmse, ll = predictive_scores(model, theta, x_test, y_test)

The same model runs under ``pyro.infer.MCMC(NUTS(model))``.

References

[1] Q. Liu, D. Wang, "Stein Variational Gradient Descent: A General Purpose Bayesian Inference
    Algorithm", NeurIPS 2016.
[2] J. M. Hernandez-Lobato, R. P. Adams, "Probabilistic Backpropagation for Scalable Learning of
    Bayesian Neural Networks", ICML 2015.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from torch import Tensor

from .base import log_gamma_dist

__all__ = ["BNNPrior", "BNNRegression", "predictive_scores"]


class BNNPrior(dist.TorchDistribution):
    """The hierarchical prior of one network, over ``theta = [weights (W), log gamma, log lambda]``, event
    shape ``[W + 2]``: ``log gamma, log lambda`` log-Gamma(shape, rate) each, weights N(0, 1/lambda).

    :param num_weights: ``W``, the number of network weights and biases.
    :param shape: Gamma shape ``a0``.
    :param rate: Gamma rate ``b0`` (mean ``a0 / b0``).
    """

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = False

    def __init__(self, num_weights: int, shape: float = 1.0, rate: float = 0.1, validate_args=None):
        if num_weights < 1:
            raise ValueError(f"num_weights must be >= 1, got {num_weights}")
        if not (shape > 0 and rate > 0):
            raise ValueError(f"Gamma shape and rate must be positive, got {shape}, {rate}")
        self.num_weights, self.shape, self.rate = num_weights, float(shape), float(rate)
        super().__init__(torch.Size(), torch.Size([num_weights + 2]), validate_args=validate_args)

    def log_prob(self, value: Tensor) -> Tensor:
        """``[..., W + 2] -> [...]``."""
        if self._validate_args:
            self._validate_sample(value)
        w, log_gamma, log_lambda = value[..., :-2], value[..., -2], value[..., -1]
        # sum_j log N(w_j | 0, 1/lambda)
        log_w = 0.5 * self.num_weights * (log_lambda - math.log(2 * math.pi)) - 0.5 * log_lambda.exp() * w.pow(2).sum(-1)
        log_precision = log_gamma_dist(self.shape, self.rate, value)
        return log_w + log_precision.log_prob(log_gamma) + log_precision.log_prob(log_lambda)

    def sample(self, sample_shape=torch.Size()) -> Tensor:
        shape = torch.Size(sample_shape)
        with torch.no_grad():
            gamma_dist = torch.distributions.Gamma(torch.tensor(self.shape), torch.tensor(self.rate))
            gam, lam = gamma_dist.sample(shape), gamma_dist.sample(shape)
            w = torch.randn(shape + (self.num_weights,)) * lam.rsqrt().unsqueeze(-1)
            return torch.cat([w, gam.log().unsqueeze(-1), lam.log().unsqueeze(-1)], -1)


class BNNRegression:
    """The Pyro model ``model(x, y=None, subsample_size=None)`` of a one-hidden-layer ReLU network with
    :class:`BNNPrior` (one latent site ``theta``, one observed site ``y`` in a ``data`` plate at dim -1, so
    ``max_plate_nesting=1``).

    :param in_dim: ``d``, the number of input features.
    :param hidden: ``H``, hidden units (50 in [1]).
    :param prior_shape: ``a0``.
    :param prior_rate: ``b0``.
    """

    def __init__(self, in_dim: int, hidden: int = 50, prior_shape: float = 1.0, prior_rate: float = 0.1):
        if in_dim < 1 or hidden < 1:
            raise ValueError(f"in_dim and hidden must be >= 1, got {in_dim}, {hidden}")
        self.in_dim, self.hidden = in_dim, hidden
        self.prior_shape, self.prior_rate = prior_shape, prior_rate

    @property
    def num_weights(self) -> int:
        return self.in_dim * self.hidden + 2 * self.hidden + 1

    @property
    def num_params(self) -> int:
        """``P = W + 2``, the length of ``theta``."""
        return self.num_weights + 2

    def prior(self) -> BNNPrior:
        return BNNPrior(self.num_weights, self.prior_shape, self.prior_rate)

    def unpack(self, theta: Tensor) -> dict[str, Tensor]:
        """``theta [..., P]`` -> ``w1 [..., d, H]``, ``b1 [..., H]``, ``w2 [..., H]``, ``b2 [...]``,
        ``log_noise_precision [...]`` (log gamma), ``log_weight_precision [...]`` (log lambda)."""
        if theta.shape[-1] != self.num_params:
            raise ValueError(f"theta must end in {self.num_params} parameters, got shape {tuple(theta.shape)}")
        d, h = self.in_dim, self.hidden
        sizes = [d * h, h, h, 1, 1, 1]
        w1, b1, w2, b2, lg, ll = torch.split(theta, sizes, dim=-1)
        return {"w1": w1.reshape(*theta.shape[:-1], d, h), "b1": b1, "w2": w2, "b2": b2[..., 0],
                "log_noise_precision": lg[..., 0], "log_weight_precision": ll[..., 0]}

    def named(self, theta: Tensor) -> dict[str, Tensor]:
        """:meth:`unpack` with the precisions exponentiated (``noise_precision`` is in standardized-y units)."""
        out = self.unpack(theta)
        out["noise_precision"] = out.pop("log_noise_precision").exp()
        out["weight_precision"] = out.pop("log_weight_precision").exp()
        return out

    def forward(self, x: Tensor, theta: Tensor) -> Tensor:
        """``f(x; theta)``: ``x [n, d]``, ``theta [..., P]`` -> ``[..., n]``."""
        p = self.unpack(theta)
        hid = torch.relu(x @ p["w1"] + p["b1"].unsqueeze(-2))  # ..., n, H
        return (hid @ p["w2"].unsqueeze(-1)).squeeze(-1) + p["b2"].unsqueeze(-1)  # ..., n

    def __call__(self, x: Tensor, y: Tensor | None = None, subsample_size: int | None = None) -> Tensor:
        """The model: ``x [n, d]``, ``y [n]`` or None; ``subsample_size`` picks a random mini-batch (the
        likelihood is then scaled by ``n / subsample_size``). Returns ``f`` on the (sub)sampled points."""
        theta = pyro.sample("theta", self.prior())
        if theta.dim() > 1 and theta.shape[-2] == 1:
            # Outer plates (SVGD's particles at dim -2) broadcast theta to [..., 1, P]: the 1 is the data
            # plate's dim, which theta sits outside of. (Predictive conditions on [S, P] values directly.)
            theta = theta.squeeze(-2)
        noise_std = (-0.5 * self.unpack(theta)["log_noise_precision"]).exp().unsqueeze(-1)  # ..., 1
        with pyro.plate("data", x.shape[0], subsample_size=subsample_size, dim=-1) as idx:
            f = self.forward(x[idx], theta)  # ..., B
            pyro.sample("y", dist.Normal(f, noise_std), obs=None if y is None else y[idx])
        return f

    def init_particles(self, num: int, x: Tensor, y: Tensor, lambda_rate: float | None = None) -> Tensor:
        """Starting networks ``[num, P]`` as in [1]'s code: ``w1 ~ N(0, 1/(d+1))``, ``w2 ~ N(0, 1/(H+1))``, zero
        biases, ``lambda ~ Gamma(a0, rate=lambda_rate)``, ``gamma`` = 1 / (the network's mean squared error on
        up to 1000 training points). Draws from torch's global generator (``pyro.set_rng_seed`` seeds it).

        :param lambda_rate: default ``1 / b0``, as [1]'s code has it (it passes ``b0`` to numpy's
            ``gamma(shape, scale)``, so lambda starts near ``a0 * b0 = 0.1``: a weak weight prior); ``b0``
            draws lambda from its prior instead (mean ``a0 / b0 = 10``).
        """
        d, h = self.in_dim, self.hidden
        w1 = torch.randn(num, d * h) / math.sqrt(d + 1)
        w2 = torch.randn(num, h) / math.sqrt(h + 1)
        rate = 1.0 / self.prior_rate if lambda_rate is None else lambda_rate
        lam = torch.distributions.Gamma(self.prior_shape, rate).sample((num,))
        zeros = torch.zeros(num, 1)
        theta = torch.cat([w1, zeros.expand(num, h), w2, zeros, zeros, lam.log().unsqueeze(-1)], -1)
        idx = torch.randperm(x.shape[0])[:1000]
        mse = (self.forward(x[idx], theta) - y[idx]).pow(2).mean(-1)  # num
        theta[:, -2] = -mse.log()
        return theta


def predictive_scores(model: BNNRegression, theta: Tensor, x: Tensor, y: Tensor, y_mean: float = 0.0,
                      y_std: float = 1.0, log_noise_precision: Tensor | None = None) -> tuple[float, float]:
    """Test RMSE of the mean prediction and test log-likelihood ``mean_i log (1/M) sum_m N(y_i | f_m(x_i),
    1/gamma_m)``, both in the original y units (the model works on ``(y - y_mean) / y_std``).

    :param theta: ``[M, P]`` networks (particles or posterior draws).
    :param x: standardized inputs ``[n, d]``.
    :param y: targets in the original units ``[n]``.
    :param log_noise_precision: ``[M]`` log gamma to use instead of theta's (standardized units).
    """
    with torch.no_grad():
        f = model.forward(x, theta) * y_std + y_mean  # M n
        lg = model.unpack(theta)["log_noise_precision"] if log_noise_precision is None else log_noise_precision
        std = (-0.5 * lg).exp().unsqueeze(-1) * y_std  # M 1
        rmse = (f.mean(0) - y).pow(2).mean().sqrt()
        log_p = dist.Normal(f, std).log_prob(y)  # M n
        ll = (torch.logsumexp(log_p, 0) - math.log(theta.shape[0])).mean()
    return float(rmse), float(ll)
