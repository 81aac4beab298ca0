"""The reference rows' recipes, ``prior`` and ``oracle``: no training (``steps`` 0), exact predictives by
quadrature over the family's task parameters (:mod:`pyro_meta.models.reference`)."""

from __future__ import annotations

from typing import Any

from ..config import RunConfig
from ..guides.empty import NoLatentGuide
from ..learner import MetaLearner
from ..models.reference import ReferenceModel
from ..nn import FunctionalNet
from .common import MethodInfo

# Quadrature: 100 x 100 midpoints per parameter pair, 256 mixture components per query point. Measured by
# experiments/reference_check.py: refining either changes the test NLL by less than 0.01 (see its results).
GRID_POINTS = 100
COMPONENTS = 256
# the families that offer a prior quadrature and noisy targets (their exact predictive has a density)
REFERENCE_BENCHMARKS = ("sinusoid_line",)


def _builder(kind: str):  # noqa: ANN202 - a build function
    def build(cfg: RunConfig, net: FunctionalNet) -> MetaLearner:
        from ..tasks.registry import family_of

        model = ReferenceModel(family_of(cfg.benchmark), kind, GRID_POINTS, COMPONENTS)
        return MetaLearner(model, NoLatentGuide(), name=kind, protocol=_protocol(kind)(cfg))
    return build


def _protocol(kind: str):  # noqa: ANN202 - a protocol function
    def protocol(cfg: RunConfig) -> dict[str, Any]:
        what = ("the family's prior predictive (ignores the support set)" if kind == "prior" else
                "the exact posterior predictive given the support set")
        how = (f"{GRID_POINTS}x{GRID_POINTS} midpoint grid per parameter pair of the task prior, float64; per query "
               f"point {COMPONENTS} " + ("equal-mass strata of the grid's f(x) values, each a Normal with the "
                                         "stratum's mean and variance plus the noise" if kind == "prior" else
                                         "grid points of largest posterior weight, renormalized (dropped mass "
                                         "recorded)"))
        return {"reference": what, "quadrature": how, "training": "none (steps 0)",
                "noise": "the family's own observation noise"}
    return protocol


def defaults(benchmark: str, ways: int | None, shots: int) -> dict[str, Any]:
    return {"eval_samples": 1}  # the predictive is the mixture itself: one pass carries it


PRIOR = MethodInfo("prior", "reference row: the family's exact prior predictive (ignores the support; no training)",
                   defaults, _builder("prior"), _protocol("prior"), REFERENCE_BENCHMARKS, run_defaults={"steps": 0})
ORACLE = MethodInfo("oracle", "reference row: the exact posterior predictive by quadrature (no training)",
                    defaults, _builder("oracle"), _protocol("oracle"), REFERENCE_BENCHMARKS,
                    run_defaults={"steps": 0})
