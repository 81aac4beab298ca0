"""Evaluation metrics, each reported as a mean over tasks with a 95% confidence interval."""

from __future__ import annotations

import math

import torch
from torch import Tensor

Z95 = 1.959963984540054


def mean_ci(per_task: Tensor) -> dict[str, float]:
    """Mean and 95% CI half-width (normal approximation, ``1.96 * sd / sqrt(T)``) of ``[T]`` values."""
    v = per_task.detach().double().flatten()
    n = v.numel()
    if n == 0:
        raise ValueError("mean_ci needs at least one value")
    sd = float(v.std(unbiased=True)) if n > 1 else float("nan")
    return {"mean": float(v.mean()), "ci95": Z95 * sd / math.sqrt(n), "n": n}


def squared_error(pred_mean: Tensor, y: Tensor) -> Tensor:
    """Per-task mean squared error: ``pred_mean, y [T, Q, O]`` -> ``[T]``."""
    return ((pred_mean - y) ** 2).flatten(1).mean(-1)


def mixture_nll(log_lik: Tensor) -> Tensor:
    """Per-task mean NLL of the predictive mixture over ``S`` posterior samples.

    :param log_lik: ``log p(y_tq | phi_s)``, ``[S, T, Q]``. Returns ``[T]``:
        ``-mean_q log( (1/S) sum_s p(y_tq | phi_s) )``.
    """
    s = log_lik.shape[0]
    return -(torch.logsumexp(log_lik, dim=0) - math.log(s)).mean(-1)


def gaussian_mixture_cdf(y: Tensor, loc: Tensor, scale: Tensor) -> Tensor:
    """CDF at ``y [...]`` of the equal-weight mixture of ``N(loc_s, scale_s)``, ``loc, scale [S, ...]``."""
    z = (y.unsqueeze(0) - loc) / scale
    return 0.5 * (1 + torch.erf(z / math.sqrt(2))).mean(0)


def gaussian_mixture_quantile(p: float, loc: Tensor, scale: Tensor, iters: int = 40) -> Tensor:
    """The ``p`` quantile of the equal-weight Gaussian mixture, by bisection (to 2^-40 of the
    bracket width). ``loc, scale [S, ...]`` -> ``[...]``."""
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}")
    q = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(p, dtype=torch.float64)).item()
    lo = (loc + min(q, 0) * 1.01 * scale - 1e-9).min(0).values - scale.max(0).values
    hi = (loc + max(q, 0) * 1.01 * scale + 1e-9).max(0).values + scale.max(0).values
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        below = gaussian_mixture_cdf(mid, loc, scale) < p
        lo = torch.where(below, mid, lo)
        hi = torch.where(below, hi, mid)
    return 0.5 * (lo + hi)


def interval_coverage(y: Tensor, lower: Tensor, upper: Tensor) -> Tensor:
    """Per-task fraction of ``y [T, Q, ...]`` inside ``[lower, upper]`` -> ``[T]``."""
    inside = ((y >= lower) & (y <= upper)).to(torch.float64)
    return inside.flatten(1).mean(-1)
