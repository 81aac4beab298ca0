"""The attentive neural process's guides (Kim et al., ICLR 2019), for its latent path.

- Training, :class:`ANPGuide` with ``with_query=True``: ``z ~ q(z | support + query)``, the model's own
  latent encoder run on both sets (the NP's approximate posterior shares the prior's network [1]).
- Test (``MetaLearner.predictive_guide``), ``with_query=False``: ``z ~ p(z | support)``, the model's
  conditional prior; it never reads ``batch.y_query``.

Without the latent path (the default) the model has no latent site and the guide is
:class:`~pyro_meta.guides.empty.NoLatentGuide`.

[1] Garnelo, Schwarz, Rosenbaum, Viola, Rezende, Eslami, Teh, Neural Processes, 2018.
"""

from __future__ import annotations

import pyro
from torch import Tensor, nn

from ..models.anp import ANPModel
from ..models.base import conditioning_set, tasks_plate
from ..tasks import TaskBatch


class ANPGuide(nn.Module):
    """``z ~ N(m(C), s(C)^2)`` per task, ``C`` the support set (+ the query set with ``with_query`` when its
    labels are there). Site ``z``: batch ``[T, 1]``, event ``[Z]``. No parameters of its own.

    :param model: the :class:`~pyro_meta.models.anp.ANPModel` with ``latent=True``.
    """

    def __init__(self, model: ANPModel, with_query: bool):
        super().__init__()
        if not model.latent:
            raise ValueError("ANPGuide needs the model's latent path (ANPModel(latent=True))")
        # a reference, not a submodule: the encoder's parameters belong to the model alone
        object.__setattr__(self, "model", model)
        self.with_query = with_query

    def forward(self, batch: TaskBatch) -> Tensor:
        x, y = conditioning_set(batch, self.with_query)  # T N X, T N O
        with tasks_plate(batch.num_tasks):
            return pyro.sample("z", self.model.latent_law(x, y))  # ..., T, 1, Z
