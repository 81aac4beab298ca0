"""Run a grid of configurations in parallel worker processes (one torch thread each) and tabulate
their test metrics.

    python experiments/sweep.py --base '{"method": "abml", "steps": 5000}' \\
        --grid '{"inner_lr": [0.01, 0.03], "kl_weight_outer": [1.0, 0.1]}' --workers 8 --out runs/sweep

Every run is an ordinary run directory (``pyro-meta evaluate/inspect`` work on it); started again,
the sweep skips finished runs and resumes interrupted ones from their checkpoints.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

from pyro_meta.run import markdown_table, run_many


def main(args: argparse.Namespace) -> int:
    base = json.loads(args.base)
    grid = json.loads(args.grid)
    keys = sorted(grid)
    jobs = {}
    for vals in itertools.product(*(grid[k] for k in keys)):
        combo = dict(zip(keys, vals))
        jobs["_".join(f"{k}={v}" for k, v in combo.items()) or "base"] = {**base, **combo}
    results = run_many(jobs, args.out, args.workers)
    text = f"base: `{json.dumps(base)}`\n\n" + markdown_table(results)
    (Path(args.out) / "sweep.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="{}", help="JSON object of RunConfig settings shared by all runs")
    p.add_argument("--grid", required=True, help="JSON object: setting -> list of values")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default="runs/sweep")
    raise SystemExit(main(p.parse_args()))
