"""The reference rows of the regression scoreboards: what knowing the task distribution buys.

Both need no training, only the family's generative process (:meth:`RegressionFamily.prior_grid`, a
midpoint quadrature of the task prior, and the family's observation noise):

- ``prior``: the family's prior predictive, which ignores the support set: at a query input ``x`` the
  law of ``y`` is ``sum_g w_g N(y; f_g(x), sigma^2)`` over the grid ``g`` of task parameters with prior
  weights ``w_g``.
- ``oracle``: the exact posterior predictive given the support set: the same mixture with the posterior
  weights ``w_g ∝ prior_g prod_n N(y_n; f_g(x_n), sigma^2)`` (float64).

The grid has ``2 n^2`` points (20,000 for ``sinusoid_line`` at ``n = 100``), too many components to carry
for every query point of every test task, and a broad posterior (an ambiguous task) needs thousands of
them: keeping the largest weights lost up to 86% of the mass on ``sinusoid_line`` with 256 of 80,000
kept. So each point's mixture is compressed into ``K`` components of equal mass
(:func:`equal_mass_strata`: the values ``f_g(x)`` sorted and cut at the mass levels ``j/K``, each stratum a
Normal with the stratum's mean and the noise plus the stratum's variance of ``f``: the stratum's first two
moments). Refining ``n`` (100 to 200) or ``K`` (256 to 512) moved the oracle's NLL on 100 test tasks by
at most 0.0001 (``experiments/RESULTS_reference.md``). The strata are per point, so the joint predictive
of a task's query points is not represented: the evaluator reports the pointwise log predictive density
only (``pointwise_only``).

A family without a quadrature of its prior (a user's own, ``custom``) gets the ``prior`` row by Monte
Carlo instead: a pool of ``(x, y)`` pairs drawn once from its own sampler (fixed seed), and at each query
input the ``y`` of the pool's ``k`` nearest inputs, as equal-weight values cut into the same strata, each
widened by a kernel (half Silverman's bandwidth of the neighbours' ``y``). It
converges to the prior predictive as the pool grows and ``k / pool`` shrinks (``tests/test_reference.py``
compares it with the quadrature on ``sinusoid_line``); the neighbourhood's width in ``x`` is its bias.

Each quadrature point stands for its cell: where the family gives the cells' edges
(:meth:`RegressionFamily.prior_grid`), the spread of ``f`` across a point's cell (``sum_axes (f(upper) -
f(lower))^2 / 12``) is added to its point's variance. Without it a noiseless family's predictive is a
comb of spikes (``sinusoid_bmaml``'s oracle moved by 0.21 nats/point from a 16 x 16 to a 24 x 24 (a, b)
grid; with it by 0.004). On a grid of uniform cells (a uniform prior) it is exact; on a posterior grid,
whose weights vary within a cell, it widens the predictive a little (``sinusoid_bmaml``'s oracle: 1.5%
in std against a brute-force quadrature, ``tests/test_reference.py``).

Noiseless query targets (``sinusoid``, ``sinusoid_bmaml``'s test queries) have a prior predictive with a
density (the law of ``f(x)`` over the task prior); a stratum that holds a single quadrature value would
be a point mass, so each stratum's variance has a floor of ``(1e-3 (max f - min f))^2`` per point.

Each is a Pyro model whose ``y_query`` site is a ``MixtureSameFamily`` of Normals (the evaluator reads its
components as weighted draws: :class:`pyro_meta.evaluate.Prediction`'s ``log_weights``), with a guide
that has nothing to infer.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn

from ..tasks import TaskBatch
from ..tasks.regression import RegressionFamily
from .base import POINT_DIM, full_plate, tasks_plate

REFERENCE_KINDS = ("prior", "oracle")
# the Monte Carlo prior of a family without a quadrature: pool tasks x points per task, neighbours per query
POOL_TASKS, POOL_POINTS, NEIGHBOURS, POOL_SEED = 8000, 25, 1000, 3_000_017
# ... and its strata per point, each widened by a kernel of BANDWIDTH x Silverman's bandwidth: without it the
# strata of draws are a bumpy density (256 strata of 500 draws scored sinusoid_line 2.9 nats/point worse
# than the quadrature; 24 strata 0.06 worse; 64 strata at half Silverman's bandwidth 0.011 worse, 100 tasks)
MC_COMPONENTS = 64
BANDWIDTH = 0.5  # x Silverman's rule: measured on sinusoid_line, 0.011 nats/point above the quadrature (1.0: 0.021)
SCALE_FLOOR = 1e-3  # noiseless targets: each stratum's std at least this fraction of the point's range of f


class ReferenceModel(nn.Module):
    """``y_query ~`` the exact prior (``kind="prior"``) or posterior (``"oracle"``) predictive of
    ``family`` by quadrature on an ``n x n`` grid per parameter pair, ``K`` components per point.

    :param task_chunk: tasks whose grid weights are computed at once (memory: ``task_chunk * points * G``
        float64 values, ``G = 2 n^2`` for ``sinusoid_line``).

    After each call, ``last_info`` holds, for the oracle on a family with an ``is_line`` parameter,
    ``p_line`` ``[T]``: each task's posterior probability of being a line.
    """

    def __init__(self, family: RegressionFamily, kind: str, n: int = 200, components: int = 256,
                 task_chunk: int = 2, posterior_n: int = 8000):
        super().__init__()
        if kind not in REFERENCE_KINDS:
            raise ValueError(f"kind must be one of {REFERENCE_KINDS}, got {kind!r}")
        grid = family.prior_grid(n) if hasattr(family, "prior_grid") else None
        if grid is None and kind == "oracle":
            raise ValueError(f"task family {family.name!r} offers no quadrature of its prior (prior_grid): the "
                             "oracle row needs one")
        sigma = float(getattr(family, "noise_std", 0.0) or 0.0)
        # the family's own posterior quadrature (a near-noiseless support), else the prior grid x likelihood
        self.posterior_n = posterior_n if kind == "oracle" and has_posterior_grid(family) else None
        if kind == "oracle" and not sigma > 0 and self.posterior_n is None:
            raise ValueError(oracle_refusal(family.name))
        self.family, self.kind, self.n, self.components, self.task_chunk = family, kind, n, components, task_chunk
        self.sigma = sigma
        if grid is not None:
            self.params, self.log_prior, *rest = grid
            self.edges = rest[0] if rest else []  # the cells' edges, per axis (RegressionFamily.prior_grid)
            self.pool = None
        else:  # Monte Carlo: the family's own sampler (custom families carry their noise in the draws)
            self.params, self.log_prior, self.sigma, self.edges = {}, None, 0.0, []
            self.pool = draw_pool(family)
        # the strata are per query point: the evaluator reports the pointwise log predictive density only
        self.pointwise_only = True
        self.last_info: dict[str, Tensor] = {}

    def forward(self, batch: TaskBatch) -> None:
        with torch.no_grad():  # nothing here is learned
            parts = [self._predictive(batch.select(slice(i, i + self.task_chunk)))
                     for i in range(0, batch.num_tasks, self.task_chunk)]
        logits = torch.cat([p[0] for p in parts]).to(batch.x_query.dtype)  # T Q K
        loc = torch.cat([p[1] for p in parts]).to(batch.x_query.dtype)  # T Q K
        scale = torch.cat([p[2] for p in parts]).to(batch.x_query.dtype)
        self.last_info = {k: torch.cat([p[3][k] for p in parts]) for k in parts[0][3]}
        law = dist.MixtureSameFamily(dist.Categorical(logits=logits),
                                     dist.Normal(loc.unsqueeze(-1), scale.unsqueeze(-1)).to_event(1))
        with tasks_plate(batch.num_tasks), full_plate("y_query_points", batch.num_query, POINT_DIM):
            pyro.sample("y_query", law, obs=batch.y_query)

    def _predictive(self, b: TaskBatch) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        """``(logits, loc, scale)`` of the per-point mixture, each ``[t, Q, K]``, and the task info."""
        info: dict[str, Tensor] = {}
        if self.posterior_n is not None:  # one task at a time: each has its own adaptive grid
            outs = [self._strata(*self._posterior(b.x_support[t], b.y_support[t], b.x_query[t]))
                    for t in range(b.num_tasks)]
            return (*(torch.stack([o[i] for o in outs]) for i in range(3)), info)
        if self.pool is not None:
            f_q = neighbours(self.pool, b.x_query)  # t Q k, equal weights
            w, within = torch.full_like(f_q, 1.0 / f_q.shape[-1]), None
        else:
            params = {k: v.to(b.x_query.device) for k, v in self.params.items()}
            log_w = self.log_prior.to(b.x_query.device).expand(b.num_tasks, -1)  # t G
            if self.kind == "oracle":
                f_s = self.family.grid_function(params, b.x_support)  # t N G
                y_s = b.y_support.to(torch.float64)  # t N 1
                log_lik = (-0.5 * ((y_s - f_s) / self.sigma) ** 2).sum(-2)  # t G (constants cancel)
                log_w = torch.log_softmax(log_w + log_lik, -1)
                if "is_line" in params:
                    line = params["is_line"] > 0.5
                    info["p_line"] = torch.logsumexp(log_w.masked_fill(~line, -math.inf), -1).exp()
            f_q = self.family.grid_function(params, b.x_query)  # t Q G
            w = log_w.exp()[:, None, :].expand_as(f_q)
            within = self._within(self.edges, b.x_query)
        return (*self._strata(f_q, w, within), info)

    def _within(self, edges: list, x_q: Tensor) -> Tensor | None:
        """Each grid point's cell's spread of ``f`` at ``x_q``: ``sum_axes (f(upper) - f(lower))^2 / 12``
        (``f`` linear across the cell, the cell uniform), ``[..., Q, G]``; ``None`` without edges."""
        if not edges:
            return None
        dev = x_q.device
        parts = [(self.family.grid_function({k: v.to(dev) for k, v in hi.items()}, x_q)
                  - self.family.grid_function({k: v.to(dev) for k, v in lo.items()}, x_q)) ** 2 for lo, hi in edges]
        return torch.stack(parts).sum(0) / 12

    def _posterior(self, x_s: Tensor, y_s: Tensor, x_q: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """One task's ``f(x_q) [Q, G]``, posterior weights and cell spreads from the family's
        :meth:`posterior_grid`."""
        params, log_w, *rest = self.family.posterior_grid(x_s, y_s, self.posterior_n)
        f_q = self.family.grid_function({k: v.to(x_q.device) for k, v in params.items()}, x_q)  # Q G
        return f_q, log_w.to(x_q.device).exp().expand_as(f_q), self._within(rest[0] if rest else [], x_q)

    def _strata(self, f_q: Tensor, w: Tensor, within: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(log_mass, loc, scale)`` ``[..., K]`` of each point's values ``f_q [..., G]`` with weights ``w``
        (and each value's own spread ``within``)."""
        k = self.components if self.pool is None else min(self.components, MC_COMPONENTS)
        log_mass, loc, var = strata(f_q, w, k // 2, k - k // 2, within)
        if self.pool is not None:  # draws: a kernel of Silverman's bandwidth on each stratum (a smoothed histogram)
            floor = (BANDWIDTH * 1.06 * f_q.std(-1) * f_q.shape[-1] ** -0.2).unsqueeze(-1) ** 2
        else:
            floor = 0.0 if self.sigma > 0 else (SCALE_FLOOR * (f_q.amax(-1) - f_q.amin(-1))).unsqueeze(-1) ** 2
        return log_mass, loc, (self.sigma**2 + var + floor).sqrt()


def has_posterior_grid(family) -> bool:  # noqa: ANN001 - any regression family
    """Whether the family overrides :meth:`RegressionFamily.posterior_grid` (its own posterior quadrature)."""
    own = getattr(type(family), "posterior_grid", None)
    return own is not None and own is not RegressionFamily.posterior_grid


ORACLE_NONE = "noiseless targets: the exact posterior predictive is a point mass (MSE 0, NLL unbounded below)"


def oracle_refusal(name: str) -> str:
    """Why a family with noiseless (or near noiseless) targets has no oracle row."""
    return (f"task family {name!r} has noiseless targets: given two or more noiseless support points the exact "
            "posterior predictive is a point mass at the task's function (MSE 0, NLL unbounded below), which a "
            "mixture of Normals cannot stand for (with one point the posterior lies on a curve, which the grid does "
            "not follow). The oracle row exists for families with observation noise (sinusoid_line) or a posterior "
            "quadrature of their own (sinusoid_bmaml, 3 or more shots)")


def draw_pool(family) -> tuple[Tensor, Tensor]:  # noqa: ANN001 - any regression family with sample()
    """``(x [P, D], y [P])`` float64: :data:`POOL_TASKS` tasks of :data:`POOL_POINTS` points drawn from the
    family's own sampler with a fixed seed (support and query pooled)."""
    b = family.sample(POOL_TASKS, 1, POOL_POINTS - 1, torch.Generator().manual_seed(POOL_SEED))
    if b.is_classification or b.y_support.shape[-1] != 1:
        raise ValueError(f"task family {family.name!r}: the Monte Carlo prior row needs regression with one output")
    x = torch.cat([b.x_support, b.x_query], 1).to(torch.float64)
    y = torch.cat([b.y_support, b.y_query], 1).to(torch.float64)
    return x.reshape(-1, *x.shape[2:]).flatten(1), y.reshape(-1)


def neighbours(pool: tuple[Tensor, Tensor], x_query: Tensor) -> Tensor:
    """The pool's ``y`` at the :data:`NEIGHBOURS` inputs nearest to each query input: ``[t, Q, k]``. One
    input feature: the pool sorted once, each query's ``k`` nearest taken from the ``2k`` sorted values
    around it (they are among them); several: distances to the whole pool, 64 query points at a time."""
    xp, yp = (v.to(x_query.device) for v in pool)
    xq = x_query.to(torch.float64).flatten(2)  # t Q D
    rows = xq.reshape(-1, xq.shape[-1])  # tQ D
    k = min(NEIGHBOURS, xp.shape[0])
    if xp.shape[1] == 1:
        order = xp[:, 0].argsort()
        xs, ys = xp[order, 0], yp[order]
        at = torch.searchsorted(xs, rows[:, 0].contiguous())  # tQ
        lo = (at - k).clamp(0, max(xs.numel() - 2 * k, 0))
        window = (lo[:, None] + torch.arange(min(2 * k, xs.numel()), device=xs.device)).clamp(max=xs.numel() - 1)
        pick = (xs[window] - rows[:, :1]).abs().topk(k, largest=False).indices  # tQ k
        return ys[window.gather(1, pick)].reshape(*xq.shape[:2], -1)
    idx = torch.cat([torch.cdist(r, xp).topk(k, largest=False).indices  # 64 rows x P distances at a time
                     for r in rows.split(64)])  # tQ k
    return yp[idx].reshape(*xq.shape[:2], -1)


def strata(f: Tensor, w: Tensor, k_mass: int, k_width: int, within: Tensor | None = None
           ) -> tuple[Tensor, Tensor, Tensor]:
    """The weighted values ``f [..., G]`` (weights ``w [..., G]`` summing to 1 over ``G``) cut, in sorted
    order, at the mass levels ``j / k_mass`` and at ``k_width`` equally spaced values between their
    smallest and largest (a value straddling a cut is shared in proportion): ``K = k_mass + k_width``
    strata, each with its mass, mean and variance, ``(log_mass, mean, var)``, ``[..., K]`` each (a stratum
    of no mass has ``log_mass = -inf``). The mixture of ``N(mean_j, noise^2 + var_j)`` with those masses
    matches, stratum by stratum, the first two moments of ``sum_g w_g N(f_g, noise^2)``. The mass cuts
    resolve where the law is dense, the value cuts its tails (no stratum is wider than the range over
    ``k_width``). ``within [..., G]``: each value's own variance (a quadrature cell's spread), added to the
    second moments (the law of total variance)."""
    f, order = f.sort(-1)
    w = w.gather(-1, order)
    sq = f * f if within is None else f * f + within.gather(-1, order)  # each value's second moment
    cw = w.cumsum(-1)  # ... G, the mass up to and including each value
    c1, c2 = (w * f).cumsum(-1), (w * sq).cumsum(-1)
    g = f.shape[-1]
    mass_cuts = (torch.arange(k_mass + 1, dtype=f.dtype, device=f.device) / k_mass).expand(*f.shape[:-1], -1)
    lo, hi = f[..., :1], f[..., -1:]
    values = lo + (hi - lo) * torch.arange(1, k_width + 1, dtype=f.dtype, device=f.device) / (k_width + 1)
    below = torch.searchsorted(f.contiguous(), values.contiguous(), right=True)  # values <= each cut
    value_cuts = torch.where(below == 0, torch.zeros_like(values), cw.gather(-1, (below - 1).clamp(min=0)))
    levels = torch.cat([mass_cuts, value_cuts], -1).sort(-1).values.clamp(0.0, 1.0).contiguous()
    idx = torch.searchsorted(cw.contiguous(), levels).clamp(max=g - 1)  # the value each cut falls in
    prev = (idx - 1).clamp(min=0)
    first = idx == 0

    def at(c: Tensor, v: Tensor) -> Tensor:  # the cumulative sum of c up to each mass level
        before = torch.where(first, torch.zeros_like(levels), c.gather(-1, prev))
        mass_before = torch.where(first, torch.zeros_like(levels), cw.gather(-1, prev))
        return before + (levels - mass_before) * v.gather(-1, idx)

    m1, m2 = at(c1, f), at(c2, sq)
    mass = levels[..., 1:] - levels[..., :-1]
    some = mass > 1e-300
    safe = torch.where(some, mass, torch.ones_like(mass))
    mean = torch.where(some, (m1[..., 1:] - m1[..., :-1]) / safe, f.gather(-1, idx[..., 1:]))
    var = torch.where(some, ((m2[..., 1:] - m2[..., :-1]) / safe - mean * mean).clamp(min=0.0),
                      torch.zeros_like(mean))
    return torch.where(some, safe.log(), torch.full_like(mass, -math.inf)), mean, var
