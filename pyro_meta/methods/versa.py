"""VERSA's recipe (Gordon et al., ICLR 2019): defaults, builder and protocol text."""

from __future__ import annotations

from typing import Any

import torch

from ..config import RunConfig
from ..guides import VERSAGuide
from ..infer import MLPIP, LeanTrace_ELBO
from ..learner import MetaLearner
from ..models import VERSAModel
from ..nn import FunctionalNet
from .common import MethodInfo, bn_text, init_weights


def build(cfg: RunConfig, net: FunctionalNet) -> MetaLearner:
    model = VERSAModel(net, init_weights(net, cfg.seed))
    torch.manual_seed(cfg.seed)  # the amortizer's nn.Linear layers draw from the global RNG
    guide = VERSAGuide(model, cfg.hidden)
    objective = MLPIP(cfg.train_samples, cfg.local_reparam) if cfg.objective == "ml-pip" else \
        LeanTrace_ELBO(num_particles=cfg.train_samples, vectorize_particles=True, max_plate_nesting=2)
    return MetaLearner(model, guide, objective, name="versa", protocol=protocol(cfg))


def protocol(cfg: RunConfig) -> dict[str, Any]:
    mlpip = cfg.objective == "ml-pip"
    return {
        "paper": "Gordon, Bronskill, Bauer, Nowozin & Turner, Meta-Learning Probabilistic Inference for "
                 "Prediction (VERSA), ICLR 2019",
        "objective": "ML-PIP: -mean over tasks and query points of log((1/L) sum_l p(y | x, psi_l)), no KL"
        if mlpip else "Trace_ELBO on the query set with a N(0, I) prior on each class's psi (amortized VI)",
        "samples_L": cfg.train_samples,
        "estimator": ("local reparameterization: logits sampled per query point from the Gaussian that "
                      "q(psi) induces" if cfg.local_reparam else "L weight samples per task")
        if mlpip else "L weight samples per task (vectorized particles)",
        "amortizer": f"per class, on the mean-pooled support features: ELU layers {list(cfg.hidden)}, "
                     "separate mean and log-variance heads for the weights and the bias",
        "feature_extractor": "shared conv4, point estimate (no prior)",
        "queries_per_class_train": cfg.queries,
        "queries_per_class_test": cfg.eval_queries,
        "batch_norm": bn_text(cfg),
        "outer_scored_sets": "query",
    }


def defaults(benchmark: str, ways: int | None, shots: int) -> dict[str, Any]:
    # VERSA's protocol (ANCHORS.md): L = 10, ML-PIP with local reparameterization
    return {"objective": "ml-pip", "train_samples": 10, "local_reparam": True, "eval_samples": 100}


RECIPE = MethodInfo(
    "versa", "VERSA: per-class amortized Gaussian over a linear head on a shared feature extractor; ML-PIP",
    defaults, build, protocol, ("omniglot",), objectives=("ml-pip", "elbo"), network="features")
