"""The normalization table of few-shot classification runs: each run's mode, its test accuracy with each
query set scored whole and with every image scored alone, and on ``--split lake`` Lake's within-alphabet
episodes (every image alone), from the runs' own ``eval.json`` and ``config.json``.

A non-transductive mode (``support``, ``tasknorm``, ``instance``, ``none``) scores an image the same alone
or in a set (``tests/test_query_independence.py``), so its "alone" column is its whole-set figure; the
transductive ``task`` mode's "alone" column is ``eval.json``'s ``one_image_at_a_time``.

    python experiments/normalization_table.py runs/bn/versa5-* runs/bn/maml5-*
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TRANSDUCTIVE = ("task",)


def _acc(block: dict | None) -> str:
    if not block:
        return "-"
    a = block["accuracy"]
    return f"{100 * a['mean']:.2f} ± {100 * a['ci95']:.2f}"


def row(run: Path) -> str:
    cfg = json.loads((run / "config.json").read_text())
    ev = json.loads((run / "eval.json").read_text())
    mode = cfg["batch_norm"]
    whole = ev["metrics"]
    alone = ev.get("one_image_at_a_time") if mode in TRANSDUCTIVE else whole
    lake_block = ev.get("within_alphabet") or {}
    lake = lake_block.get("metrics")
    lake_whole = lake_block.get("whole_query_set", lake)
    seconds = None
    metrics = run / "metrics.jsonl"
    if metrics.exists():
        lines = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        seconds = lines[-1].get("seconds") if lines else None
    wall = "-" if seconds is None else f"{seconds / 60:.1f} min"
    return (f"| {run.name} | {cfg['method']} | {cfg['ways']}-way {cfg['shots']}-shot | {cfg['split']} | "
            f"{mode}{' (transductive)' if mode in TRANSDUCTIVE else ''} | {ev['step']} | {wall} | "
            f"{_acc(whole)} | {_acc(alone)} | {_acc(lake_whole)} | {_acc(lake)} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", type=Path, nargs="+")
    args = p.parse_args(argv)
    print("| run | method | setting | split | normalization | steps | training | accuracy %, query set whole | "
          "accuracy %, each image alone | within-alphabet accuracy %, query set whole | within-alphabet "
          "accuracy %, each image alone |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for run in args.runs:
        if (run / "eval.json").exists():
            print(row(run))
        else:
            print(f"| {run.name} | (no eval.json yet) | | | | | | | | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
