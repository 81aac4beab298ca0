"""MetaLearner: a Pyro model and guide over a TaskBatch, plus the objective that trains them."""

from __future__ import annotations

from typing import Any, Protocol

import pyro
from pyro import poutine
from torch import Tensor, nn

from .infer import LeanTrace_ELBO
from .tasks import TaskBatch

# Parameters declared with pyro.param / PyroParam inside a PyroModule belong to that module (so a
# plain torch optimizer, DDP and state_dict() see them), not to Pyro's global param store.
pyro.settings.set(module_local_params=True)


class Objective(Protocol):
    """Anything with Pyro's ``differentiable_loss(model, guide, *args)`` (every Pyro ELBO does)."""

    def differentiable_loss(self, model: Any, guide: Any, *args: Any) -> Tensor: ...


class MetaLearner(nn.Module):
    """The unit the trainer, evaluator and ArviZ export work on.

    :param model: a Pyro program ``model(batch: TaskBatch)`` that observes the query labels at a site
        named ``"y_query"`` (one factor per point, tasks plate at ``dim=-2``, points at ``dim=-1``).
    :param guide: a Pyro program ``guide(batch)`` that conditions on the support set only.
    :param objective: default ``LeanTrace_ELBO()`` (``Trace_ELBO``'s estimate on a shorter path); any object with ``differentiable_loss``.
    :param name: a label for logs and plots.
    :param protocol: the method's resolved settings, written into the run's config.
    :param predictive_guide: the program that predicts from the support set alone, run by the
        evaluator, the ArviZ export and the plots on tasks **without** their query labels. Default: the
        guide. A method whose training guide reads the query set by design (PLATIPUS) declares one
        here; it must emit the same latent sites as the guide.

    The loss is divided by the number of tasks: a meta-batch's loss is the mean over its tasks.

    Example::

        learner = MetaLearner(MyModel(), MyGuide(), name="mine")
        loss = learner.loss(batch)   # scalar, differentiable w.r.t. learner.parameters()
    """

    def __init__(self, model: nn.Module, guide: nn.Module, objective: Objective | None = None,
                 name: str = "custom", protocol: dict | None = None, predictive_guide: nn.Module | None = None):
        super().__init__()
        if not callable(model) or not callable(guide):
            raise TypeError("model and guide must be callables (Pyro programs) taking a TaskBatch")
        if predictive_guide is not None and not callable(predictive_guide):
            raise TypeError("predictive_guide must be a callable (a Pyro program) taking a TaskBatch")
        self.model, self.guide = model, guide
        self._predictive_guide = predictive_guide
        self.objective = objective if objective is not None else LeanTrace_ELBO()
        self.name = name
        self.protocol = dict(protocol or {})

    def loss(self, batch: TaskBatch) -> Tensor:
        """Mean over tasks of the negative objective (``-ELBO`` per task for an ELBO)."""
        if not isinstance(batch, TaskBatch):
            raise TypeError(f"expected a TaskBatch, got {type(batch).__name__}")
        if batch.y_query is None:
            raise ValueError("training needs query labels; this TaskBatch has y_query=None")
        with poutine.scale(scale=1.0 / batch.num_tasks):
            return self.objective.differentiable_loss(self.model, self.guide, batch)

    forward = loss

    @property
    def predictive_guide(self):
        """What the evaluator runs on support-only tasks: the declared predictive guide, else the guide."""
        return self._predictive_guide if self._predictive_guide is not None else self.guide
