"""First-step checks of a meta-model: the mistakes that train without complaint and give plausible,
wrong numbers, caught on the first meta-batch with an error that names the site.

:func:`check_learner` runs the guide and the model once, with Pyro's validation on, and checks that

1. every site the model and the guide share has the same shape in both (a per-task vector is
   ``[T, 1, D]`` in the tasks plate; a guide that emits ``[T, D]`` there broadcasts to ``[T, T, D]``);
2. each site's log-density has the shape its plates promise (Pyro's ``check_site_shape``);
3. the tasks plate is ``pyro.plate("tasks", T, dim=-2)``, and no latent site with one value per task
   sits outside it (the evaluator and the ArviZ export would take it for a global site);
4. the model observes the query labels at ``y_query``, one factor per query point, inside the tasks
   plate;
5. the learner's predictive guide runs on the batch without its query labels and emits the same
   latent sites as the training guide (so evaluation cannot read, and does not need, the answers).

``fit`` calls it on its first meta-batch (``check_first_step=True``); it costs one extra forward pass
of guide and model, once per call of ``fit``.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from pyro.util import check_site_shape

from .learner import MetaLearner
from .tasks import TaskBatch

TASKS_PLATE, TASKS_DIM = "tasks", -2
QUERY_SITE = "y_query"


class ModelCheckError(ValueError):
    """A meta-model or guide that would train, but wrongly; the message names the site and the fix."""


class ModelCheckWarning(UserWarning):
    """Legal in Pyro, but rarely what a meta-model means."""


def _latents(tr) -> dict[str, dict]:
    return {n: s for n, s in tr.nodes.items()
            if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s)}


def _shape(site: dict) -> tuple[int, ...]:
    fn = site["fn"]
    return tuple(fn.batch_shape + fn.event_shape)


def _plates(site: dict) -> dict[str, Any]:
    return {f.name: f for f in site["cond_indep_stack"]}


def _max_plate_nesting(*traces) -> int:
    dims = [-f.dim for tr in traces for s in tr.nodes.values() if s["type"] == "sample"
            for f in s["cond_indep_stack"] if f.dim is not None]
    return max(dims, default=0)


def _run(fn, batch: TaskBatch, what: str):
    try:
        return poutine.trace(fn).get_trace(batch)
    except ModelCheckError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised with the program's role named
        raise ModelCheckError(f"the {what} failed on the first meta-batch: {type(e).__name__}: {e}") from e


def check_learner(learner: MetaLearner, batch: TaskBatch) -> dict[str, float]:
    """Check ``learner`` on ``batch`` (a training meta-batch with query labels); raise
    :class:`ModelCheckError` naming the first problem found. Returns the check's cost in ms."""
    t0 = time.perf_counter()
    T = batch.num_tasks
    with pyro.validation_enabled(True), torch.no_grad(), warnings.catch_warnings(), learner.pyro_context():
        warnings.filterwarnings("ignore", category=UserWarning, module="pyro")  # Pyro's own: ours follow
        guide_tr = _run(learner.guide, batch, "guide")
        try:
            model_tr = _run(poutine.replay(learner.model, trace=guide_tr), batch,
                            "model (replayed on the guide's draws)")
        except ModelCheckError:
            # a guide draw of the wrong shape often breaks the model itself: the model run on its own
            # prior draws tells the shapes it expects, and the mismatch is the message worth giving
            try:
                prior_tr = poutine.trace(learner.model).get_trace(batch)
            except Exception:  # noqa: BLE001 - the model fails on its own too: report the first error
                prior_tr = None
            if prior_tr is not None:
                _check_shapes(prior_tr, guide_tr, T)
            raise
        _check_shapes(model_tr, guide_tr, T)
        _check_plates(model_tr, guide_tr, T)
        _check_query_site(model_tr, batch)
        _check_site_shapes(model_tr, guide_tr)
        _check_blind(learner, batch, guide_tr)
    return {"ms": 1000 * (time.perf_counter() - t0)}


def _check_shapes(model_tr, guide_tr, T: int) -> None:
    model_lat, guide_lat = _latents(model_tr), _latents(guide_tr)
    for name in guide_lat:
        if name not in model_lat and not guide_lat[name]["infer"].get("is_auxiliary"):
            raise ModelCheckError(f"the guide samples a site {name!r} that the model does not have (model sites: "
                                  f"{sorted(model_lat)}); give them the same names")
    for name, m in model_lat.items():
        if name not in guide_lat:
            warnings.warn(f"the model samples {name!r} and the guide does not: Trace_ELBO draws it from the "
                          "model's prior in every step (intended only for a site you do not want to infer)",
                          ModelCheckWarning, stacklevel=4)
            continue
        g = guide_lat[name]
        if m["fn"].event_dim != g["fn"].event_dim:
            raise ModelCheckError(f"model and guide disagree at site {name!r}: event_dim {m['fn'].event_dim} in the "
                                  f"model vs {g['fn'].event_dim} in the guide (use .to_event(...) alike)")
        ms, gs = _shape(m), _shape(g)
        if ms != gs:
            hint, e = "", g["fn"].event_dim
            if TASKS_PLATE in _plates(g) and len(gs) > e + 1 and len(ms) > e + 1 and gs[-(e + 1)] == T \
                    and ms[-(e + 1)] == 1:
                hint = (f". Per-task sites sit in tasks_plate at dim=-2: a per-task vector has shape [T, 1, D] "
                        f"(T = {T}); a [T, D] value broadcasts to [T, T, D] there. Add .unsqueeze(-2) to the "
                        "guide's parameters")
            raise ModelCheckError(f"model and guide shapes disagree at site {name!r}: {list(ms)} in the model vs "
                                  f"{list(gs)} in the guide{hint}")


def _check_plates(model_tr, guide_tr, T: int) -> None:
    seen_tasks = False
    for role, tr in (("model", model_tr), ("guide", guide_tr)):
        for name, site in tr.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            plates = _plates(site)
            if TASKS_PLATE in plates:
                f = plates[TASKS_PLATE]
                if f.dim != TASKS_DIM or f.size != T:
                    raise ModelCheckError(
                        f"site {name!r} in the {role} sits in a plate named 'tasks' of size {f.size} at dim "
                        f"{f.dim}; the tasks plate must be pyro.plate('tasks', {T}, dim=-2) "
                        "(pyro_meta.models.tasks_plate(batch.num_tasks))")
                seen_tasks = True
                continue
            if site["is_observed"]:
                continue
            bshape = tuple(site["fn"].batch_shape)
            if T > 1 and T in bshape:
                raise ModelCheckError(
                    f"site {name!r} in the {role} has batch shape {list(bshape)}, one value per task (T = {T}), "
                    "but is not inside tasks_plate. Per-task sites go in `with tasks_plate(batch.num_tasks):` "
                    "(dim=-2, value [T, 1, D]); a global site has batch shape [] (use .to_event(...)). Outside "
                    "the plate the evaluator and the ArviZ export would treat it as one global site")
    if not seen_tasks:
        raise ModelCheckError("no sample site sits in a plate named 'tasks': put per-task latents and the "
                              "observations in `with tasks_plate(batch.num_tasks):` (pyro_meta.models.tasks_plate)")


def _check_query_site(model_tr, batch: TaskBatch) -> None:
    observed = [n for n, s in model_tr.nodes.items() if s["type"] == "sample" and s["is_observed"]]
    if QUERY_SITE not in model_tr.nodes:
        raise ModelCheckError(
            f"the model has no site named {QUERY_SITE!r} (its observed sites: {observed}). The trainer, "
            "evaluator and ArviZ export read the query predictive from it: observe the query labels with "
            "pyro_meta.models.observe('y_query', likelihood, f, batch.y_query)")
    site = model_tr.nodes[QUERY_SITE]
    if not site["is_observed"]:
        raise ModelCheckError(f"the model's {QUERY_SITE!r} site is not observed: pass obs=batch.y_query")
    if site["value"] is not batch.y_query and not (
            site["value"].shape == batch.y_query.shape and torch.equal(site["value"], batch.y_query)):
        raise ModelCheckError(f"the model's {QUERY_SITE!r} site observes a tensor of shape "
                              f"{list(site['value'].shape)} that is not batch.y_query "
                              f"{list(batch.y_query.shape)}")
    plates = _plates(site)
    if TASKS_PLATE not in plates:
        raise ModelCheckError(f"the model's {QUERY_SITE!r} site is not inside tasks_plate")
    try:
        lp = site["fn"].log_prob(site["value"])
    except ValueError as e:  # Pyro's validation: labels outside the likelihood's support
        raise ModelCheckError(f"the query labels do not fit the model's {QUERY_SITE!r} likelihood: "
                              f"{str(e).splitlines()[0][:300]}") from None
    want = (batch.num_tasks, batch.num_query)
    if tuple(lp.shape[-2:]) != want:
        raise ModelCheckError(
            f"the model's {QUERY_SITE!r} site gives log-densities of shape {list(lp.shape)}; the evaluator needs "
            f"one per task and query point, [..., T, Q] = [..., {want[0]}, {want[1]}]: observe it in a points "
            "plate at dim=-1 inside tasks_plate (pyro_meta.models.observe does both)")


def _check_site_shapes(model_tr, guide_tr) -> None:
    nesting = _max_plate_nesting(model_tr, guide_tr)
    for role, tr in (("model", model_tr), ("guide", guide_tr)):
        try:
            tr.compute_log_prob()
        except ValueError as e:  # Pyro's validation: a value outside its distribution's support
            raise ModelCheckError(f"a {role} site's log-density failed: {str(e).splitlines()[0][:300]}") from None
        for name, site in tr.nodes.items():
            if site["type"] != "sample" or "log_prob" not in site or site_is_subsample(site):
                continue
            try:
                check_site_shape(site, nesting)
            except ValueError as e:
                raise ModelCheckError(f"{role} site {name!r}: {e}") from None


def _check_blind(learner: MetaLearner, batch: TaskBatch, guide_tr) -> None:
    from .evaluate import LeakError, run_blind

    try:
        blind_guide, _ = run_blind(learner, batch)
    except LeakError as e:
        raise ModelCheckError(str(e)) from e
    except Exception as e:  # noqa: BLE001
        raise ModelCheckError(f"the model failed on a batch without query labels ({type(e).__name__}: {e}); "
                              "at evaluation y_query is None and the model must sample it "
                              "(observe(..., obs=None))") from e
    want, got = set(_latents(guide_tr)), set(_latents(blind_guide))
    if want != got:
        raise ModelCheckError(f"the predictive guide's latent sites {sorted(got)} differ from the guide's "
                              f"{sorted(want)}")
    for name in want:
        a, b = _shape(_latents(guide_tr)[name]), _shape(_latents(blind_guide)[name])
        if a != b:
            raise ModelCheckError(f"site {name!r}: shape {list(a)} from the guide but {list(b)} from the "
                                  "predictive guide on the same tasks without query labels")

