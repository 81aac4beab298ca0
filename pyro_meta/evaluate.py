"""Posterior predictive of a MetaLearner on fixed evaluation tasks, and its metrics."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from torch import Tensor

from . import metrics as M
from .learner import MetaLearner
from .tasks import TaskBatch

QUERY_SITE = "y_query"
SUPPORT_SITE = "y_support"
SAMPLES_DIM = -3  # left of the tasks plate (-2) and the points plate (-1)


@dataclass
class Prediction:
    """Posterior-predictive draws on the query points of ``T`` tasks (``S`` draws).

    - ``latents``: guide sample sites; per-task sites ``[S, T, ...]``, global ones ``[S, ...]``
      (empty when predicted with ``keep_latents=False``).
    - ``per_task``: names of the per-task latent sites.
    - ``mean``, ``stddev``: ``[S, T, Q, O]`` the predictive mean and std of ``p(y | phi_s)``
      (classification: ``mean`` is the class probabilities ``[S, T, Q, C]``, ``stddev`` None).
    - ``log_lik``: ``[S, T, Q]`` ``log p(y_tq | phi_s)`` (``None`` without query labels).
    - ``y_draws``: ``[S, T, Q, ...]`` one draw of ``y`` from each ``p(y | phi_s)``.
    - ``gaussian``: whether ``p(y | phi)`` is a (possibly independent) Normal, so the mixture's
      quantiles are exact.
    - ``inner_plates``: per-task site -> names of its plates inside ``tasks`` (VERSA's ``psi``:
      ``("classes",)``, value ``[S, T, C, D]``).
    - ``support_log_lik``: ``[S, T, N]`` ``log p(y_tn | phi_s)`` of the support points, when the model
      observes them at ``y_support`` (the observations the posterior conditioned on), else ``None``.
    - ``log_weights``: ``[S, T, Q]`` (or ``[S, T, 1]``) log weights of the draws, normalized over ``S``,
      when the predictive is a weighted mixture (a model whose ``y_query`` law is a ``MixtureSameFamily`` of
      Normals, as the ``prior`` and ``oracle`` reference rows: each component becomes one weighted draw);
      ``None``: equal weights ``1/S``. The joint over a task's query points (``heldout_lpd``) reads the
      first point's weights: weights that differ by point make sense per point only.
    - ``joint``: whether draw ``s`` is one predictive for all of a task's query points (posterior draws);
      ``False`` for a model that declares ``pointwise_only`` (the reference rows' strata are per point), whose
      ``heldout_lpd`` is then the pointwise sum only.

    Every draw comes from the learner run on the tasks without their query labels
    (:func:`run_blind`); ``log_lik`` is computed afterwards from the labels.
    """

    latents: dict[str, Tensor]
    per_task: tuple[str, ...]
    mean: Tensor
    stddev: Tensor | None
    log_lik: Tensor | None
    y_draws: Tensor
    gaussian: bool
    inner_plates: dict[str, tuple[str, ...]] = field(default_factory=dict)
    support_log_lik: Tensor | None = None
    log_weights: Tensor | None = None
    joint: bool = True

    @property
    def num_samples(self) -> int:
        return self.mean.shape[0]

    def predictive_mean(self) -> Tensor:
        """``[T, Q, O]``: the mean of the predictive mixture (weighted by ``log_weights`` when set)."""
        w = M.mixture_weights(self.log_weights, self.mean)
        return self.mean.mean(0) if w is None else (w * self.mean).sum(0)


def _base(fn: dist.Distribution) -> dist.Distribution:
    while isinstance(fn, (dist.Independent, torch.distributions.Independent)):
        fn = fn.base_dist
    return fn


@contextlib.contextmanager
def _rng(seed: int | None, device: torch.device):
    """Seeded draws inside, the caller's RNG state untouched outside (``seed=None``: no seeding)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        pyro.set_rng_seed(seed)
        yield


def _plates(node: dict) -> list[str]:
    """Names of a site's plates inside "tasks" (e.g. VERSA's "classes"), outermost first."""
    frames = sorted(node["cond_indep_stack"], key=lambda f: f.dim)
    return [f.name for f in frames if f.name not in ("tasks", "samples") and f.dim > -3]


class LeakError(RuntimeError):
    """A guide that could not run without the query labels it must never see at evaluation."""


def run_blind(learner: MetaLearner, batch: TaskBatch):
    """Guide and model traces on ``batch`` with its query labels removed: the learner's predictive
    guide (``learner.predictive_guide``, by default its guide) conditions on the support set alone,
    and the model, replayed on the guide's draws, samples ``y_query`` instead of observing it. Nothing
    the learner runs here can read ``batch.y_query``."""
    blind = batch.without_query_labels()
    guide = learner.predictive_guide
    with learner.pyro_context():
        return _run_blind(learner, guide, blind)


def _run_blind(learner: MetaLearner, guide, blind: TaskBatch):
    try:
        guide_tr = poutine.trace(guide).get_trace(blind)
    except Exception as e:  # noqa: BLE001 - re-raised with what went wrong and how to fix it
        raise LeakError(
            f"the {'predictive guide' if guide is not learner.guide else 'guide'} failed on a batch without "
            f"query labels ({type(e).__name__}: {e}). At evaluation a guide sees the support set only "
            "(batch.y_query is None). If your method's training guide reads the query set by design (as "
            "PLATIPUS's does), give MetaLearner a predictive_guide that predicts from the support set "
            "alone") from e
    model_tr = poutine.trace(poutine.replay(learner.model, trace=guide_tr)).get_trace(blind)
    return guide_tr, model_tr


def _predict_chunk(learner: MetaLearner, batch: TaskBatch, num_samples: int, keep_latents: bool = True):
    with pyro.plate("samples", num_samples, dim=SAMPLES_DIM):
        guide_tr, model_tr = run_blind(learner, batch)
    if QUERY_SITE not in model_tr.nodes:
        raise ValueError(f"the model has no sample site named {QUERY_SITE!r}; the evaluator reads the "
                         "query predictive from it")
    site = model_tr.nodes[QUERY_SITE]
    fn = site["fn"]
    latents, per_task, inner = {}, [], {}
    for name, node in guide_tr.nodes.items():
        if node["type"] != "sample" or node["is_observed"] or site_is_subsample(node):
            continue
        in_tasks = "tasks" in {f.name for f in node["cond_indep_stack"]}
        if in_tasks:
            per_task.append(name)
            inner[name] = tuple(_plates(node))
        if not keep_latents:
            continue
        v = node["value"].detach()
        e = node["fn"].event_dim
        v = v.expand((num_samples,) + v.shape[1:]) if v.shape[0] == 1 else v
        if in_tasks:
            if not inner[name]:
                v = v.squeeze(-(e + 1))  # S T 1 *event -> S T *event
            # else: S T C *event (a plate inside tasks at dim -1, e.g. VERSA's classes)
        else:
            v = v.reshape(num_samples, *v.shape[v.dim() - e:])  # S 1 1 *event -> S *event
        latents[name] = v
    base = _base(fn)
    support = model_tr.nodes.get(SUPPORT_SITE)
    support_ll = None
    if support is not None and support["type"] == "sample" and support["is_observed"]:
        support_ll = support["fn"].log_prob(support["value"]).detach()
        support_ll = support_ll.expand((num_samples,) + support_ll.shape[1:])  # S T N
    y = batch.y_query  # only now, to score the draws the blind model made
    joint = not getattr(getattr(learner, "model", None), "pointwise_only", False)
    mixture = _gaussian_mixture(base)
    if mixture is not None:  # a weighted mixture per point: its components become weighted draws
        log_w, loc, scale = mixture
        k = log_w.shape[0]
        log_lik = None
        if y is not None:
            log_lik = torch.distributions.Normal(loc, scale).log_prob(y.to(loc.dtype)).sum(-1)  # K T Q
        return {"latents": latents, "per_task": tuple(per_task), "inner_plates": inner, "mean": loc,
                "stddev": scale, "log_lik": log_lik,
                "y_draws": site["value"].detach().expand((num_samples,) + site["value"].shape[1:]),
                "gaussian": True, "support_log_lik": None if support_ll is None else support_ll[:1].expand(k, -1, -1),
                "log_weights": log_w, "joint": joint}
    gaussian = isinstance(base, torch.distributions.Normal)
    mean = fn.probs if batch.is_classification else fn.mean
    return {
        "latents": latents,
        "per_task": tuple(per_task),
        "inner_plates": inner,
        "mean": mean.detach().expand((num_samples,) + mean.shape[1:]),
        "stddev": base.scale.detach().expand_as(mean) if gaussian else None,
        "log_lik": fn.log_prob(y).detach() if y is not None else None,
        "y_draws": site["value"].detach().expand((num_samples,) + site["value"].shape[1:]),
        "gaussian": gaussian,
        "support_log_lik": support_ll,
        "log_weights": None,
        "joint": joint,
    }


def _gaussian_mixture(fn) -> tuple[Tensor, Tensor, Tensor] | None:  # noqa: ANN001 - a distribution
    """``(log_w [K, T, Q], loc [K, T, Q, O], scale [K, T, Q, O])`` when ``fn`` (the ``y_query`` law, batch
    ``[S, T, Q]``, event ``[O]``) is a ``MixtureSameFamily`` of Normals (the reference rows); else ``None``.
    The mixture is the same for every sample ``s`` (it has no latent draws), so sample 0 is read."""
    if not isinstance(fn, torch.distributions.MixtureSameFamily):
        return None
    comp = _base(fn.component_distribution)
    if not isinstance(comp, torch.distributions.Normal):
        return None
    logits = fn.mixture_distribution.logits  # S T Q K (normalized by Categorical)
    if logits.dim() != 4:
        return None
    event = fn.event_shape.numel() if len(fn.event_shape) else 1
    loc = comp.loc.expand(*logits.shape, event)[0].movedim(-2, 0).detach()  # K T Q O
    scale = comp.scale.expand(*logits.shape, event)[0].movedim(-2, 0).detach()
    log_w = logits[0].movedim(-1, 0).detach()  # K T Q
    return log_w, loc, scale


# The most per-task weight values one chunk may draw (samples x tasks x weights): ABML's conv4 has ~1e5
# weights per task, so 100 draws for 100 tasks at once would be 4 GB.
CHUNK_VALUES = 50_000_000


def per_task_weights(learner: MetaLearner) -> int:
    """How many values each task draws per posterior draw: the model's ``per_task_weights`` (a weight-space
    model: ``D``, a copy of the task network per task and draw; BMAML: a particle's length), 0 for a model
    without one (e.g. VERSA's shared feature extractor)."""
    return int(getattr(getattr(learner, "model", None), "per_task_weights", 0))


def default_task_chunk(learner: MetaLearner, num_samples: int, cap: int = 100) -> int:
    """Tasks per chunk so that ``num_samples * tasks * weights`` stays under :data:`CHUNK_VALUES`."""
    d = per_task_weights(learner)
    if not d:
        return cap
    return max(1, min(cap, CHUNK_VALUES // (num_samples * d)))


def predict(learner: MetaLearner, batch: TaskBatch, num_samples: int = 100, seed: int | None = 0,
            task_chunk: int | None = None, keep_latents: bool = True) -> Prediction:
    """Draw ``num_samples`` posterior-predictive samples for every task of ``batch``.

    The guide runs (its inner loop included) once per chunk of ``task_chunk`` tasks (default: as many
    as fit :data:`CHUNK_VALUES`, at most 100); samples are vectorized by a
    ``pyro.plate("samples", S, dim=-3)`` around guide and model. A ``seed`` makes the draws
    reproducible without touching the caller's RNG state. ``keep_latents=False`` keeps only the
    predictive (evaluation of many tasks with large per-task weights).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if batch.num_tasks < 1 or batch.num_query < 1:
        raise ValueError(f"nothing to evaluate: the batch has {batch.num_tasks} task(s) with {batch.num_query} "
                         "query point(s) each; evaluation needs at least one of each")
    if task_chunk is None:
        task_chunk = default_task_chunk(learner, num_samples)
    was_training = learner.training
    learner.eval()
    device = batch.x_support.device
    chunks = []
    try:
        # validation off: a task whose inner loop diverged must show up as a non-finite prediction
        # that the metrics count, not abort the whole evaluation
        with torch.no_grad(), _rng(seed, device), pyro.validation_enabled(False):
            for start in range(0, batch.num_tasks, task_chunk):
                sub = batch.select(slice(start, start + task_chunk))
                chunks.append(_predict_chunk(learner, sub, num_samples, keep_latents))
    finally:
        learner.train(was_training)
    first = chunks[0]

    def cat(key):
        if first[key] is None:
            return None
        return torch.cat([c[key] for c in chunks], dim=1)

    latents = {}
    for name, v in first["latents"].items():
        latents[name] = torch.cat([c["latents"][name] for c in chunks], 1) if name in first["per_task"] else v
    return Prediction(latents, first["per_task"], cat("mean"), cat("stddev"), cat("log_lik"),
                      cat("y_draws"), first["gaussian"], first["inner_plates"], cat("support_log_lik"),
                      cat("log_weights"), first["joint"])


def _sharded_predict(learner: MetaLearner, batch: TaskBatch, num_samples: int, seed: int | None,
                     task_chunk: int | None, ctx: Any) -> Prediction:
    """Under torch.distributed, each rank predicts a contiguous share of the tasks and every rank gets them
    all back, in order. Rank r > 0 draws from seed ``seed + r`` (its own noise), so the metrics equal one
    process's within Monte Carlo error, and exactly for a method whose predictive draws no noise (MAML)."""
    from . import distributed

    bounds = torch.arange(batch.num_tasks).tensor_split(ctx.world_size)[ctx.rank]
    mine = None
    if len(bounds):
        sub = batch.select(slice(int(bounds[0]), int(bounds[-1]) + 1))
        rank_seed = None if seed is None else seed + ctx.rank
        mine = predict(learner, sub, num_samples, rank_seed, task_chunk, keep_latents=False)
        mine = _map_tensors(mine, lambda t: t.cpu())
    parts = [p for p in distributed.gather(mine) if p is not None]
    first = parts[0]

    def cat(key: str) -> Tensor | None:
        if getattr(first, key) is None:
            return None
        return torch.cat([getattr(p, key) for p in parts], dim=1).to(batch.x_support.device)

    return Prediction({}, first.per_task, cat("mean"), cat("stddev"), cat("log_lik"), cat("y_draws"), first.gaussian,
                      first.inner_plates, cat("support_log_lik"), cat("log_weights"), first.joint)


def _map_tensors(pred: Prediction, fn) -> Prediction:  # noqa: ANN001 - a tensor -> tensor function
    def f(t: Tensor | None) -> Tensor | None:
        return None if t is None else fn(t)

    return Prediction({k: fn(v) for k, v in pred.latents.items()}, pred.per_task, f(pred.mean), f(pred.stddev),
                      f(pred.log_lik), f(pred.y_draws), pred.gaussian, pred.inner_plates, f(pred.support_log_lik),
                      f(pred.log_weights), pred.joint)


def finite_tasks(pred: Prediction) -> Tensor:
    """``[T]`` bool: tasks whose every predictive draw is finite (an inner loop can diverge)."""
    ok = torch.isfinite(pred.mean).flatten(2).all(-1).all(0)
    if pred.stddev is not None:
        ok &= torch.isfinite(pred.stddev).flatten(2).all(-1).all(0)
    if pred.log_lik is not None:
        ok &= torch.isfinite(pred.log_lik).flatten(2).all(-1).all(0)
    return ok


def _select_tasks(pred: Prediction, keep: Tensor) -> Prediction:
    def sel(t: Tensor | None) -> Tensor | None:
        return None if t is None else t[:, keep]

    latents = {k: (v[:, keep] if k in pred.per_task else v) for k, v in pred.latents.items()}
    return Prediction(latents, pred.per_task, sel(pred.mean), sel(pred.stddev), sel(pred.log_lik),
                      sel(pred.y_draws), pred.gaussian, pred.inner_plates, sel(pred.support_log_lik),
                      sel(pred.log_weights), pred.joint)


def predictive_quantile(pred: Prediction, p: float) -> Tensor:
    """The ``p`` quantile of the predictive mixture per query point, ``[T, Q, O]``: exact for Gaussian
    ``p(y | phi)``, else the empirical quantile of the draws."""
    if pred.gaussian:
        return M.gaussian_mixture_quantile(p, pred.mean, pred.stddev, log_weights=pred.log_weights)
    return torch.quantile(pred.y_draws.float(), p, dim=0)


def interval_coverages(pred: Prediction, y: Tensor, levels: Sequence[float] = M.CALIBRATION_LEVELS) -> Tensor:
    """``[L, T]``: each task's fraction of query points ``y [T, Q, O]`` inside the central interval of the
    predictive mixture at each nominal level, between the mixture's exact quantiles (those of
    :func:`predictive_quantile`). For a Gaussian ``p(y | phi)`` the test is made through the mixture's
    CDF at ``y`` (``|2 F(y) - 1| <= level``: the same intervals, without a bisection per level);
    otherwise each level's interval comes from :func:`predictive_quantile` of the draws."""
    if pred.gaussian:
        return M.pit_coverage(M.gaussian_mixture_cdf(y, pred.mean, pred.stddev, pred.log_weights), levels)  # L T
    return torch.stack([M.interval_coverage(y, predictive_quantile(pred, (1 - a) / 2),
                                            predictive_quantile(pred, (1 + a) / 2)) for a in levels])


def predictive_calibration(pred: Prediction, y: Tensor,
                           levels: Sequence[float] = M.CALIBRATION_LEVELS) -> dict[str, Any]:
    """The regression calibration curve (:func:`pyro_meta.metrics.calibration_curve`) of the
    predictive mixture on ``y [T, Q, O]`` (:func:`interval_coverages` at each level)."""
    return M.calibration_curve(interval_coverages(pred, y, levels), levels)


def predictive_pit(pred: Prediction, y: Tensor) -> Tensor:
    """``[T, Q, O]``: the probability integral transform ``F(y)`` of each query label ``y [T, Q, O]`` under
    the predictive mixture: its exact CDF for a Gaussian ``p(y | phi)``
    (:func:`~pyro_meta.metrics.gaussian_mixture_cdf`), else the empirical CDF of the draws ``y_draws``;
    weighted by ``log_weights`` when set."""
    if pred.gaussian:
        return M.gaussian_mixture_cdf(y, pred.mean, pred.stddev, pred.log_weights)
    return M.empirical_cdf(y, pred.y_draws, pred.log_weights)


def predictive_crps(pred: Prediction, y: Tensor) -> Tensor:
    """``[T]``: each task's mean CRPS over its query points (and outputs) ``y [T, Q, O]``: closed form for a
    Gaussian ``p(y | phi)`` (:func:`~pyro_meta.metrics.gaussian_mixture_crps`) of at most
    :data:`CRPS_EXACT_MAX` equal-weight draws (or weighted ones), else the energy form over the draws
    ``y_draws`` (:func:`~pyro_meta.metrics.sample_crps`); weighted by ``log_weights`` when set."""
    if pred.gaussian and (pred.num_samples <= CRPS_EXACT_MAX or pred.log_weights is not None):
        crps = M.gaussian_mixture_crps(y, pred.mean, pred.stddev, pred.log_weights)
    else:  # the closed form costs S^2 pairs per point: past CRPS_EXACT_MAX draws, their energy form
        crps = M.sample_crps(y, pred.y_draws, pred.log_weights)
    return crps.flatten(1).mean(-1)


# The most equal-weight Gaussian draws whose CRPS is computed in closed form (S^2 / 2 pairs per point); with
# more (a 20,000-draw evaluation), the energy form of the S draws y_draws, one per p(y | phi_s), which is
# O(S log S) and differs from the closed form by about E|X - X'| / (2 S).
CRPS_EXACT_MAX = 1000


def regression_metrics(pred: Prediction, batch: TaskBatch) -> dict[str, dict[str, float]]:
    """MSE of the predictive mean, NLL of the predictive mixture, and 50%/90% central-interval
    coverage, each as ``{"mean", "ci95", "n"}`` over tasks; ``"calibration"``: the calibration curve
    at nominal levels 0.05, 0.10, ..., 0.95 and its mean absolute gap (:func:`predictive_calibration`).
    ``"crps"``: the continuous ranked probability score (lower is better), each task's mean over its query
    points, ``{"mean", "ci95", "n"}`` over tasks (:func:`predictive_crps`). ``"calibration_error"``: PACOH's
    calibration error (Rothfuss et al. 2021) of the PIT values of every query point of every finite task
    pooled, ``{"mae", "rmse", "levels": 20, "n": points, "tasks": T}``
    (:func:`~pyro_meta.metrics.pit_calibration_error` of :func:`predictive_pit`).

    Tasks with a non-finite prediction (a diverged inner loop), or an absurd one (:func:`absurd_tasks`), are
    left out of these means, counted and named in ``"nonfinite_tasks"`` and ``"absurd_tasks"``; ``n`` says how
    many tasks each mean is over.
    """
    dropped = dropped_tasks(pred, batch)
    pred, y, bad = _finite_only(pred, batch)
    out = {
        "mse": M.mean_ci(M.squared_error(pred.predictive_mean(), y)),
        "nll": M.mean_ci(M.mixture_nll(_points(pred.log_lik), pred.log_weights)),
    }
    levels = M.CALIBRATION_LEVELS
    coverage = interval_coverages(pred, y, levels)  # L T, once for the curve and the 50%/90% columns
    for level in (0.5, 0.9):
        out[f"coverage{int(level * 100)}"] = M.mean_ci(coverage[levels.index(level)])
    out["crps"] = M.mean_ci(predictive_crps(pred, y))
    out["calibration_error"] = {**M.pit_calibration_error(predictive_pit(pred, y)), "tasks": int(y.shape[0])}
    out["heldout_lpd"] = M.heldout_lpd(_points(pred.log_lik), pred.log_weights)
    if not pred.joint:  # per-point mixtures are no joint draws: only the pointwise sum is a density there
        h = out["heldout_lpd"]
        out["heldout_lpd"] = {**h, "total": h["pointwise_total"], "per_point": h["pointwise_total"] / h["points"],
                              "se": float("nan"), "per_point_se": float("nan"), "mc_se": 0.0, "joint": False}
    out["calibration"] = M.calibration_curve(coverage, levels)
    return {**out, **dropped}


def _points(log_lik: Tensor) -> Tensor:
    """``[S, T, Q, ...]`` (several outputs per point) -> ``[S, T, Q * ...]``."""
    return log_lik.flatten(2) if log_lik.dim() > 3 else log_lik


# a regression task whose predictive mean anywhere exceeds this many times the largest |y| among the
# evaluation batch's support targets is absurd (a diverged adaptation that stayed finite): counted, named and
# left out of the means, as the non-finite ones
ABSURD_FACTOR = 100.0


def absurd_tasks(pred: Prediction, batch: TaskBatch) -> Tensor:
    """``[T]`` bool: regression tasks whose predictive mean at some query point is more than
    :data:`ABSURD_FACTOR` times the largest ``|y|`` of the batch's support targets, or than the factor itself
    when that is below 1 (finite, but a diverged
    adaptation: PLATIPUS's blow-ups reached a test MSE of 1e8). Classification: none."""
    if batch.is_classification or pred.mean is None:
        return torch.zeros(batch.num_tasks, dtype=torch.bool, device=pred.mean.device)
    scale = batch.y_support.abs().max().clamp(min=1.0).to(pred.mean.device)  # at least 1: a flat support
    big = pred.mean.abs() > ABSURD_FACTOR * scale  # S T Q O
    return big.flatten(2).any(-1).any(0) & finite_tasks(pred)


def dropped_tasks(pred: Prediction, batch: TaskBatch) -> dict[str, dict[str, Any]]:
    """What ``eval.json`` says about the tasks left out of the means: ``nonfinite_tasks`` and
    ``absurd_tasks``, each ``{"count", "of", "tasks"}`` (the tasks' indices in the evaluation batch)."""
    nonfinite, absurd = ~finite_tasks(pred), absurd_tasks(pred, batch)
    out = {}
    for name, mask in (("nonfinite_tasks", nonfinite), ("absurd_tasks", absurd)):
        out[name] = {"count": int(mask.sum()), "of": batch.num_tasks,
                     "tasks": mask.nonzero()[:, 0].tolist()}
    out["absurd_tasks"]["rule"] = (f"a predictive mean beyond {ABSURD_FACTOR:g} x max(1, the largest |y| of the "
                                   "support targets)")
    return out


def _finite_only(pred: Prediction, batch: TaskBatch) -> tuple[Prediction, Tensor, int]:
    y = batch.y_query
    if y is None:
        raise ValueError("metrics need query labels; this TaskBatch has y_query=None")
    keep = finite_tasks(pred) & ~absurd_tasks(pred, batch)
    bad = int((~keep).sum())
    if bad == batch.num_tasks:
        raise FloatingPointError(f"every one of the {bad} evaluation tasks gave a non-finite or absurd prediction")
    if bad:
        pred, y = _select_tasks(pred, keep), y[keep]
    return pred, y, bad


def _per_image(v: Tensor, q: int) -> Tensor:
    """``[t, n, ...]`` -> ``[t * q, n, ...]``: each task's set once per query image."""
    t = v.shape[0]
    return v.unsqueeze(1).expand(t, q, *v.shape[1:]).reshape(t * q, *v.shape[1:])


def one_image_at_a_time(learner: MetaLearner, batch: TaskBatch, num_samples: int = 100, seed: int = 0,
                        chunk_tasks: int = 25) -> dict[str, Any]:
    """Classification metrics with every query image scored on its own (the protocol of the published
    one-shot figures): each image becomes a task of its own with the same support set and one query, so a
    normalization that reads the query set sees that image alone. ``chunk_tasks`` original tasks at a time
    (their support sets are copied once per query image). The draws of different images are independent,
    so ``heldout_lpd`` (a joint over a task's points) is left out."""
    probs, log_lik = [], []
    for a in range(0, batch.num_tasks, chunk_tasks):
        sub = batch.select(slice(a, min(a + chunk_tasks, batch.num_tasks)))
        t, q = sub.num_tasks, sub.num_query

        single = TaskBatch(_per_image(sub.x_support, q), _per_image(sub.y_support, q),
                           sub.x_query.reshape(t * q, 1, *sub.x_query.shape[2:]),
                           sub.y_query.reshape(t * q, 1, *sub.y_query.shape[2:]))
        pred = predict(learner, single, num_samples, seed, keep_latents=False)
        probs.append(pred.mean.reshape(pred.mean.shape[0], t, q, pred.mean.shape[-1]))
        log_lik.append(pred.log_lik.reshape(pred.log_lik.shape[0], t, q))
    pred = Prediction(latents={}, per_task=(), mean=torch.cat(probs, 1), stddev=None, log_lik=torch.cat(log_lik, 1),
                      y_draws=torch.cat(probs, 1).argmax(-1), gaussian=False)
    out = classification_metrics(pred, batch)
    out.pop("heldout_lpd", None)
    out["protocol"] = ("each query image scored alone: a task of its own with the same support set (" +
                       f"{batch.num_query} images per task, {batch.num_tasks} tasks)")
    return out


def classification_metrics(pred: Prediction, batch: TaskBatch,
                           num_bins: int = M.CALIBRATION_BINS) -> dict[str, dict[str, float]]:
    """Accuracy, NLL and Brier score of the posterior predictive ``p(y | x) = mean_s p(y | x, phi_s)``,
    each ``{"mean", "ci95", "n"}`` over tasks; ECE and MCE (``num_bins`` equal-width confidence bins,
    every query prediction of every task pooled) and the reliability bins behind them
    (``"reliability"``: per-bin count, mean confidence, accuracy). Non-finite tasks as in
    :func:`regression_metrics`."""
    pred, y, bad = _finite_only(pred, batch)
    probs = pred.mean.mean(0)  # T Q C
    bins = M.calibration_bins(probs, y, num_bins)
    cal = M.calibration_errors(bins)
    return {
        "accuracy": M.mean_ci(M.accuracy(probs, y)),
        "nll": M.mean_ci(M.mixture_nll(pred.log_lik)),
        "brier": M.mean_ci(M.brier(probs, y)),
        "heldout_lpd": M.heldout_lpd(_points(pred.log_lik)),
        "ece": {"value": cal["ece"], "bins": num_bins},
        "mce": {"value": cal["mce"], "bins": num_bins},
        "reliability": {k: [None if v != v else float(v) for v in bins[k].tolist()]
                        for k in ("edges", "count", "confidence", "accuracy")},
        "nonfinite_tasks": {"count": bad, "of": batch.num_tasks},
    }


def evaluate(learner: MetaLearner, batch: TaskBatch, num_samples: int = 100, seed: int = 0,
             task_chunk: int | None = None) -> tuple[dict[str, dict[str, float]], Prediction]:
    """Metrics of ``learner`` on ``batch`` (fixed evaluation tasks) and the draws behind them (without
    the latent draws, which can be large; :func:`predict` keeps them)."""
    from . import distributed

    ctx = distributed.current()
    if ctx is None:
        pred = predict(learner, batch, num_samples, seed, task_chunk, keep_latents=False)
    else:
        pred = _sharded_predict(learner, batch, num_samples, seed, task_chunk, ctx)
    if batch.is_classification:
        return classification_metrics(pred, batch), pred
    return regression_metrics(pred, batch), pred
