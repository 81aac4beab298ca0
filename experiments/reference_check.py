"""The reference rows' quadrature check: the ``prior`` and ``oracle`` rows of ``sinusoid_line`` on the
library's fixed test tasks at the default quadrature (``n`` grid points per axis, ``K`` strata per query
point) and refined (``2n``, ``2K``), and how many test tasks stay ambiguous between sine and line.

    python experiments/reference_check.py --out experiments/RESULTS_reference.md [--tasks 600] [--refine-tasks 200]

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
from pyro_meta.methods.reference import COMPONENTS, GRID_POINTS
from pyro_meta.models.reference import ReferenceModel
from pyro_meta.tasks import get_benchmark
from pyro_meta.tasks.regression import SinusoidLine


def run(kind: str, n: int, k: int, tasks) -> tuple[dict, float, torch.Tensor | None]:  # noqa: ANN001
    model = ReferenceModel(SinusoidLine(), kind, n, k)
    t0 = time.perf_counter()
    metrics, _ = evaluate(MetaLearner(model, NoLatentGuide()), tasks, num_samples=1, task_chunk=tasks.num_tasks)
    return metrics, time.perf_counter() - t0, model.last_info.get("p_line")


def row(kind: str, n: int, k: int, tasks: int, m: dict, sec: float) -> str:
    f = {key: m[key]["mean"] for key in ("mse", "nll", "coverage50", "coverage90")}
    ci = {key: m[key]["ci95"] for key in ("mse", "nll")}
    return (f"| {kind} | {n} | {k} | {tasks} | {f['mse']:.4f} ± {ci['mse']:.4f} | {f['nll']:.4f} ± {ci['nll']:.4f} | "
            f"{f['coverage50']:.3f} | {f['coverage90']:.3f} | {sec:.0f} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=600)
    p.add_argument("--refine-tasks", type=int, default=200)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "RESULTS_reference.md")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    test = get_benchmark("sinusoid_line", shots=5, num_test_tasks=args.tasks, seed=0).test
    sub = test.select(slice(0, args.refine_tasks))
    lines = ["# Reference rows: quadrature check (sinusoid_line, 5 shots, the library's test tasks)", "",
             f"Command: `python {' '.join(['experiments/reference_check.py', *(argv or sys.argv[1:])])}`. "
             f"Machine: {platform.machine()}, {platform.processor() or 'CPU'}, one torch thread, torch "
             f"{torch.__version__}. Test tasks: the library's fixed `sinusoid_line` test set (seed 0), 100 query "
             "points each.", "",
             "| row | n (grid per axis) | K (strata per point) | tasks | MSE | NLL | 50% cov. | 90% cov. | seconds |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    p_line = None
    for kind in ("oracle", "prior"):
        m, sec, pl = run(kind, GRID_POINTS, COMPONENTS, test)
        p_line = pl if kind == "oracle" else p_line
        lines.append(row(kind, GRID_POINTS, COMPONENTS, args.tasks, m, sec))
        print(lines[-1], flush=True)
        nll = {}
        for n, k in ((GRID_POINTS, COMPONENTS), (2 * GRID_POINTS, COMPONENTS), (GRID_POINTS, 2 * COMPONENTS)):
            m, sec, _ = run(kind, n, k, sub)
            nll[(n, k)] = m["nll"]["mean"]
            lines.append(row(kind, n, k, args.refine_tasks, m, sec))
            print(lines[-1], flush=True)
        base = nll[(GRID_POINTS, COMPONENTS)]
        lines.append(f"| {kind}: largest NLL change on refining | | | | | "
                     f"{max(abs(v - base) for v in nll.values()):.5f} | | | |")
    amb = int(((p_line > 0.05) & (p_line < 0.95)).sum())
    lines += ["", f"Ambiguous test tasks (the oracle's posterior probability of a line between 0.05 and 0.95): "
              f"**{amb} of {args.tasks}**; between 0.01 and 0.99: "
              f"{int(((p_line > 0.01) & (p_line < 0.99)).sum())}.", ""]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines[-2:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
