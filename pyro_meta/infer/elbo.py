"""``LeanTrace_ELBO``: Pyro's ``Trace_ELBO`` estimate and gradient on a shorter path for guides whose
latent sites are all reparameterized (every built-in method's are).

``Trace_ELBO.differentiable_loss`` runs the guide, replays the model against it, then copies both
traces to drop subsample sites, computes every site's score parts, builds a surrogate
``loss + (surrogate - surrogate.item())`` and registers a NaN hook on it. For a reparameterized guide
the score-function part is zero and the surrogate equals the ELBO, so the same value and the same
gradient come from summing each site's scaled, masked ``log_prob`` directly:

    loss = -(sum_model_sites log p - sum_guide_sites log q) / num_particles

That path keeps the model and guide as Pyro programs (the traces are the same two traces) and drops
per-step work that does not change the estimate: the trace copies, the score-part bookkeeping, the
device-to-host ``item()`` calls and the NaN hooks (the trainer checks every step's loss and gradient
norm itself). Two site kinds are summed without calling ``log_prob``:

- an ``ImproperUniform`` site (a flat prior, e.g. MAML's): its log density is 0 by definition;
- an unobserved ``Delta`` guide site (a point estimate): its value is its own support point, so
  ``log q`` is the site's ``log_density`` without the equality test ``Delta.log_prob`` does; for a
  :class:`~pyro_meta.distributions.PointMass` (MAML's and ABML's point estimates) that is 0, and the
  site adds nothing.

Anything else goes to ``Trace_ELBO`` unchanged: a guide site without ``rsample`` (score-function
gradients), a ``GuideMessenger`` guide, and every step while Pyro's validation is on (so its site and
shape checks still run). ``loss`` (no gradient) is ``Trace_ELBO``'s.

``LeanTraceMeanField_ELBO`` does the same for ``TraceMeanField_ELBO``: a latent site whose guide and model
laws have a closed-form KL contributes ``KL(q || p)`` (the guide site's scale and mask), any other site its
``log_prob`` as above, so PLATIPUS and the amortized method's closed-form-KL objectives also run without
the per-step ``item()`` calls and NaN hooks (each a device-to-host wait on a GPU).
"""

from __future__ import annotations

from typing import Any

import torch
from pyro import poutine
from pyro.distributions import Delta, ImproperUniform, Independent
from pyro.distributions.util import scale_and_mask
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.util import is_validation_enabled
from pyro.poutine.util import prune_subsample_sites, site_is_subsample
from torch.distributions import kl_divergence

from ..distributions import PointMass


class _NeedsScoreFunction(Exception):
    """A guide site has no reparameterized sampler: the estimate needs Trace_ELBO's surrogate."""


def _site_term(site: dict) -> tuple[float | None, torch.Tensor | None]:
    """``(scale, sum(mask * log p(value)))`` at one site, or ``(None, term)`` with the scale applied already
    (a tensor scale), or ``(None, None)`` for a site that adds nothing. ``scale * term`` is what
    ``Trace.compute_log_prob`` gives the site's ``log_prob_sum``."""
    fn, mask, scale = site["fn"], site["mask"], site["scale"]
    if isinstance(fn, ImproperUniform) or mask is False or (isinstance(fn, PointMass) and not site["is_observed"]):
        return None, None  # a flat density, a masked-out site, or a point mass at its own point: 0
    if isinstance(fn, Delta) and not site["is_observed"] and not site["args"] and not site["kwargs"]:
        log_p = fn.log_density  # the value is the support point: log q = log_density exactly
    elif (mask is None or mask is True) and not isinstance(scale, torch.Tensor) and not site["args"] \
            and not site["kwargs"]:
        # the term is a sum over every dimension, so an Independent's own sum over its event dims is skipped
        # (not under a tensor scale, which broadcasts against the batch dims alone)
        while isinstance(fn, Independent):
            fn = fn.base_dist
        log_p = fn.log_prob(site["value"])
    else:
        log_p = fn.log_prob(site["value"], *site["args"], **site["kwargs"])
    if isinstance(scale, torch.Tensor):
        return None, scale_and_mask(log_p, scale, mask).sum()
    if mask is not None and mask is not True:
        log_p = torch.where(mask, log_p, log_p.new_zeros(()))
    return float(scale), log_p.sum()


def _total(terms: list[torch.Tensor]) -> torch.Tensor | float:
    if not terms:
        return 0.0
    return terms[0] if len(terms) == 1 else torch.stack(terms).sum()


def _grouped(groups: dict[float | None, tuple[list, list]]) -> torch.Tensor | float:
    """``sum over scale groups of scale * (sum of guide terms - sum of model terms)``."""
    loss: torch.Tensor | float = 0.0
    for scale, (guide_terms, model_terms) in groups.items():
        part = _total(guide_terms) - _total(model_terms)
        loss = loss + (part if scale is None or scale == 1.0 else part * scale)
    return loss


class LeanTrace_ELBO(Trace_ELBO):
    """``Trace_ELBO`` with the shorter path described in the module docstring; same arguments
    (``num_particles``, ``vectorize_particles``, ``max_plate_nesting``, ...), same estimate and gradient."""

    def differentiable_loss(self, model: Any, guide: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        if is_validation_enabled() or isinstance(poutine.unwrap(guide), poutine.messenger.Messenger):
            return super().differentiable_loss(model, guide, *args, **kwargs)
        runs = self.num_particles
        if self.vectorize_particles:
            if self.max_plate_nesting == float("inf"):
                self._guess_max_plate_nesting(model, guide, args, kwargs)
            model, guide = self._vectorized_num_particles(model), self._vectorized_num_particles(guide)
            runs = 1  # one run with a particles plate: its log-probs sum over the particles
        total: torch.Tensor | float = 0.0
        for i in range(runs):
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
            try:
                total = total + self._negative_elbo(model_trace, guide_trace)
            except _NeedsScoreFunction:
                # Trace_ELBO's surrogate from here on: this run's traces, then fresh ones for the rest
                # (earlier runs had reparameterized draws only, their terms stand as computed)
                model_trace, guide_trace = prune_subsample_sites(model_trace), prune_subsample_sites(guide_trace)
                model_trace.compute_log_prob()
                guide_trace.compute_score_parts()
                pairs = [(model_trace, guide_trace)]
                pairs += [self._get_trace(model, guide, args, kwargs) for _ in range(runs - i - 1)]
                return total / self.num_particles + self._surrogate(pairs)
        return total / self.num_particles if self.num_particles != 1 else total

    @staticmethod
    def _negative_elbo(model_trace: poutine.Trace, guide_trace: poutine.Trace) -> torch.Tensor | float:
        """``sum_sites log q - sum_sites log p``: the site sums are grouped by their scale (a meta-batch's sites
        share ``1/T`` or a few multiples of it), so each group is scaled once, not each site."""
        groups: dict[float | None, tuple[list, list]] = {}  # scale -> (guide terms, model terms)
        for side, trace in ((0, guide_trace), (1, model_trace)):
            for site in trace.nodes.values():
                if site["type"] != "sample" or site_is_subsample(site):
                    continue
                if side == 0 and not site["is_observed"] and not site["fn"].has_rsample:
                    raise _NeedsScoreFunction(site["name"])
                scale, term = _site_term(site)
                if term is not None:
                    groups.setdefault(scale, ([], []))[side].append(term)
        return _grouped(groups)

    def _surrogate(self, pairs: list) -> torch.Tensor:
        """Trace_ELBO's estimator over these (pruned, scored) trace pairs, divided by ``num_particles``: the
        value of the negative ELBO with the score-function surrogate's gradient."""
        loss = surrogate = 0.0
        for model_trace, guide_trace in pairs:
            particle_loss, particle_surrogate = self._differentiable_loss_particle(model_trace, guide_trace)
            loss, surrogate = loss + particle_loss, surrogate + particle_surrogate
        loss, surrogate = loss / self.num_particles, surrogate / self.num_particles
        return loss + (surrogate - float(surrogate.detach()))


class LeanTraceMeanField_ELBO(LeanTrace_ELBO, TraceMeanField_ELBO):
    """``TraceMeanField_ELBO`` on :class:`LeanTrace_ELBO`'s short path (same arguments, estimate and
    gradient); its fallbacks are ``TraceMeanField_ELBO``'s."""

    @staticmethod
    def _negative_elbo(model_trace: poutine.Trace, guide_trace: poutine.Trace) -> torch.Tensor | float:
        groups: dict[float | None, tuple[list, list]] = {}  # scale -> (guide-side terms, model-side terms)
        guide_sites = {name: site for name, site in guide_trace.nodes.items()
                       if site["type"] == "sample" and not site_is_subsample(site)}
        for name, site in guide_sites.items():
            if not site["is_observed"] and not site["fn"].has_rsample:
                raise _NeedsScoreFunction(name)
        as_kl = set()
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            q = guide_sites.get(name) if not site["is_observed"] else None
            if q is not None:
                try:
                    kl = scale_and_mask(kl_divergence(q["fn"], site["fn"]), q["scale"], q["mask"])
                except NotImplementedError:
                    pass  # no closed form: log q - log p, as any other site
                else:
                    term = kl.sum() if torch.is_tensor(kl) else kl * torch.Size(q["fn"].batch_shape).numel()
                    groups.setdefault(None, ([], []))[0].append(term)
                    as_kl.add(name)
                    continue
            scale, term = _site_term(site)
            if term is not None:
                groups.setdefault(scale, ([], []))[1].append(term)
        for name, site in guide_sites.items():
            if name not in as_kl:
                scale, term = _site_term(site)
                if term is not None:
                    groups.setdefault(scale, ([], []))[0].append(term)
        return _grouped(groups)
