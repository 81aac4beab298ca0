"""Stein variational gradient descent: a kernel that keeps repulsion in high dimension, usable both by
``pyro.infer.SVGD`` and by a differentiable SVGD step (BMAML's inner loop).

SVGD (Liu & Wang, NeurIPS 2016) moves ``N`` particles ``x_n`` along

    phi(x_n) = (1/N) sum_m [ k(x_m, x_n) grad log p(x_m) + grad_{x_m} k(x_m, x_n) ],

the first term driving each particle uphill (kernel-smoothed), the second repelling it from its
neighbours. Pyro's ``RBFSteinKernel`` takes one bandwidth per dimension; in
``SVGD(mode="multivariate")`` the kernel is then a product over ``D`` factors, each of order
``exp(-log(N+1))`` at a typical distance, so at ``D`` in the tens the off-diagonal kernel is ~0 and the
repulsion vanishes (measured in ``experiments/svgd_collapse.py``). :class:`ScalarRBFKernel` uses one
bandwidth for all dimensions, ``h = median_{i<j} ||x_i - x_j||^2 / log(N + 1)`` (Liu & Wang's
heuristic), so a typical pair keeps ``k = 1/(N+1)`` at any ``D``.

Shapes: every function here works on particles ``[..., N, D]`` (leading dims are independent sets of
particles, e.g. one set per task); the kernel's bandwidth is computed per set and detached.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from pyro.infer.svgd import SteinKernel
from torch import Tensor

from .adapt import sgd_adapt

__all__ = ["ScalarRBFKernel", "svgd_adapt", "svgd_direction", "svgd_step"]


def _centred_sq_dists(particles: Tensor) -> tuple[Tensor, Tensor]:
    """The particles centred at their mean ``[..., N, D]``, and ``||x_n - x_m||^2`` ``[..., N, N]`` in
    ``O(N^2 + N D)`` memory: ``|a|^2 + |b|^2 - 2 a.b`` on the centred particles (centring keeps the
    cancellation small: the norms are then of the order of the distances), clamped at 0, with an exact
    zero diagonal. The explicit differences ``[..., N, N, D]`` cost ``N`` times the particles' memory
    and, on the autograd graph, most of a BMAML step at ``M = 20`` (benchmarks/RESULTS_bmaml.md)."""
    c = particles - particles.mean(-2, keepdim=True)
    sq = c.pow(2).sum(-1)  # ..., N
    d2 = (sq.unsqueeze(-1) + sq.unsqueeze(-2) - 2.0 * (c @ c.transpose(-1, -2))).clamp(min=0.0)
    n = particles.shape[-2]
    return c, d2 * (1.0 - torch.eye(n, dtype=d2.dtype, device=d2.device))


class ScalarRBFKernel(SteinKernel):
    """``k(x, y) = exp(-||x - y||^2 / h)`` with one bandwidth for all dimensions,

        h = bandwidth_factor * median_{i<j} ||x_i - x_j||^2 / log(N + log_offset),

    detached from the graph (as in Liu & Wang's and BMAML's code). ``log_offset=1`` is Liu & Wang's
    ``log(N + 1)``; BMAML's code uses ``log N`` (``log_offset=0``, which needs ``N >= 2``).

    A :class:`pyro.infer.svgd.SteinKernel`: pass it to ``pyro.infer.SVGD(..., mode="multivariate")``.
    Unlike Pyro's kernels, :meth:`log_kernel_and_grad` is not under ``no_grad`` and accepts leading batch
    dims, and :meth:`kernel_and_repulsion` gives the two SVGD ingredients in ``O(N^2 + N D)`` memory.

    :param bandwidth_factor: scale on the median heuristic (> 0).
    :param log_offset: ``c`` in ``log(N + c)``.
    :param min_bandwidth: floor of ``h`` (all particles at one point give a zero median).
    :param bandwidth: a fixed ``h`` instead of the median heuristic (the heuristic's ``h`` is detached, so a
        finite-difference check of a gradient through SVGD steps needs it fixed).
    """

    def __init__(self, bandwidth_factor: float = 1.0, log_offset: float = 1.0, min_bandwidth: float = 1e-12,
                 bandwidth: float | None = None):
        if bandwidth is not None and not (bandwidth > 0 and math.isfinite(bandwidth)):
            raise ValueError(f"bandwidth must be a positive finite number or None, got {bandwidth!r}")
        self.fixed_bandwidth = bandwidth
        if not (bandwidth_factor > 0 and math.isfinite(bandwidth_factor)):
            raise ValueError(f"bandwidth_factor must be a positive finite number, got {bandwidth_factor!r}")
        if not (math.isfinite(log_offset) and log_offset >= 0):
            raise ValueError(f"log_offset must be a finite number >= 0, got {log_offset!r}")
        if not (min_bandwidth > 0 and math.isfinite(min_bandwidth)):
            raise ValueError(f"min_bandwidth must be a positive finite number, got {min_bandwidth!r}")
        self.bandwidth_factor, self.log_offset, self.min_bandwidth = bandwidth_factor, log_offset, min_bandwidth

    def bandwidth(self, particles: Tensor, sq_dists: Tensor | None = None) -> Tensor:
        """``h`` per set of particles, ``[...]``, detached. One particle: ``h = 1`` (no repulsion to scale)."""
        n = particles.shape[-2]
        if self.fixed_bandwidth is not None:
            return particles.new_full(particles.shape[:-2], self.fixed_bandwidth)
        if n < 2:
            return particles.new_ones(particles.shape[:-2])
        d2 = (_centred_sq_dists(particles)[1] if sq_dists is None else sq_dists).detach()
        iu = torch.triu_indices(n, n, offset=1, device=particles.device)
        pairs = d2[..., iu[0], iu[1]]  # ..., N(N-1)/2
        med = torch.quantile(pairs, 0.5, dim=-1)  # numpy's median (the mean of the two middle values)
        h = self.bandwidth_factor * med / math.log(n + self.log_offset)
        return h.clamp(min=self.min_bandwidth)

    def kernel_and_repulsion(self, particles: Tensor) -> tuple[Tensor, Tensor]:
        """``K [..., N, N]`` with ``K[n, m] = k(x_m, x_n)``, and the repulsive term
        ``sum_m grad_{x_m} k(x_m, x_n) = (2 / h) (x_n sum_m K[n, m] - sum_m K[n, m] x_m)`` ``[..., N, D]``,
        formed on the particles centred at their mean (it is translation invariant; uncentred, float32
        cancellation cost 3% far from the origin, ``tests/test_svgd.py``)."""
        c, d2 = _centred_sq_dists(particles)
        h = self.bandwidth(particles, d2).unsqueeze(-1).unsqueeze(-1)  # ..., 1, 1
        k = torch.exp(-d2 / h)
        repulsion = (2.0 / h) * (c * k.sum(-1, keepdim=True) - k @ c)
        return k, repulsion

    def log_kernel_and_grad(self, particles: Tensor) -> tuple[Tensor, Tensor]:
        """Pyro's interface: ``(log_kernel, kernel_grad)``, each ``[..., N, N, D]``, with
        ``log_kernel.sum(-1) = log k`` and ``kernel_grad[n, m] = d log k(x_m, x_n) / d x_n =
        2 (x_m - x_n) / h`` (Pyro's sign convention)."""
        delta = particles.unsqueeze(-3) - particles.unsqueeze(-2)  # x_m - x_n
        sq = delta.pow(2)
        h = self.bandwidth(particles, sq.sum(-1))[..., None, None, None]
        return -sq / h, 2.0 * delta / h

    def __repr__(self) -> str:
        if self.fixed_bandwidth is not None:
            return f"ScalarRBFKernel(bandwidth={self.fixed_bandwidth:g})"
        return (f"ScalarRBFKernel(bandwidth_factor={self.bandwidth_factor:g}, "
                f"log_offset={self.log_offset:g})")


def svgd_direction(particles: Tensor, scores: Tensor, kernel: ScalarRBFKernel,
                   driving_weight: float | Tensor = 1.0) -> Tensor:
    """The SVGD direction ``phi(x_n)`` for particles and their scores ``grad log p``, both ``[..., N, D]``.

    :param driving_weight: a weight ``gamma`` on the driving (kernel-smoothed score) term, as in annealed
        SVGD (D'Angelo & Fortuin, 2021: ``gamma`` grows from 0 to 1 so repulsion spreads the particles
        first); 1 is plain SVGD. A tensor (one weight per set of particles) must broadcast as ``[..., 1, 1]``.
        Measured: annealing changes the path, not where the particles settle
        (``experiments/RESULTS_svgd.md``).
    """
    k, repulsion = kernel.kernel_and_repulsion(particles)
    return (driving_weight * (k @ scores) + repulsion) / particles.shape[-2]


def svgd_step(particles: Tensor, log_prob: Callable[[Tensor], Tensor], kernel: ScalarRBFKernel, lr: float,
              create_graph: bool = True, driving_weight: float | Tensor = 1.0) -> Tensor:
    """One SVGD step ``x + lr * phi(x)`` that stays on the autograd graph.

    :param log_prob: ``log_prob(particles) -> scalar``, the *sum* of every particle's log density (each
        particle's gradient is then its own score: one ``autograd.grad`` for all sets and particles).
    :param create_graph: keep second-order terms (the score's dependence on the particles).
    """
    return svgd_adapt(log_prob, particles, 1, lr, kernel, first_order=not create_graph,
                      driving_weight=driving_weight)


def svgd_adapt(log_prob: Callable[[Tensor], Tensor], particles: Tensor, steps: int, lr: float | Tensor,
               kernel: ScalarRBFKernel, first_order: bool = False, particle_dim: int = -2,
               driving_weight: float | Tensor = 1.0) -> Tensor:
    """``steps`` SVGD steps as a pure function (the particles analogue of :func:`sgd_adapt`, whose loop,
    second/first-order and ``no_grad`` handling it reuses).

    :param log_prob: ``log_prob(particles) -> scalar``: the sum over particles (and sets) of log p.
    :param particles: particles with the particle axis at ``particle_dim`` and ``D`` last, e.g. BMAML's
        ``[M, T, 1, D]`` with ``particle_dim=0``.
    :param lr: the step size, or one per coordinate ``[D]`` (broadcast over the particles).
    :param first_order: detach the scores (the kernel terms stay differentiable).
    :returns: the moved particles, same shape.
    """
    pd = particle_dim % particles.dim()
    if pd == particles.dim() - 1:
        raise ValueError("particle_dim must not be the last (feature) dimension")

    def update(cur, grads):
        (x,), (g,) = cur, grads  # g = d(-log p)/dx = -score
        xs = x.movedim(pd, -2)
        step = svgd_direction(xs, (-g).movedim(pd, -2), kernel, driving_weight)
        return (x + lr * step.movedim(-2, pd),)

    (out,) = sgd_adapt(lambda x: -log_prob(x), (particles,), steps, 0.0, first_order, update=update)
    return out
