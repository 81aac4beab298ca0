"""SVGD's variance collapse in high dimension: particle std / target std against dimension and particle count.

Target: a diagonal Gaussian in ``D`` dimensions, mean 0, standard deviations spread evenly from 0.5 to 2.
Particles start from N(0, I) (set as ``pyro.infer.SVGD``'s param before its first step) and move for a
fixed number of steps of Adam (lr 0.05) on the SVGD direction. The score is the ratio

    ratio = mean over dims of  std_n(x_nd) / sigma_d      (sample std with N - 1; exact samples give ~1)

after the last step, for the kernels

- ``pyro-rbf``: Pyro's ``RBFSteinKernel`` (one median bandwidth per dimension) in ``mode="multivariate"``;
- ``scalar``: :class:`pyro_meta.infer.ScalarRBFKernel` (one bandwidth ``med ||x_i - x_j||^2 / log(N+1)``);
- ``scalar-xF``: the same with ``bandwidth_factor=F`` (a wider kernel, more repulsion);
- ``annealed``: ``scalar`` with the driving term weighted by ``gamma`` growing linearly from 0 to 1 over the
  first half of the run (D'Angelo & Fortuin, 2021), then plain SVGD; our own loop (``svgd_direction`` +
  ``torch.optim.Adam``, the same update as ``pyro.infer.SVGD`` with the same optimizer).

A run that goes non-finite stops there and is reported as ``nan@step``.

    python experiments/svgd_collapse.py --out runs/svgd_collapse

writes ``<out>/svgd_collapse.md`` and ``.json`` and the figure ``--figure``
(default ``experiments/figures/svgd_collapse.png``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVGD, RBFSteinKernel
from pyro.optim import Adam

from pyro_meta.infer.svgd import ScalarRBFKernel, svgd_direction

LR = 0.05


def target_stds(dim: int) -> torch.Tensor:
    """``sigma_d``, ``[D]``: evenly from 0.5 to 2 (one dimension: 1)."""
    return torch.linspace(0.5, 2.0, dim) if dim > 1 else torch.ones(1)


def ratio(particles: torch.Tensor, stds: torch.Tensor) -> float:
    """Mean over dims of particle std / target std; particles ``[N, D]``."""
    return float((particles.std(0) / stds).mean())


class Tracker:
    """Per-step record of one run: the ratio every ``every`` steps, its minimum over the run, the first
    non-finite step, and at the end the ratio and the mean error ``mean_d |mean_n x_nd| / sigma_d``."""

    def __init__(self, stds: torch.Tensor, every: int = 25):
        self.stds, self.every = stds, every
        self.out = {"nan_step": None, "min_ratio": math.inf, "min_step": 0, "trace": []}

    def __call__(self, step: int, x: torch.Tensor) -> bool:
        """Record step ``step``'s particles ``[N, D]``; False once they are non-finite."""
        if not torch.isfinite(x).all():
            self.out["nan_step"] = step
            return False
        r = ratio(x, self.stds)
        if r < self.out["min_ratio"]:
            self.out["min_ratio"], self.out["min_step"] = r, step
        if step % self.every == 0:
            self.out["trace"].append(r)
        self.x = x
        return True

    def result(self) -> dict:
        ok = self.out["nan_step"] is None
        self.out["ratio"] = ratio(self.x, self.stds) if ok else math.nan
        self.out["mean_err"] = float((self.x.mean(0) / self.stds).abs().mean()) if ok else math.nan
        return self.out


def run_pyro(kernel, init: torch.Tensor, stds: torch.Tensor, steps: int) -> dict:
    """``pyro.infer.SVGD(mode="multivariate")`` with Adam(LR) from ``init`` ``[N, D]``."""
    n, d = init.shape

    def model():
        pyro.sample("x", dist.Normal(torch.zeros(d), stds).to_event(1))

    pyro.clear_param_store()
    track = Tracker(stds)
    pyro.param("svgd_particles", init.reshape(-1).clone())  # the guide's init_to_sample would draw from the target
    svgd = SVGD(model, kernel, Adam({"lr": LR}), n, 0, mode="multivariate")
    for step in range(1, steps + 1):
        svgd.step()
        if not track(step, pyro.param("svgd_particles").detach().reshape(n, d)):
            break
    return track.result()


def run_annealed(init: torch.Tensor, stds: torch.Tensor, steps: int, ramp: float = 0.5) -> dict:
    """Annealed SVGD: driving weight ``min(1, t / (ramp * steps))``, Adam(LR) on ``-phi``."""
    kernel = ScalarRBFKernel()
    x = init.clone().requires_grad_()
    opt = torch.optim.Adam([x], lr=LR)
    prec = stds.pow(-2)
    track = Tracker(stds)
    for step in range(1, steps + 1):
        gamma = min(1.0, (step - 1) / (ramp * steps)) if ramp > 0 else 1.0
        with torch.no_grad():
            score = -x * prec  # N D: grad log N(0, diag(stds^2))
            x.grad = -svgd_direction(x, score, kernel, gamma)
        opt.step()
        if not track(step, x.detach().clone()):
            break
    return track.result()


def kernels_for(factors: list[float]) -> dict:
    ks = {"pyro-rbf": RBFSteinKernel, "scalar": ScalarRBFKernel}
    for f in factors:
        ks[f"scalar-x{f:g}"] = lambda f=f: ScalarRBFKernel(bandwidth_factor=f)
    return ks


COLLAPSED = 1e-3


def fmt(r: dict) -> str:
    """The final ratio; ``nan@k`` if non-finite at step k; ``*`` if it fell below COLLAPSED during the run."""
    if r["nan_step"] is not None:
        return f"nan@{r['nan_step']}"
    return f"{r['ratio']:.3f}" + ("*" if r["min_ratio"] < COLLAPSED else "")


def fmt_min(r: dict) -> str:
    return f"{r['min_ratio']:.1e}@{r['min_step']}"


def table(results: dict, dims: list[int], ns: list[int], cell=fmt) -> str:
    lines = ["| kernel | D | " + " | ".join(f"N={n}" for n in ns) + " |",
             "| --- | --- | " + " | ".join("---" for _ in ns) + " |"]
    for name, per_d in results.items():
        for d in dims:
            lines.append(f"| {name} | {d} | " + " | ".join(cell(per_d[str(d)][str(n)]) for n in ns) + " |")
    return "\n".join(lines)


def figure(results: dict, dims: list[int], ns: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(dims), figsize=(3.6 * len(dims), 3.4), sharey=True, squeeze=False)
    for ax, d in zip(axes[0], dims):
        for name, per_d in results.items():
            rs = [per_d[str(d)][str(n)] for n in ns]
            bad = [r["nan_step"] is not None or r["min_ratio"] < COLLAPSED for r in rs]
            ys = [math.nan if b else r["ratio"] for r, b in zip(rs, bad)]
            line, = ax.plot(ns, ys, marker="o", label=name)
            if any(bad):  # went NaN or collapsed to a point: crosses on the x axis
                ax.plot([n for n, b in zip(ns, bad) if b], [0.0] * sum(bad), "x", color=line.get_color(),
                        markersize=9, clip_on=False)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_title(f"D = {d}")
        ax.set_xlabel("particles N")
        ax.set_ylim(0, 1.3)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("particle std / target std")
    axes[0][-1].legend(fontsize=8, loc="upper right")
    fig.suptitle("SVGD on a diagonal Gaussian (stds 0.5..2): spread after the run "
                 f"(x on the axis: went NaN or collapsed below {COLLAPSED:g})", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(1)
    if args.quick:
        args.dims, args.ns, args.steps, args.factors = [2, 30], [5, 10], 40, [2.0]
    kernels = kernels_for(args.factors)
    results: dict = {name: {} for name in [*kernels, *(["annealed"] if not args.no_annealed else [])]}
    t0 = time.perf_counter()
    for d in args.dims:
        stds = target_stds(d)
        for n in args.ns:
            gen = torch.Generator().manual_seed(args.seed + 1000 * d + n)
            init = torch.randn(n, d, generator=gen)
            for name, make in kernels.items():
                pyro.set_rng_seed(args.seed)
                t = time.perf_counter()
                r = run_pyro(make(), init, stds, args.steps)
                r["seconds"] = time.perf_counter() - t
                results[name].setdefault(str(d), {})[str(n)] = r
            if not args.no_annealed:
                t = time.perf_counter()
                r = run_annealed(init, stds, args.steps)
                r["seconds"] = time.perf_counter() - t
                results["annealed"].setdefault(str(d), {})[str(n)] = r
            print(f"D={d} N={n}: " + ", ".join(f"{k} {fmt(v[str(d)][str(n)])}" for k, v in results.items()),
                  flush=True)
    wall = time.perf_counter() - t0
    md = "\n".join([
        f"Command: `python experiments/svgd_collapse.py {' '.join(args.argv)}`; {args.steps} steps of Adam "
        f"(lr {LR}), seed {args.seed}; wall time {wall:.0f} s.", "",
        "Particle std / target std (mean over dims) after the last step; `nan@k`: non-finite at step k; "
        f"`*`: the ratio fell below {COLLAPSED:g} during the run (collapse to a point; what follows is "
        "numerical, not SVGD).", "",
        table(results, args.dims, args.ns), "",
        "Smallest ratio during the run and its step:", "",
        table(results, args.dims, args.ns, fmt_min), "",
        "Mean error after the last step, mean over dims of |particle mean| / target std (target mean 0):", "",
        table(results, args.dims, args.ns, lambda r: f"{r['mean_err']:.3f}"), "",
    ])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "svgd_collapse.md").write_text(md)
    (out / "svgd_collapse.json").write_text(json.dumps({"args": {k: v for k, v in vars(args).items()},
                                                        "wall_seconds": wall, "results": results}, indent=1))
    figure(results, args.dims, args.ns, Path(args.figure))
    print(md)
    return 0


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dims", nargs="+", type=int, default=[5, 10, 30, 100])
    p.add_argument("--ns", nargs="+", type=int, default=[10, 20, 50, 100, 200], help="particle counts")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--factors", nargs="+", type=float, default=[2.0, 4.0],
                   help="bandwidth factors of the wider ScalarRBFKernel runs")
    p.add_argument("--no-annealed", action="store_true", help="skip annealed SVGD")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a tiny smoke run (2 dims, 2 particle counts, 40 steps)")
    p.add_argument("--out", default="runs/svgd_collapse")
    p.add_argument("--figure", default=str(Path(__file__).resolve().parent / "figures" / "svgd_collapse.png"))
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    return args


if __name__ == "__main__":
    raise SystemExit(main())
