"""ABML's inner-loop guide against a posterior known in closed form.

Task model: y = w x + b + noise, noise std sigma, prior (w, b) ~ N(mu0, tau^{-1} I). With the support
inputs symmetric about 0, X^T X is diagonal, so the exact posterior factorizes and a mean-field
Gaussian can equal it:  Lambda = tau I + X^T X / sigma^2,  mean = Lambda^{-1} (tau mu0 + X^T y / sigma^2).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_close

from pyro_meta.guides import ABMLGuide
from pyro_meta.likelihoods import Gaussian
from pyro_meta.models import ABMLModel
from pyro_meta.nn import MLP
from pyro_meta.tasks import TaskBatch

SIGMA, TAU = 0.7, 1.5


def _tasks():
    g = torch.Generator().manual_seed(0)
    x = torch.linspace(-1, 1, 8, dtype=torch.float64)  # symmetric: sum x = 0
    xs = x[None, :, None].expand(3, 8, 1).contiguous()  # T S 1
    true_w = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    true_b = torch.tensor([1.0, 0.3, -0.5], dtype=torch.float64)
    ys = true_w[:, None, None] * xs + true_b[:, None, None] + SIGMA * torch.randn(xs.shape, generator=g, dtype=torch.float64)
    return TaskBatch(xs, ys, xs[:, :2], ys[:, :2])


def _exact(batch, mu0):
    x = batch.x_support[..., 0]  # T S
    feats = torch.stack([x, torch.ones_like(x)], -1)  # T S 2  (w, b): MLP([1, 1]) lays out w0 then b0
    prec = TAU * torch.eye(2, dtype=torch.float64) + feats.transpose(-1, -2) @ feats / SIGMA**2  # T 2 2
    assert torch.allclose(prec - torch.diag_embed(torch.diagonal(prec, dim1=-2, dim2=-1)),
                          torch.zeros_like(prec)), "design must give a diagonal posterior precision"
    rhs = TAU * mu0 + (feats * batch.y_support).sum(1) / SIGMA**2  # T 2
    mean = torch.linalg.solve(prec, rhs)
    var = 1.0 / torch.diagonal(prec, dim1=-2, dim2=-1)
    return mean, var


def test_abml_inner_loop_recovers_the_exact_gaussian_posterior():
    net = MLP([1, 1])
    model = ABMLModel(net, Gaussian(SIGMA))
    mu0 = torch.tensor([0.2, -0.1], dtype=torch.float64)
    guide = ABMLGuide(model, mu0, init_prior_std=1 / math.sqrt(TAU), inner_steps=300, inner_lr=0.5,
                      inner_samples=20000).double()
    batch = _tasks()
    torch.manual_seed(0)
    with torch.no_grad():
        mu, log_std = guide.adapt(batch)
    mean, var = _exact(batch, mu0)
    # tolerances: 300 SGD steps from the prior converge to ~1e-6; what remains is the Monte Carlo
    # noise of 20000 reparameterized draws per step (well under 3% of a posterior std).
    assert_close(mu[:, 0], mean, rtol=0, atol=0.03 * var.sqrt().min().item(), msg="posterior mean")
    assert_close(torch.exp(2 * log_std[:, 0]), var, rtol=0.02, msg="posterior variance")
    # and it moved: the prior is far from the posterior
    assert (mean - mu0).abs().max() > 0.5
    assert (var - 1 / TAU).abs().max() > 0.3


def test_abml_guide_from_prior_with_zero_steps_is_the_prior():
    net = MLP([1, 1])
    model = ABMLModel(net, Gaussian(SIGMA))
    mu0 = torch.tensor([0.2, -0.1])
    guide = ABMLGuide(model, mu0, init_prior_std=0.3, inner_steps=0, inner_steps_eval=0)
    mu, log_std = guide.adapt(_tasks().to(dtype=torch.float32))
    assert_close(mu[:, 0], mu0.expand(3, 2), rtol=1e-6)
    assert_close(log_std.exp()[:, 0], torch.full((3, 2), 0.3), rtol=1e-5)


@pytest.mark.parametrize("steps,rho", [(1, 1.0), (12, 0.5)])
def test_natural_inner_step_reaches_the_exact_posterior(steps, rho):
    """With a likelihood linear in the weights the natural step's curvature is exact in expectation:
    one step of rho = 1 lands on the posterior, and rho < 1 converges to it geometrically."""
    net = MLP([1, 1])
    model = ABMLModel(net, Gaussian(SIGMA))
    mu0 = torch.tensor([0.2, -0.1], dtype=torch.float64)
    guide = ABMLGuide(model, mu0, init_prior_std=1 / math.sqrt(TAU), inner_steps=steps, inner_lr=rho,
                      inner_samples=20000, inner_step="natural").double()
    batch = _tasks()
    torch.manual_seed(0)
    with torch.no_grad():
        mu, log_std = guide.adapt(batch)
    mean, var = _exact(batch, mu0)
    # Monte Carlo noise of the curvature estimate from 20000 draws: ~1% of the precision
    assert_close(torch.exp(2 * log_std[:, 0]), var, rtol=0.03, msg="posterior variance")
    assert_close(mu[:, 0], mean, rtol=0, atol=0.05 * var.sqrt().min().item(), msg="posterior mean")
