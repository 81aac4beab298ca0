"""``pyro-meta inspect``: an ArviZ summary of a run's posterior and pictures of it."""

from __future__ import annotations

import warnings
from pathlib import Path

import arviz as az
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .run import POSTERIOR, export_run, load_run  # noqa: E402


def inspect_run(run_dir: str | Path, max_weights: int = 8) -> str:
    """Print-ready summary of ``run_dir``'s ``posterior.nc`` (rebuilt from the checkpoint if absent);
    writes ``plots/posterior.png`` and ``plots/ppc.png``."""
    run_dir = Path(run_dir)
    path = run_dir / POSTERIOR
    if not path.exists():
        cfg, learner, bm = load_run(run_dir)
        export_run(run_dir, cfg, learner, bm)
    idata = az.from_netcdf(str(path))
    post = idata.posterior
    lines = [f"run: {run_dir}", f"posterior draws: {post.sizes['draw']} (independent guide draws, 1 chain); "
             f"tasks exported: {post.sizes.get('task', 0)}"]
    per_task = [v for v in post.data_vars if "task" in post[v].dims]
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for v in per_task:
            wdim = [d for d in post[v].dims if d not in ("chain", "draw", "task")]
            sel = {"task": 0}
            if wdim:
                sel[wdim[0]] = post[v][wdim[0]].values[:max_weights]
            lines.append(f"\n{v} on test task 0 (first {max_weights} weights):")
            lines.append(az.summary(idata, var_names=[v], coords=sel, kind="stats").to_string())
            az.plot_posterior(idata, var_names=[v], coords=sel, figsize=(12, 6))
            plt.gcf().savefig(plots / "posterior.png", dpi=90)
            plt.close("all")
        draws = post.sizes["draw"]
        try:
            if draws < 2:
                raise ValueError(f"PSIS-LOO needs more than one posterior draw; this run exports {draws} "
                                 "(a point estimate such as MAML's)")
            loo = az.loo(idata)
            lines.append(f"\nPSIS-LOO over {loo.n_data_points} query points: elpd_loo {loo.elpd_loo:.1f} "
                         f"(se {loo.se:.1f}), p_loo {loo.p_loo:.1f}")
        except Exception as e:  # noqa: BLE001 - LOO is informative, never fatal
            lines.append(f"\nPSIS-LOO not available: {e}")
        az.plot_ppc(idata, data_pairs={"y_query": "y_query"}, num_pp_samples=min(50, post.sizes["draw"]))
        plt.gcf().savefig(plots / "ppc.png", dpi=90)
        plt.close("all")
    lines.append(f"\nwrote {plots / 'posterior.png'} and {plots / 'ppc.png'}")
    return "\n".join(lines)
