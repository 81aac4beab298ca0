"""The conditional neural process's guide: it has nothing to infer.

The CNP's model (:class:`~pyro_meta.models.cnp.CNPModel`) has no latent site, so its guide is the empty
Pyro program; with it every ELBO estimator equals ``log p(y_query | support)`` exactly (no sampling).
"""

from __future__ import annotations

from torch import nn

from ..tasks import TaskBatch


class NoLatentGuide(nn.Module):
    """The empty guide of a model without latent sites; never reads ``batch``."""

    def forward(self, batch: TaskBatch) -> None:
        return None
