"""ArviZ export: ``to_inference_data`` turns a learner's posterior predictive on some tasks into an
``arviz.InferenceData`` (posterior, posterior_predictive, log_likelihood, observed_data, constant_data)."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from ._arviz import az
from .evaluate import QUERY_SITE, SUPPORT_SITE, Prediction, _points, predict
from .learner import MetaLearner
from .tasks import TaskBatch

HELDOUT_GROUP = "heldout_log_likelihood"


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy() if t.is_floating_point() else t.detach().cpu().numpy()


def _weight_names(learner: MetaLearner, size: int, site: str) -> list[str] | None:
    model = getattr(learner, "model", None)
    named = getattr(model, "site_coords", None)
    if named is not None:
        names = named(site)
        if names is not None and len(names) == size:
            return names
    net = getattr(model, "net", None)
    spec = getattr(net, "spec", None)
    if spec is None or spec.num_params != size:
        return None
    names = []
    for name, shape in spec.shapes.items():
        for idx in np.ndindex(*shape):
            names.append(f"{name}[{','.join(map(str, idx))}]")
    return names


def _labels(t: torch.Tensor, batch: TaskBatch) -> np.ndarray:
    """``[T, N, 1]`` regression targets -> ``[T, N]``; class labels stay ``[T, N]``."""
    return _np(t[..., 0] if t.dim() == 3 and t.shape[-1] == 1 else t)


def to_inference_data(learner: MetaLearner, batch: TaskBatch, num_samples: int = 100, seed: int = 0,
                      prediction: Prediction | None = None,
                      recalibration: dict[str, Any] | None = None) -> az.InferenceData:
    """An ``InferenceData`` of ``learner``'s posterior on the tasks of ``batch``.

    Guide draws are independent, so they are one chain of ``num_samples`` draws. Groups and dims:

    - ``posterior``: every guide latent site; per-task sites ``(chain, draw, task, <site>_dim)``,
      global ones ``(chain, draw, <site>_dim)``, and a dim per plate inside ``tasks`` (VERSA's per-class
      ``psi``: ``(chain, draw, task, class, psi_dim)``); weight coordinates are the model's
      ``site_coords(name)`` (VERSA: ``w[i]``, ``b``) or the network's parameter names (``w0[3,0]``)
      when the learner's model has a functional ``net``.
    - ``posterior_predictive``: ``y_query`` ``(chain, draw, task, query)``: draws of the held-out query
      labels from the support-conditioned posterior.
    - ``log_likelihood``: ``y_support``: ``log p(y_tn | phi_s)``, ``(chain, draw, task, support)``, the
      observations the posterior conditioned on (present when the model observes the support set at
      ``y_support``, e.g. ABML; absent for MAML and VERSA, whose models score the query set only).
      ``az.loo`` reads this group, so PSIS-LOO is computed over conditioned-on data only.
    - ``heldout_log_likelihood``: ``y_query``: ``log p(y_tq | phi_s)``, ``(chain, draw, task, query)``,
      for query points the posterior did **not** condition on. Their held-out log predictive density is
      :func:`pyro_meta.metrics.heldout_lpd` (``eval.json``, ``pyro-meta inspect``); PSIS-LOO over
      them would treat them as conditioned on and is not meaningful.
    - ``observed_data``: ``y_query (task, query)``.
    - ``constant_data``: ``x_query (task, query)``, ``x_support``, ``y_support (task, support)``.

    :param prediction: reuse draws from :func:`pyro_meta.evaluate.predict` instead of drawing again.
    :param recalibration: a run's recalibration maps (``recalibration.json``, fitted on validation tasks):
        the attributes ``recalibration`` (what was fitted, in words) and ``recalibration_json`` (the maps)
        say so, and for a Gaussian regression predictive ``posterior_predictive`` gains
        ``y_query_recalibrated``: the draws under the width factor, ``m + s (y - m)`` around the predictive
        mean ``m`` (the isotonic map moves the CDF, not the draws: its quantiles are
        :func:`pyro_meta.recalibrate.recalibrated_quantile`). The raw groups are unchanged.
    """
    pred = prediction if prediction is not None else predict(learner, batch, num_samples, seed)
    if pred.log_lik is None:
        raise ValueError("to_inference_data needs query labels (batch.y_query) for the log-likelihood")
    t, q = batch.num_tasks, batch.num_query
    coords: dict[str, Any] = {"task": np.arange(t), "query": np.arange(q),
                              "support": np.arange(batch.num_support)}
    dims: dict[str, list[str]] = {}
    posterior = {}
    for name, v in pred.latents.items():
        per_task = name in pred.per_task
        inner = pred.inner_plates.get(name, ()) if per_task else ()
        lead = (t, *v.shape[2:2 + len(inner)]) if per_task else ()  # task (and e.g. class) sizes
        event = v.shape[1 + len(lead):]
        arr = _np(v).reshape((1, v.shape[0]) + lead + ((int(np.prod(event)),) if event else ()))
        posterior[name] = arr
        site_dims = ["task"] if per_task else []
        for plate, size in zip(inner, lead[1:]):
            dim = "class" if plate == "classes" else plate
            site_dims.append(dim)
            coords.setdefault(dim, np.arange(size))
        if event:
            dim = f"{name}_dim"
            site_dims.append(dim)
            coords[dim] = _weight_names(learner, arr.shape[-1], name) or np.arange(arr.shape[-1])
        dims[name] = site_dims
    y_draws = pred.y_draws
    if y_draws.dim() == 4 and y_draws.shape[-1] == 1:
        y_draws = y_draws[..., 0]
    posterior_predictive = {QUERY_SITE: _np(y_draws)[None]}
    attrs = {"learner": learner.name, "inference": "guide draws (independent), one chain",
             "heldout": "heldout_log_likelihood: query points the posterior did not condition on"}
    if recalibration is not None:
        import json

        from .recalibrate import describe, rescale

        attrs["recalibration"] = describe(recalibration)
        attrs["recalibration_json"] = json.dumps(recalibration)
        if recalibration.get("scale") is not None and pred.gaussian and pred.stddev is not None:
            r = rescale(pred, recalibration["scale"], None).y_draws
            posterior_predictive[f"{QUERY_SITE}_recalibrated"] = _np(r[..., 0] if r.dim() == 4 and r.shape[-1] == 1
                                                                     else r)[None]
            dims[f"{QUERY_SITE}_recalibrated"] = ["task", "query"]
    heldout = {QUERY_SITE: _np(_points(pred.log_lik))[None]}
    log_likelihood = None
    if pred.support_log_lik is not None:
        log_likelihood = {SUPPORT_SITE: _np(_points(pred.support_log_lik))[None]}
        dims[SUPPORT_SITE] = ["task", "support"]
    dims[QUERY_SITE] = ["task", "query"]
    x_q = batch.x_query.flatten(2)
    x_s = batch.x_support.flatten(2)
    constant = {
        "x_query": _np(x_q[..., 0] if x_q.shape[-1] == 1 else x_q),
        "x_support": _np(x_s[..., 0] if x_s.shape[-1] == 1 else x_s),
        "y_support": _labels(batch.y_support, batch),
    }
    dims["x_query"] = ["task", "query"] + (["x_dim"] if x_q.shape[-1] > 1 else [])
    dims["x_support"] = ["task", "support"] + (["x_dim"] if x_s.shape[-1] > 1 else [])
    dims["y_support"] = ["task", "support"]
    idata = az.from_dict(
        posterior=posterior,
        posterior_predictive=posterior_predictive,
        log_likelihood=log_likelihood,
        observed_data={QUERY_SITE: _labels(batch.y_query, batch)},
        constant_data=constant,
        coords=coords,
        dims=dims,
        attrs=attrs,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(group.*not.*defined|dims 'chain' and 'draw').*")
        idata.add_groups({HELDOUT_GROUP: heldout}, coords=coords, dims={QUERY_SITE: ["task", "query"]})
    return idata
