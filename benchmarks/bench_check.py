"""What the first-step model check (pyro_meta.checks.check_learner) costs against one training step.

    python benchmarks/bench_check.py [--benchmark sinusoid] [--meta-batch 25] [--repeats 20]

One torch thread. For each method: the check's wall time on a fresh meta-batch (median of
``--repeats``), and the median time of one training step (loss, backward, Adam) on the same stream.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pyro_meta.checks import check_learner
from pyro_meta.config import RunConfig
from pyro_meta.methods import build_learner, resolve
from pyro_meta.run import benchmark_of


def measure(method: str, benchmark: str, meta_batch: int, repeats: int) -> dict[str, float]:
    cfg = resolve(RunConfig(benchmark=benchmark, method=method, meta_batch=meta_batch, num_test_tasks=2,
                            num_val_tasks=2))
    learner = build_learner(cfg)
    stream = benchmark_of(cfg).train
    opt = torch.optim.Adam(learner.parameters(), lr=cfg.meta_lr)
    for _ in range(3):  # warm-up
        check_learner(learner, next(stream))
    checks, steps = [], []
    for _ in range(repeats):
        batch = next(stream)
        t0 = time.perf_counter()
        check_learner(learner, batch)
        checks.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        loss = learner.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps.append(time.perf_counter() - t0)
    c, s = statistics.median(checks) * 1e3, statistics.median(steps) * 1e3
    return {"check_ms": c, "step_ms": s, "ratio": c / s}


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    print(f"| method | check (ms) | one training step (ms) | check / step |  ({args.benchmark}, T={args.meta_batch})")
    print("| --- | --- | --- | --- |")
    for method in args.methods:
        r = measure(method, args.benchmark, args.meta_batch, args.repeats)
        print(f"| {method} | {r['check_ms']:.1f} | {r['step_ms']:.1f} | {r['ratio']:.2f} |")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--benchmark", default="sinusoid")
    p.add_argument("--meta-batch", type=int, default=25)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--methods", nargs="+", default=["maml", "abml"])
    main(p.parse_args())
