"""Meta-training speed and memory on Omniglot: the library's VERSA and MAML vs plain PyTorch vs the
machine's ceiling.

For each method (VERSA, MAML) and setting (5-way 1-shot, 20-way 1-shot), with each method's
Omniglot protocol (meta-batch, queries, inner steps, conv4 variant), one meta-training step
(loss, backward, Adam step) is timed along three paths:

- ``lib``: ``MetaLearner.loss`` (the Pyro model + guide under the method's objective), validation off;
- ``ref``: the same estimator in plain PyTorch (``benchmarks/reference_conv.py``);
- ``ceiling``: a plain conv4 (the method's variant) + linear head, cross-entropy over every support
  and query image of the step, one backward: no inner loop, no amortizer, no Pyro.

The result is given in episodes (tasks) per second: meta-batch / seconds per step. A self-check
first verifies, in float64, that the reference computes the library's loss and gradients. The
timed batches are synthetic (random images of the right shapes, generated before timing), so no
dataset is needed; ``--data-root`` uses real Omniglot episodes instead. Results go to a markdown
file (default ``benchmarks/RESULTS_omniglot.md``).

Example::

    python benchmarks/bench_omniglot.py --device cuda --out benchmarks/RESULTS_omniglot_cuda.md
    python benchmarks/bench_omniglot.py --meta-batch 4 --repeats 3 --min-time 0   # CPU, reduced
    python benchmarks/bench_omniglot.py --quick --out /tmp/r.md                   # smoke test
"""

from __future__ import annotations

import argparse
import datetime
import math
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import bench_sinusoid  # the sinusoid benchmark's protocol: timing, peak memory, machine info
import pyro
import torch
from bench_sinusoid import _loadavg, make_step, peak_memory, rss_peak_works, start_benchmark
from reference_conv import CeilingConv4, ceiling_inputs, reference_for

from pyro_meta.config import RunConfig
from pyro_meta.guides import MAMLGuide, VERSAGuide
from pyro_meta.infer import MLPIP
from pyro_meta.learner import MetaLearner
from pyro_meta.likelihoods import Categorical
from pyro_meta.methods import build_learner, resolve
from pyro_meta.models import MAMLModel, VERSAModel
from pyro_meta.nn import Conv4
from pyro_meta.tasks import TaskBatch

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "RESULTS_omniglot.md"
METHODS = ("versa", "maml")
CHECK_TOL = 1e-10
CONTROL_MIN = 1e-6  # a control check must differ by more than this

Step = Callable[[int], None]


# ------------------------------------------------------------------------------ arguments
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--methods", default="versa,maml", help="comma-separated subset of versa,maml")
    p.add_argument("--settings", default="5w1s,20w1s", help="comma-separated WAYSwSHOTSs settings")
    p.add_argument("--meta-batch", type=int, default=None,
                   help="tasks per meta-batch for every configuration (default: each protocol's: "
                        "VERSA 16; MAML 32 at 5-way, 16 at 20-way)")
    p.add_argument("--versa-queries", type=int, default=None,
                   help="VERSA's query points per class (default: the protocol's 15); MAML's = shots")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads on CPU (0: torch's default); see benchmarks/README.md")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per path (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per path before timing")
    p.add_argument("--min-time", type=float, default=0.5,
                   help="seconds per timed repeat (steps per repeat are calibrated to reach it)")
    p.add_argument("--batches", type=int, default=4, help="pre-generated meta-batches per configuration")
    p.add_argument("--data-root", default=None,
                   help="time on real Omniglot episodes from this directory instead of synthetic images")
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke test")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown file to write")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        args.meta_batch = args.meta_batch or 2
        args.versa_queries = args.versa_queries or 2
        args.repeats, args.warmup, args.min_time, args.batches = 2, 1, 0.0, 2
    args.method_list = _names(args.methods, METHODS, "--methods")
    args.setting_list = _settings(args.settings)
    if (args.repeats < 1 or args.warmup < 0 or args.min_time < 0 or args.threads < 0 or args.batches < 1
            or (args.meta_batch is not None and args.meta_batch < 1)
            or (args.versa_queries is not None and args.versa_queries < 1)):
        p.error("--repeats, --batches, --meta-batch and --versa-queries must be >= 1; "
                "--warmup, --min-time and --threads >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda was asked for, but torch sees no CUDA device")
    return args


def _names(text: str, known: Sequence[str], flag: str) -> list[str]:
    out = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in out if v not in known]
    if not out or bad:
        raise SystemExit(f"{flag}: expected a subset of {','.join(known)}, got {text!r}")
    return out


def _settings(text: str) -> list[tuple[int, int]]:
    out = []
    for item in (v.strip() for v in text.split(",") if v.strip()):
        m = re.fullmatch(r"(\d+)w(\d+)s", item)
        if m is None or int(m.group(1)) < 2 or int(m.group(2)) < 1:
            raise SystemExit(f"--settings: expected items like 5w1s (ways >= 2, shots >= 1), got {item!r}")
        out.append((int(m.group(1)), int(m.group(2))))
    if not out:
        raise SystemExit("--settings: expected at least one setting, e.g. 5w1s")
    return out


# ------------------------------------------------------------------------------ building
# the timed protocol keeps the per-task batch statistics ("task") its plain-PyTorch reference
# (reference_conv.py) implements and benchmarks/RESULTS_omniglot.md measured; the library's default is now
# "support", which passes the support images once more through the trunk with each query pass
BENCH_BATCH_NORM = "task"


def config_for(method: str, ways: int, shots: int, args) -> RunConfig:
    """The method's resolved Omniglot protocol, with the benchmark's overrides."""
    return resolve(RunConfig(benchmark="omniglot", method=method, ways=ways, shots=shots,
                             meta_batch=args.meta_batch,
                             queries=args.versa_queries if method == "versa" else None,
                             seed=args.seed, data_root=args.data_root, batch_norm=BENCH_BATCH_NORM))


def synthetic_batch(tasks: int, ways: int, shots: int, queries: int, g: torch.Generator,
                    image_size: int = 28, dtype=torch.float32) -> TaskBatch:
    """Random images in [0, 1] with the episode sampler's shapes and class-major labels."""
    labels = torch.arange(ways)
    return TaskBatch(
        torch.rand(tasks, ways * shots, 1, image_size, image_size, generator=g, dtype=dtype),
        labels.repeat_interleave(shots).repeat(tasks, 1),
        torch.rand(tasks, ways * queries, 1, image_size, image_size, generator=g, dtype=dtype),
        labels.repeat_interleave(queries).repeat(tasks, 1),
        {"classes": torch.zeros(tasks, ways, dtype=torch.long)},
    )


def make_batches(cfg: RunConfig, count: int, seed: int, device: str) -> list[TaskBatch]:
    """``count`` meta-batches, made before timing (synthetic, or Omniglot with ``cfg.data_root``)."""
    if cfg.data_root is not None:
        from pyro_meta.run import benchmark_of

        stream = benchmark_of(cfg).train
        return [next(stream).to(device) for _ in range(count)]
    g = torch.Generator().manual_seed(seed)
    return [synthetic_batch(cfg.meta_batch, cfg.ways, cfg.shots, cfg.queries, g).to(device)
            for _ in range(count)]


# ------------------------------------------------------------------------------ measuring
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_paths(paths: dict[str, Step], device: str, warmup: int, repeats: int,
               min_time: float) -> dict[str, list[float]]:
    """Seconds per step of each path, one value per repeat, the paths interleaved within each repeat
    (``bench_sinusoid.time_paths``). With ``min_time == 0`` every repeat is one step and the two
    calibration steps per path are skipped (a CPU step here can take seconds)."""
    if min_time > 0:
        return bench_sinusoid.time_paths(paths, device, warmup, repeats, min_time)
    it = dict.fromkeys(paths, 0)
    for name, step in paths.items():
        for _ in range(warmup):
            step(it[name])
            it[name] += 1
    out: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(repeats):
        for name, step in paths.items():
            _sync(device)
            t0 = time.perf_counter()
            step(it[name])
            _sync(device)
            out[name].append(time.perf_counter() - t0)
            it[name] += 1
    return out


# ------------------------------------------------------------------------------ self-check
@dataclass
class Check:
    name: str
    quantity: str
    error: float
    tol: float
    control: bool = False  # a control must DIFFER (error > tol): it shows the check can fail

    @property
    def ok(self) -> bool:
        if not math.isfinite(self.error):
            return False
        return self.error > self.tol if self.control else self.error <= self.tol


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b| / max |b|``."""
    a, b = a.detach().double(), b.detach().double()
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


def _loss_and_grads(module: torch.nn.Module, loss_fn: Callable, batch: TaskBatch, seed: int):
    params = dict(module.named_parameters())
    for p in params.values():
        p.grad = None
    torch.manual_seed(seed)
    loss = loss_fn(batch)
    loss.backward()
    return loss.detach(), {k: p.grad.detach().clone() for k, p in params.items() if p.grad is not None}


def tiny_learner(method: str, ways: int, downsample: str, batch_norm: str, seed: int,
                 chunk_tasks: int | None = None, images: int = 6) -> MetaLearner:
    """A small learner built from the library's classes: conv4 with 2 blocks of 4 filters on
    12x12 images, perturbed away from the symmetric init (batch-norm gamma = 1, beta = 0).
    ``chunk_tasks``: set the net's CPU chunk budget so that ``images`` images per task go through
    ``chunk_tasks`` tasks at a time (the reference copies the setting)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = Conv4(None if method == "versa" else ways, image_size=12, filters=4, blocks=2,
                downsample=downsample, batch_norm=batch_norm)
    if chunk_tasks is not None:
        net.chunk_elements = chunk_tasks * images * net.filters * net.spatial_sizes[
            0 if downsample == "maxpool" else 1] ** 2
    init = net.init(g) + 0.1 * torch.randn(net.num_params, generator=g)
    if method == "versa":
        model = VERSAModel(net, init)
        return MetaLearner(model, VERSAGuide(model, [8, 8]), MLPIP(3, local_reparam=True), name="versa")
    model = MAMLModel(net, Categorical())
    guide = MAMLGuide(model, init, inner_steps=2, inner_steps_eval=2, inner_lr=0.4)
    return MetaLearner(model, guide, name="maml")


def _compare(checks: list[Check], name: str, learner, batch: TaskBatch, seed: int,
             controls: bool = False) -> None:
    lib_loss, lib_grads = _loss_and_grads(learner, learner.loss, batch, seed)
    ref = reference_for(learner, align_rng=True)
    ref_loss, ref_grads = _loss_and_grads(ref, ref.loss, batch, seed)
    ref_grads = ref.as_library(ref_grads)
    checks.append(Check(name, "loss", _rel(ref_loss, lib_loss), CHECK_TOL))
    # the amortizer's tensors as one group (relative to the group's largest gradient): some of its
    # gradients are exactly 0 in theory (softmax is shift-invariant, e.g. w_mean.bias), rounding noise
    groups: dict[str, list[str]] = {}
    for k in lib_grads:
        groups.setdefault(k if k.endswith("theta") else "amortizer (all guide tensors)", []).append(k)
    for label, keys in groups.items():
        err = _rel(torch.cat([ref_grads[k].flatten() for k in keys]),
                   torch.cat([lib_grads[k].flatten() for k in keys]))
        checks.append(Check(name, f"d loss / d {label}", err, CHECK_TOL))
    if not controls:
        return
    if learner.name == "versa":  # without the library's order of draws the numbers must differ
        other = reference_for(learner, align_rng=False)
        loss, _ = _loss_and_grads(other, other.loss, batch, seed)
        checks.append(Check(f"control: {name}, reference drawing eps without the guide's psi draw",
                            "loss (must differ)", _rel(loss, lib_loss), CONTROL_MIN, control=True))
    else:  # first-order MAML must not pass for the library's second-order gradient
        other = reference_for(learner)
        other.first_order = True
        _, grads = _loss_and_grads(other, other.loss, batch, seed)
        checks.append(Check(f"control: {name}, first-order reference", "d loss / d guide.theta (must differ)",
                            _rel(grads["theta"], lib_grads["guide.theta"]), CONTROL_MIN, control=True))


def self_check(settings: Sequence[tuple[int, int]], methods: Sequence[str], seed: int = 11,
               device: str = "cpu", tasks: int = 2) -> list[Check]:
    """Reference vs library in float64: same parameters, data and ``torch.manual_seed``.

    Tiny learners (3-way, 2 shots, 2 queries per class, every conv4 variant) and the benchmark's own
    protocol learners (``build_learner``) for each setting, on ``tasks`` tasks of 2 queries per class.
    """
    checks: list[Check] = []
    g = torch.Generator().manual_seed(seed)
    with pyro.validation_enabled(True):
        for method in methods:
            variants = [("maxpool", "task", None), ("stride", "task", None), ("stride", "none", None)]
            if hasattr(Conv4(None, image_size=12, blocks=2), "chunk_elements"):
                variants += [("maxpool", "task", 2), ("stride", "task", 2)]  # 3 tasks in CPU chunks of 2
            for downsample, bn, chunk in variants:
                learner = tiny_learner(method, 3, downsample, bn, seed, chunk).double().to(device)
                t = tasks if chunk is None else 3
                batch = synthetic_batch(t, 3, 2, 2, g, 12, torch.float64).to(device)
                label = f"{method} tiny T={t} 3w2s {downsample} bn={bn}" + (
                    f", CPU chunks of {chunk} tasks" if chunk and device == "cpu" else "")
                _compare(checks, label, learner, batch, seed)
            for ways, shots in settings:
                cfg = resolve(RunConfig(benchmark="omniglot", method=method, ways=ways, shots=shots,
                                        meta_batch=tasks, seed=seed, batch_norm=BENCH_BATCH_NORM))
                learner = build_learner(cfg).double().to(device)
                batch = synthetic_batch(tasks, ways, shots, 2 if method == "versa" else shots, g,
                                        dtype=torch.float64).to(device)
                what = f"L={cfg.train_samples}" if method == "versa" else \
                    f"K={cfg.inner_steps} lr={cfg.inner_lr}"
                label = f"{method} protocol T={tasks} {ways}w{shots}s {cfg.downsample} {what}"
                _compare(checks, label, learner, batch, seed, controls=(ways, shots) == settings[0])
    return checks


# ------------------------------------------------------------------------------ the benchmark
PATHS = ("lib", "ref", "ceiling")


@dataclass
class Row:
    method: str
    ways: int
    shots: int
    tasks: int
    queries: int
    detail: str
    times: dict[str, list[float]]
    memory: dict[str, float | None]
    final_loss: dict[str, float] = field(default_factory=dict)

    @property
    def setting(self) -> str:
        return f"{self.ways}w{self.shots}s"

    @property
    def images(self) -> int:
        return self.tasks * self.ways * (self.shots + self.queries)

    def median(self, path: str) -> float | None:
        return statistics.median(self.times[path]) if path in self.times else None

    def paired(self, num: str, den: str) -> list[float]:
        return [a / b for a, b in zip(self.times[num], self.times[den])]


def run_config(method: str, ways: int, shots: int, args) -> Row:
    dev = args.device
    cfg = config_for(method, ways, shots, args)
    torch.manual_seed(args.seed)
    batches = make_batches(cfg, args.batches, args.seed + 1, dev)
    learner = build_learner(cfg).to(dev)
    ref = reference_for(learner)
    ceiling = CeilingConv4(ways, cfg.filters, cfg.downsample, cfg.batch_norm, seed=args.seed,
                           chunk_elements=ref.net.chunk_elements).to(dev)
    ceiling_batches = [ceiling_inputs(b) for b in batches]
    paths = {"lib": make_step(learner, learner.loss, batches, cfg.meta_lr),
             "ref": make_step(ref, ref.loss, batches, cfg.meta_lr),
             "ceiling": make_step(ceiling, ceiling.loss, ceiling_batches, cfg.meta_lr)}
    times = time_paths(paths, dev, args.warmup, args.repeats, args.min_time)
    memory = {name: peak_memory(step, dev) for name, step in paths.items()}
    final = {name: float(step.state["loss"]) for name, step in paths.items()}
    detail = (f"L={cfg.train_samples}, {cfg.downsample}" if method == "versa"
              else f"K={cfg.inner_steps}, lr {cfg.inner_lr}, {cfg.downsample}")
    return Row(method, ways, shots, cfg.meta_batch, cfg.queries, detail, times, memory, final)


# ------------------------------------------------------------------------------ report
def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:,.1f}" if x >= 0.1 else f"{x * 1e3:.2f}"


def _rate(x: float | None, per: int = 1) -> str:
    return "-" if x is None else f"{per / x:,.0f}" if per / x >= 100 else f"{per / x:.1f}" \
        if per / x >= 1 else f"{per / x:.2f}"


def _mb(x: float | None) -> str:
    return "n/a" if x is None else f"{x:,.0f}"


def _ratio_range(r: Row, num: str, den: str) -> str:
    v = r.median(num) / r.median(den)
    paired = r.paired(num, den)
    return f"{v:.2f} ({min(paired):.2f}-{max(paired):.2f})"


def _protocol_defaults_text() -> str:
    return ("VERSA: meta-batch 16, 15 queries per class, ML-PIP with local reparameterization, "
            "L=10, max-pool conv4 (64 filters, 64 features), amortizer 3x256 ELU, Adam lr 1e-4; "
            "MAML: meta-batch 32 (5-way) / 16 (20-way), queries = shots, second order, 1 inner step "
            "of lr 0.4 (5-way) / 5 steps of 0.1 (20-way), strided conv4 (64 filters) + linear head, "
            "Adam lr 1e-3. Both: per-task batch norm (statistics per task and per set).")


def _chunk_text(args) -> str:
    if args.device != "cpu":
        return "not used off the CPU"
    value = getattr(Conv4(None), "chunk_elements", None)
    return "none (all tasks at once)" if value is None else f"{value:,}"


def render(args, argv: Sequence[str], info: dict[str, str], checks: list[Check], rows: list[Row],
           load: tuple[str, str], seconds: float, rss_ok: bool) -> str:
    cmd = "python benchmarks/bench_omniglot.py" + ("" if not argv else " " + shlex.join(argv))
    passed = all(c.ok for c in checks)
    changes = []
    if args.meta_batch is not None:
        changes.append(f"meta-batch reduced to {args.meta_batch} tasks for every configuration "
                       f"(`--meta-batch`)")
    if args.versa_queries is not None:
        changes.append(f"VERSA with {args.versa_queries} queries per class (`--versa-queries`)")
    data = (f"real Omniglot episodes from `{args.data_root}`" if args.data_root else
            "synthetic images (uniform in [0, 1]) with the episode sampler's shapes and labels")
    lines = [
        "# Omniglot meta-training: library (Pyro) vs plain PyTorch vs a plain conv4 ceiling",
        "",
        f"- Command: `{cmd}`",
        f"- Date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        *[f"- {k}: {v}" for k, v in info.items()],
        f"- Load average (1 min) before / after: {load[0]} / {load[1]}; total run time {seconds:.0f} s",
        f"- Protocol (the methods' Omniglot defaults, `pyro_meta.methods`): {_protocol_defaults_text()}",
        f"- Deviations from the protocol: {'; '.join(changes) if changes else 'none'}.",
        f"- Conv4 CPU chunk budget (`Conv4.chunk_elements`, first-layer activation entries per group of "
        f"tasks; the reference and the ceiling use the library net's value): {_chunk_text(args)}.",
        f"- Data: {data}, {args.batches} meta-batches per configuration made before timing and cycled. "
        f"float32, Pyro validation off. Per path: {args.warmup} warm-up step(s), "
        + (f"2 calibration steps, then the median of {args.repeats} repeats of >= {args.min_time} s each"
           if args.min_time > 0 else f"then the median of {args.repeats} repeats of one step each")
        + "; paths interleaved within each repeat.",
        "",
        "## Self-check (float64, same parameters, data and torch seed)",
        "",
        f"Self-check: {'PASSED' if passed else 'FAILED'}",
        "",
        "| check | quantity | max abs err / max abs value | tolerance | result |",
        "| --- | --- | --- | --- | --- |",
        *[f"| {c.name} | {c.quantity} | {c.error:.1e} | {'> ' if c.control else ''}{c.tol:.0e} | "
          f"{'ok' if c.ok else 'FAIL'} |" for c in checks],
        "",
    ]
    mem_note = ("peak RSS growth (VmHWM after reset minus RSS before)" if args.device == "cpu"
                else "torch.cuda.max_memory_allocated growth")
    if args.device == "cpu" and not rss_ok:
        mem_note += "; n/a: VmHWM cannot be reset on this machine"
    lines += [
        "## Results",
        "",
        "One meta-training step = loss + backward + Adam step on one meta-batch of T tasks. "
        "Episodes/s = T / (seconds per step). `lib/ref` and `lib/ceiling` are ratios of step times "
        "(> 1: the library is slower); in brackets the range of the ratios within single repeats. "
        f"Memory: {mem_note}, MiB, over 2 steps.",
        "",
        "| method | setting | T | queries/class | details | images/step | lib ms/step | lib episodes/s "
        "| ref ms/step | ref episodes/s | ceiling ms/step | ceiling episodes/s | lib/ref | lib/ceiling "
        "| ref/ceiling | mem lib MiB | mem ref MiB | mem ceiling MiB |",
        "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lib, ref, ceil = (r.median(p) for p in PATHS)
        lines.append(
            f"| {r.method} | {r.setting} | {r.tasks} | {r.queries} | {r.detail} | {r.images:,} | "
            f"{_ms(lib)} | {_rate(lib, r.tasks)} | {_ms(ref)} | {_rate(ref, r.tasks)} | {_ms(ceil)} | "
            f"{_rate(ceil, r.tasks)} | {_ratio_range(r, 'lib', 'ref')} | {_ratio_range(r, 'lib', 'ceiling')} "
            f"| {_ratio_range(r, 'ref', 'ceiling')} | {_mb(r.memory.get('lib'))} | "
            f"{_mb(r.memory.get('ref'))} | {_mb(r.memory.get('ceiling'))} |")
    bad = [f"{r.method} {r.setting} {p}" for r in rows for p, v in r.final_loss.items() if not math.isfinite(v)]
    if bad:
        lines += ["", f"Warning: non-finite loss at the end of timing: {', '.join(bad)}."]
    lines += [
        "",
        "Paths: `lib` = `MetaLearner.loss` (Pyro); `ref` = `benchmarks/reference_conv.py`, the same "
        "estimator in plain PyTorch; `ceiling` = a plain conv4 of the method's variant + linear head, "
        "cross-entropy over all the step's images (support + query of every task, batch-norm "
        "statistics per task), one backward: the cost of a plain conv4 training step on these "
        "images, not a strict lower bound (VERSA passes support and query sets separately; on a CPU "
        "one larger batch can be slower than two smaller ones). See `benchmarks/README.md`.",
        "",
    ]
    return "\n".join(lines)


def main(args: argparse.Namespace, argv: Sequence[str] = ()) -> int:
    t_start, load0, info = start_benchmark(args)
    if args.device == "cuda":
        info["cuDNN"] = (f"{torch.backends.cudnn.version()}, benchmark={torch.backends.cudnn.benchmark}, "
                         f"allow_tf32={torch.backends.cudnn.allow_tf32}; matmul allow_tf32="
                         f"{torch.backends.cuda.matmul.allow_tf32}")
    print("machine:", "; ".join(f"{k} {v}" for k, v in info.items()), flush=True)

    t0 = time.perf_counter()
    checks = self_check(args.setting_list, args.method_list)
    if args.device == "cuda":
        checks += [Check(c.name + " [cuda]", c.quantity, c.error, c.tol, c.control)
                   for c in self_check(args.setting_list, args.method_list, device="cuda")]
    for c in checks:
        print(f"self-check {'ok  ' if c.ok else 'FAIL'} {c.name}: {c.quantity} rel err {c.error:.1e}")
    print(f"self-check: {time.perf_counter() - t0:.1f} s", flush=True)
    rss_ok = args.device == "cuda" or rss_peak_works()
    pyro.enable_validation(False)

    rows: list[Row] = []
    for method in args.method_list:
        for ways, shots in args.setting_list:
            t0 = time.perf_counter()
            row = run_config(method, ways, shots, args)
            rows.append(row)
            lib, ref, ceil = (row.median(p) for p in PATHS)
            print(f"{method} {row.setting} T={row.tasks}: lib {_ms(lib)} ms ({_rate(lib, row.tasks)} ep/s), "
                  f"ref {_ms(ref)} ms, ceiling {_ms(ceil)} ms; lib/ref {lib / ref:.2f}, "
                  f"lib/ceiling {lib / ceil:.2f}  [{time.perf_counter() - t0:.1f} s]", flush=True)

    text = render(args, argv, info, checks, rows, (load0, _loadavg()), time.perf_counter() - t_start, rss_ok)
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
