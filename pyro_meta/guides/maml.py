"""MAML's guide: a point estimate (Delta) of each task's weights, produced by K SGD steps on the
support loss from the meta-learned initialization theta."""

from __future__ import annotations

import pyro
import torch
from torch import Tensor, nn

from ..distributions import PointMass
from ..infer import sgd_adapt
from ..models.base import TASK_DIM, WeightSpaceModel, tasks_plate
from ..tasks import TaskBatch


class MAMLGuide(nn.Module):
    """:param model: the model whose ``net`` and ``likelihood`` define the support loss.
    :param init: initial theta ``[D]``.
    :param inner_steps: K during meta-training; :param inner_steps_eval: K at evaluation.
    :param inner_lr: the inner SGD step size alpha.
    :param first_order: drop second-order terms of the meta-gradient (FOMAML).
    """

    def __init__(self, model: WeightSpaceModel, init: Tensor, inner_steps: int = 1,
                 inner_steps_eval: int = 10, inner_lr: float = 0.01, first_order: bool = False):
        super().__init__()
        # a reference, not a submodule: the model's parameters belong to the model alone
        object.__setattr__(self, "model", model)
        self.theta = nn.Parameter(init.clone())
        self.inner_steps, self.inner_steps_eval = inner_steps, inner_steps_eval
        self.inner_lr, self.first_order = inner_lr, first_order

    def support_loss(self, phi: Tensor, batch: TaskBatch) -> Tensor:
        """Sum over tasks of each task's mean support loss; ``phi [T, 1, D]``."""
        f = self.model.net(phi.squeeze(TASK_DIM), batch.x_support)  # T S O
        return self.model.likelihood.point_loss(f, batch.y_support).mean(-1).sum()

    def adapt(self, batch: TaskBatch) -> Tensor:
        """The adapted weights ``[T, 1, D]``."""
        steps = self.inner_steps if self.training else self.inner_steps_eval
        start = self.theta.expand(batch.num_tasks, 1, -1)  # T 1 D
        (phi,) = sgd_adapt(lambda p: self.support_loss(p, batch), (start,), steps,
                           self.inner_lr, self.first_order)
        return phi

    def forward(self, batch: TaskBatch) -> Tensor:
        phi = self.adapt(batch)
        with tasks_plate(batch.num_tasks):
            return pyro.sample("phi", PointMass(phi, event_dim=1))

    def prior_summary(self) -> dict[str, torch.Tensor]:
        return {"theta": self.theta.detach()}
