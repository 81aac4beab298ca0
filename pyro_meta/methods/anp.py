"""The attentive neural process's recipe (Kim et al., ICLR 2019): defaults, builder, protocol text.

``--objective cll`` (default): the deterministic path only (an attentive CNP), trained on
``-log p(y_query | support)``. ``--objective elbo``: the latent path too, trained with the ELBO
``E_q[-log p(y_query | z, support)] + KL(q(z | support + query) || p(z | support))``; at test ``z`` is
drawn from ``p(z | support)`` (the predictive guide).
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import RunConfig
from ..guides.anp import ANPGuide
from ..guides.empty import NoLatentGuide
from ..infer import LeanTrace_ELBO
from ..learner import MetaLearner
from ..models.anp import LATENT_STD_MIN, ANPModel
from ..models.cnp import MIN_STD
from ..nn import FunctionalNet
from .cnp import RUN_DEFAULTS as CNP_RUN_DEFAULTS
from .cnp import io_dims
from .common import REGRESSION, MethodInfo, elbo

ANP_OBJECTIVES = ("cll", "elbo")
HEADS = 8
SELF_ATTENTION_LAYERS = 2
LATENT_DIM = 128


# the CNP's optimizer and widths, with the benchmark's K training targets (the ANP's measured setting:
# 20,000 steps, test NLL 0.754 on sinusoid_line; the CNP's 45 targets were not measured for it)
RUN_DEFAULTS = {k: v for k, v in CNP_RUN_DEFAULTS.items() if k != "queries"}

def build(cfg: RunConfig, net: FunctionalNet) -> MetaLearner:
    torch.manual_seed(cfg.seed)  # nn.Linear layers draw their initial weights from the global RNG
    latent = cfg.objective == "elbo"
    model = ANPModel(*io_dims(net), cfg.encoder_hidden, cfg.hidden, HEADS, SELF_ATTENTION_LAYERS, latent,
                     LATENT_DIM)
    if not latent:
        return MetaLearner(model, NoLatentGuide(), LeanTrace_ELBO(), name="anp", protocol=protocol(cfg))
    # closed-form KL between the two diagonal Normals over z (TraceMeanField_ELBO), train_samples draws
    return MetaLearner(model, ANPGuide(model, with_query=True), elbo("analytic", cfg.train_samples), name="anp",
                       protocol=protocol(cfg), predictive_guide=ANPGuide(model, with_query=False))


def protocol(cfg: RunConfig) -> dict[str, Any]:
    latent = cfg.objective == "elbo"
    out = {
        "paper": "Kim et al., Attentive Neural Processes, ICLR 2019",
        "objective": cfg.objective,
        "objective_text": (
            "per task, E_q[-sum_q log p(y_q | x_q, r*_q, z)] + KL(q(z | support + query) || p(z | support)), "
            f"closed-form KL, {cfg.train_samples} draw(s) of z" if latent else
            "per task, -sum_q log N(y_q | mu, sigma^2) over the query points given the support set (the "
            "conditional log-likelihood; LeanTrace_ELBO with an empty guide)") + "; the meta-batch loss is the "
                                                                                "mean over tasks",
        "training_context": f"the support set ({cfg.shots} points per task)",
        "training_targets": f"the query set only ({cfg.queries} points per task)",
        "test": f"context the support set, targets the {cfg.eval_queries} query points of each fixed test task"
                + (f"; z ~ p(z | support), {cfg.eval_samples} draws" if latent else ""),
        "deterministic_path": f"per (x, y) pair: MLP {[*cfg.encoder_hidden]} (ReLU); {SELF_ATTENTION_LAYERS} "
                              f"self-attention layers over the support encodings; cross-attention from the query "
                              f"x to the support x ({HEADS} heads, width {cfg.encoder_hidden[-1]}, keys and queries "
                              "a shared 2-layer MLP of x, values the self-attended encodings); each attention "
                              "layer LayerNorm(input + multi-head attention), no feed-forward sublayer",
        "latent_path": (f"per (x, y) pair: MLP {[*cfg.encoder_hidden]}, mean-pooled, MLP to z's mean and std "
                        f"= {LATENT_STD_MIN:g} + {1 - LATENT_STD_MIN:g} sigmoid(raw), z of {LATENT_DIM}; the "
                        "same network gives q (support + query) and p (support)") if latent else "none",
        "decoder": f"MLP of (x, r*{', z' if latent else ''}): hidden {[*cfg.hidden]} (ReLU), outputs mu and raw; "
                   f"sigma = {MIN_STD:g} + softplus(raw)",
        "likelihood": "Gaussian with the decoder's per-point sigma (no noise_std setting)",
        "network": {"type": "anp", "encoder_hidden": [*cfg.encoder_hidden], "decoder_hidden": [*cfg.hidden]},
        "batch_norm": "none (MLP)",
        "outer_scored_sets": "query",
        "outer_loop": f"Adam {cfg.meta_lr:g}, {cfg.meta_batch} tasks per meta-batch, {cfg.steps} steps",
    }
    return out


def defaults(benchmark: str, ways: int | None, shots: int) -> dict[str, Any]:
    # eval_samples and train_samples depend on the objective: dependent() fills them
    return {"objective": "cll", "encoder_hidden": [128, 128, 128], "eval_samples": None, "train_samples": None}


def dependent(cfg: RunConfig) -> dict[str, Any]:
    """One predictive pass without the latent path (the predictive is exact); 100 draws of ``z`` with it."""
    latent = cfg.objective == "elbo"
    return {"eval_samples": 100 if latent else 1, "train_samples": 1}


RECIPE = MethodInfo(
    "anp", "attentive neural process: self- and cross-attention over the support set (--objective elbo: "
           "with the latent path)",
    defaults, build, protocol, REGRESSION, objectives=ANP_OBJECTIVES, dependent=dependent,
    run_defaults=RUN_DEFAULTS)
