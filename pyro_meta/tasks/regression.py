"""Toy regression task families: MAML's sinusoids, PLATIPUS's ambiguous sinusoid-or-line tasks and
BMAML's sinusoids with a varying frequency."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .batch import TaskBatch


class ProtocolError(ValueError):
    """A protocol setting (shots, queries, ways, ...) that the benchmark cannot provide."""


def check_counts(family: str, shots: int, queries: int) -> None:
    """Shots and queries of a task family's draw: positive integers, else a :class:`ProtocolError`."""
    for what, v in (("shots", shots), ("queries", queries)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ProtocolError(f"{family}: {what} must be a positive integer, got {v!r}")


# sinusoid_bmaml's posterior quadrature: frequencies kept within PRUNE nats of the best profile likelihood,
# an AB x AB grid over (a, b) spanning +-SPAN standard deviations at each
POSTERIOR_PRUNE, POSTERIOR_SPAN, POSTERIOR_AB = 30.0, 6.0, 16


def midpoints(lo_hi: tuple[float, float], n: int) -> Tensor:
    """The ``n`` midpoints of equal cells of a uniform range, float64 (the midpoint rule)."""
    lo, hi = lo_hi
    return lo + (hi - lo) * (torch.arange(n, dtype=torch.float64) + 0.5) / n


Edges = list[tuple[dict[str, Tensor], dict[str, Tensor]]]


def uniform_grid(n: int, **ranges: tuple[float, float]) -> tuple[dict[str, Tensor], Tensor, Edges]:
    """The product midpoint grid of independent uniform parameters, ``n`` points per range: ``params``
    (values ``[n^d]``, float64), equal log weights ``[n^d]`` and each axis's cell edges (``params`` with
    that parameter at its cell's lower and upper end; see :meth:`RegressionFamily.prior_grid`)."""
    axes = torch.meshgrid(*(midpoints(r, n) for r in ranges.values()), indexing="ij")
    g = n ** len(ranges)
    params = {k: a.reshape(-1) for k, a in zip(ranges, axes)}
    edges = [({**params, k: params[k] - (hi - lo) / (2 * n)}, {**params, k: params[k] + (hi - lo) / (2 * n)})
             for k, (lo, hi) in ranges.items()]
    return params, torch.full((g,), -math.log(g), dtype=torch.float64), edges


@dataclass(frozen=True)
class RegressionFamily:
    """Base of 1-D regression task families ``y = f_task(x) + noise``.

    Each task draws its parameters, then ``shots`` support and ``queries`` query points with
    ``x ~ U[x_range]``. Evaluation tasks draw their support from a pool of :attr:`pool_size`
    points, so the test functions are the same for every shot setting; asking for more shots
    than the pool holds is a :class:`ProtocolError`.
    """

    x_range: tuple[float, float] = (-5.0, 5.0)
    noise_std: float = 0.0
    pool_size: int = 50

    name = "regression"

    def draw_params(self, n: int, g: torch.Generator) -> dict[str, Tensor]:
        raise NotImplementedError

    def function(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        """The noiseless task function. ``params`` values ``[T]``, ``x`` ``[T, N, 1]`` -> ``[T, N, 1]``."""
        raise NotImplementedError

    def prior_grid(self, n: int) -> tuple[dict[str, Tensor], Tensor, Edges] | None:
        """Quadrature of the task prior for the exact reference rows (``prior``, ``oracle``): grid points
        ``params`` (values ``[G]``, float64), their log prior weights ``[G]`` (summing to 1), ``n`` points
        per axis (the midpoint rule on each uniform range), and optionally the cells' edges: per axis a pair
        of ``params`` dicts at the lower and upper end of each point's cell along that axis. With them the
        reference rows add each cell's spread of ``f``, ``sum_axes (f(upper) - f(lower))^2 / 12``, to its
        point (the midpoint rule's points as cells, not spikes: what makes a noiseless family's predictive a
        smooth density). ``None``: this family cannot offer a quadrature."""
        return None

    def grid_function(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        """The task functions of every grid point at every input: ``params`` values ``[G]``, ``x [..., N, 1]``
        -> ``[..., N, G]``. Families with a :meth:`prior_grid` implement it."""
        raise NotImplementedError

    def posterior_grid(self, x_support: Tensor, y_support: Tensor, n: int
                       ) -> tuple[dict[str, Tensor], Tensor, Edges] | None:
        """A quadrature of one task's exact posterior given its support ``[N, 1]`` each: grid points
        (values ``[G]``, float64), their normalized log weights ``[G]`` and the cells' edges (as for
        :meth:`prior_grid`), for a posterior too narrow for
        :meth:`prior_grid` weighted by the likelihood (near-noiseless support). ``n`` sets its resolution.
        ``None`` (the default): the ``oracle`` row weights :meth:`prior_grid` by the Gaussian likelihood of
        :attr:`noise_std` instead."""
        return None

    def draw_x(self, n: int, m: int, g: torch.Generator) -> Tensor:
        """Inputs of ``n`` tasks, ``m`` points each, ``[n, m, 1]``: uniform on :attr:`x_range`. Override
        it (and :meth:`draw_params`, :meth:`function`) for another input distribution."""
        lo, hi = self.x_range
        return lo + (hi - lo) * torch.rand(n, m, 1, generator=g)  # T N 1

    def _y(self, params: dict[str, Tensor], x: Tensor, g: torch.Generator) -> Tensor:
        y = self.function(params, x)
        if self.noise_std > 0:
            y = y + self.noise_std * torch.randn(y.shape, generator=g)
        return y

    def check(self, shots: int, queries: int) -> None:
        check_counts(self.name, shots, queries)

    def sample(self, num_tasks: int, shots: int, queries: int, g: torch.Generator) -> TaskBatch:
        """Fresh training tasks: ``num_tasks`` tasks of ``shots`` support and ``queries`` query points."""
        self.check(shots, queries)
        params = self.draw_params(num_tasks, g)
        x = self.draw_x(num_tasks, shots + queries, g)
        y = self._y(params, x, g)
        return TaskBatch(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:], params)

    def fixed(self, num_tasks: int, shots: int, queries: int, seed: int) -> TaskBatch:
        """Seeded evaluation tasks: the same functions, pool and query points for every ``shots``."""
        self.check(shots, queries)
        if shots > self.pool_size:
            raise ProtocolError(
                f"{self.name}: asked for {shots} shots, but each evaluation task provides "
                f"{self.pool_size} support points"
            )
        g = torch.Generator().manual_seed(seed)
        params = self.draw_params(num_tasks, g)
        xs = self.draw_x(num_tasks, self.pool_size, g)
        ys = self._y(params, xs, g)
        xq = self.draw_x(num_tasks, queries, g)
        yq = self._y(params, xq, g)
        return TaskBatch(xs[:, :shots], ys[:, :shots], xq, yq, params)


@dataclass(frozen=True)
class Sinusoid(RegressionFamily):
    """MAML's sinusoids (Finn et al., 2017): ``y = A sin(x + p)``, ``A ~ U[0.1, 5]``, ``p ~ U[0, pi]``,
    ``x ~ U[-5, 5]``, no noise."""

    amplitude: tuple[float, float] = (0.1, 5.0)
    phase: tuple[float, float] = (0.0, math.pi)
    name = "sinusoid"

    def draw_params(self, n: int, g: torch.Generator) -> dict[str, Tensor]:
        a0, a1 = self.amplitude
        p0, p1 = self.phase
        return {
            "amplitude": a0 + (a1 - a0) * torch.rand(n, generator=g),
            "phase": p0 + (p1 - p0) * torch.rand(n, generator=g),
        }

    def function(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        a = params["amplitude"][:, None, None]
        p = params["phase"][:, None, None]
        return a * torch.sin(x + p)

    def prior_grid(self, n: int) -> tuple[dict[str, Tensor], Tensor]:
        """``n x n`` midpoints over (amplitude, phase), equal weights, with the cells' edges."""
        return uniform_grid(n, amplitude=self.amplitude, phase=self.phase)

    def grid_function(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        return params["amplitude"] * torch.sin(x.to(torch.float64) + params["phase"])  # ... N G


@dataclass(frozen=True)
class SinusoidLine(RegressionFamily):
    """PLATIPUS's ambiguous tasks (Finn et al., 2018): each task is, with probability 1/2, a sinusoid
    (MAML's ranges) or a line with slope and intercept ``~ U[-3, 3]``; ``x ~ U[-5, 5]``; noise std 0.3."""

    noise_std: float = 0.3
    amplitude: tuple[float, float] = (0.1, 5.0)
    phase: tuple[float, float] = (0.0, math.pi)
    slope: tuple[float, float] = (-3.0, 3.0)
    intercept: tuple[float, float] = (-3.0, 3.0)
    name = "sinusoid_line"

    def draw_params(self, n: int, g: torch.Generator) -> dict[str, Tensor]:
        def u(lo_hi: tuple[float, float]) -> Tensor:
            return lo_hi[0] + (lo_hi[1] - lo_hi[0]) * torch.rand(n, generator=g)

        return {
            "is_line": (torch.rand(n, generator=g) < 0.5).float(),
            "amplitude": u(self.amplitude),
            "phase": u(self.phase),
            "slope": u(self.slope),
            "intercept": u(self.intercept),
        }

    def function(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        def c(k: str) -> Tensor:
            return params[k][:, None, None]

        sine = c("amplitude") * torch.sin(x + c("phase"))
        line = c("slope") * x + c("intercept")
        return torch.where(c("is_line") > 0.5, line, sine)

    def prior_grid(self, n: int) -> tuple[dict[str, Tensor], Tensor]:
        """``n x n`` midpoints over (amplitude, phase) for the sines and over (slope, intercept) for the
        lines, each class 1/2 of the prior mass: ``G = 2 n^2`` points of equal weight. The unused pair of a
        class is set to 0 (its function ignores them)."""
        sine, _, sine_edges = uniform_grid(n, amplitude=self.amplitude, phase=self.phase)
        line, _, line_edges = uniform_grid(n, slope=self.slope, intercept=self.intercept)
        zeros = torch.zeros(n * n, dtype=torch.float64)

        def both(s: dict[str, Tensor], li: dict[str, Tensor]) -> dict[str, Tensor]:  # sines first, then lines
            return {"is_line": torch.cat([zeros, torch.ones(n * n, dtype=torch.float64)]),
                    "amplitude": torch.cat([s["amplitude"], zeros]), "phase": torch.cat([s["phase"], zeros]),
                    "slope": torch.cat([zeros, li["slope"]]), "intercept": torch.cat([zeros, li["intercept"]])}

        edges = [(both(se[0], le[0]), both(se[1], le[1])) for se, le in zip(sine_edges, line_edges)]
        return both(sine, line), torch.full((2 * n * n,), -math.log(2 * n * n), dtype=torch.float64), edges

    def grid_function(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        x = x.to(torch.float64)  # ... N 1, broadcast against the grid's last dim
        sine = params["amplitude"] * torch.sin(x + params["phase"])
        line = params["slope"] * x + params["intercept"]
        return torch.where(params["is_line"] > 0.5, line, sine)  # ... N G


@dataclass(frozen=True)
class SinusoidBMAML(RegressionFamily):
    """BMAML's sinusoids (Yoon et al., NeurIPS 2018; their code): ``y = A sin(w x + p)``, ``A ~ U[0.1, 5]``,
    frequency ``w ~ U[0.5, 2]``, ``p ~ U[0, 2 pi]``, ``x ~ U[-5, 5]``; observation noise of std
    ``noise_fraction * A`` (0.01 A) on the training tasks' targets and on the evaluation tasks' support
    set, while the evaluation tasks' query targets are noiseless, as in their code."""

    amplitude: tuple[float, float] = (0.1, 5.0)
    frequency: tuple[float, float] = (0.5, 2.0)
    phase: tuple[float, float] = (0.0, 2 * math.pi)
    noise_fraction: float = 0.01
    name = "sinusoid_bmaml"

    def draw_params(self, n: int, g: torch.Generator) -> dict[str, Tensor]:
        def u(lo_hi: tuple[float, float]) -> Tensor:
            return lo_hi[0] + (lo_hi[1] - lo_hi[0]) * torch.rand(n, generator=g)

        return {"amplitude": u(self.amplitude), "frequency": u(self.frequency), "phase": u(self.phase)}

    def function(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        def c(k: str) -> Tensor:
            return params[k][:, None, None]

        return c("amplitude") * torch.sin(c("frequency") * x + c("phase"))

    def _y(self, params: dict[str, Tensor], x: Tensor, g: torch.Generator) -> Tensor:
        y = self.function(params, x)
        return y + self.noise_fraction * params["amplitude"][:, None, None] * torch.randn(y.shape, generator=g)

    def prior_grid(self, n: int) -> tuple[dict[str, Tensor], Tensor]:
        """``n^3`` midpoints over (amplitude, frequency, phase), equal weights, with the cells' edges."""
        return uniform_grid(n, amplitude=self.amplitude, frequency=self.frequency, phase=self.phase)

    def grid_function(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        return params["amplitude"] * torch.sin(params["frequency"] * x.to(torch.float64) + params["phase"])

    def posterior_grid(self, x_support: Tensor, y_support: Tensor, n: int) -> tuple[dict[str, Tensor], Tensor, Edges]:
        """The exact posterior of ``(A, w, p)`` given ``N >= 3`` support points with noise ``0.01 A``, by an
        adaptive quadrature that uses the model's structure: for a fixed frequency ``w`` the function
        ``a sin(w x) + b cos(w x)`` (``a = A cos p``, ``b = A sin p``) is linear in ``(a, b)``.

        1. ``n`` midpoints over the frequency range; at each, least squares gives ``(a, b)`` and a profile
           log likelihood (noise ``0.01 |(a, b)|``); frequencies more than :data:`POSTERIOR_PRUNE` nats below
           the best are dropped (their posterior mass is below ``e^-PRUNE`` of the mode's).
        2. At each kept frequency, a ``m x m`` midpoint grid over ``(a, b)`` of +-:data:`POSTERIOR_SPAN` standard
           deviations along the least-squares covariance's principal axes (``m`` = :data:`POSTERIOR_AB`).
        3. Every point's exact log weight: the prior density in ``(a, b, w)`` (``1 / A`` on the annulus
           ``0.1 <= A <= 5``, from the uniform ``A`` and ``p``), the exact Gaussian likelihood with noise
           ``0.01 A`` at that point, and its cell's volume; the points more than ``PRUNE`` nats below the
           largest dropped; normalized.
        """
        x = x_support.reshape(-1).to(torch.float64)
        y = y_support.reshape(-1).to(torch.float64)
        if x.numel() < 3:
            raise ValueError(f"{self.name}: the oracle needs at least 3 support points (with fewer, the posterior "
                             "spreads along a curve that this quadrature does not follow)")
        w = midpoints(self.frequency, n)  # W
        dw = (self.frequency[1] - self.frequency[0]) / n
        sn, cs = torch.sin(w[:, None] * x), torch.cos(w[:, None] * x)  # W N
        m = torch.stack([torch.stack([(sn * sn).sum(-1), (sn * cs).sum(-1)], -1),
                         torch.stack([(sn * cs).sum(-1), (cs * cs).sum(-1)], -1)], -2)  # W 2 2
        rhs = torch.stack([(sn * y).sum(-1), (cs * y).sum(-1)], -1)  # W 2
        ab = torch.linalg.solve(m, rhs)  # W 2
        sigma = (self.noise_fraction * ab.norm(dim=-1)).clamp(min=self.noise_fraction * self.amplitude[0])  # W
        rss = ((y - ab[:, :1] * sn - ab[:, 1:] * cs) ** 2).sum(-1)
        profile = -0.5 * rss / sigma**2 - x.numel() * sigma.log()
        keep = profile >= profile.max() - POSTERIOR_PRUNE
        w, ab, sigma, m = w[keep], ab[keep], sigma[keep], m[keep]
        # the least-squares covariance sigma^2 M^-1, its principal axes scaled by their standard deviations
        evals, evecs = torch.linalg.eigh(torch.linalg.inv(m))  # K 2, K 2 2
        axes = evecs * (sigma[:, None, None] * evals.clamp(min=0).sqrt()[:, None, :])  # K 2 2: columns
        u = midpoints((-POSTERIOR_SPAN, POSTERIOR_SPAN), POSTERIOR_AB)
        uu, vv = torch.meshgrid(u, u, indexing="ij")
        uv = torch.stack([uu.reshape(-1), vv.reshape(-1)], -1)  # m^2 2
        pts = ab[:, None, :] + uv @ axes.transpose(-1, -2)  # K m^2 2
        du = 2 * POSTERIOR_SPAN / POSTERIOR_AB
        log_cell = math.log(dw * du * du) + torch.log(torch.linalg.det(axes).abs())  # K
        a, b = pts[..., 0], pts[..., 1]
        amp = torch.hypot(a, b)
        lo, hi = self.amplitude
        f = a[..., None] * sn[keep][:, None, :] + b[..., None] * cs[keep][:, None, :]  # K m^2 N
        s2 = (self.noise_fraction * amp) ** 2
        log_lik = (-0.5 * (y - f) ** 2 / s2[..., None]).sum(-1) - 0.5 * x.numel() * torch.log(2 * math.pi * s2)
        log_prior = torch.where((amp >= lo) & (amp <= hi), -torch.log(amp), torch.full_like(amp, -math.inf))
        log_w = (log_lik + log_prior + log_cell[:, None]).reshape(-1)
        freq = w[:, None].expand_as(amp)

        def at(ab_pts: Tensor, f_w: Tensor) -> dict[str, Tensor]:
            return {"amplitude": torch.hypot(ab_pts[..., 0], ab_pts[..., 1]).reshape(-1), "frequency": f_w.reshape(-1),
                    "phase": torch.remainder(torch.atan2(ab_pts[..., 1], ab_pts[..., 0]), 2 * math.pi).reshape(-1)}

        params = at(pts, freq)
        # the cells' edges: along the frequency, and along each principal axis of (a, b)
        edges = [(at(pts, freq - dw / 2), at(pts, freq + dw / 2))]
        edges += [(at(pts - du / 2 * axes[:, None, :, j], freq), at(pts + du / 2 * axes[:, None, :, j], freq))
                  for j in range(2)]
        # the points of negligible weight go (at most G e^-PRUNE of the mass; they only cost sorting time)
        some = log_w >= log_w.max() - POSTERIOR_PRUNE

        def keep(d: dict[str, Tensor]) -> dict[str, Tensor]:
            return {k: v[some] for k, v in d.items()}

        return keep(params), torch.log_softmax(log_w[some], -1), [(keep(lo), keep(hi)) for lo, hi in edges]

    def fixed(self, num_tasks: int, shots: int, queries: int, seed: int) -> TaskBatch:
        """Seeded evaluation tasks with a noisy support pool and noiseless query targets."""
        b = super().fixed(num_tasks, shots, queries, seed)
        return TaskBatch(b.x_support, b.y_support, b.x_query, self.function(b.info, b.x_query), b.info)
