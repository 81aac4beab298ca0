"""MetaLearner: a Pyro model and guide over a TaskBatch, plus the objective that trains them."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol

import pyro
from pyro import poutine
from pyro.nn import PyroModule
from torch import Tensor, nn

from .infer import LeanTrace_ELBO
from .tasks import TaskBatch


def local_params() -> AbstractContextManager:
    """Pyro's ``module_local_params=True`` for the duration of a ``with`` block: parameters declared with
    ``PyroParam`` (or ``pyro.param`` inside a ``PyroModule``) belong to that module, so a plain torch
    optimizer, DDP and ``state_dict()`` see them, not Pyro's global param store.

    The library never sets it globally (importing :mod:`pyro_meta` leaves ``pyro.settings`` as it was); a
    :class:`MetaLearner` holding a ``PyroModule`` enters it around its own calls.
    """
    return pyro.settings.context(module_local_params=True)


def _localize(module: nn.Module) -> bool:
    """Give every ``PyroModule`` in ``module`` the local parameter state that Pyro only creates when the
    module is built under ``module_local_params=True``, so it can run inside :func:`local_params`
    whichever way the setting stood when the user built it. True if there is any ``PyroModule``."""
    found = False
    for m in module.modules():
        if isinstance(m, PyroModule):
            found = True
            ctx = m._pyro_context
            if not hasattr(ctx, "param_state"):  # built with the setting off (Pyro's default)
                ctx.param_state = {"params": {}, "constraints": {}}
    return found


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
        # PyroModules run with module-local params, entered around each call (never set globally)
        self._pyro_modules = _localize(self)

    def pyro_context(self) -> AbstractContextManager:
        """The context every run of this learner's model and guide goes in: :func:`local_params` when
        they hold a ``PyroModule``, else nothing (the built-in methods are plain ``nn.Module`` s)."""
        return local_params() if self._pyro_modules else nullcontext()

    def loss(self, batch: TaskBatch) -> Tensor:
        """Mean over tasks of the negative objective (``-ELBO`` per task for an ELBO)."""
        if not isinstance(batch, TaskBatch):
            raise TypeError(f"expected a TaskBatch, got {type(batch).__name__}")
        if batch.y_query is None:
            raise ValueError("training needs query labels; this TaskBatch has y_query=None")
        with self.pyro_context(), poutine.scale(scale=1.0 / batch.num_tasks):
            return self.objective.differentiable_loss(self.model, self.guide, batch)

    forward = loss

    @property
    def predictive_guide(self):
        """What the evaluator runs on support-only tasks: the declared predictive guide, else the guide."""
        return self._predictive_guide if self._predictive_guide is not None else self.guide
