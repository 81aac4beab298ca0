"""The Gaussian process's guide: it has nothing to infer.

:class:`~pyro_meta.models.gp.GPModel` integrates each task's function out in closed form and has no latent
site, so its guide is the empty Pyro program; with it ``Trace_ELBO`` is exactly minus the model's log joint,
``-sum_t log p(y_support, y_query)`` (the summed marginal likelihood), with no sampling.
"""

from __future__ import annotations

from torch import nn

from ..tasks import TaskBatch


class GPGuide(nn.Module):
    """The empty guide; never reads ``batch``."""

    def forward(self, batch: TaskBatch) -> None:
        return None
