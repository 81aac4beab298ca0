"""The guide of a model without latent sites: it has nothing to infer.

The function-space peers (``cnp``, ``anp`` deterministic, ``gp``) and the reference rows (``prior``,
``oracle``) put everything in the model: their predictive needs no latent draw. Their guide is the empty
Pyro program, and with it every ELBO estimator equals the model's log joint exactly (no sampling): for the
neural processes the conditional log-likelihood ``log p(y_query | support)``, for the GP the summed
marginal likelihood ``log p(y_support, y_query)``.
"""

from __future__ import annotations

from torch import nn

from ..tasks import TaskBatch


class NoLatentGuide(nn.Module):
    """The empty guide of a model without latent sites; never reads ``batch``."""

    def forward(self, batch: TaskBatch) -> None:
        return None
