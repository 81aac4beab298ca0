"""ABML's ablation: which protocol choice moves which number, beside MAML at equal iterations.

Every variant trains on the same task stream (same seed) and is scored on the same fixed test tasks.
A variant is a set of RunConfig overrides on ABML's defaults; ``--variants`` picks some by name.

    python experiments/abml_ablation.py --steps 2000 --shots 5 --benchmark sinusoid --out runs/abml-ablation

Writes ``<out>/ablation.md``: test MSE, NLL, 50%/90% coverage (mean ± 95% CI over tasks), the learned
prior's median std and the learned noise std, and each variant's overrides.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from pyro_meta.run import run_many

# name -> RunConfig overrides of ABML's defaults ("maml": the baseline, MAML's defaults)
# The paper's protocol as this library ran it before issue 9 (plain SGD inner loop, prior std 0.1 at
# initialization, fixed noise 1/sqrt(2), one Monte Carlo draw, hyperprior counted once per meta-batch,
# 5 inner steps at test); each variant changes what its name says.
PAPER = {"objective": "paper", "train_samples": 1, "hyperprior_weight": 1.0, "inner_steps_eval": 5,
         "inner_step": "sgd", "prior_init_std": 0.1, "learn_noise": False, "kl_estimator": "mc"}
# objective "predictive" with the hyperprior counted once over the run (1 / 2000 steps)
PRED = {**PAPER, "objective": "predictive", "train_samples": 10, "hyperprior_weight": 0.0005}

# name -> RunConfig overrides of ABML's defaults ("maml": the baseline, MAML's defaults)
VARIANTS: dict[str, dict] = {
    "maml": {"method": "maml"},
    "paper": PAPER,
    "paper-init0.01": {**PAPER, "prior_init_std": 0.01},
    "paper-nokl-inner": {**PAPER, "kl_weight_inner": 0.0},
    "paper-analytic": {**PAPER, "kl_estimator": "analytic"},
    "joint": {**PAPER, "objective": "joint"},
    "support": {**PAPER, "objective": "support"},
    "predictive": {**PAPER, "objective": "predictive", "train_samples": 10},
    "natural": {**PAPER, "inner_step": "natural", "inner_lr": 0.5},
    "paper-hyper": {**PAPER, "hyperprior_weight": 0.0005},
    "joint-hyper": {**PAPER, "objective": "joint", "hyperprior_weight": 0.0005},
    "predictive-hyper": PRED,
    "predictive-hyper-0.05": {**PRED, "prior_init_std": 0.05},
    "predictive-hyper-nokl": {**PRED, "kl_weight_inner": 0.0},
    "predictive-hyper-noise": {**PRED, "learn_noise": True, "noise_std": 0.7071, "noise_scaled_lr": True},
    "natural-layers-hyper": {**PRED, "inner_step": "natural", "inner_lr": 0.5, "prior_init_std_hidden": 0.01},
    "natural-0.06": {**PRED, "inner_step": "natural", "inner_lr": 0.5, "prior_init_std": 0.06,
                     "inner_steps_eval": 10},
    "natural-layers-0.03": {**PRED, "inner_step": "natural", "inner_lr": 0.5, "prior_init_std_hidden": 0.03,
                            "inner_steps_eval": 10},
    "defaults": {},
}


def _summary(run_dir: Path) -> dict:
    """The learned prior's median std and noise std from the run's checkpoint (ABML only)."""
    from pyro_meta.rundir import load_checkpoint

    try:
        state = load_checkpoint(run_dir / "checkpoint.pt")["learner"]
    except Exception:  # noqa: BLE001 - a summary, not a result
        return {}
    out = {}
    if "guide.log_precision" in state:
        out["prior_std_median"] = float(torch.exp(-0.5 * state["guide.log_precision"]).median())
    if "model.likelihood.raw_noise" in state:
        out["noise_std"] = float(torch.nn.functional.softplus(state["model.likelihood.raw_noise"]) + 1e-3)
    return out


def jobs_for(args: argparse.Namespace) -> dict[str, dict]:
    jobs = {}
    for name in args.variants:
        over = dict(VARIANTS[name])
        method = over.pop("method", "abml")
        jobs[name] = {"benchmark": args.benchmark, "method": method, "shots": args.shots, "steps": args.steps,
                      "seed": args.seed, "num_test_tasks": args.test_tasks, "log_every": max(1, args.steps // 20),
                      "checkpoint_every": max(1, args.steps // 2), **over}
    return jobs


def main(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    jobs = jobs_for(args)
    results = run_many(jobs, args.out, args.workers)
    lines = [f"# ABML ablation: {args.benchmark}, {args.shots} shots, {args.steps} meta-iterations", "",
             f"Command: `python experiments/abml_ablation.py {' '.join(args.argv)}`", "",
             f"Wall time: {time.perf_counter() - t0:.0f} s with {args.workers} worker(s).", "",
             "| variant | test MSE | NLL | 50% cov | 90% cov | prior std (median) | noise std | overrides |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in args.variants:
        rep = results[name]
        if "error" in rep:
            lines.append(f"| {name} | failed: {rep['error']} | | | | | | |")
            continue
        m = rep["metrics"]
        cells = " | ".join(f"{m[k]['mean']:.3f} ± {m[k]['ci95']:.3f}" for k in ("mse", "nll", "coverage50", "coverage90"))
        s = _summary(Path(args.out) / name)
        prior = f"{s['prior_std_median']:.4f}" if "prior_std_median" in s else "-"
        noise = f"{s['noise_std']:.3f}" if "noise_std" in s else "fixed"
        lines.append(f"| {name} | {cells} | {prior} | {noise} | `{json.dumps(VARIANTS[name])}` |")
    text = "\n".join(lines) + "\n"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "ablation.md").write_text(text)
    print(text)
    return 0 if all("error" not in r for r in results.values()) else 1


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--benchmark", default="sinusoid")
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-tasks", dest="test_tasks", type=int, default=600)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("runs/abml-ablation"))
    args = p.parse_args(argv)
    args.argv = argv
    return args


if __name__ == "__main__":
    sys.exit(main(parse(sys.argv[1:])))
