"""The reference rows' quadrature check: the ``prior`` and ``oracle`` rows of a built-in family on the
library's fixed test tasks at the default quadrature (``n`` grid points per axis, ``K`` strata per query
point) and refined (``2n``, ``2K``), and, for ``sinusoid_line``, how many test tasks stay ambiguous
between sine and line. Families with noiseless query targets (``sinusoid``, ``sinusoid_bmaml``) have the
``prior`` row only.

    python experiments/reference_check.py --out experiments/RESULTS_reference.md [--benchmark sinusoid_line]
        [--tasks 600] [--refine-tasks 200]

With another benchmark than ``sinusoid_line`` the output is appended to ``--out``.

The refined settings run on the first ``--refine-tasks`` tasks (they cost 5x and 2x), compared with the
default on the same tasks.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

from pyro_meta.evaluate import evaluate
from pyro_meta.guides.empty import NoLatentGuide
from pyro_meta.learner import MetaLearner
from pyro_meta.methods.reference import COMPONENTS, POSTERIOR_FREQUENCIES, grid_points
from pyro_meta.models.reference import ReferenceModel, has_posterior_grid
from pyro_meta.tasks import get_benchmark, regression
from pyro_meta.tasks.registry import family_of

BENCHMARK = "sinusoid_line"


def posterior(kind: str) -> bool:
    """Whether the row uses the family's own posterior quadrature (sinusoid_bmaml's oracle)."""
    return kind == "oracle" and has_posterior_grid(family_of(BENCHMARK))


def run(kind: str, n: int, k: int, tasks, ab: int = regression.POSTERIOR_AB  # noqa: ANN001
        ) -> tuple[dict, float, torch.Tensor | None]:
    """``n``: grid points per axis, or the posterior quadrature's frequencies; ``ab``: its (a, b) grid."""
    regression.POSTERIOR_AB = ab
    family = family_of(BENCHMARK)
    model = ReferenceModel(family, kind, grid_points(BENCHMARK), k, posterior_n=n) if posterior(kind) else \
        ReferenceModel(family, kind, n, k)
    t0 = time.perf_counter()
    metrics, _ = evaluate(MetaLearner(model, NoLatentGuide()), tasks, num_samples=1, task_chunk=tasks.num_tasks)
    return metrics, time.perf_counter() - t0, model.last_info.get("p_line")


def row(kind: str, n: int, k: int, tasks: int, m: dict, sec: float, ab: int = regression.POSTERIOR_AB) -> str:
    f = {key: m[key]["mean"] for key in ("mse", "nll", "coverage50", "coverage90")}
    ci = {key: m[key]["ci95"] for key in ("mse", "nll")}
    grid = f"{n} frequencies, {ab} x {ab} (a, b)" if posterior(kind) else str(n)
    return (f"| {kind} | {grid} | {k} | {tasks} | {f['mse']:.4f} ± {ci['mse']:.4f} | {f['nll']:.4f} ± {ci['nll']:.4f} | "
            f"{f['coverage50']:.3f} | {f['coverage90']:.3f} | {sec:.0f} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--benchmark", default="sinusoid_line", choices=["sinusoid", "sinusoid_line", "sinusoid_bmaml"])
    p.add_argument("--tasks", type=int, default=600)
    p.add_argument("--refine-tasks", type=int, default=200)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "RESULTS_reference.md")
    args = p.parse_args(argv)
    global BENCHMARK
    BENCHMARK = args.benchmark
    GRID_POINTS = grid_points(BENCHMARK)
    torch.set_num_threads(1)
    test = get_benchmark(BENCHMARK, shots=5, num_test_tasks=args.tasks, seed=0).test
    sub = test.select(slice(0, args.refine_tasks))
    kinds = ("prior",) if BENCHMARK == "sinusoid" else ("oracle", "prior")
    lines = [f"# Reference rows: quadrature check ({BENCHMARK}, 5 shots, the library's test tasks)", "",
             f"Command: `python {' '.join(['experiments/reference_check.py', *(argv or sys.argv[1:])])}`. "
             f"Machine: {platform.machine()}, {platform.processor() or 'CPU'}, one torch thread, torch "
             f"{torch.__version__}. Test tasks: the library's fixed `{BENCHMARK}` test set (seed 0), 100 query "
             "points each." + {"sinusoid": " Noiseless targets: the prior row only (the oracle is a point mass).",
                                "sinusoid_bmaml": " The oracle by the family's posterior quadrature "
                                "(`posterior_grid`: frequencies x an (a, b) grid), the prior by the 3-D grid."
                                }.get(BENCHMARK, ""), "",
             "| row | n (grid per axis) | K (strata per point) | tasks | MSE | NLL | 50% cov. | 90% cov. | seconds |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    p_line = None
    for kind in kinds:
        n0 = POSTERIOR_FREQUENCIES if posterior(kind) else GRID_POINTS
        ab0 = regression.POSTERIOR_AB
        m, sec, pl = run(kind, n0, COMPONENTS, test)
        p_line = pl if kind == "oracle" else p_line
        lines.append(row(kind, n0, COMPONENTS, args.tasks, m, sec))
        print(lines[-1], flush=True)
        nll = {}
        refine = [(n0, COMPONENTS, ab0), (2 * n0, COMPONENTS, ab0), (n0, 2 * COMPONENTS, ab0)]
        if posterior(kind):
            refine.append((n0, COMPONENTS, ab0 * 3 // 2))
        for n, k, ab in refine:
            m, sec, _ = run(kind, n, k, sub, ab)
            nll[(n, k, ab)] = m["nll"]["mean"]
            lines.append(row(kind, n, k, args.refine_tasks, m, sec, ab))
            print(lines[-1], flush=True)
        regression.POSTERIOR_AB = ab0
        base = nll[(n0, COMPONENTS, ab0)]
        lines.append(f"| {kind}: largest NLL change on refining | | | | | "
                     f"{max(abs(v - base) for v in nll.values()):.5f} | | | |")
    if p_line is not None:
        amb = int(((p_line > 0.05) & (p_line < 0.95)).sum())
        lines += ["", f"Ambiguous test tasks (the oracle's posterior probability of a line between 0.05 and 0.95): "
                  f"**{amb} of {args.tasks}**; between 0.01 and 0.99: "
                  f"{int(((p_line > 0.01) & (p_line < 0.99)).sum())}.", ""]
    if BENCHMARK == "sinusoid_line":
        args.out.write_text("\n".join(lines))
    else:
        with args.out.open("a") as f:
            f.write("\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines[-2:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
