"""``pyro-meta inspect``: an ArviZ summary of a run's posterior, its held-out log predictive density,
and pictures of it.

What the numbers mean:

- **held-out lpd** (``heldout_log_likelihood`` group): ``sum_t log p(y_query_t | support_t)``, the
  Monte Carlo estimate over the exported draws of how much probability the support-conditioned
  posterior gives the query sets it never saw, with its standard error over tasks. Higher is better;
  it is the number to compare models by.
- **PSIS-LOO** (``log_likelihood`` group): leave-one-out over the *support* points, the observations
  the posterior conditioned on; only for models that observe the support set (``y_support``). It is
  never computed over the query points, which the posterior did not condition on (there, PSIS-LOO
  would "leave out" points that were never in).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

from ._arviz import az
from .arviz import HELDOUT_GROUP
from .metrics import heldout_lpd
from .plots import plot_posterior_weights, plot_ppc
from .recalibrate import read_recalibration
from .run import POSTERIOR, export_run, load_run, read_config
from .rundir import RunLock, clean_temp_files


def heldout_summary(idata: az.InferenceData) -> str:
    """One paragraph on the held-out log predictive density of ``idata``'s query sets."""
    if HELDOUT_GROUP not in idata.groups():
        return "held-out log predictive density: not available (posterior.nc has no held-out group)"
    ll = idata[HELDOUT_GROUP]["y_query"].values  # chain draw task query
    ll = torch.as_tensor(ll.reshape(-1, *ll.shape[2:]))  # S T Q
    h = heldout_lpd(ll)
    return (f"held-out log predictive density of the query sets, log p(y_query | support), over {h['tasks']} "
            f"tasks x {h['points'] // h['tasks']} points and {h['num_samples']} draws:\n"
            f"  total {h['total']:.1f} (se over tasks {h['se']:.1f}, Monte Carlo se {h['mc_se']:.2f}); "
            f"per point {h['per_point']:.4f} (se {h['per_point_se']:.4f})\n"
            f"  pointwise (each point's own predictive): {h['pointwise_total']:.1f}; smallest per-task effective "
            f"sample size of the draws {h['min_ess']:.1f}")


def loo_summary(idata: az.InferenceData) -> str:
    if "log_likelihood" not in idata.groups():
        return ("PSIS-LOO: not computed: the model does not observe the support set (y_support), so no "
                "observation the posterior conditioned on has a log-likelihood here; the held-out lpd above "
                "is the model-comparison number")
    draws = idata.posterior.sizes["draw"]
    if draws < 2:
        return f"PSIS-LOO: not available: it needs more than one posterior draw; this run exports {draws}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loo = az.loo(idata)
    except Exception as e:  # noqa: BLE001 - LOO is informative, never fatal
        return f"PSIS-LOO: not available: {e}"
    return (f"PSIS-LOO over the {loo.n_data_points} support points the posterior conditioned on: elpd_loo "
            f"{loo.elpd_loo:.1f} (se {loo.se:.1f}), p_loo {loo.p_loo:.1f}")


def inspect_run(run_dir: str | Path, max_weights: int = 8) -> str:
    """Print-ready summary of ``run_dir``'s ``posterior.nc`` (rebuilt from the checkpoint if absent);
    writes ``plots/posterior.png`` and ``plots/ppc.png``."""
    run_dir = Path(run_dir)
    read_config(run_dir)  # not a run directory: an error before anything is touched
    with RunLock(run_dir, "inspect"):
        clean_temp_files(run_dir)
        return _inspect_locked(run_dir, max_weights)


def _load_netcdf(path: Path) -> az.InferenceData:
    """``path`` read fully into memory and closed (so it can be replaced while we hold the data)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        idata = az.from_netcdf(str(path))
        for group in idata.groups():
            idata[group].load()
            idata[group].close()
    return idata


def _read_posterior(run_dir: Path) -> az.InferenceData:
    """``posterior.nc``, rebuilt from the checkpoint when it is absent, damaged, or of the old layout."""
    path = run_dir / POSTERIOR
    if path.exists():
        try:
            idata = _load_netcdf(path)
            if HELDOUT_GROUP in idata.groups():
                return idata
            print(f"note: {path} was written by an older version (query log-likelihoods in log_likelihood, where "
                  "PSIS-LOO would misread them); rebuilding it from the checkpoint", file=sys.stderr, flush=True)
        except Exception as e:  # noqa: BLE001 - any read failure: the file is damaged; rebuild it
            print(f"warning: {path} is damaged ({type(e).__name__}: {str(e).splitlines()[0][:120]}); rebuilding it "
                  "from the checkpoint", file=sys.stderr, flush=True)
    cfg, learner, bm = load_run(run_dir)
    export_run(run_dir, cfg, learner, bm, read_recalibration(run_dir))
    return _load_netcdf(path)


def recalibration_summary(run_dir: Path) -> str | None:
    """The run's recalibration in a few lines: the maps (``recalibration.json``) and, from ``eval.json``, the
    raw and recalibrated test NLL and coverage side by side; ``None`` for a run without maps."""
    import json

    from .recalibrate import describe

    recal = read_recalibration(run_dir)
    if recal is None:
        return None
    lines = ["recalibration: " + describe(recal)]
    try:
        report = json.loads((run_dir / "eval.json").read_text())
    except (OSError, ValueError):
        return "\n".join(lines)
    m, rec = report.get("metrics", {}), report.get("recalibrated") or {}

    def row(name: str, r: dict) -> str:
        cells = []
        for key, label in (("nll", "NLL"), ("accuracy", "accuracy"), ("coverage50", "cov 50%"),
                           ("coverage90", "cov 90%")):
            v = r.get(key)
            if isinstance(v, dict) and v.get("mean") is not None:
                cells.append(f"{label} {v['mean']:.3f}")
        return f"  {name:<10} " + ", ".join(cells)

    lines.append("test metrics, raw and recalibrated (eval.json):")
    lines.append(row("raw", m))
    for name in ("scale", "isotonic", "temperature"):
        if name in rec:
            lines.append(row(name, rec[name]))
    return "\n".join(lines)


def _inspect_locked(run_dir: Path, max_weights: int) -> str:
    idata = _read_posterior(run_dir)
    post = idata.posterior
    lines = [f"run: {run_dir}", f"posterior draws: {post.sizes['draw']} (independent guide draws, 1 chain); "
             f"tasks exported: {post.sizes.get('task', 0)}"]
    per_task = [v for v in post.data_vars if "task" in post[v].dims]
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    written = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for v in per_task:
            wdim = [d for d in post[v].dims if d not in ("chain", "draw", "task", "class")]
            sel = {"task": 0}
            if "class" in post[v].dims:
                sel["class"] = 0
            if wdim:
                sel[wdim[0]] = post[v][wdim[0]].values[:max_weights]
            where = "test task 0" + (", class 0" if "class" in sel else "")
            lines.append(f"\n{v} on {where} (first {max_weights} weights):")
            lines.append(az.summary(idata, var_names=[v], coords=sel, kind="stats").to_string())
            png = plot_posterior_weights(idata, v, sel, plots / "posterior.png",
                                         title=f"{v} on {where}: posterior of the first {max_weights} weights")
            if png is not None and png not in written:
                written.append(png)
    recal = recalibration_summary(run_dir)
    if recal is not None:
        lines.append("\n" + recal)
    lines.append("\n" + heldout_summary(idata))
    lines.append(loo_summary(idata))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        written.append(plot_ppc(idata, plots / "ppc.png", num_pp_samples=min(50, post.sizes["draw"])))
    lines.append(f"\nwrote {', '.join(str(p) for p in written)}")
    return "\n".join(lines)
