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


class ReferenceModel(nn.Module):
    """``y_query ~`` the exact prior (``kind="prior"``) or posterior (``"oracle"``) predictive of
    ``family`` by quadrature on an ``n x n`` grid per parameter pair, ``K`` components per point.

    :param task_chunk: tasks whose grid weights are computed at once (memory: ``task_chunk * points * G``
        float64 values, ``G = 2 n^2`` for ``sinusoid_line``).

    After each call, ``last_info`` holds, for the oracle on a family with an ``is_line`` parameter,
    ``p_line`` ``[T]``: each task's posterior probability of being a line.
    """

    def __init__(self, family: RegressionFamily, kind: str, n: int = 200, components: int = 256,
                 task_chunk: int = 2):
        super().__init__()
        if kind not in REFERENCE_KINDS:
            raise ValueError(f"kind must be one of {REFERENCE_KINDS}, got {kind!r}")
        grid = family.prior_grid(n)
        if grid is None:
            raise ValueError(f"task family {family.name!r} offers no quadrature of its prior (prior_grid)")
        if not family.noise_std > 0:
            raise ValueError(f"task family {family.name!r} has noiseless targets: its exact predictive is a point "
                             "mass (NLL -inf), which a mixture of Normals cannot stand for")
        self.family, self.kind, self.n, self.components, self.task_chunk = family, kind, n, components, task_chunk
        self.params, self.log_prior = grid
        self.sigma = float(family.noise_std)
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
        params = {k: v.to(b.x_query.device) for k, v in self.params.items()}
        log_w = self.log_prior.to(b.x_query.device).expand(b.num_tasks, -1)  # t G
        info = {}
        if self.kind == "oracle":
            f_s = self.family.grid_function(params, b.x_support)  # t N G
            y_s = b.y_support.to(torch.float64)  # t N 1
            log_lik = (-0.5 * ((y_s - f_s) / self.sigma) ** 2).sum(-2)  # t G (constants cancel)
            log_w = torch.log_softmax(log_w + log_lik, -1)
            if "is_line" in params:
                line = params["is_line"] > 0.5
                info["p_line"] = torch.logsumexp(log_w.masked_fill(~line, -math.inf), -1).exp()
        f_q = self.family.grid_function(params, b.x_query)  # t Q G
        half = self.components // 2
        log_mass, loc, var = strata(f_q, log_w.exp()[:, None, :].expand_as(f_q), half, self.components - half)
        return log_mass, loc, (self.sigma**2 + var).sqrt(), info


def strata(f: Tensor, w: Tensor, k_mass: int, k_width: int) -> tuple[Tensor, Tensor, Tensor]:
    """The weighted values ``f [..., G]`` (weights ``w [..., G]`` summing to 1 over ``G``) cut, in sorted
    order, at the mass levels ``j / k_mass`` and at ``k_width`` equally spaced values between their
    smallest and largest (a value straddling a cut is shared in proportion): ``K = k_mass + k_width``
    strata, each with its mass, mean and variance, ``(log_mass, mean, var)``, ``[..., K]`` each (a stratum
    of no mass has ``log_mass = -inf``). The mixture of ``N(mean_j, noise^2 + var_j)`` with those masses
    matches, stratum by stratum, the first two moments of ``sum_g w_g N(f_g, noise^2)``. The mass cuts
    resolve where the law is dense, the value cuts its tails (no stratum is wider than the range over
    ``k_width``)."""
    f, order = f.sort(-1)
    w = w.gather(-1, order)
    cw = w.cumsum(-1)  # ... G, the mass up to and including each value
    c1, c2 = (w * f).cumsum(-1), (w * f * f).cumsum(-1)
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

    m1, m2 = at(c1, f), at(c2, f * f)
    mass = levels[..., 1:] - levels[..., :-1]
    some = mass > 1e-300
    safe = torch.where(some, mass, torch.ones_like(mass))
    mean = torch.where(some, (m1[..., 1:] - m1[..., :-1]) / safe, f.gather(-1, idx[..., 1:]))
    var = torch.where(some, ((m2[..., 1:] - m2[..., :-1]) / safe - mean * mean).clamp(min=0.0),
                      torch.zeros_like(mean))
    return torch.where(some, safe.log(), torch.full_like(mass, -math.inf)), mean, var
