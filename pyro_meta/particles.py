"""ArviZ export of a particle approximation (SVGD's particles, or any set of equally weighted draws)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

from ._arviz import az

__all__ = ["particles_to_inference_data"]


def _np(t: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(t, Tensor):
        t = t.detach().cpu()
        return t.to(torch.float64).numpy() if t.is_floating_point() else t.numpy()
    return np.asarray(t)


def particles_to_inference_data(named_particles: Mapping[str, Tensor], *,
                                log_likelihood: Mapping[str, Tensor] | None = None,
                                posterior_predictive: Mapping[str, Tensor] | None = None,
                                observed_data: Mapping[str, Tensor | np.ndarray] | None = None,
                                constant_data: Mapping[str, Tensor | np.ndarray] | None = None,
                                coords: dict | None = None, dims: dict | None = None) -> az.InferenceData:
    """An ``InferenceData`` whose posterior is one chain with the ``M`` particles as its draws.

    :param named_particles: ``{name: [M, ...]}``, e.g. ``pyro.infer.SVGD.get_named_particles()`` or
        :meth:`pyro_meta.models.bnn.BNNRegression.named` of the particle matrix.
    :param log_likelihood: ``{observed site: [M, n]}`` pointwise ``log p(y_i | particle m)`` (for
        ``az.loo`` / ``az.waic``; with SVGD's few, unweighted particles read them as a rough check).
    :param posterior_predictive: ``{site: [M, ...]}`` draws, one per particle.
    :param observed_data: ``{site: [...]}`` observed values (no particle dim).
    :param constant_data: ``{name: [...]}`` covariates (no particle dim).
    :param coords: passed to ``az.from_dict``; dims not named get ArviZ's ``<name>_dim_<i>``.
    :param dims: passed to ``az.from_dict``: ``{name: [dim names after (chain, draw)]}``.
    :returns: groups ``posterior`` (+ the ones given), dims ``(chain=1, draw=M, ...)``.

    Example::

        idata = particles_to_inference_data(svgd.get_named_particles())
        az.summary(idata, kind="stats")  # r_hat and ESS mean nothing for particles
    """
    if not named_particles:
        raise ValueError("named_particles is empty: expected {name: tensor [M, ...]}")
    sizes = {name: tuple(v.shape)[:1] for name, v in named_particles.items()}  # (M,) or () for scalars
    num = next(iter(sizes.values()))
    if not num or any(s != num for s in sizes.values()):
        raise ValueError(f"every particle tensor needs the same leading particle count, got {sizes}")

    def per_draw(group: Mapping[str, Tensor] | None, what: str) -> dict[str, np.ndarray] | None:
        if group is None:
            return None
        out = {}
        for name, v in group.items():
            a = _np(v)
            if a.shape[:1] != num:
                raise ValueError(f"{what}[{name!r}] must lead with the {num[0]} particles, got shape {a.shape}")
            out[name] = a[None]  # chain=1, draw=M
        return out

    return az.from_dict(
        posterior=per_draw(named_particles, "named_particles"),
        log_likelihood=per_draw(log_likelihood, "log_likelihood"),
        posterior_predictive=per_draw(posterior_predictive, "posterior_predictive"),
        observed_data=None if observed_data is None else {k: _np(v) for k, v in observed_data.items()},
        constant_data=None if constant_data is None else {k: _np(v) for k, v in constant_data.items()},
        coords=coords, dims=dims,
    )
