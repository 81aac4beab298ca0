"""Meta-training speed and memory of BMAML (SVGD particles per task) against MAML on BMAML's sinusoids.

One meta-training step (loss, ``zero_grad``, backward, Adam step; float32; Pyro validation off) on
``T`` tasks of 10 support + 10 query points (BMAML's protocol, network 1-40-40-40-1) is timed for

- MAML, 1 inner SGD step, second order (the baseline);
- BMAML with the chaser loss (1 follower + 1 leader SVGD step), second order, at every ``M`` of
  ``--particles``; first order at ``M = --variant-particles``;
- BMAML with the BFA objective (1 follower step) at ``M = --variant-particles``;
- the SVGD kernel alone (its share of a chaser step) at every ``M`` of ``--particles``;

interleaved within every repeat, with the protocol of ``bench_sinusoid.py`` (its ``time_paths`` and
``peak_memory``). Then the evaluation cost: ``pyro_meta.evaluate.predict`` on ``--eval-tasks`` test
tasks with ``--eval-steps`` (10) inner steps at test, for MAML and for BMAML at ``M = --variant-particles``. The report
(default ``benchmarks/RESULTS_bmaml.md``) also fits step time and memory against ``M``.

Example::

    python benchmarks/bench_bmaml.py                          # the full CPU run (~2 min)
    python benchmarks/bench_bmaml.py --quick --out /tmp/r.md  # smoke test (seconds)
    python benchmarks/bench_bmaml.py --device cuda --out benchmarks/RESULTS_bmaml_cuda.md
"""

from __future__ import annotations

import argparse
import datetime
import math
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from bench_sinusoid import (  # the sinusoid benchmark's measuring protocol
    _loadavg,
    _mb,
    _ms,
    _rate,
    _sync,
    make_step,
    peak_memory,
    rss_peak_works,
    start_benchmark,
    time_paths,
)

from pyro_meta.config import RunConfig
from pyro_meta.evaluate import predict
from pyro_meta.methods import build_learner
from pyro_meta.tasks import SinusoidBMAML, TaskBatch

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "RESULTS_bmaml.md"
BENCHMARK = "sinusoid_bmaml"
SHARED_LOAD = 1.2  # a 1-minute load average above this at start: the report says the machine was shared
EVAL_QUERIES = 100  # query points per evaluation task (the protocol's eval_queries)
FLOAT_BYTES = 4  # float32


# ------------------------------------------------------------------------------ arguments
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--particles", default="1,5,10,20", help="particle counts M of the chaser rows")
    p.add_argument("--variant-particles", type=int, default=10,
                   help="M of the first-order chaser row, the BFA row and the BMAML evaluation")
    p.add_argument("--tasks", type=int, default=10, help="tasks per meta-batch T")
    p.add_argument("--shots", type=int, default=10, help="support (and query) points per training task")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads on CPU (0: torch's default); see benchmarks/README.md")
    p.add_argument("--repeats", type=int, default=11, help="timed repeats per configuration (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration before timing")
    p.add_argument("--min-time", type=float, default=0.5,
                   help="seconds per timed repeat (steps per repeat are calibrated to reach it; 0: one step)")
    p.add_argument("--eval-tasks", type=int, default=100, help="test tasks of the evaluation timing")
    p.add_argument("--eval-steps", type=int, default=10, help="inner steps at test (SGD for MAML, SVGD for BMAML)")
    p.add_argument("--eval-repeats", type=int, default=3, help="timed repeats of the evaluation (median reported)")
    p.add_argument("--quick", action="store_true",
                   help="tiny settings for a smoke test: M in {1, 2}, T=2, 1 repeat, 5 evaluation tasks")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown file to write")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        args.particles, args.variant_particles, args.tasks = "1,2", 2, 2
        args.repeats, args.warmup, args.min_time = 1, 1, 0.0
        args.eval_tasks, args.eval_steps, args.eval_repeats = 5, 2, 1
    try:
        args.particle_list = sorted({int(v) for v in args.particles.split(",") if v.strip()})
    except ValueError:
        p.error(f"--particles: expected comma-separated integers, got {args.particles!r}")
    if not args.particle_list or min(args.particle_list) < 1:
        p.error(f"--particles: expected positive integers, got {args.particles!r}")
    positive = {"--variant-particles": args.variant_particles, "--tasks": args.tasks, "--shots": args.shots,
                "--repeats": args.repeats, "--eval-tasks": args.eval_tasks, "--eval-repeats": args.eval_repeats}
    bad = [f"{k} {v}" for k, v in positive.items() if v < 1]
    if bad:
        p.error(f"expected values >= 1, got {', '.join(bad)}")
    if args.warmup < 0 or args.min_time < 0 or args.threads < 0 or args.eval_steps < 0:
        p.error("--warmup, --min-time, --threads and --eval-steps must be >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda was asked for, but torch sees no CUDA device")
    return args


# ------------------------------------------------------------------------------ configurations
@dataclass(frozen=True)
class Config:
    """One timed learner: MAML (``particles=None``) or BMAML with an objective, M and gradient order."""

    method: str
    particles: int | None = None
    objective: str | None = None
    first_order: bool = False

    @property
    def label(self) -> str:
        if self.method == "maml":
            return "MAML, 1 SGD step"
        order = "1st order" if self.first_order else "2nd order"
        return f"BMAML {self.objective}, {order}"

    @property
    def m(self) -> int:
        """Per-task copies of the network held (MAML: its one adapted copy)."""
        return self.particles or 1

    def run_config(self, tasks: int, shots: int, seed: int, eval_steps: int) -> RunConfig:
        extra = {} if self.method == "maml" else {
            "particles": self.particles, "objective": self.objective, "leader_steps": 1}
        return RunConfig(benchmark=BENCHMARK, method=self.method, shots=shots, meta_batch=tasks, seed=seed,
                         first_order=self.first_order, inner_steps=1, inner_steps_eval=eval_steps, **extra)


def configurations(args: argparse.Namespace) -> list[Config]:
    v = args.variant_particles
    return [Config("maml"),
            *[Config("bmaml", m, "chaser") for m in args.particle_list],
            Config("bmaml", v, "chaser", first_order=True),
            Config("bmaml", v, "bfa")]


def make_batches(tasks: int, shots: int, count: int, seed: int, device: str) -> list[TaskBatch]:
    """``count`` pre-generated training meta-batches (data generation is never timed)."""
    g = torch.Generator().manual_seed(seed)
    return [SinusoidBMAML().sample(tasks, shots, shots, g).to(device, torch.float32) for _ in range(count)]


# ------------------------------------------------------------------------------ measuring
@dataclass
class Row:
    config: Config
    tasks: int
    weights: int  # D, the network's weights
    values_per_task: int  # M * (D + 2) for BMAML, D for MAML: the per-task values the step adapts
    times: list[float]
    memory: float | None
    final_loss: float
    kernel: float | None = None  # seconds of the SVGD kernel alone per step (chaser rows)

    @property
    def median(self) -> float:
        return statistics.median(self.times)


@dataclass
class EvalRow:
    label: str
    m: int
    tasks: int
    steps: int
    times: list[float]
    memory: float | None
    finite: bool

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def _seconds(fn: Callable[[int], None], device: str, repeats: int) -> list[float]:
    """Wall time of ``repeats`` calls of ``fn(i)``, after one untimed call."""
    fn(0)
    out = []
    for i in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn(i)
        _sync(device)
        out.append(time.perf_counter() - t0)
    return out


def kernel_path(guide, tasks: int) -> Callable[[int], None]:
    """The SVGD kernel's own work in one chaser step, as a timed path: ``kernel_and_repulsion`` on the
    step's particles ``[T, 1, M, P]`` twice forward (follower with a graph, leader without) and once
    backward."""
    start = guide.start(tasks).detach().movedim(0, -2)  # T 1 M P
    x0 = start + 0.01 * torch.randn_like(start)  # distinct particles: a non-zero median distance
    kernel = guide.kernel

    def once(_i: int) -> None:
        x = x0.clone().requires_grad_()
        k, repulsion = kernel.kernel_and_repulsion(x)  # T 1 M M, T 1 M P
        (k.sum() + repulsion.sum()).backward()
        with torch.no_grad():
            kernel.kernel_and_repulsion(x0)

    return once


def train_rows(configs: list[Config], args: argparse.Namespace) -> list[Row]:
    dev = args.device
    batches = make_batches(args.tasks, args.shots, 4, args.seed + 1, dev)
    learners, steps = {}, {}
    for c in configs:
        torch.manual_seed(args.seed)
        learners[c] = build_learner(c.run_config(args.tasks, args.shots, args.seed, args.eval_steps)).to(dev)
        steps[c] = make_step(learners[c], learners[c].loss, batches)
    # the kernel alone, timed in the same interleaved repeats as the steps (same machine load)
    kernels = {("kernel", c): kernel_path(learners[c].guide, args.tasks) for c in configs
               if c.objective == "chaser" and not c.first_order}
    times = time_paths({**steps, **kernels}, dev, args.warmup, args.repeats, args.min_time)
    rows = []
    for c in configs:
        model = learners[c].model
        d = model.net.num_params
        per_task = d if c.method == "maml" else c.m * model.particle_dim
        kernel = statistics.median(times[("kernel", c)]) if ("kernel", c) in times else None
        rows.append(Row(c, args.tasks, d, per_task, times[c], peak_memory(steps[c], dev),
                        float(steps[c].state["loss"]), kernel))
    return rows


def eval_rows(args: argparse.Namespace) -> list[EvalRow]:
    """``predict`` on fixed test tasks (``no_grad`` inside), MAML with 1 draw, BMAML with one per particle."""
    batch = SinusoidBMAML().fixed(args.eval_tasks, args.shots, EVAL_QUERIES, args.seed + 2)
    batch = batch.to(args.device, torch.float32)
    out = []
    for c in (Config("maml"), Config("bmaml", args.variant_particles, "chaser")):
        torch.manual_seed(args.seed)
        learner = build_learner(c.run_config(args.tasks, args.shots, args.seed, args.eval_steps)).to(args.device)
        samples = c.m

        def run(_i: int, learner=learner, samples=samples) -> None:
            with torch.no_grad():
                predict(learner, batch, num_samples=samples, seed=args.seed, keep_latents=False)

        times = _seconds(run, args.device, args.eval_repeats)
        with torch.no_grad():
            pred = predict(learner, batch, num_samples=samples, seed=args.seed, keep_latents=False)
        finite = bool(torch.isfinite(pred.mean).all())
        label = "MAML" if c.method == "maml" else "BMAML"
        out.append(EvalRow(label, c.m, args.eval_tasks, args.eval_steps, times,
                           peak_memory(run, args.device, steps=1), finite))
    return out


# ------------------------------------------------------------------------------ scaling with M
def poly_fit(xs: Sequence[float], ys: Sequence[float], degree: int) -> tuple[list[float], float]:
    """Least squares ``y = c_0 + c_1 x + ... + c_degree x^degree`` (float64): ``(coefficients, r2)``."""
    x = torch.tensor(xs, dtype=torch.float64)
    y = torch.tensor(ys, dtype=torch.float64)
    design = torch.stack([x**k for k in range(degree + 1)], -1)  # N degree+1
    coef = torch.linalg.lstsq(design, y[:, None]).solution[:, 0]  # degree+1
    ss_res = float((y - design @ coef).pow(2).sum())
    ss_tot = float((y - y.mean()).pow(2).sum())
    return coef.tolist(), 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0


def scaling_text(rows: list[Row], device: str) -> list[str]:
    """A paragraph on how the chaser's (2nd order) step time and memory grow with M."""
    chaser = sorted((r for r in rows if r.config.objective == "chaser" and not r.config.first_order),
                    key=lambda r: r.config.m)
    if len(chaser) < 2:
        return ["Fewer than two particle counts were timed: no fit against M."]
    ms = [float(r.config.m) for r in chaser]
    t = [r.median * 1e3 for r in chaser]
    (a, b), r2 = poly_fit(ms, t, 1)
    worst = max(abs(y - a - b * x) / y for x, y in zip(ms, t))
    marginal = [(t[i + 1] - t[i]) / (ms[i + 1] - ms[i]) for i in range(len(ms) - 1)]
    spans = [f"{ms[i]:.0f}->{ms[i + 1]:.0f}: {marginal[i]:.2f}" for i in range(len(marginal))]
    exponent = math.log(t[-1] / t[-2]) / math.log(ms[-1] / ms[-2])
    quadratic = ""
    if len(ms) >= 3:
        (qa, qb, qc), qr2 = poly_fit(ms, t, 2)
        quadratic = (f" Quadratic fit: ms/step = {qa:.2f} {qb:+.3f} M {qc:+.4f} M^2 (R^2 = {qr2:.3f}); at "
                     f"M={ms[-1]:.0f} its M^2 term alone is {qc * ms[-1] ** 2:.0f} ms (measured: {t[-1]:.0f} ms).")
    if len(marginal) < 2:
        verdict = "two particle counts cannot tell linear from superlinear growth"
    elif marginal[-1] > 1.5 * max(marginal[0], 1e-9):
        verdict = (f"**superlinear**: each added particle costs more as M grows (the last span's marginal cost "
                   f"is {marginal[-1] / max(marginal[0], 1e-9):.1f}x the first's)"
                   + (", close to quadratic at the largest M" if exponent >= 1.7 else ""))
    elif marginal[-1] < marginal[0] / 1.5:
        verdict = "sublinear: fixed per-step costs still dominate at small M"
    else:
        verdict = "close to **linear** in M"
    lines = [
        f"**Step time against M** (chaser, 2nd order, T={chaser[0].tasks}): least squares "
        f"ms/step = {a:.2f} {b:+.2f} M (R^2 = {r2:.3f}, largest residual {worst:.0%} of the measured "
        f"time).{quadratic} Marginal ms per added particle between consecutive M: {'; '.join(spans)}. "
        f"Local exponent between the two largest M (ms ~ M^p): p = {exponent:.2f}. Verdict: {verdict}.",
    ]
    mem = [r.memory for r in chaser]
    if all(v is not None for v in mem):
        (ma, mb), mr2 = poly_fit(ms, mem, 1)
        per_value = [v * 2**20 / (r.values_per_task * r.tasks * FLOAT_BYTES) for v, r in zip(mem, chaser)]
        lines += [
            "",
            f"**Memory against M**: peak growth = {ma:.1f} {mb:+.2f} M MiB (R^2 = {mr2:.3f}); as a multiple of "
            f"the batch's particle values T x M x (D+2) in float32: "
            + ", ".join(f"M={m:.0f}: {v:.0f}x" for m, v in zip(ms, per_value))
            + (" (a multiple that grows with M means memory grows faster than M x D)" if len(ms) > 1 else "")
            + ("" if device == "cuda" else "; small CPU values are coarse (allocator reuse, page granularity)")
            + ".",
        ]
    kernel = [r for r in chaser if r.kernel is not None]
    if kernel:
        lines += [
            "",
            "The SVGD kernel alone (`ScalarRBFKernel.kernel_and_repulsion` on the step's particles "
            "`[T, 1, M, D+2]`, two forward passes and one backward, as in a chaser step: follower and leader), "
            "against the whole step:",
            "",
            "| M | step ms | kernel ms | kernel / step |",
            "| ---: | ---: | ---: | ---: |",
            *[f"| {r.config.m} | {_ms(r.median)} | {_ms(r.kernel)} | {r.kernel / r.median:.0%} |" for r in kernel],
        ]
    lines += [
        "",
        "Where the M-dependence comes from: every SVGD step evaluates the M particles' scores with one "
        "`autograd.grad` over a `[M, T, N]` batch of network passes (O(M D) per task), and the kernel: "
        "`ScalarRBFKernel.kernel_and_repulsion` forms the pairwise squared distances from the centred "
        "particles' Gram matrix (`_centred_sq_dists`: a `[T, 1, M, M]` result from an O(M^2 D) matmul, O(M D) "
        "memory) and `K @ scores` (O(M^2 D) time). At these M the network passes dominate, so the step is "
        "close to linear in M. (Before the Gram form, explicit `[T, 1, M, M, D+2]` differences on the graph "
        "made the step grow like M^2.6 between M = 10 and 20.)",
    ]
    return lines


# ------------------------------------------------------------------------------ report
def _spread(times: list[float]) -> str:
    return f"{min(times) * 1e3:.2f}-{max(times) * 1e3:.2f}"


def _int(n: int) -> str:
    return f"{n:,}"


def render(args: argparse.Namespace, argv: Sequence[str], info: dict[str, str], rows: list[Row],
           evals: list[EvalRow], load: tuple[str, str], seconds: float, rss_ok: bool) -> str:
    cmd = "python benchmarks/bench_bmaml.py" + ("" if not argv else " " + shlex.join(argv))
    d = rows[0].weights
    try:
        shared = float(load[0]) > SHARED_LOAD
    except ValueError:
        shared = False
    mem_note = ("peak RSS growth (VmHWM after reset minus RSS before)" if args.device == "cpu"
                else "torch.cuda.max_memory_allocated growth")
    if args.device == "cpu" and not rss_ok:
        mem_note += "; n/a: VmHWM cannot be reset on this machine"
    lines = [
        "# BMAML vs MAML: meta-training speed and memory against the number of particles M",
        "",
        f"- Command: `{cmd}`",
        f"- Date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        *[f"- {k}: {v}" for k, v in info.items()],
        f"- Load average (1 min) before / after: {load[0]} / {load[1]}; total run time {seconds:.0f} s",
        *([f"- **Shared machine**: the 1-minute load average was {load[0]} (> {SHARED_LOAD}) at start: other "
           "processes were running, so absolute times are inflated and noisier than on a quiet machine "
           "(the configurations are interleaved within every repeat, so their ratios are fairer than their "
           "absolute values)."] if shared else []),
        f"- Protocol: `{BENCHMARK}` (Yoon et al.'s sinusoids), T={args.tasks} tasks of {args.shots} support + "
        f"{args.shots} query points, MLP 1-40-40-40-1 ReLU (D={_int(d)} weights; a BMAML particle has D+2 = "
        f"{_int(d + 2)} entries: the weights, log weight precision and log noise precision), float32, Adam lr "
        "1e-3, Pyro validation off. MAML: 1 inner SGD step of 0.01, second order. BMAML: the method's "
        "defaults (SVGD step 1e-3, scalar RBF kernel with the median bandwidth), 1 follower step; chaser: "
        "+ 1 leader step on support + query. One step = loss, zero_grad, backward, Adam step. Batches "
        f"pre-generated (4, cycled). Per configuration: {args.warmup} warm-up step(s), then the median of "
        f"{args.repeats} repeats of >= {args.min_time} s each; configurations interleaved within each repeat.",
        "",
        "## Meta-training step",
        "",
        f"Memory: {mem_note}, MiB, over 2 steps after timing. Values per task: the per-task numbers the "
        "step adapts and differentiates through (BMAML: M x (D+2) particle entries; MAML: its one adapted "
        "copy of the D weights); x T for the meta-batch. mem / values: the peak growth as a multiple of the "
        "meta-batch's values in float32.",
        "",
        "| configuration | M | ms/step (median) | spread (min-max over repeats) | tasks/s | task-particles/s "
        "| vs MAML | values per task | values per batch | peak mem MiB | mem / values |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    base = next(r.median for r in rows if r.config.method == "maml")
    for r in rows:
        c = r.config
        batch_values = r.values_per_task * r.tasks
        ratio = "-" if r.memory is None else f"{r.memory * 2**20 / (batch_values * FLOAT_BYTES):.0f}x"
        lines.append(
            f"| {c.label} | {c.particles if c.particles else '-'} | {_ms(r.median)} | {_spread(r.times)} | "
            f"{_rate(r.median, r.tasks)} | {_rate(r.median, r.tasks * c.m) if c.particles else '-'} | "
            f"{r.median / base:.1f}x | {_int(r.values_per_task)} | {_int(batch_values)} | {_mb(r.memory)} | "
            f"{ratio} |")
    bad = [r.config.label + f" M={r.config.particles}" for r in rows if not math.isfinite(r.final_loss)]
    if bad:
        lines += ["", f"Warning: non-finite loss at the end of timing: {', '.join(bad)}."]
    lines += ["", "## Scaling with M", "", *scaling_text(rows, args.device), ""]
    lines += [
        "## Evaluation",
        "",
        f"`pyro_meta.evaluate.predict(learner, batch, num_samples=S, keep_latents=False)` (no_grad) on "
        f"{evals[0].tasks} fixed test tasks of {args.shots} support + {EVAL_QUERIES} query points, "
        f"{evals[0].steps} inner steps at test (MAML: SGD, S = 1 draw; BMAML: SVGD, S = M, one draw per "
        f"particle). One warm-up call, then the median of {args.eval_repeats} calls. Memory: peak growth "
        "over one call, MiB.",
        "",
        "| method | M | inner steps | tasks | s/call (median) | spread (min-max) | ms/task | tasks/s "
        "| peak mem MiB | finite |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for e in evals:
        lines.append(
            f"| {e.label} | {e.m if e.label != 'MAML' else '-'} | {e.steps} | {e.tasks} | {e.median:.3f} | "
            f"{min(e.times):.3f}-{max(e.times):.3f} | {e.median / e.tasks * 1e3:.2f} | {_rate(e.median, e.tasks)} "
            f"| {_mb(e.memory)} | {'yes' if e.finite else 'NO'} |")
    lines += ["", "Columns: see `benchmarks/README.md` (section on `bench_bmaml.py`).", ""]
    return "\n".join(lines)


def main(args: argparse.Namespace, argv: Sequence[str] = ()) -> int:
    t_start, load0, info = start_benchmark(args)
    print("machine:", "; ".join(f"{k} {v}" for k, v in info.items()), f"; load {load0}", flush=True)
    rss_ok = args.device == "cuda" or rss_peak_works()

    rows = train_rows(configurations(args), args)
    for r in rows:
        print(f"{r.config.label:28s} M={r.config.m:3d}: {_ms(r.median)} ms/step ({_spread(r.times)}), "
              f"mem {_mb(r.memory)} MiB", flush=True)
    evals = eval_rows(args)
    for e in evals:
        print(f"evaluation {e.label} M={e.m}: {e.median:.3f} s for {e.tasks} tasks, mem {_mb(e.memory)} MiB",
              flush=True)

    text = render(args, argv, info, rows, evals, (load0, _loadavg()), time.perf_counter() - t_start, rss_ok)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    finite = all(math.isfinite(r.final_loss) for r in rows) and all(e.finite for e in evals)
    if not finite:
        print("NON-FINITE LOSS OR PREDICTION", file=sys.stderr)
    return 0 if finite else 1


if __name__ == "__main__":
    argv = sys.argv[1:]
    sys.exit(main(parse_args(argv), argv))
