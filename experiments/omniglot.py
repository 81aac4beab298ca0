"""Reproduce MAML's and VERSA's Omniglot protocols (few-shot classification, Vinyals split).

Protocols (../shared/ANCHORS.md; every choice is also written to each run's config.json):

- MAML (Finn et al., 2017): conv4 with strided convolutions, 64 filters, batch norm with per-task batch
  statistics; 5-way: meta-batch 32, 1 inner step of 0.4; 20-way: meta-batch 16, 5 inner steps of 0.1;
  second order; K query images per class in training; Adam 1e-3; 60,000 iterations.
- VERSA (Gordon et al., 2019): conv4 with max-pooling as a shared feature extractor; per-class
  amortization network (3 ELU layers of 256) on mean-pooled class features; local reparameterization;
  L = 10; ML-PIP loss; Adam 1e-4; 16 tasks per batch; 15 queries per class in training;
  80,000 iterations (20-way 1-shot 100,000; 20-way 5-shot 60,000).
- Test: 600 fixed, seeded episodes from the test classes, query = shot images per class.

``--budget`` scales every protocol's iteration count; ``--minutes`` caps each run's training time
instead (each run times its first steps, then sets its iteration count to fit).

    python experiments/omniglot.py --budget 0.01 --settings 5w1s --methods versa --out runs/omniglot

Writes ``<out>/results.md``: test accuracy (95% CI), NLL, Brier, ECE and MCE beside the papers' numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

SETTINGS = {"5w1s": (5, 1), "5w5s": (5, 5), "20w1s": (20, 1), "20w5s": (20, 5)}
# ../shared/ANCHORS.md; "[R]" = quoted from secondary sources, still to be checked against the paper
PAPER_ACCURACY = {
    ("maml", 5, 1): "98.7 ± 0.4", ("maml", 5, 5): "99.9 ± 0.1",
    ("maml", 20, 1): "95.8 ± 0.3", ("maml", 20, 5): "98.9 ± 0.2",
    ("versa", 5, 1): "99.70 ± 0.20 [R]", ("versa", 5, 5): "99.75 ± 0.13 [R]",
    ("versa", 20, 1): "97.66 ± 0.29 [R]", ("versa", 20, 5): "98.77 ± 0.18",
}
PROBE_STEPS = 30


def job_config(method: str, ways: int, shots: int, args: argparse.Namespace) -> dict[str, Any]:
    from pyro_meta.config import RunConfig
    from pyro_meta.methods import resolve

    cfg = {"benchmark": "omniglot", "method": method, "ways": ways, "shots": shots, "seed": args.seed,
           "device": args.device, "data_root": args.data_root, **json.loads(args.set),
           **json.loads(getattr(args, method))}
    paper_steps = resolve(RunConfig.from_dict(cfg)).steps
    steps = max(1, round(paper_steps * args.budget))
    cfg.update(steps=steps, log_every=max(1, min(100, steps // 20)), checkpoint_every=max(1, min(2000, steps // 5)))
    cfg["paper_steps"] = paper_steps
    return cfg


def run_job(cfg: dict[str, Any], out: str, minutes: float | None, threads: int) -> dict[str, Any]:
    """Train one configuration into ``out`` (resuming if interrupted), return its eval.json + timing."""
    import torch

    from pyro_meta.config import RunConfig
    from pyro_meta.run import EVAL, train_run

    torch.set_num_threads(threads)
    cfg = dict(cfg)
    cfg.setdefault("threads", threads)  # recorded in config.json and applied by train_run
    paper_steps = cfg.pop("paper_steps")
    out_p = Path(out)
    t0 = time.perf_counter()
    try:
        if (out_p / EVAL).exists():
            rep = json.loads((out_p / EVAL).read_text())
        else:
            steps = cfg["steps"]
            if (out_p / "checkpoint.pt").exists():
                _, res = train_run(RunConfig(), out_p, resume=True, progress=False, overrides={"steps": steps})
            elif minutes is not None:
                # time the first steps, then fit the run into the time it has
                probe = min(PROBE_STEPS, steps)
                _, res = train_run(RunConfig.from_dict(cfg), out_p, progress=False, stop_after=probe,
                                   finalize_run=probe >= steps)
                per_step = res.seconds / max(res.step, 1)
                steps = max(probe, min(steps, int(minutes * 60 / per_step)))
                _, res = train_run(RunConfig(), out_p, resume=True, progress=False,
                                   overrides={"steps": steps, "log_every": max(1, min(100, steps // 20)),
                                              "checkpoint_every": max(1, min(2000, steps // 5))})
            else:
                _, res = train_run(RunConfig.from_dict(cfg), out_p, progress=False)
            rep = json.loads((out_p / EVAL).read_text())
            rep["train_seconds"] = res.seconds
    except Exception as e:  # noqa: BLE001 - one failed configuration must not stop the others
        return {"error": f"{type(e).__name__}: {e}"}
    rep["paper_steps"] = paper_steps
    rep["wall_seconds"] = time.perf_counter() - t0
    return rep


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = ["| run | iterations (paper's) | train time | test accuracy (%) | NLL | Brier | ECE | MCE | paper accuracy |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in sorted(results.items()):
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} | | | | | | | |")
            continue
        m = r["metrics"]
        acc = f"{100 * m['accuracy']['mean']:.2f} ± {100 * m['accuracy']['ci95']:.2f}"
        secs = r.get("train_seconds")
        lines.append(
            f"| {name} | {r['step']} ({r['paper_steps']}) | {'' if secs is None else f'{secs / 60:.1f} min'} | {acc} | "
            f"{m['nll']['mean']:.3f} ± {m['nll']['ci95']:.3f} | {m['brier']['mean']:.4f} | "
            f"{m['ece']['value']:.4f} | {m['mce']['value']:.4f} | "
            f"{PAPER_ACCURACY.get((r['method'], r['ways'], r['shots']), '')} |")
    return "\n".join(lines)


def _test_tasks(results: dict[str, dict[str, Any]]) -> str:
    counts = sorted({r["num_test_tasks"] for r in results.values() if "num_test_tasks" in r})
    return "/".join(map(str, counts)) or "no"


def main(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    jobs = {f"{m}-{s}": job_config(m, *SETTINGS[s], args) for m in args.methods for s in args.settings}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    with ProcessPoolExecutor(max_workers=max(1, args.workers)) as pool:
        futs = {pool.submit(run_job, cfg, str(out / name), args.minutes, args.threads): name
                for name, cfg in jobs.items()}
        for fut in as_completed(futs):
            name = futs[fut]
            results[name] = fut.result()
            print(f"[{len(results)}/{len(jobs)}] {name}: {results[name].get('error', 'done')}",
                  file=sys.stderr, flush=True)
    cap = f", at most {args.minutes:g} min of training each" if args.minutes is not None else ""
    text = "\n".join([
        f"# Omniglot few-shot classification, budget {args.budget}{cap}", "",
        f"Command: `python experiments/omniglot.py {' '.join(args.argv)}`", "",
        f"Device: {args.device}; wall time {time.perf_counter() - t0:.0f} s with {args.workers} parallel run(s).",
        f"{_test_tasks(results)} fixed test episodes (Vinyals test classes), query = shot images per class; "
        "mean ± 95% CI over episodes; ECE/MCE with 15 bins over all test predictions.", "",
        table(results), ""]) + "\n"
    (out / "results.md").write_text(text)
    print(text)
    return 0 if all("error" not in r for r in results.values()) else 1


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=1.0, help="fraction of each protocol's iterations")
    p.add_argument("--minutes", type=float, default=None, help="cap each run's training time (minutes)")
    p.add_argument("--methods", nargs="+", default=["maml", "versa"], choices=["maml", "versa", "abml"])
    p.add_argument("--settings", nargs="+", default=["5w1s", "20w1s"], choices=sorted(SETTINGS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-root", default=None, help="Omniglot folder (default: $PYRO_META_DATA, then the cache)")
    p.add_argument("--workers", type=int, default=1, help="runs in parallel")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--set", default="{}", help="JSON settings for every run (e.g. num_test_tasks)")
    p.add_argument("--maml", default="{}", help="JSON settings for the MAML runs only")
    p.add_argument("--versa", default="{}", help="JSON settings for the VERSA runs only")
    p.add_argument("--abml", default="{}", help="JSON settings for the ABML runs only")
    p.add_argument("--out", default="runs/omniglot")
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    return args


if __name__ == "__main__":
    raise SystemExit(main(parse()))
