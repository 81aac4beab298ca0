"""The scoreboard: every regression method on identical task streams and identical fixed test tasks.

Trains each registered regression method (MAML, ABML, and whichever others are registered) on
``sinusoid`` and PLATIPUS's ambiguous ``sinusoid_line`` at 1, 2, 5 and 10 shots, once at an equal
iteration budget (``--budget``: the fraction of MAML's 70,000 meta-iterations) and once at equal
wall time (by default each cell's median equal-iteration training time), all with seed 0, so every
method sees the same training meta-batches and the same 600 fixed test tasks. Scores: test MSE,
NLL, held-out log predictive density, 50%/90% coverage, CRPS, PACOH's PIT calibration error (MAE and
RMSE), the regression calibration curve and its mean absolute gap, training wall time and tasks/s. The README's table comes from (2 CPU cores):

    python experiments/scoreboard.py --steps 1500 --workers 2 --out runs/scoreboard   # 38 min

Writes ``<out>/scoreboard.md`` (printed too), ``scoreboard.json``, ``ambiguous_tasks.png`` (each
method's posterior on the same 1- and 2-shot sinusoid_line tasks) and ``calibration.png``; each run
is a run directory under ``<out>/runs``, and a scoreboard started again skips the finished ones. The
same as ``pyro-meta compare`` (pyro_meta/compare.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pyro_meta.compare import add_arguments, scoreboard_from_args


def main(args: argparse.Namespace) -> int:
    board = scoreboard_from_args(args, "python experiments/scoreboard.py")
    print((Path(args.out) / "scoreboard.md").read_text())
    return 0 if all("error" not in r for r in board["rows"]) else 1


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return p.parse_args(argv)


if __name__ == "__main__":
    raise SystemExit(main(parse()))
