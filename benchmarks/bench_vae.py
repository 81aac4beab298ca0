"""Training speed of the VAE (``pyro_meta.vi.vae``) against the same estimator in plain PyTorch.

One training step (loss, ``zero_grad``, backward, Adam step; float32; Pyro validation off) on a
minibatch of binarized 28x28 images (random grey levels binarized: the cost does not depend on the
pixels), Burda et al.'s 784-200-200-50 networks, is timed for each objective and k of ``--configs``:

- ``lib``: :class:`pyro_meta.vi.vae.VAE` (``Trace_ELBO`` for ``elbo``, ``ImportanceWeightedELBO`` for
  ``iwae``: Pyro traces of the model and guide);
- ``ref``: the same networks and estimator written directly in torch (no traces, no distribution objects
  beyond ``Bernoulli``/``Normal`` log densities in closed form).

The two paths are interleaved within every repeat (``bench_sinusoid.time_paths``). A float64 self-check
first confirms that they compute the same loss and gradients from the same ``torch.manual_seed`` (so the
ratio compares two implementations of one estimator). Then one evaluation batch: the k = 5000 bound on
20 test images, the cost behind ``pyro-meta vi vae``'s report.

Example::

    python benchmarks/bench_vae.py                          # the full CPU run (~1 min)
    python benchmarks/bench_vae.py --quick --out /tmp/r.md  # smoke test (seconds)
"""

from __future__ import annotations

import argparse
import datetime
import math
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from bench_sinusoid import _loadavg, _rel, make_step, start_benchmark, time_paths
from torch import nn

from pyro_meta.vi.vae import VAE, ImageBatch, evaluate_bounds

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "RESULTS_vae.md"
SHARED_LOAD = 1.2


class RefVAE(nn.Module):
    """The estimator of :class:`VAE` without Pyro: shares (copies) a VAE's networks."""

    def __init__(self, vae: VAE):
        super().__init__()
        self.encoder = vae.guide.encoder
        self.decoder = vae.model.decoder
        self.latent, self.objective, self.k = vae.guide.latent, vae.objective_name, vae.k

    def loss(self, batch: ImageBatch) -> torch.Tensor:
        x = batch.x
        loc, log_scale = self.encoder(x).split(self.latent, dim=-1)
        scale = log_scale.exp()
        shape = (self.k, *loc.shape) if self.k > 1 else loc.shape
        eps = torch.empty(shape, dtype=loc.dtype).normal_()  # what Normal.rsample draws
        z = loc + eps * scale
        logits = self.decoder(z)
        log_px = -nn.functional.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)
        log_pz = (-0.5 * z.pow(2) - 0.5 * math.log(2 * math.pi)).sum(-1)
        log_qz = (-0.5 * eps.pow(2) - log_scale - 0.5 * math.log(2 * math.pi)).sum(-1)
        log_w = log_px + log_pz - log_qz
        if self.k == 1:
            log_w = log_w.unsqueeze(0)
        if self.objective == "iwae":
            bound = torch.logsumexp(log_w, 0) - math.log(log_w.shape[0])
        else:
            bound = log_w.mean(0)
        return -bound.sum() / x.shape[0]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="elbo:1,iwae:5,iwae:50,elbo:50",
                   help="objective:k pairs, comma-separated (default elbo:1,iwae:5,iwae:50,elbo:50)")
    p.add_argument("--batch", type=int, default=20, help="images per step (Burda et al.: 20)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--min-time", type=float, default=1.0, help="seconds per path per repeat")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="tiny repeats (smoke test)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    args.config_list = []
    for item in args.configs.split(","):
        obj, _, k = item.partition(":")
        if obj not in ("elbo", "iwae") or not k.isdigit() or int(k) < 1:
            p.error(f"--configs: expected objective:k with objective elbo or iwae, got {item!r}")
        args.config_list.append((obj, int(k)))
    if args.quick:
        args.repeats, args.min_time = 2, 0.05
    return args


def _batch(n: int, seed: int, dtype: torch.dtype = torch.float32) -> ImageBatch:
    g = torch.Generator().manual_seed(seed)
    return ImageBatch(torch.bernoulli(torch.rand(n, 784, generator=g)).to(dtype))


def self_check(seed: int = 3) -> list[tuple[str, float]]:
    """float64: the library's loss and every gradient against the reference's, same seed."""
    out = []
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        for obj, k in (("elbo", 1), ("iwae", 5), ("elbo", 5)):
            torch.manual_seed(0)
            vae = VAE(objective=obj, k=k)
            ref = RefVAE(vae)
            batch = _batch(8, 1, torch.float64)
            results = []
            for fn in (vae.loss, ref.loss):
                vae.zero_grad()
                torch.manual_seed(seed)
                loss = fn(batch)
                loss.backward()
                results.append((loss.detach(), [p.grad.clone() for p in vae.parameters()]))
            (l1, g1), (l2, g2) = results
            err = max([_rel(l1, l2)] + [_rel(a, b) for a, b in zip(g1, g2)])
            out.append((f"{obj}, k={k}", err))
    finally:
        torch.set_default_dtype(old)
    return out


def main(args: argparse.Namespace, argv: Sequence[str]) -> int:
    t_start, load0, info = start_benchmark(args)
    print("machine:", "; ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    checks = self_check()
    for name, err in checks:
        print(f"self-check {'ok  ' if err < 1e-9 else 'FAIL'} {name}: max rel err {err:.1e}")
    rows = []
    for obj, k in args.config_list:
        torch.manual_seed(0)
        vae = VAE(objective=obj, k=k).to(args.device)
        ref = RefVAE(vae)
        batches = [_batch(args.batch, i).to(args.device) for i in range(4)]
        paths = {"lib": make_step(vae, vae.loss, batches), "ref": make_step(ref, ref.loss, batches)}
        times = time_paths(paths, args.device, warmup=3, repeats=args.repeats, min_time=args.min_time)
        lib, refm = statistics.median(times["lib"]), statistics.median(times["ref"])
        rows.append((obj, k, lib, refm))
        print(f"{obj} k={k}: lib {lib * 1e3:.2f} ms, ref {refm * 1e3:.2f} ms, ratio {lib / refm:.2f}", flush=True)
    torch.manual_seed(0)
    vae = VAE().to(args.device)
    x = _batch(20, 9).x.to(args.device)
    evaluate_bounds(vae, x[:2], k=500, ks=(1, 500))  # warm-up
    t0 = time.perf_counter()
    evaluate_bounds(vae, x, k=5000, ks=(1, 50, 5000))
    eval_s = time.perf_counter() - t0
    load1 = _loadavg()
    lines = [
        "# VAE training step: Pyro against plain PyTorch", "",
        f"Command: `{shlex.join(['python', 'benchmarks/bench_vae.py', *argv])}`", "",
        f"Date: {datetime.date.today().isoformat()}. Machine: " + "; ".join(f"{k}: {v}" for k, v in info.items())
        + f". Load average at start / end: {load0} / {load1}"
        + (" (the machine was shared: compare ratios, not absolute times)"
           if max(float(load0.split()[0]), float(load1.split()[0])) > SHARED_LOAD else "") + ".", "",
        f"Minibatch of {args.batch} binarized 28x28 images, networks 784-200-200-50 (tanh), float32, Adam, Pyro "
        f"validation off; median over {args.repeats} interleaved repeats of at least {args.min_time:g} s each.", "",
        "Self-check (float64, same seed, loss and every gradient, max relative error): "
        + ", ".join(f"{n} {e:.1e}" for n, e in checks) + ".", "",
        "| objective | k | Pyro ms/step | plain PyTorch ms/step | ratio | images/s (Pyro) |",
        "|---|---|---|---|---|---|",
        *[f"| {o} | {k} | {lib * 1e3:.2f} | {r * 1e3:.2f} | {lib / r:.2f} | {args.batch / lib:,.0f} |"
          for o, k, lib, r in rows], "",
        f"Evaluation: the k = 5000 bound on 20 images took {eval_s:.2f} s "
        f"({eval_s / 20 * 8460 / 60:.1f} min for the 8,460 test drawings at this rate).", "",
        f"Total benchmark time: {time.perf_counter() - t_start:.0f} s.", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")
    return 0 if all(e < 1e-9 for _, e in checks) else 1


if __name__ == "__main__":
    argv = sys.argv[1:]
    sys.exit(main(parse_args(argv), argv))
