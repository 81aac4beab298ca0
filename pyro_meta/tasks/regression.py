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


def midpoints(lo_hi: tuple[float, float], n: int) -> Tensor:
    """The ``n`` midpoints of equal cells of a uniform range, float64 (the midpoint rule)."""
    lo, hi = lo_hi
    return lo + (hi - lo) * (torch.arange(n, dtype=torch.float64) + 0.5) / n


def uniform_grid(n: int, **ranges: tuple[float, float]) -> tuple[dict[str, Tensor], Tensor]:
    """The product midpoint grid of independent uniform parameters, ``n`` points per range: ``params``
    (values ``[n^d]``, float64) and equal log weights ``[n^d]``."""
    axes = torch.meshgrid(*(midpoints(r, n) for r in ranges.values()), indexing="ij")
    g = n ** len(ranges)
    return ({k: a.reshape(-1) for k, a in zip(ranges, axes)},
            torch.full((g,), -math.log(g), dtype=torch.float64))


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

    def prior_grid(self, n: int) -> tuple[dict[str, Tensor], Tensor] | None:
        """Quadrature of the task prior for the exact reference rows (``prior``, ``oracle``): grid points
        ``params`` (values ``[G]``, float64) and their log prior weights ``[G]`` (summing to 1), ``n`` points
        per axis (the midpoint rule on each uniform range). ``None``: this family cannot offer one."""
        return None

    def grid_function(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        """The task functions of every grid point at every input: ``params`` values ``[G]``, ``x [..., N, 1]``
        -> ``[..., N, G]``. Families with a :meth:`prior_grid` implement it."""
        raise NotImplementedError

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
        """``n x n`` midpoints over (amplitude, phase), equal weights."""
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
        sine = uniform_grid(n, amplitude=self.amplitude, phase=self.phase)[0]
        line = uniform_grid(n, slope=self.slope, intercept=self.intercept)[0]
        zeros = torch.zeros(n * n, dtype=torch.float64)
        params = {
            "is_line": torch.cat([zeros, torch.ones(n * n, dtype=torch.float64)]),
            "amplitude": torch.cat([sine["amplitude"], zeros]), "phase": torch.cat([sine["phase"], zeros]),
            "slope": torch.cat([zeros, line["slope"]]), "intercept": torch.cat([zeros, line["intercept"]]),
        }
        return params, torch.full((2 * n * n,), -math.log(2 * n * n), dtype=torch.float64)

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
        """``n^3`` midpoints over (amplitude, frequency, phase), equal weights."""
        return uniform_grid(n, amplitude=self.amplitude, frequency=self.frequency, phase=self.phase)

    def grid_function(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        return params["amplitude"] * torch.sin(params["frequency"] * x.to(torch.float64) + params["phase"])

    def fixed(self, num_tasks: int, shots: int, queries: int, seed: int) -> TaskBatch:
        """Seeded evaluation tasks with a noisy support pool and noiseless query targets."""
        b = super().fixed(num_tasks, shots, queries, seed)
        return TaskBatch(b.x_support, b.y_support, b.x_query, self.function(b.info, b.x_query), b.info)
