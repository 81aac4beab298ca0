"""Training-step time with 1 and 2 torch intra-op threads, alone and beside a CPU-bound process: the
measurements behind the threading policy (``pyro_meta/threads.py``).

    python benchmarks/bench_threads.py [--steps 5] [--out benchmarks/RESULTS_threads.md]

Each (network, threads, load) cell runs in its own process (threads are per process). "busy" starts
one single-threaded CPU-bound Python process beside it for the duration of the cell. Images are
synthetic (uniform noise): speed does not depend on their content.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

CASES = {
    "maml-mlp": "MAML, sinusoid 1-40-40-1 MLP, T=25, K=5 (5 shots, 5 queries), 1 inner step",
    "abml-mlp": "ABML, sinusoid 1-40-40-1 MLP, T=25, 5 shots, 5 queries, 5 inner steps",
    "maml-conv4": "MAML, Omniglot conv4 (strided), 5-way 1-shot, T=32, 1 query per class, 1 inner step",
    "versa-conv4": "VERSA, Omniglot conv4 (max-pool), 5-way 1-shot, T=16, 15 queries per class",
}


def synthetic_episodes(cfg, count: int, seed: int = 0) -> list:  # noqa: ANN001 - a resolved RunConfig
    """``count`` meta-batches of uniform-noise images in ``cfg``'s shape (``meta_batch`` tasks, ``ways``,
    ``shots``, ``queries`` per class), from the Omniglot benchmark's maker: speed does not depend on the
    pixels."""
    import torch
    from bench_omniglot import synthetic_batch

    g = torch.Generator().manual_seed(seed)
    return [synthetic_batch(cfg.meta_batch, cfg.ways, cfg.shots, cfg.queries, g) for _ in range(count)]


def _child(case: str, threads: int, steps: int) -> float:
    import torch

    torch.set_num_threads(threads)
    from pyro_meta import TaskBatch
    from pyro_meta.config import RunConfig
    from pyro_meta.methods import build_learner, resolve
    from pyro_meta.run import benchmark_of

    method, net = case.split("-")
    if net == "mlp":
        cfg = resolve(RunConfig(benchmark="sinusoid", method=method, num_test_tasks=2, num_val_tasks=2))
        stream = benchmark_of(cfg).train
        batches = [next(stream) for _ in range(steps + 2)]
    else:
        cfg = resolve(RunConfig(benchmark="omniglot", method=method, ways=5, shots=1))
        batches = synthetic_episodes(cfg, steps + 2)
    learner = build_learner(cfg)
    opt = torch.optim.Adam(learner.parameters(), lr=1e-3)

    def step(b: TaskBatch) -> None:
        loss = learner.loss(b)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for b in batches[:2]:
        step(b)
    t0 = time.perf_counter()
    for b in batches[2:]:
        step(b)
    return (time.perf_counter() - t0) / steps


def _cell(case: str, threads: int, steps: int, busy: bool) -> float:
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        out = subprocess.run([sys.executable, __file__, "--child", case, "--threads", str(threads),
                              "--steps", str(steps)], env=env, capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])["seconds_per_step"]
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()


def main(args: argparse.Namespace) -> None:
    if args.child:
        print(json.dumps({"seconds_per_step": _child(args.child, args.threads, args.steps)}))
        return
    rows = ["| network | alone, 1 thread | alone, 2 threads | busy, 1 thread | busy, 2 threads |",
            "| --- | --- | --- | --- | --- |"]
    for case in args.cases:
        cells = [_cell(case, th, args.steps, busy) for busy in (False, True) for th in (1, 2)]
        rows.append(f"| {CASES[case]} | " + " | ".join(f"{1e3 * c:.1f} ms" for c in cells) + " |")
        print(rows[-1], flush=True)
    head = (f"# Threads: milliseconds per meta-training step\n\n`python benchmarks/bench_threads.py --steps "
            f"{args.steps}` on {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{time.strftime('%Y-%m-%d')}. 'busy': one single-threaded CPU-bound process runs beside it.\n\n")
    text = head + "\n".join(rows) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=5, help="timed steps per cell (after 2 untimed)")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--out", default=None, help="write the markdown table here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    main(p.parse_args())
