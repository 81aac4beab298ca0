"""Why a regression run's predictive is too narrow or under-fit: the diagnostics the weight-space issue asks
for, one markdown row per run directory.

- support residual: RMS of (predictive mean - y) on the task's own support points (the set it conditioned
  on), against the benchmark's noise std (0.3 on sinusoid_line): above it, the adaptation under-fits;
- query RMS error of the predictive mean, and the epistemic spread: the std over posterior draws of the
  function value, averaged over query points; spread / error far below 1 with a fixed noise is the
  over-confidence; the noise std the model observes with (learned or fixed, where it has one);
- worst 5%: the share of the summed test NLL that the worst 5% of tasks carry (a few blown-up tasks or a
  broad failure).

Each quantity is computed on the first ``--tasks`` test tasks (never read during training or model
selection), with the run's own ``eval_samples`` and seed.

    python experiments/weightspace_diagnostics.py runs/s3/bmaml-default-new runs/w28/platipus-ln-nslr01 ...
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from pyro_meta.evaluate import _points, predict
from pyro_meta.metrics import mixture_nll
from pyro_meta.run import load_run
from pyro_meta.tasks import TaskBatch


def noise_std(learner) -> float | None:  # noqa: ANN001 - any MetaLearner
    lik = getattr(learner.model, "likelihood", None)
    std = getattr(lik, "noise_std", None)
    return None if std is None else float(torch.as_tensor(std).detach())


def diagnose(run_dir: Path, tasks: int) -> dict[str, float | str | None]:
    cfg, learner, bm = load_run(run_dir)
    learner.eval()
    test = bm.test.select(slice(0, min(tasks, bm.test.num_tasks)))
    samples = max(cfg.eval_samples, 1)
    on_support = TaskBatch(test.x_support, test.y_support, test.x_support, test.y_support, test.info)
    ps = predict(learner, on_support, samples, cfg.seed, keep_latents=False)
    support_rms = float(((ps.predictive_mean() - test.y_support) ** 2).mean().sqrt())
    pq = predict(learner, test, samples, cfg.seed, keep_latents=False)
    err = float(((pq.predictive_mean() - test.y_query) ** 2).mean().sqrt())
    spread = float(pq.mean.std(0, correction=0).mean()) if pq.mean.shape[0] > 1 else 0.0
    nll = mixture_nll(_points(pq.log_lik), pq.log_weights)  # T
    nll = nll[torch.isfinite(nll)]
    k = max(1, math.ceil(0.05 * nll.numel()))
    worst = float(nll.sort(descending=True).values[:k].sum() / nll.sum())
    return {"run": run_dir.name, "method": cfg.method, "support_rms": support_rms, "query_rms": err,
            "spread": spread, "noise": noise_std(learner), "nll": float(nll.mean()), "worst5": worst}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", type=Path, nargs="+")
    p.add_argument("--tasks", type=int, default=200, help="first test tasks used (200)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print("| run | method | support RMS residual | query RMS error | epistemic spread | spread / error | "
          "noise std | NLL | worst 5% share of NLL |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for run in args.runs:
        d = diagnose(run, args.tasks)
        noise = "-" if d["noise"] is None else f"{d['noise']:.3f}"
        print(f"| {d['run']} | {d['method']} | {d['support_rms']:.3f} | {d['query_rms']:.3f} | {d['spread']:.3f} | "
              f"{d['spread'] / d['query_rms']:.2f} | {noise} | {d['nll']:.3f} | {d['worst5']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
