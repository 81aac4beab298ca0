"""Pictures of what a learner believes: predictive bands on regression tasks, training curves."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from .evaluate import predict, predictive_quantile  # noqa: E402
from .learner import MetaLearner  # noqa: E402
from .tasks import RegressionFamily, TaskBatch  # noqa: E402


def _save(fig: plt.Figure, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _grid_batch(batch: TaskBatch, x_range: tuple[float, float], n: int = 200) -> TaskBatch:
    grid = torch.linspace(*x_range, n, dtype=batch.x_support.dtype, device=batch.x_support.device)
    xq = grid[None, :, None].expand(batch.num_tasks, n, 1).contiguous()  # T n 1
    return TaskBatch(batch.x_support, batch.y_support, xq, None, batch.info)


def predictive_bands(learner: MetaLearner, batch: TaskBatch, x_range: tuple[float, float],
                     num_samples: int = 100, seed: int = 0, n: int = 200) -> dict[str, torch.Tensor]:
    """Predictive mean and 50%/90% central intervals on a grid of ``n`` inputs, per task ``[T, n]``."""
    g = _grid_batch(batch, x_range, n)
    pred = predict(learner, g, num_samples, seed)
    out = {"x": g.x_query[..., 0], "mean": pred.mean.mean(0)[..., 0]}
    for level in (0.5, 0.9):
        for side, p in (("lo", (1 - level) / 2), ("hi", (1 + level) / 2)):
            v = predictive_quantile(pred, p)
            out[f"{side}{int(level * 100)}"] = v[..., 0]
    return out


def plot_regression_tasks(learners: Sequence[tuple[str, MetaLearner, int]], batch: TaskBatch,
                          family: RegressionFamily, path: str | Path, tasks: Sequence[int] = (0, 1, 2, 3),
                          seed: int = 0) -> Path:
    """One panel per task: true function, support (dots) and query (crosses) points, and each
    learner's predictive mean with 50% and 90% bands. ``learners``: ``(label, learner, samples)``."""
    tasks = [t for t in tasks if t < batch.num_tasks]
    sub = batch.select(list(tasks))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.4), squeeze=False)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    grid = torch.linspace(*family.x_range, 200)[None, :, None].expand(len(tasks), 200, 1)
    truth = family.function({k: v.cpu() for k, v in sub.info.items()}, grid)[..., 0] if sub.info else None
    bands = [(label, predictive_bands(lr, sub, family.x_range, s, seed)) for label, lr, s in learners]
    for j, ax in enumerate(axes[0]):
        if truth is not None:
            ax.plot(grid[j, :, 0], truth[j], color="black", lw=1.2, label="true function")
        for (label, b), c in zip(bands, colors):
            x = b["x"][j].cpu()
            ax.fill_between(x, b["lo90"][j].cpu(), b["hi90"][j].cpu(), color=c, alpha=0.15, lw=0)
            ax.fill_between(x, b["lo50"][j].cpu(), b["hi50"][j].cpu(), color=c, alpha=0.25, lw=0)
            ax.plot(x, b["mean"][j].cpu(), color=c, lw=1.5, label=f"{label} mean, 50/90% bands")
        if sub.y_query is not None:
            ax.scatter(sub.x_query[j, :, 0].cpu(), sub.y_query[j, :, 0].cpu(), marker="x", s=10,
                       color="gray", alpha=0.6, label="query")
        ax.scatter(sub.x_support[j, :, 0].cpu(), sub.y_support[j, :, 0].cpu(), s=30, color="red",
                   zorder=5, label="support")
        ax.set_title(f"test task {tasks[j]}")
        ax.set_xlabel("x")
    axes[0, 0].set_ylabel("y")
    axes[0, 0].legend(fontsize=7, loc="lower left")
    return _save(fig, path)


def plot_training_curve(metrics_jsonl: str | Path, path: str | Path) -> Path | None:
    """Meta-training loss against step, from a run's ``metrics.jsonl``."""
    rows = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines() if line.strip()]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.2))
    loss = [float("nan") if r["loss"] is None else r["loss"] for r in rows]  # null: a skipped step
    ax.plot([r["step"] for r in rows], loss, lw=1)
    ax.set_xlabel("meta-step")
    ax.set_ylabel("meta-batch loss (per task)")
    ax.set_yscale("symlog")
    ax.grid(alpha=0.3)
    return _save(fig, path)


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
