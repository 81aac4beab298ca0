"""Meta-training speed and memory on MAML's sinusoids: the library (Pyro) vs plain PyTorch.

For each method (MAML, ABML), meta-batch size T and inner steps K, one meta-training step
(loss, backward, Adam step) is timed along three paths:

- ``lib``: ``MetaLearner.loss`` (the Pyro model + guide under ``Trace_ELBO``), validation off;
- ``ref``: the same estimator in plain PyTorch (``benchmarks/reference.py``);
- ``loop``: the library loss one task at a time in a Python loop (only for some T).

A self-check first verifies, in float64, that the reference computes the library's loss and
gradients. Results go to a markdown file (default ``benchmarks/RESULTS.md``).

Example::

    python benchmarks/bench_sinusoid.py                 # the full CPU run (a few minutes)
    python benchmarks/bench_sinusoid.py --quick --out /tmp/r.md
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import datetime
import gc
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyro
import torch
from reference import (
    MAML_CONSTANT,
    RefMLP,
    abml_outer,
    loop_loss,
    maml_outer,
    reference_for,
    split_tasks,
)

import pyro_meta
from pyro_meta.config import RunConfig
from pyro_meta.methods import build_learner
from pyro_meta.tasks import Sinusoid

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "RESULTS.md"
METHODS = ("maml", "abml")
# the project's targets: Pyro's step over the plain-PyTorch reference (issue 12's aims), keyed by (T, K)
KEY_TARGETS = {"ratio": {(25, 5): 1.10, (1, 1): 1.3}, "loop_speedup": 5.0}

Step = Callable[[int], None]


# ------------------------------------------------------------------------------ arguments
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--methods", default="maml,abml", help="comma-separated subset of maml,abml")
    p.add_argument("--tasks", default="1,10,25,100", help="meta-batch sizes T")
    p.add_argument("--inner-steps", default="1,5", help="inner steps K")
    p.add_argument("--loop-tasks", default="10,25", help="T at which the per-task loop is timed")
    p.add_argument("--shots", type=int, default=5, help="support (and query) points per task")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads on CPU (0: torch's default). 1 by default: on a shared "
                        "2-core machine, 2 OpenMP threads stall whenever a neighbour takes a core")
    p.add_argument("--repeats", type=int, default=11, help="timed repeats per path (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per path before timing")
    p.add_argument("--min-time", type=float, default=0.25,
                   help="seconds per timed repeat (steps per repeat are calibrated to reach it)")
    p.add_argument("--breakdown", default="abml:25:5,maml:25:5,abml:1:1,maml:1:1",
                   help="method:T:K configs where the library's overhead is split (empty: none)")
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke test")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown file to write")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        args.tasks, args.inner_steps, args.loop_tasks = "2,4", "1", "4"
        args.repeats, args.warmup, args.min_time = 2, 1, 0.01
        args.breakdown = "abml:4:1"
    args.method_list = _names(args.methods, METHODS, "--methods")
    args.task_list = _ints(args.tasks, "--tasks")
    args.k_list = _ints(args.inner_steps, "--inner-steps", allow_zero=True)
    args.loop_list = _ints(args.loop_tasks, "--loop-tasks") if args.loop_tasks else []
    args.breakdown_list = [_breakdown(b) for b in args.breakdown.split(",") if b.strip()]
    if args.repeats < 1 or args.warmup < 0 or args.min_time < 0 or args.shots < 1 or args.threads < 0:
        p.error("--repeats and --shots must be >= 1; --warmup, --min-time and --threads >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda was asked for, but torch sees no CUDA device")
    return args


def _ints(text: str, flag: str, allow_zero: bool = False) -> list[int]:
    try:
        out = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if not out or min(out) < (0 if allow_zero else 1):
        raise SystemExit(f"{flag}: expected {'non-negative' if allow_zero else 'positive'} integers, "
                         f"got {text!r}")
    return out


def _names(text: str, known: Sequence[str], flag: str) -> list[str]:
    out = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in out if v not in known]
    if not out or bad:
        raise SystemExit(f"{flag}: expected a subset of {','.join(known)}, got {text!r}")
    return out


def _breakdown(text: str) -> tuple[str, int, int]:
    parts = text.strip().split(":")
    if len(parts) != 3 or parts[0] not in METHODS:
        raise SystemExit(f"--breakdown: expected method:T:K items, got {text!r}")
    return parts[0], _ints(parts[1], "--breakdown T")[0], _ints(parts[2], "--breakdown K", True)[0]


# ------------------------------------------------------------------------------ building
# ABML is timed with a learned observation noise (one more meta-parameter and its gradient path than
# the fixed-noise default), the heavier of its two settings, and with the paper's objective and
# hyperprior weighting, which the plain-PyTorch reference implements (the library's default objective,
# "predictive", draws 10 samples per step instead of 1).
ABML_BENCH = {"learn_noise": True, "noise_std": 0.5, "objective": "paper", "hyperprior_weight": 1.0}


def make_learner(method: str, tasks: int, inner_steps: int, shots: int, seed: int = 0):
    extra = ABML_BENCH if method == "abml" else {}
    cfg = RunConfig(method=method, meta_batch=tasks, inner_steps=inner_steps, shots=shots, seed=seed, **extra)
    return build_learner(cfg)


def make_batches(tasks: int, shots: int, count: int, seed: int, device, dtype=torch.float32) -> list:
    """``count`` pre-generated meta-batches (data generation is never timed)."""
    g = torch.Generator().manual_seed(seed)
    return [Sinusoid().sample(tasks, shots, shots, g).to(device, dtype) for _ in range(count)]


def hybrid_loss(learner, ref_net: RefMLP) -> Callable:
    """The library's inner loop (``guide.adapt``, plain tensors, no Pyro trace) followed by the
    reference's outer loss: it separates the inner-loop formulation from Pyro's outer machinery."""
    guide, model = learner.guide, learner.model

    def loss(batch):
        if learner.name == "maml":
            phi = guide.adapt(batch).squeeze(1)  # T D
            return maml_outer(ref_net, phi, batch.x_query, batch.y_query) + MAML_CONSTANT
        mu, s = guide.adapt(batch)  # T 1 D each
        return abml_outer(ref_net, mu.squeeze(1), s.squeeze(1), guide.loc, guide.precision,
                          model.likelihood.noise_std, batch.x_support, batch.y_support,
                          batch.x_query, batch.y_query, model.kl_weight)

    return loss


def make_step(module: torch.nn.Module, loss_fn: Callable, batches: list, lr: float = 1e-3) -> Step:
    """One meta-training step on ``batches[i % len]``: loss, backward, Adam step."""
    opt = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=lr)
    state = {"loss": float("nan")}

    def step(i: int) -> None:
        loss = loss_fn(batches[i % len(batches)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        state["loss"] = loss.detach()

    step.state = state  # type: ignore[attr-defined]
    return step


# ------------------------------------------------------------------------------ measuring
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_paths(paths: dict[str, Step], device: str, warmup: int, repeats: int,
               min_time: float) -> dict[str, list[float]]:
    """Seconds per step of each path, one value per repeat. The paths are interleaved within each
    repeat, so a change of machine load affects all of them alike; each repeat runs as many steps
    as reach ``min_time`` (calibrated after the warm-up)."""
    counts, it = {}, dict.fromkeys(paths, 0)
    for name, step in paths.items():
        for _ in range(warmup):
            step(it[name])
            it[name] += 1
        one = []
        for _ in range(2):
            _sync(device)
            t0 = time.perf_counter()
            step(it[name])
            _sync(device)
            one.append(time.perf_counter() - t0)
            it[name] += 1
        counts[name] = max(1, math.ceil(min_time / max(min(one), 1e-9)))
    out: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(repeats):
        for name, step in paths.items():
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(counts[name]):
                step(it[name])
                it[name] += 1
            _sync(device)
            out[name].append((time.perf_counter() - t0) / counts[name])
    return out


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back, so RSS is current
    except (OSError, AttributeError):
        pass


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (peak RSS) to the current RSS
        return True
    except OSError:
        return False


def rss_peak_works() -> bool:
    """Whether VmHWM can be reset here (Linux >= 4.0, /proc writable)."""
    try:
        _trim()
        if not _reset_hwm():
            return False
        base = _status_kb("VmRSS")
        x = torch.ones(64 * 2**20 // 8, dtype=torch.float64)  # 64 MiB
        x.add_(1)
        del x
        _trim()
        grew = _status_kb("VmHWM") - base > 32 * 1024
        _reset_hwm()
        return grew and _status_kb("VmHWM") - _status_kb("VmRSS") < 16 * 1024
    except (OSError, KeyError, ValueError):
        return False


def peak_memory(step: Step, device: str, steps: int = 2) -> float | None:
    """Peak memory growth (MiB) over ``steps`` meta-training steps from the current state.

    CUDA: ``max_memory_allocated`` minus the allocation before. CPU: the peak RSS (VmHWM, reset
    through ``/proc/self/clear_refs``) minus the RSS before, after ``malloc_trim``; ``None`` where
    VmHWM cannot be reset.
    """
    if device == "cuda":
        torch.cuda.synchronize()
        gc.collect()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for i in range(steps):
            step(i)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    _trim()
    if not _reset_hwm():
        return None
    base = _status_kb("VmRSS")
    for i in range(steps):
        step(i)
    return (_status_kb("VmHWM") - base) / 1024


# ------------------------------------------------------------------------------ self-check
@dataclass
class Check:
    name: str
    quantity: str
    error: float
    tol: float

    @property
    def ok(self) -> bool:
        return math.isfinite(self.error) and self.error <= self.tol


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b| / max |b|`` (a relative error that is stable where entries are near zero)."""
    a, b = a.detach().double(), b.detach().double()
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


def _loss_and_grads(loss_fn: Callable, batch, params: dict[str, torch.Tensor], seed: int):
    for p in params.values():
        p.grad = None
    torch.manual_seed(seed)
    loss = loss_fn(batch)
    loss.backward()
    return loss.detach(), {k: p.grad.detach().clone() for k, p in params.items()}


# library parameter name -> reference parameter name
_PAIRS = {"maml": {"guide.theta": "theta"},
          "abml": {"guide.loc": "loc", "guide.log_precision": "log_precision",
                   "model.likelihood.raw_noise": "raw_noise"}}


def _compare(checks: list, name: str, lib: tuple, other: tuple, pairs: dict[str, str],
             offset: float, tol: float) -> None:
    (l1, g1), (l2, g2) = lib, other
    checks.append(Check(name, "loss" + (" - log(pi)/2" if offset else ""), _rel(l1 - offset, l2), tol))
    for k1, k2 in pairs.items():
        checks.append(Check(name, f"d loss / d {k1}", _rel(g1[k1], g2[k2]), tol))


def self_check(tasks: int = 4, inner_steps: int = 2, shots: int = 5, seed: int = 11) -> list[Check]:
    """Reference vs library, float64, same parameters, same data, same ``torch.manual_seed``; with Pyro's
    validation off, as in training and in the timed steps (the library's ``LeanTrace_ELBO`` hands a step
    with validation on to ``Trace_ELBO``; ``tests/test_lean_elbo.py`` checks that both agree)."""
    checks: list[Check] = []
    batch = make_batches(tasks, shots, 1, seed, "cpu", torch.float64)[0]
    with pyro.validation_enabled(False):
        for method in METHODS:
            for samples in ((1, 2) if method == "abml" else (1,)):
                learner = make_learner(method, tasks, inner_steps, shots, seed).double()
                if method == "abml":
                    learner.guide.inner_samples = samples
                ref = reference_for(learner)
                lp = dict(learner.named_parameters())
                rp = dict(ref.named_parameters())
                pairs = _PAIRS[method]
                offset = MAML_CONSTANT if method == "maml" else 0.0
                lib = _loss_and_grads(learner.loss, batch, lp, seed)
                label = f"{method} T={tasks} K={inner_steps}" + (f" M={samples}" if method == "abml" else "")
                _compare(checks, f"reference vs library, {label}", lib,
                         _loss_and_grads(ref.loss, batch, rp, seed), pairs, offset, 1e-5)
                if samples == 1:
                    hyb = hybrid_loss(learner, ref.net)
                    _compare(checks, f"library inner + reference outer vs library, {label}", lib,
                             _loss_and_grads(hyb, batch, lp, seed), {k: k for k in pairs}, 0.0, 1e-5)
                if method == "maml":  # deterministic, so the loop must agree exactly
                    def per_task(b, learner=learner):
                        return loop_loss(learner, split_tasks(b))

                    _compare(checks, f"per-task loop vs vectorized library, {label}", lib,
                             _loss_and_grads(per_task, batch, lp, seed), {k: k for k in pairs}, 0.0, 1e-5)
    return checks


# ------------------------------------------------------------------------------ the benchmark
@dataclass
class Row:
    method: str
    tasks: int
    inner_steps: int
    times: dict[str, list[float]]
    memory: dict[str, float | None]
    final_loss: dict[str, float] = field(default_factory=dict)

    def median(self, path: str) -> float | None:
        return statistics.median(self.times[path]) if path in self.times else None

    def paired(self, num: str, den: str) -> list[float]:
        """Per-repeat ratios of two interleaved paths."""
        return [a / b for a, b in zip(self.times[num], self.times[den])]


def run_config(method: str, tasks: int, inner_steps: int, args, with_loop: bool,
               with_hybrid: bool = False) -> Row:
    torch.manual_seed(args.seed)
    dev = args.device
    batches = make_batches(tasks, args.shots, 8, args.seed + 1, dev)
    learner = make_learner(method, tasks, inner_steps, args.shots, args.seed).to(dev)
    ref = reference_for(learner)
    paths = {"lib": make_step(learner, learner.loss, batches),
             "ref": make_step(ref, ref.loss, batches)}
    if with_hybrid:
        hyb_learner = copy.deepcopy(learner)
        paths["hybrid"] = make_step(hyb_learner, hybrid_loss(hyb_learner, ref.net), batches)
    if with_loop:
        loop_learner = copy.deepcopy(learner)
        split = [split_tasks(b) for b in batches]
        paths["loop"] = make_step(loop_learner, lambda tl: loop_loss(loop_learner, tl), split)
    times = time_paths(paths, dev, args.warmup, args.repeats, args.min_time)
    memory = {name: peak_memory(step, dev) for name, step in paths.items()}
    final = {name: float(step.state["loss"]) for name, step in paths.items()}
    return Row(method, tasks, inner_steps, times, memory, final)


def aten_calls_per_step(step: Step, steps: int = 3) -> float:
    """aten operator calls (nested calls included) per meta-training step, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(steps):
            step(i)
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::")) / steps


# ------------------------------------------------------------------------------ report
def machine_info(device: str) -> dict[str, str]:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "CPU": f"{cpu} ({os.cpu_count()} logical CPUs, {len(os.sched_getaffinity(0))} usable)",
        "torch threads": str(torch.get_num_threads()),
        "device": device,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pyro-ppl": pyro.__version__,
        "pyro_meta": pyro_meta.__version__,
    }
    if device == "cuda":
        info["GPU"] = torch.cuda.get_device_name()
    return info


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.2f}"


def _rate(x: float | None, per: int = 1) -> str:
    return "-" if x is None else f"{per / x:,.0f}" if per / x >= 100 else f"{per / x:.1f}"


def _mb(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{a / b:.2f}"


def _with_range(value: float, paired: list[float]) -> str:
    return f"{value:.2f} (per repeat {min(paired):.2f}-{max(paired):.2f})"


def render(args, argv: Sequence[str], info: dict[str, str], checks: list[Check], rows: list[Row],
           breakdown: list[tuple[Row, dict[str, float]]], load: tuple[str, str], seconds: float,
           rss_ok: bool) -> str:
    cmd = "python benchmarks/bench_sinusoid.py" + ("" if not argv else " " + shlex.join(argv))
    passed = all(c.ok for c in checks)
    lines = [
        "# Sinusoid meta-training: library (Pyro) vs plain PyTorch",
        "",
        f"- Command: `{cmd}`",
        f"- Date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        *[f"- {k}: {v}" for k, v in info.items()],
        f"- Load average (1 min) before / after: {load[0]} / {load[1]}; total run time {seconds:.0f} s",
        f"- Protocol: sinusoid, {args.shots} support + {args.shots} query points per task, MLP 1-40-40-1 "
        f"ReLU (D=1761), float32, Adam lr 1e-3, method defaults otherwise (ABML: inner lr 0.01, "
        f"1 inner sample, learned noise std, init 0.5: the heavier of its two noise settings). Pyro validation off. Batches pre-generated (8 per T, "
        f"cycled). Per path: {args.warmup} warm-up steps, then the median of {args.repeats} repeats "
        f"of >= {args.min_time} s each; paths interleaved within each repeat.",
        "",
        "## Self-check (float64, same parameters, data and torch seed)",
        "",
        f"Self-check: {'PASSED' if passed else 'FAILED'}",
        "",
        "| check | quantity | max abs err / max abs value | tolerance | result |",
        "| --- | --- | --- | --- | --- |",
        *[f"| {c.name} | {c.quantity} | {c.error:.1e} | {c.tol:.0e} | {'ok' if c.ok else 'FAIL'} |"
          for c in checks],
        "",
    ]
    by_key = {(r.method, r.tasks, r.inner_steps): r for r in rows}
    key_lines = []
    for (t, k), target in KEY_TARGETS["ratio"].items():
        for m in ("maml", "abml"):
            r = by_key.get((m, t, k))
            if r is not None:
                v = r.median("lib") / r.median("ref")
                key_lines.append(f"| {m.upper()} step time library / reference, T={t}, K={k} | "
                                 f"{_with_range(v, r.paired('lib', 'ref'))} | <= {target} | "
                                 f"{'met' if v <= target else 'MISSED'} |")
    for (m, t, k), r in sorted(by_key.items()):
        if t == 25 and "loop" in r.times:
            v = r.median("loop") / r.median("lib")
            key_lines.append(f"| {m.upper()} per-task loop / vectorized step time, T=25, K={k} | "
                             f"{_with_range(v, r.paired('loop', 'lib'))} | >= {KEY_TARGETS['loop_speedup']} | "
                             f"{'met' if v >= KEY_TARGETS['loop_speedup'] else 'MISSED'} |")
    if key_lines:
        lines += ["## Key figures", "",
                  "Ratio of the median step times (as in the table below); in brackets the range of "
                  "the ratios within single repeats (the paths are interleaved, so both sides of a "
                  "repeat's ratio saw the same machine load).", "",
                  "| figure | value | target | status |", "| --- | --- | --- | --- |", *key_lines, ""]
    mem_note = ("peak RSS growth (VmHWM after reset minus RSS before)" if args.device == "cpu"
                else "torch.cuda.max_memory_allocated growth")
    if args.device == "cpu" and not rss_ok:
        mem_note += "; n/a: VmHWM cannot be reset on this machine"
    lines += [
        "## Results",
        "",
        f"Times per meta-training step (loss + backward + Adam step). Memory: {mem_note}, MiB, over 2 steps.",
        "",
        "| method | T | K | lib ms/step | lib steps/s | lib tasks/s | ref ms/step | ref steps/s | "
        "ref tasks/s | lib/ref | loop ms/step | loop tasks/s | loop/vec | mem lib MiB | "
        "mem ref MiB | mem loop MiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | ---: | ---: |",
    ]
    for r in rows:
        lib, ref, loop = r.median("lib"), r.median("ref"), r.median("loop")
        lines.append(
            f"| {r.method} | {r.tasks} | {r.inner_steps} | {_ms(lib)} | {_rate(lib)} | "
            f"{_rate(lib, r.tasks)} | {_ms(ref)} | {_rate(ref)} | {_rate(ref, r.tasks)} | "
            f"{_ratio(lib, ref)} | {_ms(loop)} | {_rate(loop, r.tasks)} | {_ratio(loop, lib)} | "
            f"{_mb(r.memory.get('lib'))} | {_mb(r.memory.get('ref'))} | "
            f"{_mb(r.memory.get('loop')) if 'loop' in r.memory else '-'} |")
    bad = [f"{r.method} T={r.tasks} K={r.inner_steps} {p}" for r in rows
           for p, v in r.final_loss.items() if not math.isfinite(v)]
    if bad:
        lines += ["", f"Warning: non-finite loss at the end of timing: {', '.join(bad)}."]
    if breakdown:
        lines += [
            "",
            "## Where the library's extra time goes",
            "",
            "`hybrid` = the library's inner loop (`guide.adapt`, plain tensors, no Pyro trace) + the "
            "reference's outer loss. `hybrid - ref` is the cost of the library's inner-loop "
            "formulation; `lib - hybrid` the cost of the outer loss as a Pyro program (traces, "
            "distribution objects, `log_prob` of every site in model and guide, Trace_ELBO's "
            "bookkeeping, two network passes instead of one). aten calls: operator calls per step "
            "(forward + backward, nested calls included) from torch.profiler.",
            "",
            "| method | T | K | lib ms | hybrid ms | ref ms | inner-loop formulation ms | Pyro outer ms "
            "| aten calls lib | aten calls hybrid | aten calls ref |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r, calls in breakdown:
            lib, hyb, ref = r.median("lib"), r.median("hybrid"), r.median("ref")
            lines.append(
                f"| {r.method} | {r.tasks} | {r.inner_steps} | {_ms(lib)} | {_ms(hyb)} | {_ms(ref)} | "
                f"{(hyb - ref) * 1e3:+.2f} | {(lib - hyb) * 1e3:+.2f} | {calls['lib']:.0f} | "
                f"{calls['hybrid']:.0f} | {calls['ref']:.0f} |")
    lines += [
        "",
        "Columns: see `benchmarks/README.md`. `lib/ref` > 1 means the library is slower than the "
        "plain-PyTorch reference; `loop/vec` is the speed-up of the vectorized tasks plate over "
        "the per-task Python loop.",
        "",
    ]
    return "\n".join(lines)


def _loadavg() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "n/a"


def start_benchmark(args: argparse.Namespace) -> tuple[float, str, dict[str, str]]:
    """What every benchmark script does first: its start time, the load average, the training settings
    (validation off, float32, ``--threads`` on CPU) and the machine's description."""
    t_start = time.perf_counter()
    load0 = _loadavg()
    pyro.enable_validation(False)
    torch.set_default_dtype(torch.float32)
    if args.device == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    return t_start, load0, machine_info(args.device)


def main(args: argparse.Namespace, argv: Sequence[str] = ()) -> int:
    t_start, load0, info = start_benchmark(args)
    print("machine:", "; ".join(f"{k} {v}" for k, v in info.items()), flush=True)

    checks = self_check(tasks=3 if args.quick else 4)
    for c in checks:
        print(f"self-check {'ok  ' if c.ok else 'FAIL'} {c.name}: {c.quantity} rel err {c.error:.1e}")
    rss_ok = args.device == "cuda" or rss_peak_works()
    pyro.enable_validation(False)  # self_check restores the state it found; be explicit

    rows: list[Row] = []
    for method in args.method_list:
        for tasks in args.task_list:
            for k in args.k_list:
                t0 = time.perf_counter()
                row = run_config(method, tasks, k, args, with_loop=tasks in args.loop_list)
                rows.append(row)
                lib, ref, loop = row.median("lib"), row.median("ref"), row.median("loop")
                print(f"{method} T={tasks:3d} K={k}: lib {_ms(lib)} ms, ref {_ms(ref)} ms, "
                      f"lib/ref {_ratio(lib, ref)}" + (f", loop {_ms(loop)} ms, loop/vec "
                                                       f"{_ratio(loop, lib)}" if loop else "")
                      + f"  [{time.perf_counter() - t0:.1f} s]", flush=True)

    breakdown = []
    for method, tasks, k in args.breakdown_list:
        if method not in args.method_list:
            continue
        row = run_config(method, tasks, k, args, with_loop=False, with_hybrid=True)
        calls = {}
        for path in ("lib", "hybrid", "ref"):  # fresh learners: profiling must not disturb timing
            learner = make_learner(method, tasks, k, args.shots, args.seed).to(args.device)
            batches = make_batches(tasks, args.shots, 2, args.seed + 1, args.device)
            ref = reference_for(learner)
            fn = {"lib": learner.loss, "ref": ref.loss, "hybrid": hybrid_loss(learner, ref.net)}[path]
            step = make_step(ref if path == "ref" else learner, fn, batches)
            step(0)
            calls[path] = aten_calls_per_step(step)
        breakdown.append((row, calls))
        print(f"breakdown {method} T={tasks} K={k}: lib {_ms(row.median('lib'))} hybrid "
              f"{_ms(row.median('hybrid'))} ref {_ms(row.median('ref'))} ms; aten calls {calls}",
              flush=True)

    text = render(args, argv, info, checks, rows, breakdown, (load0, _loadavg()),
                  time.perf_counter() - t_start, rss_ok)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    ok = all(c.ok for c in checks)
    if not ok:
        print("SELF-CHECK FAILED", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    argv = sys.argv[1:]
    sys.exit(main(parse_args(argv), argv))
