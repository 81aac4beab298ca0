"""Float64 finite-difference checks of the meta-gradient through the second-order inner loop."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, central_differences

from pyro_meta.config import RunConfig
from pyro_meta.infer import sgd_adapt
from pyro_meta.methods import build_learner
from pyro_meta.tasks import Sinusoid

EPS = 1e-6


def _setup(method: str, first_order: bool = False, **kw):
    if method == "abml":  # a learned noise, so its gradient is checked too
        kw = {"learn_noise": True, "noise_std": 0.5, **kw}
    cfg = RunConfig(method=method, hidden=[5], inner_steps=2, first_order=first_order, meta_batch=3, **kw)
    learner = build_learner(cfg).double()
    batch = Sinusoid().sample(3, 4, 6, torch.Generator().manual_seed(3)).to(dtype=torch.float64)
    return learner, batch


def _loss(learner, batch, seed=7):
    torch.manual_seed(seed)  # the same Monte Carlo draws at every evaluation (ABML samples)
    return learner.loss(batch)


def _fd_grad(learner, batch, param: torch.nn.Parameter, idx: list[int]) -> torch.Tensor:
    return central_differences(lambda: _loss(learner, batch), param, idx, EPS)


def _autograd(learner, batch, param):
    learner.zero_grad()
    _loss(learner, batch).backward()
    return param.grad.detach().clone().view(-1)


@pytest.mark.parametrize("method,names,kw", [
    ("maml", ["guide.theta"], {}),
    ("abml", ["guide.loc", "guide.log_precision", "model.likelihood.raw_noise"], {}),
    ("abml", ["guide.loc", "guide.log_precision", "model.likelihood.raw_noise"],
     {"inner_step": "natural", "inner_lr": 0.3, "objective": "predictive", "train_samples": 4}),
    ("abml", ["guide.loc", "guide.log_precision"], {"objective": "joint", "kl_estimator": "analytic"}),
])
def test_second_order_meta_gradient_matches_finite_differences(method, names, kw):
    learner, batch = _setup(method, **kw)
    params = dict(learner.named_parameters())
    for name in names:
        p = params[name]
        idx = list(range(min(p.numel(), 16)))
        g = _autograd(learner, batch, p)[idx]
        fd = _fd_grad(learner, batch, p, idx)
        assert g.abs().max() > 1e-4, f"{name}: gradient is ~0, the check would be vacuous"
        assert_close(g, fd, rtol=1e-5, atol=1e-7, msg=f"{method} {name}")


@pytest.mark.parametrize("method,name", [("maml", "guide.theta"), ("abml", "guide.loc")])
def test_first_order_differs_and_drops_the_hessian_terms(method, name):
    learner, batch = _setup(method)
    fo, _ = _setup(method, first_order=True)
    fo.load_state_dict(learner.state_dict())
    g2 = _autograd(learner, batch, dict(learner.named_parameters())[name])
    g1 = _autograd(fo, batch, dict(fo.named_parameters())[name])
    assert torch.isfinite(g1).all()
    assert (g2 - g1).abs().max() > 1e-3 * g2.abs().max()


def test_sgd_adapt_first_order_equals_a_detached_reference():
    """FOMAML by hand: phi = theta - lr * stopgrad(grad); d L(phi) / d theta = L'(phi)."""
    torch.manual_seed(0)
    theta = torch.randn(4, dtype=torch.float64, requires_grad=True)
    a = torch.randn(4, 4, dtype=torch.float64)
    inner = lambda p: ((a @ p) ** 2).sum().sin()  # noqa: E731 - a curved loss with a nonzero Hessian
    outer = lambda p: (p**3).sum()  # noqa: E731
    (phi,) = sgd_adapt(inner, (theta,), steps=3, lr=0.05, first_order=True)
    (g,) = torch.autograd.grad(outer(phi), theta)
    ref = theta.detach().clone()
    for _ in range(3):
        r = ref.clone().requires_grad_()
        (gi,) = torch.autograd.grad(inner(r), r)
        ref = ref - 0.05 * gi
    assert_close(phi.detach(), ref, rtol=1e-12)
    assert_close(g, 3 * ref**2, rtol=1e-12)


def test_sgd_adapt_second_order_matches_hand_derivation():
    """One step on L_in = 0.5 p^T A p: phi = (I - lr A) theta, so d(1^T phi)/d theta = (I - lr A)^T 1."""
    torch.manual_seed(1)
    m = torch.randn(3, 3, dtype=torch.float64)
    a = m @ m.T
    theta = torch.randn(3, dtype=torch.float64, requires_grad=True)
    (phi,) = sgd_adapt(lambda p: 0.5 * p @ a @ p, (theta,), steps=1, lr=0.1)
    (g,) = torch.autograd.grad(phi.sum(), theta)
    assert_close(g, (torch.eye(3, dtype=torch.float64) - 0.1 * a).T @ torch.ones(3, dtype=torch.float64), rtol=1e-12)


def test_sgd_adapt_under_no_grad_keeps_no_graph():
    theta = torch.randn(3, requires_grad=True)
    with torch.no_grad():
        (phi,) = sgd_adapt(lambda p: (p**2).sum(), (theta,), steps=2, lr=0.1)
    assert not phi.requires_grad
    assert_close(phi, theta.detach() * 0.8**2, rtol=1e-6)


# ----------------------------------------------------------------------------- classification
def _classification_setup(method: str):
    """A tiny conv4 (2 blocks of 3 filters, 8x8 images, per-task batch norm), 3-way 2-shot, float64."""
    from pyro_meta.guides import ABMLGuide, MAMLGuide, VERSAGuide
    from pyro_meta.infer import MLPIP
    from pyro_meta.learner import MetaLearner
    from pyro_meta.likelihoods import Categorical
    from pyro_meta.models import ABMLModel, MAMLModel, VERSAModel
    from pyro_meta.nn import Conv4
    from pyro_meta.tasks import TaskBatch

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(5)
    ways, shots, queries, tasks = 3, 2, 2, 2
    x = torch.rand(tasks, ways * (shots + queries), 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.arange(ways).repeat_interleave(shots)
    batch = TaskBatch(x[:, : ways * shots], y.expand(tasks, -1).contiguous(), x[:, ways * shots:],
                      torch.arange(ways).repeat_interleave(queries).expand(tasks, -1).contiguous())
    if method == "versa":
        net = Conv4(None, image_size=8, filters=3, blocks=2)
        model = VERSAModel(net, net.init(g))
        learner = MetaLearner(model, VERSAGuide(model, [5]), MLPIP(3))
        names = ["model.theta", "guide.trunk.0.weight", "guide.w_logvar.bias"]
    else:
        net = Conv4(ways, image_size=8, filters=3, blocks=2, downsample="stride")
        if method == "maml":
            model = MAMLModel(net, Categorical())
            learner = MetaLearner(model, MAMLGuide(model, net.init(g), inner_steps=2, inner_lr=0.3))
            names = ["guide.theta"]
        else:
            model = ABMLModel(net, Categorical())
            learner = MetaLearner(model, ABMLGuide(model, net.init(g), 0.3, inner_steps=2, inner_lr=0.05))
            names = ["guide.loc", "guide.log_precision"]
    return learner.double(), batch, names


@pytest.mark.parametrize("method", ["maml", "abml", "versa"])
def test_classification_meta_gradient_matches_finite_differences(method):
    """Second order through the inner loop over conv4 + softmax (MAML, ABML), and through VERSA's
    amortizer and shared feature extractor under ML-PIP."""
    learner, batch, names = _classification_setup(method)
    params = dict(learner.named_parameters())
    for name in names:
        p = params[name]
        idx = torch.linspace(0, p.numel() - 1, min(p.numel(), 10)).long().tolist()
        g = _autograd(learner, batch, p)[idx]
        fd = _fd_grad(learner, batch, p, idx)
        assert g.abs().max() > 1e-5, f"{name}: gradient is ~0, the check would be vacuous"
        assert_close(g, fd, rtol=1e-5, atol=1e-7, msg=f"{method} {name}")
