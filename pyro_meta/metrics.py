"""Evaluation metrics, each reported as a mean over tasks with a 95% confidence interval."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

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


def heldout_lpd(log_lik: Tensor) -> dict[str, float]:
    """Held-out log predictive density of the query sets, ``log p(y_query | support)``, estimated by
    Monte Carlo over ``S`` posterior draws conditioned on the support set only.

    :param log_lik: ``log p(y_tq | phi_s)``, ``[S, T, Q]`` (the draws ``phi_s ~ q(phi | support_t)``).

    Per task, the joint density of its ``Q`` query points:
    ``lpd_t = log (1/S) sum_s prod_q p(y_tq | phi_s)``. Returned:

    - ``total``: ``sum_t lpd_t``; ``se``: its standard error over tasks (``sqrt(T) * sd_t(lpd_t)``,
      tasks are independent draws of the task distribution, as PSIS-LOO's ``se``);
    - ``per_point`` and ``per_point_se``: the same divided by ``T * Q``;
    - ``mc_se``: the Monte Carlo standard error of ``total`` from the finite ``S`` (delta method,
      ``sqrt(sum_t (1/ESS_t - 1/S))``; the estimate is biased low by about ``mc_se^2 / 2``);
    - ``min_ess``: the smallest per-task effective sample size of the importance weights
      ``prod_q p(y_tq | phi_s)`` (near 1: the joint estimate rests on one draw; raise S);
    - ``pointwise_total``: ``sum_t sum_q log (1/S) sum_s p(y_tq | phi_s)``, each point's own predictive
      (``-T * Q`` times the mean NLL); it equals ``total`` for a point estimate.
    """
    s, t, q = log_lik.shape
    ll = log_lik.double()
    joint = ll.sum(-1)  # S T
    lpd = torch.logsumexp(joint, 0) - math.log(s)  # T
    w = torch.softmax(joint, 0)  # S T, normalized importance weights
    ess = 1.0 / (w**2).sum(0)  # T
    mc_var = (1.0 / ess - 1.0 / s).clamp(min=0.0)
    total = float(lpd.sum())
    se = float(lpd.std(unbiased=True)) * math.sqrt(t) if t > 1 else float("nan")
    pointwise = -float(mixture_nll(ll).sum()) * q
    return {"total": total, "se": se, "per_point": total / (t * q), "per_point_se": se / (t * q),
            "mc_se": float(mc_var.sum().sqrt()), "min_ess": float(ess.min()), "pointwise_total": pointwise,
            "tasks": t, "points": t * q, "num_samples": s}


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


# ---------------------------------------------------------------------------- regression calibration
# nominal levels of the regression calibration curve: 0.05, 0.10, ..., 0.95
CALIBRATION_LEVELS = tuple(round(0.05 * k, 2) for k in range(1, 20))


def pit_coverage(pit: Tensor, levels: Sequence[float] = CALIBRATION_LEVELS) -> Tensor:
    """Per-task central-interval coverage at each nominal level from probability integral transforms.

    For a continuous, strictly increasing predictive CDF ``F``, ``y`` lies in the central interval
    ``[F^-1((1 - a) / 2), F^-1((1 + a) / 2)]`` exactly when ``|2 F(y) - 1| <= a``, so one CDF value per
    point gives the coverage at every level.

    :param pit: ``F(y)`` of each query point, ``[T, Q, ...]``. Returns ``[L, T]``.
    """
    dev = (2 * pit.detach().double() - 1).abs().flatten(1)  # T P
    a = torch.as_tensor(levels, dtype=torch.float64, device=dev.device)[:, None, None]  # L 1 1
    return (dev[None] <= a).to(torch.float64).mean(-1)


def calibration_curve(coverage: Tensor, levels: Sequence[float] = CALIBRATION_LEVELS) -> dict[str, Any]:
    """The regression calibration curve: observed against nominal central-interval coverage.

    :param coverage: ``[L, T]`` each task's fraction of query points inside its central predictive
        interval at each nominal level (:func:`interval_coverage` per level, or :func:`pit_coverage`).
    :returns: ``{"levels": [L], "observed": [L] (mean over tasks), "ci95": [L] (95% CI half-width over
        tasks), "gap": mean_l |observed_l - level_l|, "max_gap": max_l |...|, "n": T}``. A calibrated
        predictive has ``observed ~= levels``; an over-confident one lies below the diagonal.
    """
    cov = coverage.detach().double()
    if cov.dim() != 2 or cov.shape[0] != len(levels):
        raise ValueError(f"expected coverage [L={len(levels)}, T], got {tuple(cov.shape)}")
    stats = [mean_ci(c) for c in cov]
    observed = [s["mean"] for s in stats]
    gaps = [abs(o - a) for o, a in zip(observed, levels)]
    return {"levels": [float(a) for a in levels], "observed": observed, "ci95": [s["ci95"] for s in stats],
            "gap": sum(gaps) / len(gaps), "max_gap": max(gaps), "n": int(cov.shape[1])}


# ---------------------------------------------------------------------------- classification
CALIBRATION_BINS = 15  # the standard for ECE/MCE (Guo et al. 2017; ABML and BMAML report with it)


def _check_probs(probs: Tensor, y: Tensor) -> None:
    if probs.dim() < 2 or y.shape != probs.shape[:-1]:
        raise ValueError(f"expected probs [..., C] and labels [...] with matching leading dims, got "
                         f"probs {tuple(probs.shape)} and labels {tuple(y.shape)}")
    if y.dtype != torch.int64:
        raise ValueError(f"labels must be int64 class indices, got {y.dtype}")


def accuracy(probs: Tensor, y: Tensor) -> Tensor:
    """Per-task accuracy of the predictive's most probable class: ``probs [T, Q, C]``, ``y [T, Q]`` -> ``[T]``."""
    _check_probs(probs, y)
    return (probs.argmax(-1) == y).to(torch.float64).flatten(1).mean(-1)


def brier(probs: Tensor, y: Tensor) -> Tensor:
    """Per-task Brier score ``mean_q sum_c (p_qc - 1[y_q = c])^2`` (0 is perfect, 2 the worst):
    ``probs [T, Q, C]``, ``y [T, Q]`` -> ``[T]``."""
    _check_probs(probs, y)
    onehot = torch.nn.functional.one_hot(y, probs.shape[-1]).to(probs.dtype)
    return ((probs - onehot) ** 2).sum(-1).to(torch.float64).flatten(1).mean(-1)


def calibration_bins(probs: Tensor, y: Tensor, num_bins: int = CALIBRATION_BINS) -> dict[str, Tensor]:
    """Reliability statistics of the top-class confidence over every prediction pooled.

    Bins are ``num_bins`` equal-width intervals of confidence ``(k/B, (k+1)/B]`` (the first one also
    holds 0). ``probs [..., C]``, ``y [...]`` -> ``{"edges" [B+1], "count" [B], "confidence" [B],
    "accuracy" [B]}``; empty bins have NaN confidence and accuracy.
    """
    _check_probs(probs, y)
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    conf, pred = probs.detach().to(torch.float64).max(-1)
    conf, correct = conf.flatten(), (pred == y).to(torch.float64).flatten()
    edges = torch.linspace(0, 1, num_bins + 1, dtype=torch.float64, device=conf.device)
    # bin k holds (edges[k], edges[k+1]]: bucketize with right=False gives i such that e[i-1] < c <= e[i]
    idx = (torch.bucketize(conf, edges, right=False) - 1).clamp(0, num_bins - 1)
    count = torch.zeros(num_bins, dtype=torch.float64, device=conf.device).index_add_(0, idx, torch.ones_like(conf))
    s_conf = torch.zeros_like(count).index_add_(0, idx, conf)
    s_acc = torch.zeros_like(count).index_add_(0, idx, correct)
    with torch.no_grad():
        mean_conf = torch.where(count > 0, s_conf / count.clamp(min=1), torch.full_like(count, float("nan")))
        mean_acc = torch.where(count > 0, s_acc / count.clamp(min=1), torch.full_like(count, float("nan")))
    return {"edges": edges.cpu(), "count": count.cpu(), "confidence": mean_conf.cpu(), "accuracy": mean_acc.cpu()}


def calibration_errors(bins: dict[str, Tensor]) -> dict[str, float]:
    """Expected and maximum calibration error from :func:`calibration_bins`:
    ``ECE = sum_k (n_k / n) |acc_k - conf_k|``, ``MCE = max_k |acc_k - conf_k|`` over non-empty bins."""
    full = bins["count"] > 0
    gap = (bins["accuracy"][full] - bins["confidence"][full]).abs()
    n = bins["count"].sum()
    return {"ece": float((bins["count"][full] / n * gap).sum()), "mce": float(gap.max())}
