"""One threading policy for every entry point (``train``, ``demo``, ``evaluate``, ``inspect``,
``run_many``, the experiment scripts).

Measured on a 2-core machine (``benchmarks/RESULTS_threads.md``, ms per meta-training step):

- **MLP** (sinusoid, T=25): two threads gain 1.2x alone (MAML 3.7 -> 3.0 ms) but lose 3-7x beside one
  CPU-bound process (3.0 -> 21.6 ms), where the threads spin waiting for the busy core. Default: one
  thread, always.
- **Conv4** (Omniglot 5-way 1-shot): two threads gain 1.6-1.8x alone (VERSA 1658 -> 928 ms) and lose
  1.7-2x beside a busy process (1611 -> 2781 ms). Default: as many threads as there are cores not
  busy when the run starts (cores minus the integer part of the 1-minute load average), at most
  :data:`CONV_MAX_THREADS`, at least one.

``RunConfig.threads`` (``--threads``) overrides the default; the resolved number is written to
``config.json``.
"""

from __future__ import annotations

import os

import torch

MLP_THREADS = 1
# conv4 (Omniglot): more threads help only when cores are free; not measured beyond two
CONV_MAX_THREADS = 2


def available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def free_cores() -> int:
    """Cores not taken by other processes now: cores minus the integer part of the 1-minute load."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average on this platform
        load = 0.0
    return max(1, available_cores() - int(load))


def default_threads(network: str) -> int:
    """The default for a task network kind: ``"mlp"`` or ``"conv4"`` (anything else: 1)."""
    if network == "conv4":
        return max(1, min(CONV_MAX_THREADS, free_cores()))
    return MLP_THREADS


def apply_threads(n: int) -> int:
    """Set torch's intra-op threads for this process; returns the number set."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"threads must be a positive integer, got {n!r}")
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
