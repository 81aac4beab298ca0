"""One threading policy for every entry point (``train``, ``demo``, ``evaluate``, ``inspect``,
``run_many``, the experiment scripts).

Small networks gain nothing from torch's intra-op threads, and on a machine where another process
holds a core the threads spin and wait for each other: 1,000 MAML sinusoid steps (1-40-40-1 MLP) took
82 s with torch's default of two threads beside one other busy process on a 2-core machine, and 4 s
with one. Conv4 on 28x28 images is large enough that a second thread can help when a core is free
(``benchmarks/RESULTS_threads.md`` has the measurements behind :data:`CONV_THREADS`).

``RunConfig.threads`` (``--threads``) overrides the default; the resolved number is written to
``config.json``.
"""

from __future__ import annotations

import os

import torch

MLP_THREADS = 1
# conv4 (Omniglot): see benchmarks/RESULTS_threads.md
CONV_THREADS = 1


def available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def default_threads(network: str) -> int:
    """The default for a task network kind: ``"mlp"`` or ``"conv4"`` (anything else: 1)."""
    if network == "conv4":
        return max(1, min(CONV_THREADS, available_cores()))
    return MLP_THREADS


def apply_threads(n: int) -> int:
    """Set torch's intra-op threads for this process; returns the number set."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"threads must be a positive integer, got {n!r}")
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
