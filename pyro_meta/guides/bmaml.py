"""BMAML's guide (Yoon et al., NeurIPS 2018): a set of SVGD particles per task.

``M`` meta-learned initial particles ``Theta_0 [M, P]`` (a particle: the task network's weights, log weight
precision and, for regression, log noise precision; see :mod:`pyro_meta.models.bmaml`) are copied to every
task and moved by ``n`` SVGD steps on the task's support-set posterior ``p(theta | support)`` (the
*follower*, :meth:`BMAMLGuide.follow`), with the log density from a Pyro trace of the model and one
``autograd.grad`` for every particle and task (:func:`pyro_meta.infer.svgd_adapt`; ``create_graph`` for
the meta-gradient). The chaser loss's *leader* (:meth:`BMAMLGuide.lead`) starts at the follower and takes
``s`` more steps on support + query, without a graph.

As a Pyro guide it emits the follower's particles as Delta sites ``w``, ``log_lambda`` (``log_gamma``), so
the predictive is the equal-weight mixture over the particles. Under an enclosing plate at ``dim=-3`` of
size ``S`` (the evaluator's samples), draw ``s`` is particle ``s mod M``: with ``S`` a multiple of ``M``
every particle has weight exactly ``1/M``.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn

from ..infer.svgd import ScalarRBFKernel, svgd_adapt
from ..models.base import tasks_plate
from ..models.bmaml import BMAMLModel, enclosing_draws, particles_plate
from ..tasks import TaskBatch


def bmaml_kernel(num_particles: int, bandwidth_factor: float = 1.0) -> ScalarRBFKernel:
    """BMAML's kernel: one bandwidth, ``h = bandwidth_factor * median / log M`` (``log 2`` when ``M = 1``,
    where the authors' ``log 1 = 0`` would divide by zero)."""
    return ScalarRBFKernel(bandwidth_factor=bandwidth_factor, log_offset=0.0 if num_particles >= 2 else 1.0)


class BMAMLGuide(nn.Module):
    """:param model: the :class:`~pyro_meta.models.BMAMLModel`.
    :param init_particles: the initial particles ``[M, P]`` (meta-parameters).
    :param inner_steps: ``n``, the follower's SVGD steps in meta-training.
    :param inner_steps_eval: SVGD steps at test.
    :param inner_lr: the SVGD step size.
    :param leader_steps: ``s``, the leader's further steps on support + query.
    :param first_order: detach the scores in the inner loop (the kernel terms stay differentiable).
    :param kernel: the Stein kernel (default: :func:`bmaml_kernel`).
    :param precision_lr_factor: the SVGD step on the particles' log precisions is ``inner_lr`` times this
        (the authors' code has this factor, 1 by default). The score of ``log lambda`` holds ``D / 2``, so
        for a network with ~1e5 weights a step that suits the weights throws ``lambda`` to overflow.
    """

    def __init__(self, model: BMAMLModel, init_particles: Tensor, inner_steps: int = 1, inner_steps_eval: int = 10,
                 inner_lr: float = 1e-3, leader_steps: int = 1, first_order: bool = False,
                 kernel: ScalarRBFKernel | None = None, precision_lr_factor: float = 1.0):
        super().__init__()
        if init_particles.dim() != 2 or init_particles.shape[1] != model.particle_dim:
            raise ValueError(f"init_particles must be [M, {model.particle_dim}], got {list(init_particles.shape)}")
        object.__setattr__(self, "model", model)  # a reference: the model's parameters are its own
        self.particles = nn.Parameter(init_particles.clone())
        self.inner_steps, self.inner_steps_eval, self.inner_lr = inner_steps, inner_steps_eval, inner_lr
        self.leader_steps, self.first_order = leader_steps, first_order
        self.precision_lr_factor = precision_lr_factor
        self.kernel = kernel if kernel is not None else bmaml_kernel(init_particles.shape[0])
        self._step_sizes: tuple[tuple, Tensor] | None = None  # (settings, per-coordinate step sizes)

    @property
    def num_particles(self) -> int:
        return self.particles.shape[0]

    def start(self, num_tasks: int) -> Tensor:
        """The initial particles copied to every task, ``[M, T, 1, P]``."""
        m, p = self.particles.shape
        return self.particles[:, None, None, :].expand(m, num_tasks, 1, p)

    def step_sizes(self, like: Tensor) -> Tensor | float:
        """The SVGD step per particle coordinate: ``inner_lr`` on the weights, ``inner_lr *
        precision_lr_factor`` on the log precisions."""
        if self.precision_lr_factor == 1.0:
            return self.inner_lr
        key = (self.inner_lr, self.precision_lr_factor, like.dtype, like.device)
        if self._step_sizes is None or self._step_sizes[0] != key:  # built once, not every step
            lr = like.new_full((self.model.particle_dim,), self.inner_lr)
            lr[self.model.num_weights:] = self.inner_lr * self.precision_lr_factor
            self._step_sizes = (key, lr)
        return self._step_sizes[1]

    def _move(self, theta: Tensor, sets: list[tuple[str, Tensor, Tensor]], steps: int, first_order: bool) -> Tensor:
        return svgd_adapt(lambda th: self.model.log_joint(th, sets), theta, steps, self.step_sizes(theta),
                          self.kernel, first_order=first_order, particle_dim=0)

    def follow(self, x: Tensor, y: Tensor, steps: int | None = None) -> Tensor:
        """The follower: SVGD on ``p(theta | x, y)`` from the initial particles, ``[M, T, 1, P]``, on the
        graph of the meta-parameters (second order unless ``first_order``)."""
        if steps is None:
            steps = self.inner_steps if self.training else self.inner_steps_eval
        return self._move(self.start(x.shape[0]), [("y", x, y)], steps, self.first_order)

    def lead(self, follower: Tensor, batch: TaskBatch) -> Tensor:
        """The leader: ``s`` more SVGD steps from the (detached) follower on support + query, no graph."""
        sets = [("y_support", batch.x_support, batch.y_support), ("y_query", batch.x_query, batch.y_query)]
        with torch.no_grad():
            return self._move(follower.detach(), sets, self.leader_steps, True)

    def forward(self, batch: TaskBatch) -> dict[str, Tensor]:
        theta = self.follow(batch.x_support, batch.y_support)  # M, T, 1, P
        draws = enclosing_draws()
        if draws is not None:  # an enclosing plate (the evaluator's samples): draw s is particle s mod M
            theta = theta[torch.arange(draws, device=theta.device) % self.num_particles]
        with particles_plate(self.num_particles):
            return self._emit(theta, batch.num_tasks)

    def _emit(self, theta: Tensor, num_tasks: int) -> dict[str, Tensor]:
        values = self.model.unpack(theta)
        out = {}
        with tasks_plate(num_tasks):
            for name in ("log_lambda", "log_gamma"):
                if name in values:
                    out[name] = pyro.sample(name, dist.Delta(values[name]))
            out["w"] = pyro.sample("w", dist.Delta(values["w"], event_dim=1))
        return out

    def prior_summary(self) -> dict[str, Tensor]:
        v = self.model.unpack(self.particles.detach()[:, None, None, :])
        return {"initial_particles": self.particles.detach(),
                "weight_std": torch.exp(-0.5 * v["log_lambda"]).flatten(),
                **({"noise_std": torch.exp(-0.5 * v["log_gamma"]).flatten()} if "log_gamma" in v else {})}
