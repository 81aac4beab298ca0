"""Recalibrated coverage of finished regression runs with the maps fitted on N validation tasks (the run's
own benchmark, validation seed; never the test tasks), scored on the run's fixed test tasks: how many
validation tasks the maps need to put 50% and 90% coverage within 0.03 of nominal.

    python experiments/recalibration_check.py RUN ... --val-tasks 100 500
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

from pyro_meta.evaluate import predict
from pyro_meta.recalibrate import fit_recalibration, recalibrated_metrics
from pyro_meta.run import benchmark_of, load_run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", type=Path, nargs="+")
    p.add_argument("--val-tasks", type=int, nargs="+", default=[100, 500])
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print("| run | method | validation tasks | width factor | +scale cov 50 / 90 | +iso cov 50 / 90 | +iso NLL |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for run in args.runs:
        cfg, learner, bm = load_run(run)
        learner.eval()
        test = bm.test
        pt = predict(learner, test, cfg.eval_samples, cfg.seed, keep_latents=False)
        val = benchmark_of(replace(cfg, num_val_tasks=max(args.val_tasks))).val
        pv = predict(learner, val, cfg.eval_samples, cfg.seed, keep_latents=False)
        for n in args.val_tasks:
            idx = list(range(n))
            sub = val.select(idx)
            pvn = replace(pv, mean=pv.mean[:, :n], stddev=None if pv.stddev is None else pv.stddev[:, :n],
                          log_lik=pv.log_lik[:, :n], y_draws=pv.y_draws[:, :n], latents={},
                          log_weights=None if pv.log_weights is None else pv.log_weights[:, :n],
                          support_log_lik=None)
            recal = fit_recalibration(pvn, sub)
            m = recalibrated_metrics(pt, test, recal)
            iso = m["isotonic"]
            sc = m.get("scale")
            scale = "-" if sc is None else f"{sc['coverage50']['mean']:.3f} / {sc['coverage90']['mean']:.3f}"
            factor = "-" if recal.get("scale") is None else f"{recal['scale']:.2f}"
            print(f"| {run.name} | {cfg.method} | {n} | {factor} | {scale} | "
                  f"{iso['coverage50']['mean']:.3f} / {iso['coverage90']['mean']:.3f} | {iso['nll']['mean']:.3f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
