"""Checkpoint load time with and without the SHA-256 digest check, for the largest built-in checkpoint
(ABML on Omniglot 5-way: conv4 prior means and precisions plus Adam's two moments of each).

    python benchmarks/bench_checkpoint.py [--repeats 20]

One torch thread; the file is written once and read ``--repeats`` times per path (median reported,
from the page cache after the first read).
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pyro_meta.config import RunConfig
from pyro_meta.methods import build_learner, resolve
from pyro_meta.rundir import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    cfg = resolve(RunConfig(benchmark="omniglot", method="abml", ways=5, shots=1))
    learner = build_learner(cfg)
    opt = torch.optim.Adam(learner.parameters(), lr=1e-3)
    for p in learner.parameters():  # Adam's state as after a step, without running one
        p.grad = torch.zeros_like(p)
    opt.step()
    ckpt = {"format": CHECKPOINT_FORMAT, "step": 1, "skipped": 0, "seconds": 0.0, "learner": learner.state_dict(),
            "optimizer": opt.state_dict(), "rng": {"torch": torch.get_rng_state()}, "run_config": cfg.to_dict()}
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "checkpoint.pt"
        t0 = time.perf_counter()
        save_checkpoint(ckpt, path)
        save_s = time.perf_counter() - t0
        size = path.stat().st_size

        def timed(fn) -> float:
            fn()
            out = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t)
            return statistics.median(out) * 1e3

        with_digest = timed(lambda: load_checkpoint(path, verify=True))
        without = timed(lambda: load_checkpoint(path, verify=False))
        payload = path.read_bytes().split(b"\n", 1)[1]
        bare = timed(lambda: torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True))
    print(f"| checkpoint | size | save | load, digest checked | load, no digest check | torch.load alone |\n"
          f"| --- | --- | --- | --- | --- | --- |\n"
          f"| ABML, Omniglot 5-way conv4 ({learner.guide.loc.numel():,} weights) | {size / 2**20:.1f} MiB | "
          f"{save_s * 1e3:.0f} ms | {with_digest:.1f} ms | {without:.1f} ms | {bare:.1f} ms |")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=20)
    main(p.parse_args())
