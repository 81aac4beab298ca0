"""Scaling of meta-training over processes: one process with 1 or 2 torch threads against two
DistributedDataParallel ranks (gloo, 1 thread each) on the same global meta-batch, through
``pyro_meta.train.fit`` (the trainer a user runs; ``torchrun`` launches the ranks).

    python benchmarks/bench_ddp.py [--steps 20] [--cases maml-mlp abml-mlp maml-conv4 versa-conv4]
    python benchmarks/bench_ddp.py --quick --out /tmp/r.md     # smoke test

Each cell runs in its own process group; the time per step is read from the trainer's own log
(``history``, logged every ``--steps`` steps) between the end of the warm-up steps and the last step. Images are
synthetic (uniform noise; speed does not depend on their content); sinusoid tasks come from the
benchmark's stream. On CUDA machines ``--device cuda --ranks 1 2 4`` gives one GPU per rank (nccl).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CASES = {
    "maml-mlp": ("MAML, sinusoid 1-40-40-1 MLP, T=24, 5 shots, 5 queries, 1 inner step", 24),
    "abml-mlp": ("ABML, sinusoid 1-40-40-1 MLP, T=24, 5 shots, 5 queries, 5 inner steps", 24),
    "maml-conv4": ("MAML, Omniglot conv4 (strided), 5-way 1-shot, T=32, 1 query per class, 1 inner step", 32),
    "versa-conv4": ("VERSA, Omniglot conv4 (max-pool), 5-way 1-shot, T=16, 15 queries per class", 16),
}


def _batches(case: str, count: int):  # noqa: ANN202 - (config, list of TaskBatch)
    from bench_threads import synthetic_episodes

    from pyro_meta.config import RunConfig
    from pyro_meta.methods import resolve
    from pyro_meta.run import benchmark_of

    method, net = case.split("-")
    tasks = CASES[case][1]
    if net == "mlp":
        cfg = resolve(RunConfig(benchmark="sinusoid", method=method, meta_batch=tasks, num_test_tasks=2,
                                num_val_tasks=2))
        stream = benchmark_of(cfg).train
        return cfg, [next(stream) for _ in range(count)]
    cfg = resolve(RunConfig(benchmark="omniglot", method=method, ways=5, shots=1, meta_batch=tasks))
    return cfg, synthetic_episodes(cfg, count)  # the threads benchmark's synthetic episodes


def _child(case: str, threads: int, steps: int, warmup: int, device: str) -> None:
    import torch

    torch.set_num_threads(threads)
    from pyro_meta import distributed
    from pyro_meta.methods import build_learner
    from pyro_meta.train import fit

    ctx = distributed.init_from_env(device)
    cfg, batches = _batches(case, steps + warmup)
    torch.manual_seed(0)
    learner = build_learner(cfg)
    # the log (one all-reduce of the loss under DDP) only at the end of the warm-up and of the timed steps
    res = fit(learner, batches, steps + warmup, meta_lr=1e-3, device=device, progress=False, log_every=steps,
              check_first_step=False)
    t = {h["step"]: h["seconds"] for h in res.history}
    per_step = (t[steps + warmup] - t[warmup]) / steps
    if ctx is None or ctx.is_main:
        print(json.dumps({"seconds_per_step": per_step, "tasks": CASES[case][1]}))


def _cell(case: str, ranks: int, threads: int, steps: int, warmup: int, device: str, torchrun: bool) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    child = [str(Path(__file__).resolve()), "--child", case, "--threads", str(threads), "--steps", str(steps),
             "--warmup", str(warmup), "--device", device]
    if not torchrun:
        cmd = [sys.executable, *child]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *child]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{shlex.join(cmd)} failed:\n{out.stderr[-3000:]}")
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1])["seconds_per_step"]


def layouts_for(ranks: list[int], device: str) -> list[tuple[int, int, bool]]:
    """(ranks, threads per rank, launched by torchrun). On the CPU: one process with 1 and 2 threads,
    then each rank count > 1. On CUDA (one GPU per rank, threads do not matter): one plain process, then
    each rank count under torchrun, 1 included (DDP's cost with nccl on one GPU)."""
    if device.startswith("cuda"):
        return [(1, 1, False)] + [(r, 1, True) for r in ranks]
    return [(1, 1, False), (1, 2, False)] + [(r, 1, True) for r in ranks if r > 1]


def _layout_name(r: int, th: int, torchrun: bool, device: str) -> str:
    if device.startswith("cuda"):
        return f"{r} rank{'s' if r > 1 else ''} (torchrun, nccl)" if torchrun else "1 process, no DDP"
    return f"{r} rank{'s' if r > 1 else ''} x {th} thread{'s' if th > 1 else ''}"


def main(args: argparse.Namespace, argv: list[str]) -> int:
    if args.child:
        _child(args.child, args.threads, args.steps, args.warmup, args.device)
        return 0
    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    layouts = layouts_for(args.ranks, args.device)
    head = ["network"] + [_layout_name(r, th, tr, args.device) for r, th, tr in layouts]
    cuda = args.device.startswith("cuda")
    extra = ["torchrun cells over 1 process"] if cuda else [
        "speed-up of 2 ranks over 1 rank x 1 thread", "over 1 rank x 2 threads"]
    rows = ["| " + " | ".join(head + extra) + " |", "|" + "---|" * (len(head) + len(extra))]
    for case in args.cases:
        secs = [_cell(case, r, th, args.steps, args.warmup, args.device, tr) for r, th, tr in layouts]
        tasks = CASES[case][1]
        cells = [f"{1e3 * s:.1f} ms ({tasks / s:,.0f} tasks/s)" for s in secs]
        if cuda:
            sp = [", ".join(f"{secs[0] / s:.2f}x" for s in secs[1:]) or "-"]
        else:
            two = secs[layouts.index((2, 1, True))] if (2, 1, True) in layouts else None
            sp = [f"{secs[0] / two:.2f}x", f"{secs[1] / two:.2f}x"] if two else ["-", "-"]
        rows.append(f"| {CASES[case][0]} | " + " | ".join(cells + sp) + " |")
        print(rows[-1], flush=True)
    load1 = os.getloadavg()[0]
    import platform

    import torch
    text = "\n".join([
        "# Scaling over processes: ms per meta-training step (tasks/s)", "",
        f"Command: `{shlex.join(['python', 'benchmarks/bench_ddp.py', *argv])}`", "",
        f"{time.strftime('%Y-%m-%d')}, {platform.machine()} with {os.cpu_count()} logical CPUs, torch {torch.__version__}, "
        f"device {args.device}; load average {load0:.2f} at start, {load1:.2f} at the end. Each cell is its own "
        f"process group; {args.steps} timed steps after {args.warmup} warm-up steps, read from the trainer's log. "
        "Ranks use gloo and one thread each on the CPU, nccl and one GPU each on CUDA; the global meta-batch T "
        "is split evenly over the ranks.", "",
        *rows, "", f"Total time: {time.perf_counter() - t0:.0f} s.", ""])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="timed steps per cell")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: --steps)")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--ranks", type=int, nargs="+", default=[2],
                   help="rank counts under torchrun (default 2; on the CPU only counts > 1 are run)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="2 timed steps, MLP cases only")
    p.add_argument("--out", type=Path, default=HERE / "RESULTS_ddp.md")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.quick:
        a.steps, a.cases = 2, ["maml-mlp"]
    a.warmup = a.steps if a.warmup is None else a.warmup
    if a.warmup % a.steps:
        p.error("--warmup must be a multiple of --steps (the trainer logs every --steps steps)")
    sys.exit(main(a, sys.argv[1:]))
