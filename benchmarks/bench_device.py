"""Every method's meta-training step on one device, through the trainer a user runs (``fit``), and what
crosses between host and device in a step.

    python benchmarks/bench_device.py --device cuda --data-root DIR [--steps 20] [--accuracy 300]
    python benchmarks/bench_device.py --quick --out /tmp/r.md          # a smoke test on the CPU

Each case builds its learner from the method's defaults (the papers' protocols, ``pyro_meta.methods``;
the VAE from ``vi vae``'s defaults), lets the task stream place itself on the device as ``fit`` does, and
reports:

- the time per meta-training step and tasks (or images) per second: ``fit`` over ``--steps`` steps after
  ``--warmup`` untimed ones (the first of which runs ``fit``'s first-step check), the device synchronized
  before and after;
- on CUDA: the host-to-device copies per step and their bytes, and the device-to-host copies per step,
  counted in PyTorch's profiler over ``--profile`` further steps, with the Python lines that issued each
  kind of host-to-device copy (so a per-step copy can be found and removed); the task stream's chunked
  copies (``DeviceChunks``) are counted apart;
- the peak device memory of the timed steps (CUDA).

``--accuracy N`` also meta-trains MAML on Omniglot 5-way 1-shot for N steps from the same seed in each
``--precision`` mode (fp32, tf32, bf16 on CUDA; fp32, bf16 on the CPU) and evaluates it on the benchmark's
test episodes: the accuracy effect of reduced precision. Omniglot cases need the data (``--data-root``, or
the cache); without it they are reported as skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import shlex
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from bench_sinusoid import _loadavg, start_benchmark

from pyro_meta.config import RunConfig
from pyro_meta.evaluate import evaluate
from pyro_meta.methods import build_learner, resolve
from pyro_meta.run import apply_precision, benchmark_of
from pyro_meta.tasks.stream import place
from pyro_meta.train import fit

HERE = Path(__file__).resolve().parent
# label -> RunConfig settings (the rest: the method's defaults)
OMNIGLOT_5W1S = {"benchmark": "omniglot", "ways": 5, "shots": 1}
CASES: dict[str, dict[str, Any]] = {
    "maml-sinusoid": {"benchmark": "sinusoid", "method": "maml"},
    "abml-sinusoid": {"benchmark": "sinusoid", "method": "abml"},
    "platipus-sinusoid_line": {"benchmark": "sinusoid_line", "method": "platipus"},
    "amortized-sinusoid": {"benchmark": "sinusoid", "method": "amortized"},
    "bmaml-sinusoid_bmaml": {"benchmark": "sinusoid_bmaml", "method": "bmaml"},
    "maml-omniglot": {**OMNIGLOT_5W1S, "method": "maml"},
    "abml-omniglot": {**OMNIGLOT_5W1S, "method": "abml"},
    "versa-omniglot": {**OMNIGLOT_5W1S, "method": "versa"},
    "bmaml-omniglot": {**OMNIGLOT_5W1S, "method": "bmaml"},
    "vae-omniglot": {},  # vi vae's defaults
}
QUICK = ("maml-sinusoid", "abml-sinusoid", "vae-omniglot")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--steps", type=int, default=20, help="timed steps per case")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--profile", type=int, default=3, help="profiled steps per case (CUDA)")
    p.add_argument("--accuracy", type=int, default=0, help="steps of the precision-accuracy runs (0: none)")
    p.add_argument("--accuracy-test-tasks", type=int, default=600, help="test episodes of those runs")
    p.add_argument("--data-root", default=None, help="Omniglot's folder (else $PYRO_META_DATA or the cache)")
    p.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    p.add_argument("--quick", action="store_true", help="a smoke test: 3 cases, 2 steps, tiny accuracy runs")
    p.add_argument("--out", type=Path, default=HERE / "RESULTS_device.md")
    args = p.parse_args(argv)
    if args.quick:
        args.cases = [c for c in args.cases if c in QUICK]
        args.steps, args.warmup, args.profile = 2, 1, 1
        args.accuracy = min(args.accuracy, 2) if args.accuracy else 0
        args.accuracy_test_tasks = min(args.accuracy_test_tasks, 10)
    for name in ("steps", "warmup", "profile"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    return args


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def describe(cfg: RunConfig) -> str:
    """The protocol of a case, from its resolved config."""
    what = f"{cfg.benchmark}" + (f" {cfg.ways}-way {cfg.shots}-shot" if cfg.ways else f", {cfg.shots} shots")
    net = f"conv4 ({cfg.downsample})" if cfg.ways else "MLP 1-" + "-".join(map(str, cfg.hidden)) + "-1"
    inner = f", {cfg.inner_steps} inner step{'s' if cfg.inner_steps != 1 else ''}" if cfg.inner_steps else ""
    parts = f", {cfg.particles} particles" if getattr(cfg, "particles", None) else ""
    return f"{what}, {net}, T={cfg.meta_batch}, {cfg.queries} queries{'/class' if cfg.ways else ''}{inner}{parts}"


def build_case(label: str, args: argparse.Namespace, dev: str) -> tuple[Any, Any, int, str, str]:
    """(learner or VAE, its source placed on the device, items per step, unit, protocol)."""
    if label == "vae-omniglot":
        from pyro_meta.vi.vae import VAE, ImageStream, mean_image_logits, omniglot_images
        from pyro_meta.vi.vae_experiment import DEFAULTS

        data = omniglot_images(args.data_root, progress=False)
        torch.manual_seed(0)
        vae = VAE(pixels=data.train.shape[1], latent=DEFAULTS["latent"], hidden=DEFAULTS["hidden"],
                  objective=DEFAULTS["objective"], k=DEFAULTS["k"], output_bias=mean_image_logits(data.train))
        what = (f"Omniglot 28x28 binarized, 784-{'-'.join(map(str, DEFAULTS['hidden']))}-{DEFAULTS['latent']}, "
                f"{DEFAULTS['objective']}, minibatch {DEFAULTS['batch_size']}")
        return vae, place(ImageStream(data.train, DEFAULTS["batch_size"], seed=0), dev), DEFAULTS["batch_size"], \
            "images", what
    settings = CASES[label]
    extra = {"data_root": args.data_root} if settings["benchmark"] == "omniglot" else {"num_val_tasks": 2,
                                                                                      "num_test_tasks": 2}
    cfg = resolve(RunConfig(**settings, **extra, device=dev))
    torch.manual_seed(0)
    bm = benchmark_of(cfg)
    return build_learner(cfg), place(bm.train, dev), cfg.meta_batch, "tasks", describe(cfg)


def _fit(learner: Any, source: Any, steps: int, dev: str, check: bool = False) -> None:
    fit(learner, source, steps, device=dev, progress=False, log_every=10**9, check_first_step=check)


# ------------------------------------------------------------------ what crosses, from the profiler
def transfers(learner: Any, source: Any, steps: int, dev: str) -> dict[str, Any]:
    """Host-to-device and device-to-host copies over ``steps`` steps, from PyTorch's profiler (CUDA), and
    the Python lines that issued each kind of host-to-device copy."""
    from torch.profiler import ProfilerActivity, profile

    chunks_before = getattr(source, "transfers", 0)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
        _fit(learner, source, steps, dev)
        _sync(torch.device(dev))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
    chunk_copies = getattr(source, "transfers", 0) - chunks_before
    return {**_copies(events), "chunk_refills": chunk_copies}


def _copies(events: list[dict[str, Any]]) -> dict[str, Any]:
    runtime = {e["args"].get("correlation"): e for e in events
               if e.get("cat") == "cuda_runtime" and "args" in e}
    # CPU-side frames (operators and Python functions) per thread, to find what launched a copy
    frames: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        if e.get("cat") in ("cpu_op", "python_function"):
            frames[(e["pid"], e["tid"])].append(e)
    htod, dtoh, htod_bytes = 0, 0, 0
    sources: Counter[str] = Counter()
    for e in events:
        if e.get("cat") != "gpu_memcpy":
            continue
        name = e.get("name", "")
        if "DtoH" in name:
            dtoh += 1
        if "HtoD" not in name:
            continue
        htod += 1
        htod_bytes += int(e.get("args", {}).get("bytes", 0) or 0)
        launch = runtime.get(e.get("args", {}).get("correlation"))
        sources[_launcher(launch, frames) if launch else "(launch not found)"] += 1
    return {"htod": htod, "htod_bytes": htod_bytes, "dtoh": dtoh, "htod_sources": dict(sources.most_common())}


def _short(frame: str) -> str:
    """``/any/where/pyro_meta/x.py(12): f`` -> ``pyro_meta/x.py(12): f`` (Pyro's frames likewise)."""
    for root in ("pyro_meta/", "pyro/", "benchmarks/"):
        i = frame.find(root)
        if i >= 0 and (i == 0 or frame[i - 1] == "/"):
            return frame[i:]
    return frame


def _launcher(launch: dict[str, Any], frames: dict[Any, list[dict[str, Any]]]) -> str:
    """The innermost operator and the innermost project (or Pyro) Python frames around a runtime call."""
    t0, t1 = launch["ts"], launch["ts"] + launch.get("dur", 0)
    around = sorted((f for f in frames[(launch["pid"], launch["tid"])]
                     if f["ts"] <= t0 and f["ts"] + f.get("dur", 0) >= t1), key=lambda f: f["ts"])
    ops = [f["name"] for f in around if f["cat"] == "cpu_op"]
    py = [_short(f["name"]) for f in around if f["cat"] == "python_function"
          and ("pyro_meta/" in f["name"] or "/pyro/" in f["name"] or "bench_" in f["name"])]
    return " < ".join(([ops[-1]] if ops else []) + py[::-1][:3]) or "(no frame)"


# ------------------------------------------------------------------ one case
def run_case(label: str, args: argparse.Namespace) -> dict[str, Any]:
    dev = torch.device(args.device)
    learner, source, per_step, unit, what = build_case(label, args, args.device)
    _fit(learner, source, args.warmup, args.device, check=True)
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    _fit(learner, source, args.steps, args.device)
    _sync(dev)
    ms = 1000 * (time.perf_counter() - t0) / args.steps
    row: dict[str, Any] = {"case": label, "what": what, "ms": ms, "per_s": per_step * 1000 / ms, "unit": unit,
                           "source": type(source).__name__}
    if dev.type == "cuda":
        row["peak_mib"] = torch.cuda.max_memory_allocated(dev) / 2**20
        moved = transfers(learner, source, args.profile, args.device)
        row.update(moved)
        row["profiled_steps"] = args.profile
    return row


# ------------------------------------------------------------------ reduced precision: accuracy
def accuracy_runs(args: argparse.Namespace) -> list[dict[str, Any]]:
    modes = ("fp32", "tf32", "bf16") if args.device.startswith("cuda") else ("fp32", "bf16")
    rows = []
    for mode in modes:
        tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        try:
            cfg = resolve(RunConfig(benchmark="omniglot", method="maml", ways=5, shots=1, steps=args.accuracy,
                                    precision=mode, device=args.device, data_root=args.data_root,
                                    num_test_tasks=args.accuracy_test_tasks))
            apply_precision(cfg)
            torch.manual_seed(cfg.seed)
            bm = benchmark_of(cfg)
            learner = build_learner(cfg)
            t0 = time.perf_counter()
            fit(learner, place(bm.train, args.device), cfg.steps, meta_lr=cfg.meta_lr, grad_clip=cfg.grad_clip,
                device=args.device, progress=False, log_every=10**9)
            _sync(torch.device(args.device))
            seconds = time.perf_counter() - t0
            metrics, _ = evaluate(learner, bm.test.to(args.device), num_samples=cfg.eval_samples, seed=cfg.seed)
            rows.append({"precision": mode, "steps": cfg.steps, "ms": 1000 * seconds / cfg.steps, **metrics,
                         "test_tasks": bm.test.num_tasks})
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        print(f"accuracy {mode}: {rows[-1]['ms']:.1f} ms/step, accuracy {_get(rows[-1], 'accuracy', 100):.2f}%",
              flush=True)
    return rows


# ------------------------------------------------------------------ report
def _bytes(n: float) -> str:
    return f"{n / 1024:.1f} KB" if n < 2**20 else f"{n / 2**20:.1f} MB"


def markdown(rows: list[dict[str, Any]], acc: list[dict[str, Any]], args: argparse.Namespace, info: dict[str, str],
             load: tuple[str, str], seconds: float, argv: Sequence[str]) -> str:
    cuda = args.device.startswith("cuda")
    lines = [
        "# Every method's meta-training step on one device",
        "",
        f"- Command: `python benchmarks/bench_device.py {shlex.join(argv)}`",
        f"- Date: {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}",
        *[f"- {k}: {v}" for k, v in info.items()],
        f"- Load average (1 min) before / after: {load[0]} / {load[1]}; total run time {seconds:.0f} s",
        f"- Protocol: each method's defaults (`pyro_meta.methods`; the VAE: `vi vae`'s), float32, through "
        f"`pyro_meta.train.fit` with the task stream placed on the device as `fit` does; {args.warmup} untimed "
        f"steps (the first runs fit's first-step check), then {args.steps} timed steps, the device synchronized "
        "before and after. Omniglot episodes are real (the Vinyals split's background pool).",
        "",
        "| case | what | ms/step | per s | source | " + (
            "H2D copies/step | H2D bytes/step | D2H copies/step | stream chunk copies | peak MiB |" if cuda else ""),
        "| --- | --- | ---: | ---: | --- | " + ("---: | ---: | ---: | ---: | ---: |" if cuda else ""),
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | | skipped: {r['error']} | | | " + ("| | | | |" if cuda else ""))
            continue
        cells = [r["case"], r["what"], f"{r['ms']:.2f}", f"{r['per_s']:,.0f} {r['unit']}", r["source"]]
        if cuda:
            n = r["profiled_steps"]
            cells += [f"{r['htod'] / n:.2f}", _bytes(r["htod_bytes"] / n), f"{r['dtoh'] / n:.2f}",
                      str(r["chunk_refills"]), f"{r['peak_mib']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if cuda:
        lines += ["", f"Copies are counted by PyTorch's profiler over {args.profile} further steps per case (one "
                  "`fit` call). Device-to-host: the trainer's non-finite guard reads the loss and gradient norm "
                  "once per step (1 copy), and the call's last step logs both (2 more). Stream chunk copies: the "
                  "task stream's chunked transfers (`DeviceChunks`) in those steps, drawn ahead for up to 256 "
                  "steps. What issued the host-to-device copies (operator < innermost project or Pyro frames: "
                  "count over those steps):", ""]
        if not any(r.get("htod_sources") for r in rows):
            lines.append("- none")
        for r in rows:
            for where, count in r.get("htod_sources", {}).items():
                lines.append(f"- {r['case']}: {count} x `{where}`")
    if acc:
        lines += ["", f"## Reduced precision: accuracy (MAML, Omniglot 5-way 1-shot, {acc[0]['steps']} steps, "
                  f"{acc[0]['test_tasks']} test episodes)", "",
                  "| precision | ms/step | accuracy | NLL | ECE |", "| --- | ---: | ---: | ---: | ---: |"]
        for a in acc:
            ci = a["accuracy"].get("ci95") if isinstance(a.get("accuracy"), dict) else None
            pm = f" ± {100 * ci:.2f}" if isinstance(ci, float) and math.isfinite(ci) else ""
            lines.append(f"| {a['precision']} | {a['ms']:.1f} | {_get(a, 'accuracy', 100):.2f}{pm}% | "
                         f"{_get(a, 'nll')} | {_get(a, 'ece')} |")
    return "\n".join(lines) + "\n"


def _get(m: dict[str, Any], key: str, scale: float = 1.0) -> Any:
    v = m.get(key)
    if isinstance(v, dict):
        v = v.get("mean", v.get("value"))
    if isinstance(v, float) and math.isfinite(v):
        return v * scale if scale != 1.0 else round(v, 4)
    return float("nan") if scale != 1.0 else "-"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    t_start, load0, info = start_benchmark(args)
    print("machine:", "; ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    rows = []
    for label in args.cases:
        try:
            row = run_case(label, args)
        except (FileNotFoundError, OSError) as e:  # no Omniglot here: say so, time the rest
            row = {"case": label, "error": str(e).splitlines()[0][:120]}
        print(json.dumps(row), flush=True)
        rows.append(row)
        with contextlib.suppress(Exception):
            torch.cuda.empty_cache()
    acc = accuracy_runs(args) if args.accuracy else []
    text = markdown(rows, acc, args, info, (load0, _loadavg()), time.perf_counter() - t_start, argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
