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


def mixture_nll(log_lik: Tensor, log_weights: Tensor | None = None) -> Tensor:
    """Per-task mean NLL of the predictive mixture over ``S`` posterior samples.

    :param log_lik: ``log p(y_tq | phi_s)``, ``[S, T, Q]``. Returns ``[T]``:
        ``-mean_q log( (1/S) sum_s p(y_tq | phi_s) )``.
    :param log_weights: ``[S, T, 1]`` (or ``[S, T, Q]``) log weights of the draws, normalized over ``S``
        (quadrature over a grid of task parameters: the ``prior``/``oracle`` rows); ``None``: ``1/S`` each.
    """
    if log_weights is not None:
        return -torch.logsumexp(log_lik + log_weights.to(log_lik.dtype), dim=0).mean(-1)
    s = log_lik.shape[0]
    return -(torch.logsumexp(log_lik, dim=0) - math.log(s)).mean(-1)


def heldout_lpd(log_lik: Tensor, log_weights: Tensor | None = None) -> dict[str, float]:
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
    if log_weights is None:  # equal weights 1/S
        lw = torch.full_like(joint, -math.log(s))
    else:  # [S, T, 1]: one weight per draw and task (quadrature), the same for its query points
        lw = log_weights.double().reshape(s, t, -1)[..., 0]
    lpd = torch.logsumexp(joint + lw, 0)  # T
    w = torch.softmax(joint + lw, 0)  # S T, normalized importance weights
    ess = 1.0 / (w**2).sum(0)  # T
    # quadrature weights (log_weights) carry no Monte Carlo error
    mc_var = (1.0 / ess - 1.0 / s).clamp(min=0.0) if log_weights is None else torch.zeros_like(ess)
    total = float(lpd.sum())
    se = float(lpd.std(unbiased=True)) * math.sqrt(t) if t > 1 else float("nan")
    pointwise = -float(mixture_nll(ll, None if log_weights is None else lw[..., None]).sum()) * q
    return {"total": total, "se": se, "per_point": total / (t * q), "per_point_se": se / (t * q),
            "mc_se": float(mc_var.sum().sqrt()), "min_ess": float(ess.min()), "pointwise_total": pointwise,
            "tasks": t, "points": t * q, "num_samples": s}


def mixture_weights(log_weights: Tensor | None, like: Tensor) -> Tensor | None:
    """Normalized weights ``[S, ...]`` broadcastable against ``like [S, ...]`` from log weights that may
    lack trailing dims (``[S, T, 1]`` against ``[S, T, Q, O]``); ``None`` (equal weights) stays ``None``."""
    if log_weights is None:
        return None
    w = torch.exp(log_weights.to(like.dtype))
    while w.dim() < like.dim():
        w = w.unsqueeze(-1)
    return w


def gaussian_mixture_cdf(y: Tensor, loc: Tensor, scale: Tensor, log_weights: Tensor | None = None) -> Tensor:
    """CDF at ``y [...]`` of the mixture of ``N(loc_s, scale_s)``, ``loc, scale [S, ...]``: equal weights, or
    ``exp(log_weights)`` (``[S, ...]``, normalized over ``S``, trailing dims may be 1 or missing)."""
    z = (y.unsqueeze(0) - loc) / scale
    cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    w = mixture_weights(log_weights, cdf)
    return cdf.mean(0) if w is None else (w * cdf).sum(0)


def gaussian_mixture_quantile(p: float, loc: Tensor, scale: Tensor, iters: int = 40,
                              log_weights: Tensor | None = None) -> Tensor:
    """The ``p`` quantile of the Gaussian mixture (equal weights, or ``exp(log_weights)``), by bisection
    (to 2^-40 of the bracket width). ``loc, scale [S, ...]`` -> ``[...]``."""
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}")
    q = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(p, dtype=torch.float64)).item()
    lo = (loc + min(q, 0) * 1.01 * scale - 1e-9).min(0).values - scale.max(0).values
    hi = (loc + max(q, 0) * 1.01 * scale + 1e-9).max(0).values + scale.max(0).values
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        below = gaussian_mixture_cdf(mid, loc, scale, log_weights) < p
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


# ---------------------------------------------------------------------------- PIT calibration error and CRPS
# the levels of PACOH's calibration error (Rothfuss et al. 2021) as issue 27 specifies: linspace(0.05, 0.95, 20)
PIT_LEVELS = tuple(float(v) for v in torch.linspace(0.05, 0.95, 20, dtype=torch.float64))
# values per chunk of the mixture CRPS's pairwise term (a few float64 temporaries of 32 MB each)
CRPS_CHUNK_VALUES = 2**22
_SQRT2 = math.sqrt(2.0)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def empirical_cdf(y: Tensor, draws: Tensor, log_weights: Tensor | None = None) -> Tensor:
    """CDF at ``y [...]`` of the empirical distribution of ``draws [S, ...]``: the fraction of draws ``<= y``
    (weighted by ``exp(log_weights)``, ``[S, ...]`` normalized over ``S``, when given). Returns ``[...]``."""
    below = (draws <= y.unsqueeze(0)).to(torch.float64)
    w = mixture_weights(log_weights, below)
    return below.mean(0) if w is None else (w * below).sum(0)


def pit_calibration_error(pit: Tensor, levels: Sequence[float] = PIT_LEVELS) -> dict[str, Any]:
    """Calibration error of a regression predictive from its probability integral transforms, pooled.

    ``PIT = F(y)``, the predictive CDF at the observed label, is uniform on [0, 1] for a calibrated
    predictive. At each level ``q`` the gap is ``g_q = mean_points 1[PIT <= q] - q``, over every point given
    (every query point of every task pooled, as PACOH does, not a mean of per-task values).

    :param pit: ``F(y)`` of each point, any shape (``[T, Q, O]``).
    :returns: ``{"mae": mean_q |g_q|, "rmse": sqrt(mean_q g_q^2), "levels": L, "n": points pooled}``.
    """
    p = pit.detach().double().flatten().sort().values
    if p.numel() == 0:
        raise ValueError("pit_calibration_error needs at least one PIT value")
    q = torch.as_tensor(levels, dtype=torch.float64, device=p.device)
    freq = torch.searchsorted(p, q, right=True).to(torch.float64) / p.numel()  # L: fraction with PIT <= q
    gap = freq - q
    return {"mae": float(gap.abs().mean()), "rmse": float(gap.pow(2).mean().sqrt()), "levels": len(levels),
            "n": p.numel()}


def _abs_normal_mean(mu: Tensor, sd: Tensor) -> Tensor:
    """``E|X|`` for ``X ~ N(mu, sd^2)``: ``sd sqrt(2/pi) exp(-mu^2 / (2 sd^2)) + mu (1 - 2 Phi(-mu/sd))``,
    with ``1 - 2 Phi(-z) = erf(z / sqrt(2))`` (no cancellation for large ``|z|``)."""
    z = mu / sd
    return sd * _SQRT_2_OVER_PI * torch.exp(-0.5 * z * z) + mu * torch.erf(z / _SQRT2)


def _flat_weights(log_weights: Tensor | None, s: int, shape: torch.Size, like: Tensor) -> Tensor:
    """``[S, P]`` normalized weights of ``S`` draws at ``P = prod(shape)`` points from log weights ``[S, ...]``
    whose trailing dims may be 1 or missing (``[S, T, 1]`` against ``[T, Q, O]``); ``None``: ``1/S`` each."""
    if log_weights is None:
        return like.new_full((s, shape.numel()), 1.0 / s)
    lw = log_weights.to(like.dtype)
    while lw.dim() < 1 + len(shape):
        lw = lw.unsqueeze(-1)
    return lw.exp().expand(s, *shape).reshape(s, -1)


def gaussian_mixture_crps(y: Tensor, loc: Tensor, scale: Tensor, log_weights: Tensor | None = None,
                          chunk_values: int = CRPS_CHUNK_VALUES) -> Tensor:
    """Closed-form CRPS of the mixture ``sum_s w_s N(loc_s, scale_s^2)`` at ``y`` (lower is better).

    ``CRPS(F, y) = E|X - y| - 0.5 E|X - X'|`` (``X, X' ~ F`` independent), with
    ``E|X - y| = sum_s w_s A(loc_s - y, scale_s)`` and
    ``E|X - X'| = sum_{s,r} w_s w_r A(loc_s - loc_r, sqrt(scale_s^2 + scale_r^2))``, where
    ``A(m, sd) = E|N(m, sd^2)| = sd sqrt(2/pi) exp(-m^2 / (2 sd^2)) + m (1 - 2 Phi(-m/sd))``.
    The pairwise term is symmetric, so only the ``S (S + 1) / 2`` pairs ``s <= r`` are evaluated (the
    others counted twice), in chunks of points and pairs of at most ``chunk_values`` values: a few
    hundred draws over many tasks fit in memory. Evaluated in the inputs' precision (float32 or
    float64: float32 predictions cost a quarter of the time), summed in float64.

    :param y: ``[T, Q, O]`` (any ``[...]``). :param loc, scale: ``[S, ...]``.
    :param log_weights: ``[S, ...]`` normalized over ``S``, trailing dims may be 1 or missing
        (``[S, T, 1]``); ``None``: ``1/S`` each. Returns ``[...]`` (the broadcast shape) in float64.
    """
    dtype = torch.promote_types(torch.promote_types(loc.dtype, scale.dtype), torch.float32)
    loc, scale, y = loc.to(dtype), scale.to(dtype), y.to(dtype)
    s = loc.shape[0]
    shape = torch.broadcast_shapes(y.shape, loc.shape[1:], scale.shape[1:])
    loc, scale = loc.expand(s, *shape).reshape(s, -1), scale.expand(s, *shape).reshape(s, -1)  # S P
    y = y.expand(shape).reshape(-1)  # P
    w = None if log_weights is None else _flat_weights(log_weights, s, shape, loc)  # S P
    if s > 1 and bool((loc == loc[:1]).all()) and bool((scale == scale[:1]).all()):
        # identical components (a point estimate repeated S times): one Gaussian, no S^2 pairs
        loc, scale, w, s = loc[:1], scale[:1], None, 1
    to_y = _abs_normal_mean(loc - y, scale).double()  # S P
    to_y = to_y.mean(0) if w is None else (w.double() * to_y).sum(0)  # P
    var = scale * scale
    i, j = torch.triu_indices(s, s, device=loc.device)  # K = S (S + 1) / 2 pairs with i <= j
    twice = torch.where(i == j, 1.0, 2.0).to(dtype)  # K
    k = i.numel()
    per_point = max(1, min(y.numel(), chunk_values // k))
    per_pair = max(1, chunk_values // per_point)
    spread = torch.zeros_like(to_y)  # P: sum_{s,r} w_s w_r A(...) (without the 1/S^2 of equal weights)
    for p0 in range(0, y.numel(), per_point):
        pts = slice(p0, p0 + per_point)
        lp, vp = loc[:, pts], var[:, pts]  # S p
        for k0 in range(0, k, per_pair):
            a, b = i[k0:k0 + per_pair], j[k0:k0 + per_pair]
            # A(d, sd) in place: the chunk's temporaries are the memory bound
            d = lp.index_select(0, a).sub_(lp.index_select(0, b))  # c p
            sd = vp.index_select(0, a).add_(vp.index_select(0, b)).sqrt_()
            z = d / sd
            pair = (z * z).mul_(-0.5).exp_().mul_(sd).mul_(_SQRT_2_OVER_PI)
            pair.add_(z.div_(_SQRT2).erf_().mul_(d))
            if w is not None:
                pair.mul_(w[a, pts]).mul_(w[b, pts])
            spread[pts] += (twice[k0:k0 + per_pair] @ pair).double()  # p
    if w is None:
        spread /= s * s
    return (to_y - 0.5 * spread).reshape(shape)


def sample_crps(y: Tensor, draws: Tensor, log_weights: Tensor | None = None) -> Tensor:
    """CRPS at ``y`` of the empirical distribution of ``draws`` (energy form, lower is better):
    ``sum_s w_s |x_s - y| - 0.5 sum_{s,r} w_s w_r |x_s - x_r|``, exactly the CRPS of the draws' (weighted)
    step CDF. The pairwise sum comes from the sorted draws in ``O(S log S)``:
    ``sum_{s,r} w_s w_r |x_s - x_r| = 2 sum_k w_(k) x_(k) (W_below(k) - W_above(k))``.

    :param y: ``[...]``; :param draws: ``[S, ...]``; :param log_weights: ``[S, ...]`` normalized over ``S``
        (trailing dims may be 1), ``None``: ``1/S`` each. Returns ``[...]`` in float64.
    """
    x, y = draws.double(), y.double()
    shape = torch.broadcast_shapes(y.shape, x.shape[1:])
    s = x.shape[0]
    x = x.expand(s, *shape).reshape(s, -1)  # S P
    w = _flat_weights(log_weights, s, shape, x)  # S P
    y = y.expand(shape).reshape(-1)  # P
    to_y = (w * (x - y).abs()).sum(0)  # P
    xs, order = x.sort(0)
    ws = w.gather(0, order)
    below = ws.cumsum(0) - ws  # weight of the draws sorted before each one
    above = ws.sum(0, keepdim=True) - below - ws
    spread = 2.0 * (ws * xs * (below - above)).sum(0)  # P
    return (to_y - 0.5 * spread).reshape(shape)


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
