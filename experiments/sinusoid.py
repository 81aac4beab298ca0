"""Reproduce MAML's sinusoid-regression protocol (Finn et al., 2017) for MAML and ABML.

Protocol (from the paper): y = A sin(x + p), A ~ U[0.1, 5], p ~ U[0, pi], x ~ U[-5, 5]; MLP 1-40-40-1
ReLU; K = 5 or 10 shots (K query points per training task); meta-batch 25; 70,000 meta-iterations;
1 inner SGD step (lr 0.01) in training and 10 at test; Adam with meta-lr 1e-3. Tested here on 600
fixed, seeded tasks with 100 query points each. ``--budget`` scales the iteration count.

    python experiments/sinusoid.py --budget 0.1 --workers 2 --out runs/sinusoid

Writes ``<out>/results.md``: test MSE, NLL and interval coverage beside the paper's numbers.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pyro_meta.run import markdown_table, run_many

PAPER_STEPS = 70_000
# MAML's sinusoid MSE as quoted in ../shared/ANCHORS.md ("[R]": secondary source, to be checked
# against the paper).
PAPER_MSE = {5: "1.13 ± 0.18 [R]", 10: "0.77 ± 0.11 [R]", 20: "0.48 ± 0.08 [R]"}


def jobs_for(args: argparse.Namespace) -> dict[str, dict]:
    steps = max(1, round(PAPER_STEPS * args.budget))
    extra = json.loads(args.set)
    per_method = {"maml": json.loads(args.maml), "abml": json.loads(args.abml)}
    jobs = {}
    for method in args.methods:
        for shots in args.shots:
            cfg = {"benchmark": "sinusoid", "method": method, "shots": shots, "meta_batch": 25,
                   "steps": steps, "meta_lr": 1e-3, "seed": args.seed,
                   "log_every": max(1, min(250, steps // 10)), "checkpoint_every": max(1, min(5000, steps // 4)),
                   **extra, **per_method[method]}
            jobs[f"{method}-{shots}shot"] = cfg
    return jobs


def main(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    jobs = jobs_for(args)
    results = run_many(jobs, args.out, args.workers)
    steps = next(iter(jobs.values()))["steps"]
    lines = [
        f"# Sinusoid regression, budget {args.budget} ({steps} of {PAPER_STEPS} meta-iterations)", "",
        f"Command: `python experiments/sinusoid.py {' '.join(args.argv)}`", "",
        f"Wall time: {time.perf_counter() - t0:.0f} s with {args.workers} worker process(es).", "",
        markdown_table(results), "",
        "MAML's paper (5 / 10 / 20 shots, test MSE): " + " / ".join(PAPER_MSE[k] for k in (5, 10, 20)),
    ]
    text = "\n".join(lines) + "\n"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.md").write_text(text)
    print(text)
    return 0 if all("error" not in r for r in results.values()) else 1


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=1.0, help="fraction of MAML's 70,000 iterations")
    p.add_argument("--methods", nargs="+", default=["maml", "abml"], choices=["maml", "abml"])
    p.add_argument("--shots", nargs="+", type=int, default=[5, 10])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="parallel runs (one torch thread each)")
    p.add_argument("--set", default="{}", help="JSON settings applied to every run (e.g. num_test_tasks)")
    p.add_argument("--maml", default="{}", help="JSON settings for the MAML runs only")
    p.add_argument("--abml", default="{}", help="JSON settings for the ABML runs only")
    p.add_argument("--out", default="runs/sinusoid")
    import sys

    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    return args


if __name__ == "__main__":
    raise SystemExit(main(parse()))
