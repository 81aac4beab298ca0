"""MAML's recipe (Finn, Abbeel & Levine, ICML 2017): defaults, builder and protocol text."""

from __future__ import annotations

import math
from typing import Any

from ..config import RunConfig
from ..guides import MAMLGuide
from ..learner import MetaLearner
from ..models import MSE_NOISE_STD, MAMLModel
from ..nn import FunctionalNet
from ..tasks import CLASSIFICATION_BENCHMARKS
from .common import REGRESSION, MethodInfo, bn_text, init_weights, make_likelihood


def build(cfg: RunConfig, net: FunctionalNet) -> MetaLearner:
    model = MAMLModel(net, make_likelihood(cfg))
    guide = MAMLGuide(model, init_weights(net, cfg.seed), cfg.inner_steps, cfg.inner_steps_eval, cfg.inner_lr,
                      cfg.first_order)
    return MetaLearner(model, guide, name="maml", protocol=protocol(cfg))


def protocol(cfg: RunConfig) -> dict[str, Any]:
    return {
        "paper": "Finn, Abbeel & Levine, Model-Agnostic Meta-Learning, ICML 2017",
        "objective": "query-set loss after adaptation (Trace_ELBO with a Delta guide and a flat prior)",
        "inner_loss": inner_loss_text(cfg),
        "gradient_order": "first" if cfg.first_order else "second",
        "batch_norm": bn_text(cfg),
        "outer_scored_sets": "query",
    }


def inner_loss_text(cfg: RunConfig) -> str:
    if cfg.benchmark in CLASSIFICATION_BENCHMARKS:
        return "mean softmax cross-entropy on the support set (Categorical NLL)"
    if not cfg.learn_noise and math.isclose(cfg.noise_std, MSE_NOISE_STD):
        return "mean squared error on the support set (Gaussian NLL, std 1/sqrt(2), minus const)"
    return "mean Gaussian NLL on the support set"


def defaults(benchmark: str, ways: int | None, shots: int) -> dict[str, Any]:
    if benchmark in CLASSIFICATION_BENCHMARKS:
        # MAML's Omniglot protocol (ANCHORS.md): 5-way: 1 inner step of 0.4; 20-way: 5 steps of 0.1.
        # At test, 10 steps (our choice; the step size is the training one).
        five = (ways or 5) <= 5
        return {"inner_steps": 1 if five else 5, "inner_steps_eval": 10, "inner_lr": 0.4 if five else 0.1,
                "eval_samples": 1}
    return {"inner_steps": 1, "inner_steps_eval": 10, "inner_lr": 0.01, "noise_std": MSE_NOISE_STD,
            "learn_noise": False, "eval_samples": 1}


RECIPE = MethodInfo(
    "maml", "MAML, the point-estimate baseline (Delta guide from K SGD steps)",
    defaults, build, protocol, (*REGRESSION, "omniglot"))
