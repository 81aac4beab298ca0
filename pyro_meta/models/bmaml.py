"""BMAML (Yoon et al., NeurIPS 2018) generative model: a Bayesian task network with Gamma priors on the
weight and noise precisions, as in the authors' code.

For each task t (plate "tasks", ``dim=-2``)::

    log_lambda_t ~ LogGamma(2, 2)        weight precision lambda ~ Gamma(2, rate 2), in log space
    log_gamma_t  ~ LogGamma(2, 0.2)      noise precision gamma ~ Gamma(2, rate 0.2) (regression only)
    w_t          ~ N(0, lambda_t^{-1/2})  [D], the task network's weights
    y_t          ~ N(net(w_t, x), gamma_t^{-1/2})   (classification: Categorical(softmax(net(w_t, x))))

``LogGamma(a, b)`` is the law of ``log g`` for ``g ~ Gamma(a, b)``: density ``Gamma(e^l) e^l``, so a
particle that carries ``l = log g`` has an unconstrained coordinate, as in the authors' code.

A BMAML particle is one task's latents flattened, ``theta = [w, log_lambda(, log_gamma)]``
(:meth:`BMAMLModel.pack` / :meth:`BMAMLModel.unpack`); :meth:`BMAMLModel.log_joint` is the log density of
particles given a data set, read off a Pyro trace of :meth:`BMAMLModel.program` conditioned on them.
"""

from __future__ import annotations

import contextlib

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.runtime import get_plates
from torch import Tensor, nn

from ..likelihoods import Likelihood
from ..nn import FunctionalNet, call_net
from ..tasks import TaskBatch
from .base import POINT_DIM, TASK_DIM, log_gamma_dist, tasks_plate

# Gamma(concentration, rate) hyperparameters of the authors' code
WEIGHT_PRECISION_PRIOR = (2.0, 2.0)
NOISE_PRECISION_PRIOR = (2.0, 0.2)
# the particles' plate in the inner loop: left of tasks (-2) and points (-1), like the evaluator's samples
PARTICLES_DIM = -3


def enclosing_draws() -> int | None:
    """The size of an enclosing plate at ``dim=-3`` (the evaluator's samples), if there is one."""
    sizes = [f.size for f in get_plates() if f.dim == PARTICLES_DIM]
    return sizes[0] if sizes else None


def particles_plate(num_particles: int):  # noqa: ANN201 - a context manager
    """``pyro.plate("particles", M, dim=-3)``, or nothing where an enclosing plate already holds that dim
    (model and guide open it alike, so a guide that emits every particle replays into the model)."""
    if enclosing_draws() is not None:
        return contextlib.nullcontext()
    return pyro.plate("particles", num_particles, dim=PARTICLES_DIM)


class BMAMLModel(nn.Module):
    """:param net: the functional task network (``D`` weights).
    :param likelihood: classification's observation model (Categorical); unused (``None``) for regression,
        which observes with each particle's own noise precision.
    :param regression: whether ``y`` is real-valued (noise precision site) or a class label.
    :param num_particles: ``M``; :meth:`forward` runs in a ``particles`` plate of that size unless an
        enclosing plate holds ``dim=-3`` (the guide, :class:`~pyro_meta.guides.BMAMLGuide`, does the same).
    """

    def __init__(self, net: FunctionalNet, likelihood: Likelihood | None = None, regression: bool = True,
                 num_particles: int = 1):
        super().__init__()
        self.num_particles = num_particles
        if not regression and likelihood is None:
            raise ValueError("a classification BMAMLModel needs its likelihood (Categorical)")
        self.net, self.likelihood, self.regression = net, likelihood, regression

    @property
    def num_weights(self) -> int:
        return self.net.num_params

    @property
    def per_task_weights(self) -> int:
        """Per-task values each draw holds (the evaluator's chunking reads it): a particle's length."""
        return self.particle_dim

    @property
    def particle_dim(self) -> int:
        """``P``: a particle's length, ``D`` weights plus ``log_lambda`` (plus ``log_gamma``)."""
        return self.num_weights + (2 if self.regression else 1)

    # ------------------------------------------------------------------ particles <-> sites
    def unpack(self, theta: Tensor) -> dict[str, Tensor]:
        """``theta [..., T, 1, P]`` -> site values ``w [..., T, 1, D]``, ``log_lambda [..., T, 1]`` (and
        ``log_gamma [..., T, 1]``)."""
        d = self.num_weights
        out = {"w": theta[..., :d], "log_lambda": theta[..., d]}
        if self.regression:
            out["log_gamma"] = theta[..., d + 1]
        return out

    # ------------------------------------------------------------------ the Pyro program
    def _latents(self, like: Tensor) -> dict[str, Tensor]:
        """Sample sites of one task's latents inside the tasks plate (the caller opens it)."""
        log_lam = pyro.sample("log_lambda", log_gamma_dist(*WEIGHT_PRECISION_PRIOR, like))  # ..., T, 1
        out = {"log_lambda": log_lam}
        if self.regression:
            out["log_gamma"] = pyro.sample("log_gamma", log_gamma_dist(*NOISE_PRECISION_PRIOR, like))
        scale = torch.exp(-0.5 * log_lam).unsqueeze(-1)  # ..., T, 1, 1
        prior_w = dist.Normal(like.new_zeros(self.num_weights), scale).to_event(1)
        out["w"] = pyro.sample("w", prior_w)  # ..., T, 1, D
        return out

    def observation(self, latents: dict[str, Tensor], x: Tensor, context: Tensor | None = None) -> dist.Distribution:
        """``p(y | w, x)`` with batch shape ``[..., T, N]``; ``context``: the support images, which normalize
        ``x`` in the conv trunk's support-statistics modes."""
        f = call_net(self.net, latents["w"].squeeze(TASK_DIM), x, context)  # ..., T, N, O
        if not self.regression:
            return self.likelihood(f)
        std = torch.exp(-0.5 * latents["log_gamma"]).unsqueeze(-1)  # ..., T, 1, 1
        return dist.Normal(f, std.expand(f.shape)).to_event(1)

    def program(self, sets: list[tuple[str, Tensor, Tensor | None]], context: Tensor | None = None) -> dict[str, Tensor]:
        """Latents per task, then each named set ``(site, x [T, N, ...], y or None)`` observed at ``site``
        (one network pass per set). A set named ``"y_support"`` is the context of the others: where the conv
        trunk normalizes with support statistics, they come from it (transductive ``"task"`` statistics come
        from each set alone). ``context``: the support images where no set is the support set (a query set
        scored on its own)."""
        x0 = sets[0][1]
        ctx = next((x for site, x, _ in sets if site == "y_support"), context)
        with tasks_plate(x0.shape[0]):
            latents = self._latents(x0.new_zeros(()))
            for site, x, y in sets:
                with pyro.plate(f"{site}_points", x.shape[1], dim=POINT_DIM):
                    context = None if site == "y_support" else ctx
                    pyro.sample(site, self.observation(latents, x, context), obs=y)
        return latents

    def forward(self, batch: TaskBatch) -> dict[str, Tensor]:
        with particles_plate(self.num_particles):
            return self.program([("y_support", batch.x_support, batch.y_support),
                                 ("y_query", batch.x_query, batch.y_query)])

    # ------------------------------------------------------------------ what SVGD and the losses need
    def _trace(self, theta: Tensor, sets: list[tuple[str, Tensor, Tensor]], context: Tensor | None = None):
        """A trace of :meth:`program` conditioned on the particles ``theta [M, T, 1, P]``, blocked from any
        enclosing handler: an evaluator's samples plate or the trainer's ``1/T`` scale must not reach the
        inner loop's log density. The particles axis needs no plate of its own here (the values carry it,
        and ``log_prob_sum`` sums over it); an enclosing plate at ``dim=-3`` keeps that dim allocated."""
        with poutine.block():
            return poutine.trace(poutine.condition(self.program, data=self.unpack(theta))).get_trace(sets, context)

    def log_joint(self, theta: Tensor, sets: list[tuple[str, Tensor, Tensor]]) -> Tensor:
        """``sum_{m, t} log p(theta_mt, y_t | x_t)`` over the given sets: a scalar whose gradient with
        respect to ``theta [M, T, 1, P]`` is every particle's own score."""
        return self._trace(theta, sets).log_prob_sum()

    def log_likelihood(self, theta: Tensor, x: Tensor, y: Tensor, x_support: Tensor | None = None) -> Tensor:
        """``log p(y_t | theta_mt, x_t)`` summed over a set's points, ``[M, T]``; ``x_support``: the support
        images, the context of a query set (the support set's labels are not read)."""
        node = self._trace(theta, [("y", x, y)], x_support).nodes["y"]
        return node["fn"].log_prob(node["value"]).sum(-1)  # M, T
