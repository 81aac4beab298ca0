"""The capped Polyak inner step (pyro_meta.infer.polyak_adapt, SPS_max): its step on a least-squares task,
each task's own step size, the cap, the graph-free path, and its second-order gradient in float64."""

from __future__ import annotations

import pytest
import torch

from pyro_meta.infer import polyak_adapt, sgd_adapt


def _tasks(scale: torch.Tensor, seed: int = 0):
    """Per task t a linear least squares 0.5 |A_t w - b_t|^2 / n with A_t = scale_t * (orthonormal rows):
    A_t A_t^T = scale_t^2 I, so the Polyak step with c = 1 halves the residual whatever the scale."""
    g = torch.Generator().manual_seed(seed)
    t, n, d = scale.shape[0], 3, 6
    q, _ = torch.linalg.qr(torch.randn(t, d, n, generator=g, dtype=torch.float64))  # T d n, orthonormal columns
    a = scale[:, None, None] * q.transpose(1, 2)  # T n d
    b = torch.randn(t, n, generator=g, dtype=torch.float64) * scale[:, None]

    def losses(w):  # w [T, 1, d]
        r = (a @ w.transpose(1, 2))[..., 0] - b  # T n
        loss = 0.5 * (r ** 2).mean(-1)
        return loss, loss  # the lower bound of a squared error is 0

    def residual(w):
        return (a @ w.transpose(1, 2))[..., 0] - b

    return losses, residual


def test_one_step_halves_the_residual_at_any_scale_and_a_fixed_step_cannot():
    scale = torch.tensor([0.1, 1.0, 30.0], dtype=torch.float64)
    losses, residual = _tasks(scale)
    w0 = torch.zeros(3, 1, 6, dtype=torch.float64)
    w1 = polyak_adapt(losses, w0, 1, max_lr=1e9)
    ratio = residual(w1).norm(dim=-1) / residual(w0).norm(dim=-1)
    torch.testing.assert_close(ratio, torch.full_like(ratio, 0.5), rtol=1e-10, atol=1e-12)
    # a fixed step that suits the steepest task (1 / scale^2 of it) leaves the flattest one where it was
    (w1s,) = sgd_adapt(lambda w: losses(w)[0].sum(), (w0,), 1, 1.0 / 30.0 ** 2 * 3)
    ratio_sgd = residual(w1s).norm(dim=-1) / residual(w0).norm(dim=-1)
    assert ratio_sgd[0] > 0.999 and ratio_sgd[2] < 0.01


def test_the_cap_binds_and_no_graph_is_kept_without_grad():
    scale = torch.tensor([0.1, 1.0], dtype=torch.float64)
    losses, _ = _tasks(scale)
    w0 = torch.zeros(2, 1, 6, dtype=torch.float64)
    cap = 1e-3
    w1 = polyak_adapt(losses, w0, 1, max_lr=cap)
    with torch.enable_grad():
        w = w0.clone().requires_grad_()
        (g,) = torch.autograd.grad(losses(w)[0].sum(), w)
    # task 0 (flat): its Polyak step 0.5 n / scale^2 = 150 >> cap: the cap's plain step
    torch.testing.assert_close(w1[0], -cap * g[0])
    with torch.no_grad():
        out = polyak_adapt(losses, w0.requires_grad_(), 3, max_lr=cap)
    assert not out.requires_grad and out.grad_fn is None
    with pytest.raises(ValueError, match="steps"):
        polyak_adapt(losses, w0, -1, max_lr=cap)


def test_second_order_gradient_matches_finite_differences():
    """A tiny tanh network per task, 3 steps: d (query loss after adaptation) / d (start), float64 central
    differences, through each task's step size."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 1, generator=g, dtype=torch.float64)
    y = torch.randn(2, 4, generator=g, dtype=torch.float64)
    xq = torch.randn(2, 5, 1, generator=g, dtype=torch.float64)

    def f(w, xx):  # w [T, 1, 4]: y = w2 * tanh(w0 x + w1) + w3
        w = w[:, 0]
        return w[:, None, 2] * torch.tanh(w[:, None, 0] * xx[..., 0] + w[:, None, 1]) + w[:, None, 3]

    def losses(w):
        loss = 0.5 * ((f(w, x) - y) ** 2).mean(-1)
        return loss, loss

    def outer(w0):
        w = polyak_adapt(losses, w0, 3, max_lr=10.0)
        return (f(w, xq) ** 2).sum()

    w0 = torch.randn(2, 1, 4, generator=g, dtype=torch.float64).requires_grad_()
    (grad,) = torch.autograd.grad(outer(w0), w0)
    fd = torch.zeros_like(w0)
    eps = 1e-6
    with torch.no_grad():
        for i in range(w0.numel()):
            e = torch.zeros(w0.numel(), dtype=torch.float64)
            e[i] = eps
            e = e.view_as(w0)
            fd.view(-1)[i] = (outer(w0 + e) - outer(w0 - e)) / (2 * eps)
    assert grad.abs().max() > 1e-3
    torch.testing.assert_close(grad, fd, rtol=1e-5, atol=1e-8)
