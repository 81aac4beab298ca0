"""BMAML (chaser loss) and BFA beside MAML on BMAML's sinusoid, at 1, 5 and 10 particles.

Every run trains on the same task stream (same seed) and is scored on the same 600 fixed test tasks (100
noiseless query points each) by the blind evaluator. The protocol is the authors' (ANCHORS.md, their
code): network 1-40-40-40-1, 10 tasks per meta-batch, Adam 1e-3 decayed by 0.98 every 1% of the run,
1 follower and 1 leader SVGD step of 1e-3 in training, 10 SVGD steps at test.

    python experiments/bmaml_sinusoid.py --steps 10000 --shots 10 --out runs/bmaml-sinusoid

Writes ``<out>/bmaml_sinusoid.md`` (test MSE, NLL, 50%/90% coverage, held-out lpd, seconds per step) and
``<out>/bmaml_sinusoid.json``. Finished runs are skipped when started again; interrupted ones resume.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pyro_meta.run import run_many

PARTICLES = (1, 5, 10)


def variants(particles: tuple[int, ...], extra: dict[str, dict]) -> dict[str, dict]:
    out: dict[str, dict] = {"maml": {"method": "maml"}}
    for m in particles:
        out[f"bmaml-M{m}"] = {"method": "bmaml", "objective": "chaser", "particles": m}
        out[f"bfa-M{m}"] = {"method": "bmaml", "objective": "bfa", "particles": m}
    out.update(extra)
    return out


def seconds_per_step(run_dir: Path) -> float | None:
    """Training seconds per step from the run's last metrics.jsonl row."""
    try:
        last = json.loads((run_dir / "metrics.jsonl").read_text().strip().splitlines()[-1])
        return last["seconds"] / last["step"]
    except (OSError, ValueError, KeyError, IndexError, ZeroDivisionError):
        return None


def table(results: dict[str, dict], names: list[str], out: Path) -> str:
    lines = ["| run | test MSE | NLL | 50% cov. | 90% cov. | held-out lpd / point | s / step |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name in names:
        rep = results.get(name, {"error": "missing"})
        if "error" in rep:
            lines.append(f"| {name} | failed: {rep['error']} | | | | | |")
            continue
        m = rep["metrics"]
        cells = [f"{m[k]['mean']:.3f} ± {m[k]['ci95']:.3f}" for k in ("mse", "nll", "coverage50", "coverage90")]
        h = m.get("heldout_lpd") or {}
        lpd = f"{h['per_point']:.3f} ± {1.96 * h['per_point_se']:.3f}" if h.get("per_point_se") is not None else "-"
        sps = seconds_per_step(out / name)
        lines.append(f"| {name} | {' | '.join(cells)} | {lpd} | {'-' if sps is None else f'{sps:.4f}'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10_000)
    p.add_argument("--shots", type=int, default=10)
    p.add_argument("--particles", type=int, nargs="+", default=list(PARTICLES))
    p.add_argument("--train-tasks", type=int, default=None, help="a finite training set (the paper's 100 / 1000)")
    p.add_argument("--test-tasks", type=int, default=600)
    p.add_argument("--only", nargs="+", default=None, help="run these variants only")
    p.add_argument("--extra", type=json.loads, default={},
                   help='more variants as JSON: {"name": {RunConfig overrides}}')
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/bmaml-sinusoid"))
    args = p.parse_args(argv)
    every = max(1, args.steps // 100)
    base = {"benchmark": "sinusoid_bmaml", "shots": args.shots, "steps": args.steps, "seed": args.seed,
            "num_test_tasks": args.test_tasks, "train_tasks": args.train_tasks, "checkpoint_every": 10**9,
            "lr_schedule": {"name": "exponential", "gamma": 0.98, "every": every}}
    all_variants = variants(tuple(args.particles), args.extra)
    names = [n for n in all_variants if args.only is None or n in args.only]
    jobs = {n: {**base, **all_variants[n]} for n in names}
    results = run_many(jobs, args.out, workers=args.workers)
    md = table(results, names, args.out)
    (args.out / "bmaml_sinusoid.md").write_text(md + "\n")
    (args.out / "bmaml_sinusoid.json").write_text(json.dumps({"jobs": jobs, "results": results}, indent=1,
                                                             default=str))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
