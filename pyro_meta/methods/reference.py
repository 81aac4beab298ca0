"""The reference rows' recipes, ``prior`` and ``oracle``: no training (``steps`` 0), exact predictives by
quadrature over the family's task parameters (:mod:`pyro_meta.models.reference`)."""

from __future__ import annotations

from typing import Any

from ..config import ConfigError, RunConfig
from ..guides.empty import NoLatentGuide
from ..learner import MetaLearner
from ..models.reference import (
    NEIGHBOURS,
    POOL_POINTS,
    POOL_SEED,
    POOL_TASKS,
    ReferenceModel,
    has_posterior_grid,
    oracle_refusal,
)
from ..nn import FunctionalNet
from .common import MethodInfo

# Quadrature: 100 midpoints per parameter axis (30 for sinusoid_bmaml's three: 27,000 points), 256 mixture
# components per query point. Measured by experiments/reference_check.py: refining either changes the test
# NLL by less than 0.01 (see its results).
GRID_POINTS = 100
FAMILY_GRID_POINTS = {"sinusoid_bmaml": 30}
COMPONENTS = 256
# sinusoid_bmaml's oracle: frequencies in its posterior quadrature (RegressionFamily.posterior_grid), and the
# fewest shots it handles
POSTERIOR_FREQUENCIES = 8000
POSTERIOR_MIN_SHOTS = 3
# prior: every regression family (a quadrature where the family has one, else Monte Carlo from its sampler);
# oracle: the families with observation noise on the support, or a posterior quadrature of their own
PRIOR_BENCHMARKS = ("sinusoid", "sinusoid_line", "sinusoid_bmaml", "custom")
ORACLE_BENCHMARKS = ("sinusoid", "sinusoid_line", "sinusoid_bmaml")  # check() refuses the noiseless ones


def grid_points(benchmark: str) -> int:
    return FAMILY_GRID_POINTS.get(benchmark, GRID_POINTS)


def _builder(kind: str):  # noqa: ANN202 - a build function
    def build(cfg: RunConfig, net: FunctionalNet) -> MetaLearner:
        from ..tasks.registry import family_of

        model = ReferenceModel(family_of(cfg.benchmark), kind, grid_points(cfg.benchmark), COMPONENTS,
                               posterior_n=POSTERIOR_FREQUENCIES)
        return MetaLearner(model, NoLatentGuide(), name=kind, protocol=_protocol(kind)(cfg))
    return build


def _protocol(kind: str):  # noqa: ANN202 - a protocol function
    def protocol(cfg: RunConfig) -> dict[str, Any]:
        from ..tasks.registry import family_of

        what = ("the family's prior predictive (ignores the support set)" if kind == "prior" else
                "the exact posterior predictive given the support set")
        n = grid_points(cfg.benchmark)
        family = family_of(cfg.benchmark)
        strata = (f"per query point {COMPONENTS} strata of the values f(x) (half of equal mass, half of equal width), "
                  "each a Normal with the stratum's mean and variance plus the noise")
        if kind == "oracle" and has_posterior_grid(family):
            how = (f"the family's posterior quadrature (RegressionFamily.posterior_grid): {POSTERIOR_FREQUENCIES} "
                   "frequencies, those within 30 nats of the best profile likelihood kept, at each a 16 x 16 grid over "
                   f"(A cos p, A sin p) of +-6 least-squares standard deviations, exact weights; {strata}")
            noise = "support: the family's 0.01 A; query targets noiseless (each stratum's std floored at 1e-3 of the "\
                    "point's range of f)"
        elif hasattr(family, "prior_grid") and family.prior_grid(1) is not None:
            how = f"{n} midpoints per parameter axis of the task prior, float64" + (
                ", weighted by the support's likelihood" if kind == "oracle" else "") + f"; {strata}"
            noise = "the family's own observation noise" + (
                " (noiseless query targets: each stratum's std floored at 1e-3 of the point's range of f)"
                if not getattr(family, "noise_std", 0) > 0 else "")
        else:
            how = (f"Monte Carlo: {POOL_TASKS} tasks x {POOL_POINTS} points drawn once from the family's sampler "
                   f"(seed {POOL_SEED}); at each query input the y of the {NEIGHBOURS} nearest pooled inputs; {strata}")
            noise = "whatever the family's sampler adds (it is in the pooled draws)"
        return {"reference": what, "quadrature": how, "training": "none (steps 0)", "noise": noise}
    return protocol


def check(cfg: RunConfig) -> dict[str, Any]:
    """The oracle needs observation noise on the support, or the family's own posterior quadrature with
    the shots it needs (``resolve``'s dependent check)."""
    from ..tasks.registry import family_of

    family = family_of(cfg.benchmark)
    if has_posterior_grid(family):
        if cfg.shots < POSTERIOR_MIN_SHOTS:
            raise ConfigError(f"the oracle of {cfg.benchmark!r} needs at least {POSTERIOR_MIN_SHOTS} shots: with fewer "
                              "the posterior spreads along a curve that its quadrature does not follow")
    elif not getattr(family, "noise_std", 0) > 0:
        raise ConfigError(oracle_refusal(cfg.benchmark))
    return {}


def defaults(benchmark: str, ways: int | None, shots: int) -> dict[str, Any]:
    return {"eval_samples": 1}  # the predictive is the mixture itself: one pass carries it


PRIOR = MethodInfo("prior", "reference row: the family's exact prior predictive (ignores the support; no training)",
                   defaults, _builder("prior"), _protocol("prior"), PRIOR_BENCHMARKS, run_defaults={"steps": 0})
ORACLE = MethodInfo("oracle", "reference row: the exact posterior predictive by quadrature (no training)",
                    defaults, _builder("oracle"), _protocol("oracle"), ORACLE_BENCHMARKS, dependent=check,
                    run_defaults={"steps": 0})
