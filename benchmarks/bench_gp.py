"""Step time of the meta-learned GP (issue 27): the library's ``fit`` on the ``gp`` Pyro program against a
plain-PyTorch loop (no Pyro) training the same kernel by the same objective on the same tasks; and three
ways of batching a meta-batch's GPs in plain torch.

Both training loops: SinusoidLine tasks (5 shots, 5 queries, 25 tasks per step, drawn with
``pyro_meta.tasks.regression.SinusoidLine``), the loss ``-mean_t log p(y_support, y_query)`` under a GP with
RBF + linear + 5 periodic + 5 cosine kernels, a constant mean and a learned noise, Adam at the method's rate, gradient
norm clipped at 10 (``fit``'s default), one torch thread. The plain loop writes the kernel and the joint
Gaussian density itself (``MultivariateNormal`` with a batched Cholesky factor) and must have the library's
parameter count.

    python benchmarks/bench_gp.py            # 3,000 steps each, writes benchmarks/RESULTS_gp.md
    python benchmarks/bench_gp.py --quick    # 20 steps each: a smoke test
"""

from __future__ import annotations

import argparse
import math
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
from pyro_meta.models.gp import DEFAULT_PERIODS, JITTER, MIN_NOISE_VAR
from pyro_meta.tasks.regression import SinusoidLine
from pyro_meta.train import fit

SHOTS, QUERIES, TASKS, CLIP = 5, 5, 25, 10.0
NOTES = "<!-- notes -->"


def raw(v: float) -> nn.Parameter:
    """The unconstrained value whose softplus is ``v``."""
    return nn.Parameter(torch.tensor(v + math.log(-math.expm1(-v))))


class PlainGP(nn.Module):
    """RBF + linear + periodic + cosine components, constant mean, noise; every positive value a softplus."""

    def __init__(self, periods=DEFAULT_PERIODS):  # noqa: ANN001 - a sequence of floats
        super().__init__()
        c = len(periods)
        self.rbf = nn.ParameterList([raw(1.0), raw(1.0)])  # variance, lengthscale
        self.lin = nn.ParameterList([raw(1.0), raw(1.0)])  # variance, bias
        self.per = nn.ParameterList([nn.Parameter(torch.stack([raw(1.0 / c), raw(1.0), raw(p)]).detach())
                                     for p in periods])  # variance, lengthscale, period
        self.cos = nn.ParameterList([nn.Parameter(torch.stack([raw(1.0 / c), raw(p)]).detach())
                                     for p in periods])  # variance, period
        self.noise = raw(0.3**2 - MIN_NOISE_VAR)
        self.mean = nn.Parameter(torch.zeros(()))

    def cov(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., N, 1] -> [..., N, N]``: kernel plus noise and jitter on the diagonal."""
        d = x - x.transpose(-1, -2)  # ..., N, N (one input feature)
        v, ls = F.softplus(self.rbf[0]), F.softplus(self.rbf[1])
        k = v * torch.exp(-0.5 * (d / ls) ** 2)
        k = k + F.softplus(self.lin[0]) * (F.softplus(self.lin[1]) + x * x.transpose(-1, -2))
        for p in self.per:
            pv, pl, pp = F.softplus(p).unbind()
            k = k + pv * torch.exp(-2 * (torch.sin(math.pi * d / pp) / pl) ** 2)
        for c in self.cos:
            cv, cp = F.softplus(c).unbind()
            k = k + cv * torch.cos(2 * math.pi * d / cp)
        eye = torch.eye(x.shape[-2], dtype=x.dtype)
        return k + (MIN_NOISE_VAR + F.softplus(self.noise) + JITTER) * eye

    def nll(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean over tasks of ``-log N(y | m, C)``; ``x, y [T, N, 1]``."""
        L = torch.linalg.cholesky(self.cov(x))  # T N N
        mvn = torch.distributions.MultivariateNormal(self.mean.expand(y.shape[:-1]), scale_tril=L)
        return -mvn.log_prob(y.squeeze(-1)).mean()


def time_plain(steps: int, lr: float, seed: int = 0) -> tuple[float, int]:
    """Seconds for ``steps`` Adam steps of the plain loop, task drawing included (as in ``fit``)."""
    torch.manual_seed(seed)
    net = PlainGP()
    family, g = SinusoidLine(), torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    start = time.perf_counter()
    for _ in range(steps):
        b = family.sample(TASKS, SHOTS, QUERIES, g)
        loss = net.nll(torch.cat([b.x_support, b.x_query], 1), torch.cat([b.y_support, b.y_query], 1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), CLIP)
        opt.step()
    return time.perf_counter() - start, sum(p.numel() for p in net.parameters())


def time_library(steps: int) -> tuple[float, int, float]:
    """Seconds for ``fit`` on the gp learner (no run directory: no checkpoint files), its size, its rate."""
    from pyro_meta.run import benchmark_of

    cfg = resolve(RunConfig(benchmark="sinusoid_line", method="gp", steps=steps, threads=1))
    learner = build_learner(cfg)
    bm = benchmark_of(cfg)
    start = time.perf_counter()
    fit(learner, bm.train, steps, meta_lr=cfg.meta_lr, grad_clip=CLIP, progress=False, log_every=steps)
    return time.perf_counter() - start, sum(p.numel() for p in learner.parameters()), cfg.meta_lr


def time_batching(reps: int) -> dict[str, float]:
    """ms per loss + backward of the plain GP on one meta-batch, three ways: the batched kernel over
    ``[T, N, 1]``, ``torch.func.vmap`` of the one-task loss, and (for scale) a Python loop over tasks."""
    torch.manual_seed(0)
    net = PlainGP()
    b = SinusoidLine().sample(TASKS, SHOTS, QUERIES, torch.Generator().manual_seed(0))
    x, y = torch.cat([b.x_support, b.x_query], 1), torch.cat([b.y_support, b.y_query], 1)  # T N 1
    ways = {
        "batched": lambda: net.nll(x, y),
        "vmap": lambda: torch.func.vmap(lambda xt, yt: _nll1(net, xt, yt))(x, y).mean(),
        "loop": lambda: torch.stack([net.nll(x[t:t + 1], y[t:t + 1]) for t in range(TASKS)]).mean(),
    }
    out, values = {}, {}
    for name, f in ways.items():
        for _ in range(5):  # warm-up
            f().backward()
        start = time.perf_counter()
        for _ in range(reps):
            loss = f()
            loss.backward()
        out[name] = 1e3 * (time.perf_counter() - start) / reps
        values[name] = float(f().detach())
    spread = max(values.values()) - min(values.values())
    if spread > 1e-4 * max(1.0, abs(values["batched"])):
        raise SystemExit(f"the batching variants disagree: {values}")
    return out


def _nll1(net: PlainGP, xt: torch.Tensor, yt: torch.Tensor) -> torch.Tensor:
    """One task's ``-log N(y | m, C)``, ``xt, yt [N, 1]``, for vmap (no distribution object: its argument
    validation reads values, which vmap forbids)."""
    L = torch.linalg.cholesky(net.cov(xt))  # N N
    r = yt - net.mean  # N 1
    a = torch.linalg.solve_triangular(L, r, upper=False)
    n = xt.shape[-2]
    return 0.5 * (a * a).sum() + torch.log(torch.diagonal(L)).sum() + 0.5 * n * math.log(2 * math.pi)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--quick", action="store_true", help="20 steps each (a smoke test)")
    p.add_argument("--out", default=str(Path(__file__).with_name("RESULTS_gp.md")))
    args = p.parse_args(argv)
    steps = 20 if args.quick else args.steps
    torch.set_num_threads(1)
    lib_s, lib_params, lr = time_library(steps)
    plain_s, plain_params = time_plain(steps, lr)
    if plain_params != lib_params:
        raise SystemExit(f"the plain GP has {plain_params} parameters, the library's {lib_params}")
    print(f"gp: library {1e3 * lib_s / steps:.2f} ms/step ({lib_s:.1f} s), plain {1e3 * plain_s / steps:.2f} "
          f"ms/step ({plain_s:.1f} s), ratio {lib_s / plain_s:.2f}", flush=True)
    batching = time_batching(20 if args.quick else 300)
    print("batching (ms per loss + backward):", {k: round(v, 2) for k, v in batching.items()}, flush=True)
    cmd = "python benchmarks/bench_gp.py" + (" --quick" if args.quick else f" --steps {steps}")
    lines = [
        "# Meta-learned GP: the library's fit against a plain PyTorch loop",
        "",
        f"Command: `OMP_NUM_THREADS=1 {cmd}` ({steps} steps each; `benchmarks/bench_gp.py`).",
        f"Machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores (shared), "
        f"one torch thread; Python {sys.version.split()[0]}, torch {torch.__version__}.",
        f"Both: SinusoidLine, 5 shots, 5 queries, 25 tasks per step, Adam {lr:g}, gradient norm clipped at 10, task "
        "drawing included; RBF + linear + 5 periodic + 5 cosine kernels, constant mean, learned noise "
        f"({lib_params} parameters). Library: `fit` on the Pyro program (LeanTrace_ELBO, empty guide; support "
        "factor, per-point y_query site and the joint-correction factor), no run directory. Plain: "
        "`MultivariateNormal(scale_tril=cholesky(K + s^2 I)).log_prob` of support and query together.",
        "",
        "| loop | ms/step | s total |",
        "| --- | --- | --- |",
        f"| library | {1e3 * lib_s / steps:.2f} | {lib_s:.1f} |",
        f"| plain | {1e3 * plain_s / steps:.2f} | {plain_s:.1f} |",
        "",
        f"Ratio library / plain: **{lib_s / plain_s:.2f}**.",
        "",
        "Batching a meta-batch's 25 GPs (plain torch, one loss + backward, ms):",
        "",
        "| batched kernel [T, N, 1] | torch.func.vmap | Python loop over tasks |",
        "| --- | --- | --- |",
        f"| {batching['batched']:.2f} | {batching['vmap']:.2f} | {batching['loop']:.2f} |",
    ]
    out = Path(args.out)
    # the hand-written notes below the marker (training quality, restarts) survive a rerun
    notes = out.read_text(encoding="utf-8").partition(NOTES)[2] if out.is_file() else ""
    out.write_text("\n".join(lines) + "\n" + (f"\n{NOTES}{notes}" if notes else ""), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
