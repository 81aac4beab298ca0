"""Recalibration on validation tasks: maps fitted after training on the benchmark's validation tasks
(never the test tasks), stored in the run directory, applied beside the raw predictive in ``eval.json``.

Regression, two maps, both reported:

- ``scale``: one width factor ``s`` for every predictive, ``y - m -> (y - m) / s`` around the predictive
  mean ``m`` (each Gaussian draw's mean moves to ``m + s (mu - m)``, its std to ``s sigma``), ``s`` the
  minimizer of the validation NLL (golden-section search on ``log s``). The mean, so the MSE, is unchanged.
- ``isotonic``: Kuleshov et al. (ICML 2018): a monotone map ``R`` of the probability integral transform,
  ``F'(y) = R(F(y))``, with ``R`` the empirical CDF of the validation PIT values (isotonic regression of
  the observed frequency on the predicted level is that CDF), read at its :data:`ISOTONIC_KNOTS` quantiles,
  linear between them and mixed with one pseudo-observation spread uniformly (so no level has slope 0 and
  the density ``R'(F(y)) p(y)`` stays positive). Coverage, the calibration curve and error, and the NLL
  (``log p(y) + log R'(F(y))``, one output per point) change; MSE and CRPS are the raw ones (the map moves
  the CDF, not the draws; ``None`` in its metrics).

Classification: temperature scaling (Guo et al., ICML 2017) of the posterior predictive's log
probabilities, ``p_T ∝ p^(1/T)``, ``T`` the minimizer of the validation NLL.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import metrics as M
from .evaluate import (
    Prediction,
    _finite_only,
    _points,
    classification_metrics,
    predictive_pit,
    regression_metrics,
)
from .tasks import TaskBatch

RECALIBRATION = "recalibration.json"
ISOTONIC_KNOTS = 100
# the golden-section search's bracket for log s (or log T) and its iterations (width 9.2 * 0.618^60: 1e-12)
LOG_RANGE = (math.log(0.02), math.log(50.0))
SEARCH_STEPS = 60

__all__ = ["RECALIBRATION", "fit_recalibration", "recalibrated_metrics", "rescale", "temperature_probs",
           "isotonic_map", "read_recalibration", "isotonic_level", "recalibrated_quantile",
           "describe"]


def _golden(f, lo: float, hi: float, steps: int = SEARCH_STEPS) -> float:  # noqa: ANN001 - a float -> float
    """The minimizer of a unimodal ``f`` on ``[lo, hi]``."""
    g = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(steps):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    return (a + b) / 2


# ---------------------------------------------------------------------------- regression: width scale
def rescale(pred: Prediction, s: float, y: Tensor | None) -> Prediction:
    """The Gaussian-mixture predictive widened by ``s`` around its mean (module docstring); ``log_lik``
    recomputed on ``y [T, Q, O]`` (``None``: no labels)."""
    if not pred.gaussian or pred.stddev is None:
        raise ValueError("the width scale needs a Gaussian p(y | phi) (each draw a Normal)")
    m = pred.predictive_mean()  # T Q O
    mean = m + s * (pred.mean - m)
    std = s * pred.stddev
    # no argument validation: a diverged task (non-finite draws) is left out by the metrics, not an error here
    log_lik = None if y is None else torch.distributions.Normal(mean, std, validate_args=False).log_prob(y).sum(-1)
    return replace(pred, mean=mean, stddev=std, log_lik=log_lik, y_draws=m + s * (pred.y_draws - m))


def _fit_scale(pred: Prediction, y: Tensor) -> float:
    def nll(log_s: float) -> float:
        p = rescale(pred, math.exp(log_s), y)
        return float(M.mixture_nll(_points(p.log_lik), p.log_weights).mean())

    return math.exp(_golden(nll, *LOG_RANGE))


# ---------------------------------------------------------------------------- regression: isotonic map
def isotonic_map(pit: Tensor, knots: int = ISOTONIC_KNOTS) -> dict[str, list[float]]:
    """``{"p": levels, "r": R(levels)}``: the empirical CDF of the PIT values ``pit`` (any shape, pooled) at
    its own ``j / knots`` quantiles (knots where the PIT values are, so a predictive too narrow, whose PIT
    values crowd near 0 and 1, is resolved there), with ``(0, 0)`` and ``(1, 1)``, mixed with one uniform
    pseudo-observation: ``R(p) = (n ECDF(p) + p) / (n + 1)``."""
    u = pit.reshape(-1).double().sort().values
    n = u.numel()
    levels = torch.arange(1, knots, dtype=torch.float64) / knots
    p = torch.cat([torch.zeros(1, dtype=torch.float64), torch.quantile(u, levels), torch.ones(1, dtype=torch.float64)])
    ecdf = torch.searchsorted(u, p, right=True).double() / n
    r = (n * ecdf + p) / (n + 1)
    r[0], r[-1] = 0.0, 1.0
    last = torch.ones_like(p, dtype=torch.bool)
    last[:-1] = p[1:] > p[:-1]  # of tied levels keep the last (the largest R)
    return {"p": p[last].tolist(), "r": r[last].tolist()}


def _apply_map(knots: dict[str, list[float]], u: Tensor) -> tuple[Tensor, Tensor]:
    """``(R(u), R'(u))`` of the piecewise-linear map at ``u`` in [0, 1]."""
    p = torch.tensor(knots["p"], dtype=torch.float64, device=u.device)
    r = torch.tensor(knots["r"], dtype=torch.float64, device=u.device)
    uu = u.double().clamp(0.0, 1.0)
    j = (torch.searchsorted(p, uu, right=True) - 1).clamp(0, p.numel() - 2)
    slope = (r[j + 1] - r[j]) / (p[j + 1] - p[j])
    return r[j] + slope * (uu - p[j]), slope


def _isotonic_metrics(pred: Prediction, batch: TaskBatch, knots: dict[str, list[float]]) -> dict[str, Any]:
    pred, y, bad = _finite_only(pred, batch)
    pit, slope = _apply_map(knots, predictive_pit(pred, y))  # T Q O
    levels = M.CALIBRATION_LEVELS
    coverage = M.pit_coverage(pit, levels)  # L T
    out: dict[str, Any] = {f"coverage{int(q * 100)}": M.mean_ci(coverage[levels.index(q)]) for q in (0.5, 0.9)}
    if y.shape[-1] == 1:  # the density of F' = R(F): R'(F(y)) p(y), per point
        w = M.mixture_weights(pred.log_weights, pred.log_lik)
        lp = torch.logsumexp(pred.log_lik, 0) - math.log(pred.num_samples) if w is None else \
            torch.logsumexp(pred.log_lik + w.log(), 0)  # T Q
        out["nll"] = M.mean_ci(-(lp + slope[..., 0].log().to(lp.dtype)).mean(-1))
    else:
        out["nll"] = None
    out.update(mse=None, crps=None, calibration=M.calibration_curve(coverage, levels),
               calibration_error={**M.pit_calibration_error(pit), "tasks": int(y.shape[0])},
               nonfinite_tasks={"count": bad, "of": batch.num_tasks})
    return out


def isotonic_level(knots: dict[str, list[float]], q: float) -> float:
    """``R^{-1}(q)``: the raw predictive's level whose quantile is the recalibrated predictive's ``q``
    quantile (``F'^{-1}(q) = F^{-1}(R^{-1}(q))``; ``R`` is strictly increasing, so its inverse is the
    piecewise-linear map with the knots' axes swapped)."""
    if not 0 < q < 1:
        raise ValueError(f"q must be in (0, 1), got {q}")
    p = torch.tensor(knots["p"], dtype=torch.float64)
    r = torch.tensor(knots["r"], dtype=torch.float64)
    j = int((torch.searchsorted(r, torch.tensor(q, dtype=torch.float64), right=True) - 1).clamp(0, r.numel() - 2))
    level = float(p[j] + (p[j + 1] - p[j]) * (q - r[j]) / (r[j + 1] - r[j]))
    return min(max(level, 1e-12), 1 - 1e-12)


def recalibrated_quantile(pred: Prediction, q: float, recal: dict[str, Any], how: str = "isotonic") -> Tensor:
    """The ``q`` quantile per query point ``[T, Q, O]`` of ``pred`` under the map ``how`` of ``recal``
    (``"isotonic"``: ``F^{-1}(R^{-1}(q))``; ``"scale"``: the widened mixture's quantile)."""
    from .evaluate import predictive_quantile

    if recal.get("kind") != "regression":
        raise ValueError("quantiles are recalibrated for regression runs only (classification: temperature)")
    if how == "isotonic":
        return predictive_quantile(pred, isotonic_level(recal["isotonic"], q))
    if how == "scale":
        if recal.get("scale") is None:
            raise ValueError("this run has no width scale (its predictive is not Gaussian)")
        return predictive_quantile(rescale(pred, recal["scale"], None), q)
    raise ValueError(f"how must be 'isotonic' or 'scale', got {how!r}")


def describe(recal: dict[str, Any]) -> str:
    """One line: which maps, fitted on what."""
    on = recal.get("fitted_on", {})
    where = f"fitted on {on.get('tasks', '?')} {on.get('set', 'validation')} tasks, never the test tasks"
    if recal.get("kind") == "classification":
        return f"temperature {recal['temperature']:.3g} ({where})"
    scale = recal.get("scale")
    lo, hi = isotonic_level(recal["isotonic"], 0.05), isotonic_level(recal["isotonic"], 0.95)
    iso = f"isotonic map of the PIT (the recalibrated 90% interval spans the raw levels {lo:.3f} to {hi:.3f})"
    return (f"width factor {scale:.3g}; " if scale is not None else "") + f"{iso}; {where}"


# ---------------------------------------------------------------------------- classification: temperature
def temperature_probs(pred: Prediction, t: float) -> Tensor:
    """``[T, Q, C]``: the posterior predictive's probabilities at temperature ``t``."""
    logp = pred.mean.mean(0).clamp(min=1e-30).log()
    return torch.softmax(logp / t, -1)


def _temperature_prediction(pred: Prediction, t: float, y: Tensor) -> Prediction:
    probs = temperature_probs(pred, t)
    log_lik = probs.clamp(min=1e-30).log().gather(-1, y.long().unsqueeze(-1))[..., 0]  # T Q
    return replace(pred, mean=probs.unsqueeze(0), log_lik=log_lik.unsqueeze(0), y_draws=pred.y_draws[:1],
                   log_weights=None, latents={})


def _fit_temperature(pred: Prediction, y: Tensor) -> float:
    def nll(log_t: float) -> float:
        return float(-_temperature_prediction(pred, math.exp(log_t), y).log_lik.mean())

    return math.exp(_golden(nll, *LOG_RANGE))


# ---------------------------------------------------------------------------- fit and apply
def fit_recalibration(pred: Prediction, val: TaskBatch) -> dict[str, Any]:
    """The maps fitted on the validation tasks ``val`` from their prediction ``pred`` (only ``val``'s
    labels are read). Regression: ``{"scale": s, "isotonic": {"p", "r"}}`` (``scale`` ``None`` for a
    predictive that is not Gaussian); classification: ``{"temperature": T}``."""
    pred, y, bad = _finite_only(pred, val)
    fitted_on = {"set": "validation", "tasks": int(y.shape[0]), "left_out_nonfinite": bad,
                 "points": int(y[..., :1].numel())}
    if val.is_classification:
        return {"kind": "classification", "temperature": _fit_temperature(pred, y), "fitted_on": fitted_on}
    return {"kind": "regression", "scale": _fit_scale(pred, y) if pred.gaussian else None,
            "isotonic": isotonic_map(predictive_pit(pred, y)), "fitted_on": fitted_on}


def recalibrated_metrics(pred: Prediction, batch: TaskBatch, recal: dict[str, Any]) -> dict[str, Any]:
    """The metrics of ``pred`` on ``batch`` under each map of ``recal``: regression ``{"scale": ...,
    "isotonic": ...}``, classification ``{"temperature": ...}``, each with the map's value."""
    if recal["kind"] == "classification":
        t = recal["temperature"]
        return {"temperature": {"value": t, **classification_metrics(
            _temperature_prediction(pred, t, batch.y_query), batch)}}
    out: dict[str, Any] = {"isotonic": _isotonic_metrics(pred, batch, recal["isotonic"])}
    if recal.get("scale") is not None and pred.gaussian:
        scaled = rescale(pred, recal["scale"], batch.y_query)
        out["scale"] = {"value": recal["scale"], **regression_metrics(scaled, batch)}
    return out


def read_recalibration(run_dir: str | Path) -> dict[str, Any] | None:
    """A run directory's ``recalibration.json``, or ``None``."""
    import json

    path = Path(run_dir) / RECALIBRATION
    return json.loads(path.read_text()) if path.exists() else None
