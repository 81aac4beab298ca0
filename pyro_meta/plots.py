"""Pictures of what a learner believes: predictive bands on regression tasks, training curves."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib import ticker  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from ._arviz import az  # noqa: E402
from .evaluate import predict, predictive_quantile  # noqa: E402
from .learner import MetaLearner  # noqa: E402
from .tasks import RegressionFamily, TaskBatch  # noqa: E402


def _save(fig: plt.Figure, path: str | Path) -> Path:
    """Lay out (unless the figure has a layout engine already), write with a tight bounding box so no
    label is clipped, and close."""
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight", pad_inches=0.08)
    plt.close(fig)
    return path


def _grid_batch(batch: TaskBatch, x_range: tuple[float, float], n: int = 200) -> TaskBatch:
    grid = torch.linspace(*x_range, n, dtype=batch.x_support.dtype, device=batch.x_support.device)
    xq = grid[None, :, None].expand(batch.num_tasks, n, 1).contiguous()  # T n 1
    return TaskBatch(batch.x_support, batch.y_support, xq, None, batch.info)


def predictive_bands(learner: MetaLearner, batch: TaskBatch, x_range: tuple[float, float],
                     num_samples: int = 100, seed: int = 0, n: int = 200, draws: int = 0,
                     recalibration: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """Predictive mean and 50%/90% central intervals on a grid of ``n`` inputs, per task ``[T, n]``;
    with ``draws``, also ``"draws" [k, T, n]``: the predictive means of the first ``k <= draws``
    posterior samples (``Prediction.mean[s]``, posterior function draws; one for a point estimate).
    With a regression ``recalibration`` (a run's ``recalibration.json``), also ``"rlo50"`` ... ``"rhi90"``:
    the same intervals under its isotonic map (:func:`pyro_meta.recalibrate.recalibrated_quantile`)."""
    from .recalibrate import recalibrated_quantile

    g = _grid_batch(batch, x_range, n)
    pred = predict(learner, g, num_samples, seed, keep_latents=False)
    out = {"x": g.x_query[..., 0], "mean": pred.predictive_mean()[..., 0]}
    for level in (0.5, 0.9):
        for side, p in (("lo", (1 - level) / 2), ("hi", (1 + level) / 2)):
            v = predictive_quantile(pred, p)
            out[f"{side}{int(level * 100)}"] = v[..., 0]
            if recalibration is not None and recalibration.get("kind") == "regression":
                out[f"r{side}{int(level * 100)}"] = recalibrated_quantile(pred, p, recalibration)[..., 0]
    if draws:
        out["draws"] = pred.mean[:draws, ..., 0]  # k T n
    return out


def plot_regression_tasks(learners: Sequence[tuple[str, MetaLearner, int]], batch: TaskBatch,
                          family: RegressionFamily, path: str | Path, tasks: Sequence[int] = (0, 1, 2, 3),
                          seed: int = 0, recalibration: dict[str, Any] | None = None) -> Path:
    """One panel per task: true function, support (dots) and query (crosses) points, and each
    learner's predictive mean with 50% and 90% bands. ``learners``: ``(label, learner, samples)``.
    ``recalibration`` (one learner: its run's ``recalibration.json``): the recalibrated 50% and 90%
    intervals drawn as dashed lines over the raw bands, and the figure says so."""
    if recalibration is not None and len(learners) != 1:
        raise ValueError("recalibration is one run's map: plot one learner with it")
    tasks = [t for t in tasks if t < batch.num_tasks]
    sub = batch.select(list(tasks))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.4), squeeze=False)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    grid = torch.linspace(*family.x_range, 200)[None, :, None].expand(len(tasks), 200, 1)
    has_truth = getattr(family, "truth", True) is not None  # a TaskFamily may have no truth function
    truth = family.function({k: v.cpu() for k, v in sub.info.items()}, grid)[..., 0] \
        if sub.info and has_truth else None
    bands = [(label, predictive_bands(lr, sub, family.x_range, s, seed, recalibration=recalibration))
             for label, lr, s in learners]
    for j, ax in enumerate(axes[0]):
        if truth is not None:
            ax.plot(grid[j, :, 0], truth[j], color="black", lw=1.2, label="true function")
        for (label, b), c in zip(bands, colors):
            x = b["x"][j].cpu()
            ax.fill_between(x, b["lo90"][j].cpu(), b["hi90"][j].cpu(), color=c, alpha=0.15, lw=0)
            ax.fill_between(x, b["lo50"][j].cpu(), b["hi50"][j].cpu(), color=c, alpha=0.25, lw=0)
            ax.plot(x, b["mean"][j].cpu(), color=c, lw=1.5, label=f"{label} mean, 50/90% bands")
            if "rlo90" in b:
                for lv, ls in ((90, "--"), (50, ":")):
                    ax.plot(x, b[f"rlo{lv}"][j].cpu(), color="black", lw=1.0, ls=ls,
                            label=f"{lv}% band, recalibrated")
                    ax.plot(x, b[f"rhi{lv}"][j].cpu(), color="black", lw=1.0, ls=ls)
        if sub.y_query is not None:
            ax.scatter(sub.x_query[j, :, 0].cpu(), sub.y_query[j, :, 0].cpu(), marker="x", s=10,
                       color="gray", alpha=0.6, label="query")
        ax.scatter(sub.x_support[j, :, 0].cpu(), sub.y_support[j, :, 0].cpu(), s=30, color="red",
                   zorder=5, label="support")
        ax.set_title(f"test task {tasks[j]}")
        ax.set_xlabel("x")
    axes[0, 0].set_ylabel("y")
    handles, labels = axes[0, 0].get_legend_handles_labels()  # below the panels: never over the data
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, -0.02))
    if recalibration is not None:
        from .recalibrate import describe

        fig.suptitle("dashed/dotted: 90%/50% intervals under the isotonic recalibration map, "
                     + describe(recalibration).split("; ")[-1], fontsize=8)
        fig.subplots_adjust(top=0.84)
    fig.subplots_adjust(bottom=0.22)
    return _save(fig, path)


def _running_mean(v: np.ndarray, window: int) -> np.ndarray:
    """Centred running mean of ``v`` over ``window`` points (shorter windows at the ends)."""
    c = np.concatenate([[0.0], np.cumsum(v)])
    half = window // 2
    i = np.arange(len(v))
    lo, hi = np.maximum(i - half, 0), np.minimum(i + window - half, len(v))
    return (c[hi] - c[lo]) / (hi - lo)


def _loss_scale(finite: np.ndarray) -> tuple[str, float]:
    """``("linear" | "log" | "symlog", linthresh)`` for losses ``finite``: linear unless they span
    1.5 decades or more; then log when all are positive, else symlog, linear within the smallest
    typical magnitude."""
    if finite.size < 2:
        return "linear", 1.0
    mags = np.abs(finite[finite != 0])
    if mags.size == 0:
        return "linear", 1.0
    if (finite > 0).all():
        return ("log", 1.0) if math.log10(finite.max() / finite.min()) >= 1.5 else ("linear", 1.0)
    small = float(np.percentile(mags, 5))
    if math.log10(mags.max() / small) < 1.5:
        return "linear", 1.0
    return "symlog", 10.0 ** math.floor(math.log10(small))


def _short_number(v: float, _pos: Any = None) -> str:
    return f"{v:g}".replace("-", "\N{MINUS SIGN}")


def _training_curve_figure(rows: Sequence[Mapping[str, Any]], title: str = "") -> plt.Figure:
    """The training-loss figure of :func:`plot_training_curve` from ``metrics.jsonl`` rows (``loss``
    ``None``/NaN for a skipped step), not yet saved."""
    steps = np.array([float(r["step"]) for r in rows])
    loss = np.array([float("nan") if r.get("loss") is None else float(r["loss"]) for r in rows])
    ok = np.isfinite(loss)
    finite = loss[ok]
    fig, ax = plt.subplots(figsize=(6.0, 3.6), layout="constrained")
    scale, linthresh = _loss_scale(finite)
    many = finite.size >= 30
    ax.plot(steps, loss, lw=0.8, color="tab:blue", alpha=0.45 if many else 1.0,
            marker="o" if finite.size < 15 else None, ms=3,
            label="loss per logged step" if finite.size else None)
    if many:
        window = max(5, finite.size // 20)
        ax.plot(steps[ok], _running_mean(finite, window), lw=1.8, color="tab:blue",
                label=f"running mean ({window} logged steps)")
    if not ok.all():
        ax.plot(steps[~ok], np.zeros((~ok).sum()), "|", ms=10, mew=1.5, color="tab:red", clip_on=False,
                transform=ax.get_xaxis_transform(), label="skipped step (loss not finite)")
    if finite.size == 0:
        ax.text(0.5, 0.5, "no finite loss logged (every step skipped)", ha="center", va="center",
                transform=ax.transAxes, fontsize=9)
    if scale == "log":
        ax.set_yscale("log")
        if math.log10(finite.max() / finite.min()) < 4:  # few decades: label 1, 2, 5 x 10^k too
            ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(ticker.FuncFormatter(_short_number))
            ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    elif scale == "symlog":
        ax.set_yscale("symlog", linthresh=linthresh)
        ax.yaxis.set_major_locator(ticker.SymmetricalLogLocator(base=10, linthresh=linthresh))
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(_short_number))
    ax.set_xlabel("meta-step", fontsize=9)
    what = {"linear": "", "log": " (log scale)", "symlog": f" (symlog, linear within ±{linthresh:g})"}
    ax.set_ylabel(f"meta-batch loss per task{what[scale]}", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3, which="major")
    ax.set_title(title or "meta-training loss", fontsize=10)
    if many or not ok.all():
        fig.legend(fontsize=8, loc="outside lower center", ncols=3, frameon=False)
    return fig


def plot_training_curve(metrics_jsonl: str | Path, path: str | Path, title: str = "") -> Path | None:
    """Meta-training loss against step, from a run's ``metrics.jsonl``, with a running mean when
    there are many points and marks at skipped steps (``loss`` null). The y scale follows the data:
    linear over less than 1.5 decades, else log (or symlog when some losses are <= 0)."""
    rows = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines() if line.strip()]
    if not rows:
        return None
    return _save(_training_curve_figure(rows, title), path)


def plot_reliability(reliability: dict[str, list], path: str | Path, title: str = "") -> Path:
    """Reliability diagram: accuracy against mean confidence per confidence bin (bars), the diagonal
    of perfect calibration, the gap to it, and how many predictions each bin holds (lower panel).
    ``reliability``: ``{"edges", "count", "confidence", "accuracy"}`` as in ``eval.json``."""
    edges = torch.tensor(reliability["edges"], dtype=torch.float64)
    count = torch.tensor(reliability["count"], dtype=torch.float64)
    acc = torch.tensor([float("nan") if v is None else v for v in reliability["accuracy"]], dtype=torch.float64)
    conf = torch.tensor([float("nan") if v is None else v for v in reliability["confidence"]], dtype=torch.float64)
    left, width = edges[:-1], edges[1:] - edges[:-1]
    full = count > 0
    fig, (ax, axn) = plt.subplots(2, 1, figsize=(4.4, 5.2), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.bar(left[full], acc[full], width=width[full], align="edge", color="tab:blue", edgecolor="black", lw=0.5,
           label="accuracy")
    gap_lo, gap_hi = torch.minimum(acc, conf), torch.maximum(acc, conf)
    ax.bar(left[full], (gap_hi - gap_lo)[full], bottom=gap_lo[full], width=width[full], align="edge",
           color="tab:red", alpha=0.3, hatch="//", lw=0, label="gap to mean confidence")
    ax.plot([0, 1], [0, 1], "--", color="gray", lw=1, label="perfect calibration")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="upper left")
    if title:
        ax.set_title(title, fontsize=9)
    frac = count / count.sum().clamp(min=1)
    axn.bar(left, frac, width=width, align="edge", color="gray", edgecolor="black", lw=0.5)
    axn.set_yscale("log")
    axn.set_xlim(0, 1)
    axn.set_xlabel("confidence (top-class predictive probability)")
    axn.set_ylabel("fraction")
    return _save(fig, path)


def _kde(values: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Density of the finite ``values`` on ``grid``: ArviZ's KDE, interpolated (0 outside its support)."""
    values = values[np.isfinite(values)]
    if values.size < 2 or float(np.ptp(values)) == 0.0:
        return np.zeros_like(grid)
    x, pdf = az.kde(values)
    return np.interp(grid, x, pdf, left=0.0, right=0.0)


def _selection_text(coords: Mapping[str, Any]) -> str:
    """``{"task": 0, "class": 2, "phi_dim": [...]}`` -> ``"test task 0, class 2"``."""
    parts = []
    for k, v in coords.items():
        if np.ndim(v) == 0:
            parts.append(f"test task {v}" if k == "task" else f"{k} {v}")
    return ", ".join(parts)


def _weight_draws(idata: Any, var_name: str, coords: Mapping[str, Any]) -> tuple[np.ndarray, list[str]]:
    """Draws ``[num_weights, chains * draws]`` of ``idata.posterior[var_name]`` at ``coords`` and a
    label per weight (every dim besides chain and draw is flattened into weights)."""
    da = idata.posterior[var_name]
    da = da.sel({k: v for k, v in coords.items() if k in da.dims})
    rest = [d for d in da.dims if d not in ("chain", "draw")]
    da = da.transpose(*rest, "chain", "draw")
    shape = [da.sizes[d] for d in rest]
    values = np.asarray(da.values, dtype=np.float64).reshape(int(np.prod(shape)), -1)
    labels = []
    for idx in np.ndindex(*shape):
        names = []
        for d, i in zip(rest, idx):
            c = da[d].values[i] if d in da.coords else i
            named = isinstance(c, str) and not (len(rest) > 1 and d in ("task", "class"))
            names.append(str(c) if named else f"{d} {c}")
        labels.append(", ".join(names) if names else var_name)
    return values, labels


def _is_point(v: np.ndarray) -> bool:
    v = v[np.isfinite(v)]
    return v.size <= 1 or float(np.ptp(v)) <= 1e-12 * max(1.0, float(np.abs(v).max()))


def _point_estimate_figure(values: np.ndarray, labels: list[str], heading: str) -> plt.Figure:
    """One panel: each weight's (single) value as a labelled dot on a line from zero."""
    n = len(labels)
    point = np.array([v[np.isfinite(v)][0] if np.isfinite(v).any() else np.nan for v in values])
    fig, ax = plt.subplots(figsize=(6.4, 1.4 + 0.32 * n), layout="constrained")
    y = np.arange(n)[::-1]
    ax.hlines(y, 0, np.nan_to_num(point), color="tab:blue", lw=1.5)
    ax.plot(point, y, "o", color="tab:blue", ms=6)
    ax.axvline(0, color="gray", lw=0.8)
    for yi, v in zip(y, point):
        ax.annotate(f"{v:.4g}", (0 if not np.isfinite(v) else v, yi), xytext=(6 if v >= 0 else -6, 0),
                    textcoords="offset points", ha="left" if v >= 0 else "right", va="center", fontsize=8)
    span = np.nanmax(np.abs(point)) if np.isfinite(point).any() else 1.0
    span = span if span > 0 else 1.0
    lo, hi = min(np.nanmin(point), 0.0), max(np.nanmax(point), 0.0)
    ax.set_xlim(lo - (0.3 if lo < 0 else 0.05) * span, hi + (0.3 if hi > 0 else 0.05) * span)
    ax.set_ylim(-0.7, n - 0.3)
    ax.set_yticks(y, labels, fontsize=8)
    ax.tick_params(axis="x", labelsize=8)
    ax.set_xlabel("value", fontsize=9)
    ax.grid(alpha=0.3, axis="x")
    ax.set_title(heading, fontsize=10)
    return fig


def _posterior_weights_figure(idata: Any, var_name: str, coords: Mapping[str, Any], title: str = "",
                              max_weights: int = 24, hdi_prob: float = 0.94) -> plt.Figure | None:
    """The figure of :func:`plot_posterior_weights`, not yet saved; ``None`` when there is nothing
    to draw (no such variable, or an empty selection)."""
    if var_name not in idata.posterior:
        return None
    values, labels = _weight_draws(idata, var_name, coords)
    total = len(labels)
    if total == 0 or values.shape[1] == 0:
        return None
    values, labels = values[:max_weights], labels[:max_weights]
    n, draws = len(labels), values.shape[1]
    where = _selection_text(coords)
    which = f"first {n} of {total} weights" if total > n else f"{n} weight{'s' * (n > 1)}"
    context = ", ".join(p for p in (where, which) if p)
    point = [_is_point(v) for v in values]
    if all(point):
        why = "a single draw" if draws == 1 else f"all {draws} draws equal"
        heading = title or f"posterior of {var_name} ({context})"
        return _point_estimate_figure(values, labels, f"{heading}\npoint estimate ({why})")
    ncols = min(4, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.3 * ncols, 0.9 + 2.4 * nrows), squeeze=False,
                             layout="constrained")
    for ax, v, label, is_point in zip(axes.flat, values, labels, point):
        v = v[np.isfinite(v)]
        ax.tick_params(labelsize=8)
        ax.xaxis.set_major_locator(ticker.MaxNLocator(nbins=4))
        ax.set_yticks([])
        for side in ("left", "right", "top"):
            ax.spines[side].set_visible(False)
        if v.size == 0:
            ax.text(0.5, 0.5, "no finite draws", ha="center", va="center", transform=ax.transAxes,
                    fontsize=8)
            ax.set_title(label, fontsize=9)
            continue
        if is_point:
            ax.axvline(v[0], color="tab:blue", lw=2)
            pad = max(0.1 * abs(v[0]), 1e-3)
            ax.set_xlim(v[0] - pad, v[0] + pad)
            ax.text(0.54, 0.6, "point estimate\n(all draws equal)", ha="left", va="center",
                    transform=ax.transAxes, fontsize=8, bbox={"fc": "white", "ec": "none", "alpha": 0.8})
            ax.set_title(f"{label}\nvalue {v[0]:.3g}", fontsize=9)
            continue
        lo, hi = (float(x) for x in az.hdi(v, hdi_prob=hdi_prob))
        pad = 0.15 * (v.max() - v.min())
        grid = np.linspace(v.min() - pad, v.max() + pad, 256)
        ax.hist(v, bins=min(30, max(5, int(1.3 * np.sqrt(v.size)))), density=True, color="tab:blue",
                alpha=0.3, lw=0)
        dens = _kde(v, grid)
        ax.plot(grid, dens, color="tab:blue", lw=1.5)
        ax.axvline(v.mean(), color="black", ls="--", lw=1)
        ax.plot([lo, hi], [0, 0], color="black", lw=4, solid_capstyle="butt", clip_on=False)
        ax.set_ylim(bottom=0)
        ax.set_title(f"{label}\nmean {v.mean():.3g}, HDI [{lo:.3g}, {hi:.3g}]", fontsize=9)
    for ax in axes.flat[n:]:
        fig.delaxes(ax)
    heading = title or f"posterior of {var_name} ({context}), {draws} draws"
    fig.suptitle(f"{heading}\nhistogram and density of the draws; dashed: mean; "
                 f"black bar: {int(round(hdi_prob * 100))}% HDI", fontsize=10)
    return fig


def plot_posterior_weights(idata: Any, var_name: str, coords: Mapping[str, Any], path: str | Path,
                           title: str = "", max_weights: int = 24) -> Path | None:
    """Marginal posterior of some weights of ``idata.posterior[var_name]`` at ``coords`` (e.g.
    ``{"task": 0, "phi_dim": names[:8]}``; VERSA's ``psi`` also takes ``"class"``): one panel per
    weight (4 columns) with a histogram, a density, the mean and the 94% HDI. A point estimate (all
    draws equal, e.g. MAML's Delta guide, or a single draw) is one panel of labelled values instead;
    a single weight without spread among spread ones gets a marked line. ``None`` when there is
    nothing to draw. At most ``max_weights`` weights are shown."""
    fig = _posterior_weights_figure(idata, var_name, coords, title, max_weights)
    return None if fig is None else _save(fig, path)


def _ppc_figure(idata: Any, num_pp_samples: int = 50, title: str = "", seed: int = 0) -> plt.Figure:
    """The figure of :func:`plot_ppc`, not yet saved."""
    pp = idata.posterior_predictive["y_query"]
    obs = np.asarray(idata.observed_data["y_query"].values)
    pp = pp.stack(sample=("chain", "draw")).transpose("sample", ...)
    sims = np.asarray(pp.values).reshape(pp.sizes["sample"], -1)  # S, tasks * queries
    obs = obs.reshape(-1)
    tasks = int(idata.observed_data["y_query"].sizes.get("task", 1))
    k = max(1, min(num_pp_samples, sims.shape[0]))
    pick = np.sort(np.random.default_rng(seed).choice(sims.shape[0], size=k, replace=False))
    sims = sims[pick]
    discrete = obs.dtype.kind in "iub" and pp.dtype.kind in "iub"
    fig, ax = plt.subplots(figsize=(6.4, 4.2), layout="constrained")
    if discrete:
        num = int(max(obs.max(initial=0), sims.max(initial=0))) + 1
        classes = np.arange(num)
        obs_frac = np.bincount(obs.astype(np.int64), minlength=num) / max(obs.size, 1)
        sim_frac = np.stack([np.bincount(s.astype(np.int64), minlength=num) / max(s.size, 1)
                             for s in sims])
        width = 0.4
        ax.bar(classes - width / 2, obs_frac, width, color="0.35", label="observed query labels")
        mean = sim_frac.mean(0)
        err = None
        if k > 1:
            lo, hi = np.percentile(sim_frac, [5, 95], axis=0)
            err = np.stack([mean - lo, hi - mean])
        ax.bar(classes + width / 2, mean, width, yerr=err, capsize=2, color="tab:blue", alpha=0.8,
               label="posterior predictive" + (f" (mean, 5-95% over {k} draws)" if k > 1 else " (1 draw)"))
        if num <= 25:
            ax.set_xticks(classes)
        else:
            ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        ax.set_xlabel("query label (class index within a task)", fontsize=9)
        ax.set_ylabel("fraction of query points", fontsize=9)
        ax.set_ylim(0, max(obs_frac.max(initial=0), (mean + (0 if err is None else err[1])).max()) * 1.3)
    else:
        finite = np.concatenate([obs[np.isfinite(obs)], sims[np.isfinite(sims)]])
        lo, hi = np.percentile(finite, [0.5, 99.5]) if finite.size else (0.0, 1.0)
        pad = 0.05 * (hi - lo) if hi > lo else 1.0
        grid = np.linspace(lo - pad, hi + pad, 300)
        for i, s in enumerate(sims):
            ax.plot(grid, _kde(s, grid), color="tab:blue", lw=0.8, alpha=0.25 if k > 1 else 0.9,
                    label=f"posterior predictive ({k} draw{'s' * (k > 1)})" if i == 0 else None)
        if k > 1:
            ax.plot(grid, _kde(sims.reshape(-1), grid), color="tab:orange", ls="--", lw=1.8,
                    label="posterior predictive, all shown draws pooled")
        ax.plot(grid, _kde(obs, grid), color="black", lw=2, label="observed query labels")
        ax.set_ylim(bottom=0)
        ax.set_xlabel(f"y at the held-out query points (pooled over {tasks} test tasks)", fontsize=9)
        ax.set_ylabel("density", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    fig.legend(fontsize=8, loc="outside lower center", ncols=2, frameon=False)
    ax.set_title(title or (f"posterior predictive check: held-out query points of the {tasks} exported "
                           "test tasks\nposterior predictive draws vs the observed query labels"),
                 fontsize=10)
    return fig


def plot_ppc(idata: Any, path: str | Path, num_pp_samples: int = 50, title: str = "") -> Path:
    """Posterior predictive check of ``idata``'s ``y_query``: for regression, the density of each of
    up to ``num_pp_samples`` posterior predictive draws (pooled over the exported test tasks' held-out
    query points) against the observed query labels; for classification, the fraction of query
    points per class label, observed against predicted. Works with a single draw."""
    return _save(_ppc_figure(idata, num_pp_samples, title), path)


def _task_kind(info: Mapping[str, torch.Tensor], j: int) -> str:
    """``"line"`` / ``"sine"`` for a sinusoid-or-line task (its ``is_line`` parameter), else ``""``."""
    if "is_line" not in info:
        return ""
    return "line" if float(info["is_line"][j]) > 0.5 else "sine"


def plot_ambiguous_tasks(learners: Mapping[str, Mapping[int, tuple[MetaLearner, int]]],
                         batches: Mapping[int, TaskBatch], family: RegressionFamily, path: str | Path,
                         tasks: Sequence[int] = (0, 1), draws: int = 5, seed: int = 0, title: str = "") -> Path:
    """Posterior function draws on a few fixed test tasks: one column per method, one row per
    (task, shots). Each panel: the true function, the support points, the predictive mean with its
    50% and 90% central bands on a dense grid, and up to ``draws`` posterior function draws (the
    predictive means of single posterior samples; a point estimate such as MAML's has one).

    :param learners: ``method -> shots -> (learner, posterior samples)``; each row uses the learner
        trained at that row's shots (a method without it leaves the panel empty, saying so).
    :param batches: ``shots -> fixed test tasks`` at those shots; regression benchmarks draw the same
        functions for every shots (:meth:`RegressionFamily.fixed`), so rows of one task show how the
        posterior changes as support points are added.
    :param tasks: task indices to show (rows: each task at each shots, in order).
    """
    shots = sorted(batches)
    rows = [(t, k) for t in tasks for k in shots]
    methods = list(learners)
    n = 200
    grid = torch.linspace(*family.x_range, n)
    fig, axes = plt.subplots(len(rows), len(methods), figsize=(3.4 * len(methods) + 0.6, 2.6 * len(rows) + 0.9),
                             squeeze=False, sharex=True, layout="constrained")
    for k in shots:
        sub = batches[k].select(list(tasks))
        info = {key: v.cpu() for key, v in sub.info.items()}
        truth = family.function(info, grid[None, :, None].expand(len(tasks), n, 1))[..., 0]  # t n
        for c, method in enumerate(methods):
            bands = None
            if k in learners[method]:
                learner, samples = learners[method][k]
                bands = predictive_bands(learner, sub, family.x_range, max(samples, 1), seed, n, draws=draws)
            for i, t in enumerate(tasks):
                ax = axes[rows.index((t, k)), c]
                _ambiguous_panel(ax, grid, truth[i], sub, i, bands)
                if c == 0:
                    kind = _task_kind(info, i)
                    ax.set_ylabel(f"test task {t}{f' ({kind})' if kind else ''}\n{k}-shot\ny", fontsize=9)
    for c, method in enumerate(methods):
        axes[0, c].set_title(method, fontsize=11, fontweight="bold")
        axes[-1, c].set_xlabel("x", fontsize=9)
    handles, labels = [], []
    for ax in axes.flat:  # every kind of line once, in the first panel that has it
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 3 if len(methods) < 2 else 6),
               fontsize=8, frameon=False)
    fig.suptitle(title or "posterior predictive on ambiguous test tasks\n(the same tasks and support points "
                          "for every method)", fontsize=11)
    return _save(fig, path)


def _ambiguous_panel(ax: plt.Axes, grid: torch.Tensor, truth: torch.Tensor, sub: TaskBatch, i: int,
                     bands: dict[str, torch.Tensor] | None) -> None:
    """One panel of :func:`plot_ambiguous_tasks`: task ``i`` of ``sub`` and its predictive ``bands``."""
    xs, ys = sub.x_support[i, :, 0].cpu(), sub.y_support[i, :, 0].cpu()
    ax.plot(grid, truth, color="black", lw=1.4, label="true function", zorder=4)
    if bands is None:
        ax.text(0.5, 0.5, "no run at these shots", ha="center", va="center", transform=ax.transAxes, fontsize=8)
    else:
        x = bands["x"][i].cpu()
        ax.fill_between(x, bands["lo90"][i].cpu(), bands["hi90"][i].cpu(), color="tab:blue", alpha=0.15, lw=0,
                        label="90% predictive band")
        ax.fill_between(x, bands["lo50"][i].cpu(), bands["hi50"][i].cpu(), color="tab:blue", alpha=0.3, lw=0,
                        label="50% predictive band")
        for s, d in enumerate(bands.get("draws", [])):
            ax.plot(x, d[i].cpu(), color="tab:orange", lw=0.9, alpha=0.8,
                    label="posterior function draws" if s == 0 else None)
        ax.plot(x, bands["mean"][i].cpu(), color="tab:blue", lw=1.8, label="predictive mean")
    ax.scatter(xs, ys, s=36, color="red", edgecolor="white", zorder=6, label="support points")
    lo = float(min(truth.min(), ys.min()))
    hi = float(max(truth.max(), ys.max()))
    pad = max(0.35 * (hi - lo), 1.5)  # bands of a vague posterior are clipped, the task stays readable
    ax.set_ylim(lo - pad, hi + pad)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.25)


MODE_STYLES = {"iterations": "-", "wall": "--"}
MODE_TEXT = {"iterations": "equal iterations", "wall": "equal wall time"}


def plot_calibration_curves(panels: Mapping[str, Sequence[tuple[str, str, Mapping[str, Any]]]],
                            path: str | Path, ncols: int | None = None, title: str = "") -> Path:
    """Regression calibration curves: observed against nominal central-interval coverage, one panel
    per entry of ``panels`` (``panel title -> [(method, mode, curve)]``, ``curve`` as in ``eval.json``'s
    ``"calibration"``: ``levels``, ``observed``, ``gap``), the diagonal of perfect calibration. Colour
    says the method, line style the mode (``"iterations"`` solid, ``"wall"`` dashed); below the
    diagonal is over-confident, above it under-confident."""
    names = list(panels)
    ncols = max(1, min(ncols or len(names), len(names)))
    nrows = math.ceil(len(names) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols + 0.4, 3.1 * nrows + 0.9), squeeze=False,
                             sharex=True, sharey=True, layout="constrained")
    methods = list(dict.fromkeys(m for curves in panels.values() for m, _, _ in curves))
    modes = list(dict.fromkeys(mode for curves in panels.values() for _, mode, _ in curves))
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    for ax, name in zip(axes.flat, names):
        ax.plot([0, 1], [0, 1], color="gray", lw=1, ls=":")
        for method, mode, curve in panels[name]:
            ax.plot(curve["levels"], curve["observed"], color=colors[method], ls=MODE_STYLES.get(mode, "-."),
                    lw=1.6, marker="o", ms=2.5)
        ax.set_title(name, fontsize=10)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_aspect("equal")
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.25)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("nominal coverage", fontsize=9)
    for ax in axes[:, 0]:
        ax.set_ylabel("observed coverage", fontsize=9)
    handles = [Line2D([], [], color=colors[m], lw=2, label=m) for m in methods]
    handles += [Line2D([], [], color="black", ls=MODE_STYLES.get(mode, "-."), label=MODE_TEXT.get(mode, mode))
                for mode in modes]
    handles.append(Line2D([], [], color="gray", ls=":", label="perfect calibration"))
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 3 * ncols), fontsize=8,
               frameon=False)
    fig.suptitle(title or "regression calibration: central-interval coverage on the fixed test tasks\n"
                          "(below the diagonal: over-confident)", fontsize=10)
    return _save(fig, path)
