"""Step time of the function-space peers (issue 27): the library's ``fit`` on the ``cnp`` and ``anp`` Pyro
programs against a plain-PyTorch loop (no Pyro) training the same networks on the same tasks.

Both sides: SinusoidLine tasks (5 shots, 5 queries, 25 tasks per step, drawn with
``pyro_meta.tasks.regression.SinusoidLine``), Adam 5e-4, gradient norm clipped at 10 (``fit``'s default),
one torch thread. The plain loop's networks are written here independently (the attentive one on
``torch.nn.MultiheadAttention``) and must have the library's parameter count.

    python benchmarks/bench_np.py            # 3,000 steps each, writes benchmarks/RESULTS_np.md
    python benchmarks/bench_np.py --quick    # 20 steps each: a smoke test
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from pyro_meta.config import RunConfig
from pyro_meta.methods import build_learner, resolve
from pyro_meta.tasks.regression import SinusoidLine
from pyro_meta.train import fit

SHOTS, TASKS, LR, CLIP = 5, 25, 5e-4, 10.0
NOTES = "<!-- notes -->"
WIDTH = 128


def mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])  # no ReLU after the last layer


class PlainCNP(nn.Module):
    """Encoder 4 x 128 per pair, mean over the support; decoder 4 x 128 of (x, r) to (mu, 0.01 + softplus)."""

    def __init__(self):
        super().__init__()
        self.enc = mlp([2, WIDTH, WIDTH, WIDTH, WIDTH])
        self.dec = mlp([1 + WIDTH, WIDTH, WIDTH, WIDTH, WIDTH, 2])

    def nll(self, xs, ys, xq, yq) -> torch.Tensor:  # noqa: ANN001 - tensors [T, N, 1]
        r = self.enc(torch.cat([xs, ys], -1)).mean(1, keepdim=True)  # T 1 R
        out = self.dec(torch.cat([xq, r.expand(-1, xq.shape[1], -1)], -1))  # T Q 2
        mu, sigma = out[..., :1], 0.01 + F.softplus(out[..., 1:])
        return -torch.distributions.Normal(mu, sigma).log_prob(yq).sum((1, 2)).mean()


class PlainANP(nn.Module):
    """Encoder 3 x 128 per pair, 2 self-attention layers (LayerNorm of residual + 8-head attention),
    8-head cross-attention from a 2-layer embedding of the query x to that of the support x; the CNP's decoder."""

    def __init__(self):
        super().__init__()
        self.enc = mlp([2, WIDTH, WIDTH, WIDTH])
        self.self_att = nn.ModuleList(nn.MultiheadAttention(WIDTH, 8, batch_first=True) for _ in range(2))
        self.self_norm = nn.ModuleList(nn.LayerNorm(WIDTH) for _ in range(2))
        self.embed = mlp([1, WIDTH, WIDTH])
        self.cross = nn.MultiheadAttention(WIDTH, 8, batch_first=True)
        self.cross_norm = nn.LayerNorm(WIDTH)
        self.dec = mlp([1 + WIDTH, WIDTH, WIDTH, WIDTH, WIDTH, 2])

    def nll(self, xs, ys, xq, yq) -> torch.Tensor:  # noqa: ANN001 - tensors [T, N, 1]
        h = self.enc(torch.cat([xs, ys], -1))  # T S W
        for att, norm in zip(self.self_att, self.self_norm):
            h = norm(h + att(h, h, h, need_weights=False)[0])
        q, k = self.embed(xq), self.embed(xs)  # T Q W, T S W
        r = self.cross_norm(q + self.cross(q, k, h, need_weights=False)[0])  # T Q W
        out = self.dec(torch.cat([xq, r], -1))  # T Q 2
        mu, sigma = out[..., :1], 0.01 + F.softplus(out[..., 1:])
        return -torch.distributions.Normal(mu, sigma).log_prob(yq).sum((1, 2)).mean()


def time_plain(net: nn.Module, steps: int, queries: int, seed: int = 0) -> float:
    """Seconds for ``steps`` Adam steps of the plain loop, task drawing included (as in ``fit``)."""
    family, g = SinusoidLine(), torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    start = time.perf_counter()
    for _ in range(steps):
        b = family.sample(TASKS, SHOTS, queries, g)
        loss = net.nll(b.x_support, b.y_support, b.x_query, b.y_query)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), CLIP)
        opt.step()
    return time.perf_counter() - start


def time_library(method: str, steps: int) -> tuple[float, int, int]:
    """Seconds for ``fit`` on the method's learner (no run directory: no checkpoint files), its size, and the
    query points per training task (the method's default: CNP 45, ANP the benchmark's 5)."""
    from pyro_meta.run import benchmark_of

    cfg = resolve(RunConfig(benchmark="sinusoid_line", method=method, steps=steps, threads=1))
    learner = build_learner(cfg)
    bm = benchmark_of(cfg)
    start = time.perf_counter()
    fit(learner, bm.train, steps, meta_lr=cfg.meta_lr, grad_clip=CLIP, progress=False, log_every=steps)
    return time.perf_counter() - start, sum(p.numel() for p in learner.parameters()), cfg.queries


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--quick", action="store_true", help="20 steps each (a smoke test)")
    p.add_argument("--out", default=str(Path(__file__).with_name("RESULTS_np.md")))
    args = p.parse_args(argv)
    steps = 20 if args.quick else args.steps
    torch.set_num_threads(1)
    rows = []
    for method, plain in (("cnp", PlainCNP), ("anp", PlainANP)):
        lib_s, lib_params, queries = time_library(method, steps)
        torch.manual_seed(0)
        net = plain()
        n_plain = sum(q.numel() for q in net.parameters())
        if n_plain != lib_params:
            raise SystemExit(f"{method}: the plain network has {n_plain} parameters, the library's {lib_params}")
        plain_s = time_plain(net, steps, queries)
        rows.append((method, lib_params, lib_s, plain_s, queries))
        print(f"{method}: library {1e3 * lib_s / steps:.2f} ms/step ({lib_s:.1f} s), plain "
              f"{1e3 * plain_s / steps:.2f} ms/step ({plain_s:.1f} s), ratio {lib_s / plain_s:.2f}", flush=True)
    cmd = "python benchmarks/bench_np.py" + (" --quick" if args.quick else f" --steps {steps}")
    lines = [
        "# Neural-process peers: the library's fit against a plain PyTorch loop",
        "",
        f"Command: `OMP_NUM_THREADS=1 {cmd}` ({steps} steps each; `benchmarks/bench_np.py`).",
        f"Machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores (shared), "
        f"one torch thread; Python {sys.version.split()[0]}, torch {torch.__version__}.",
        "Both: SinusoidLine, 5 shots, the method's training queries (CNP 45, ANP 5), 25 tasks per step, Adam 5e-4, gradient norm clipped at 10, task "
        "drawing included; the same architecture and parameter count. Library: `fit` on the Pyro program "
        "(LeanTrace_ELBO, empty guide), no run directory. The attention differs in kernel only: the library's "
        "ANP calls F.scaled_dot_product_attention, the plain loop torch.nn.MultiheadAttention (same projections, "
        "same parameter count).",
        "",
        "| method | queries | parameters | library ms/step | plain ms/step | ratio | library s | plain s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for method, n, lib_s, plain_s, queries in rows:
        lines.append(f"| {method} | {queries} | {n} | {1e3 * lib_s / steps:.2f} | {1e3 * plain_s / steps:.2f} | "
                     f"{lib_s / plain_s:.2f} | {lib_s:.1f} | {plain_s:.1f} |")
    out = Path(args.out)
    # the hand-written notes below the marker (training quality) survive a rerun
    notes = out.read_text(encoding="utf-8").partition(NOTES)[2] if out.is_file() else ""
    out.write_text("\n".join(lines) + "\n" + (f"\n{NOTES}{notes}" if notes else ""), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
