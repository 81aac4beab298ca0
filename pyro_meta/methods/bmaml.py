"""BMAML's recipe (Yoon, Kim, Dia, Kim, Bengio & Ahn, Bayesian Model-Agnostic Meta-Learning, NeurIPS 2018):
defaults, builder and protocol text."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..config import RunConfig
from ..guides.bmaml import BMAMLGuide, bmaml_kernel
from ..infer.losses import BFALoss, ChaserLoss
from ..learner import MetaLearner
from ..models.bmaml import NOISE_PRECISION_PRIOR, WEIGHT_PRECISION_PRIOR, BMAMLModel
from ..nn import FunctionalNet
from ..tasks import CLASSIFICATION_BENCHMARKS
from .common import REGRESSION, MethodInfo, bn_text, make_likelihood

BMAML_OBJECTIVES = ("chaser", "bfa", "chaser-full")
# initial particles: the weight precision at its prior mean (lambda = 1) and, for regression, the noise
# precision at 100 (noise std 0.1), as in the authors' code
INIT_LOG_LAMBDA = 0.0
INIT_LOG_GAMMA = math.log(100.0)


def initial_particles(net: FunctionalNet, num: int, seed: int, regression: bool,
                      noise_std: float | None = None) -> torch.Tensor:
    """``[M, P]``: each particle's weights from the network's initializer with its own seed, then
    ``log lambda`` (and ``log gamma``: ``-2 log noise_std``, default the authors' noise std 0.1)."""
    log_gamma = INIT_LOG_GAMMA if noise_std is None else -2 * math.log(noise_std)
    rows = []
    for m in range(num):
        w = net.init(torch.Generator().manual_seed(seed * 1009 + m))
        extra = [INIT_LOG_LAMBDA] + ([log_gamma] if regression else [])
        rows.append(torch.cat([w, w.new_tensor(extra)]))
    return torch.stack(rows)


def build(cfg: RunConfig, net: FunctionalNet) -> MetaLearner:
    regression = cfg.benchmark not in CLASSIFICATION_BENCHMARKS
    m = cfg.particles
    model = BMAMLModel(net, None if regression else make_likelihood(cfg), regression=regression, num_particles=m)
    guide = BMAMLGuide(model, initial_particles(net, m, cfg.seed, regression, cfg.noise_std if regression else None),
                       cfg.inner_steps, cfg.inner_steps_eval,
                       cfg.inner_lr, cfg.leader_steps, cfg.first_order,
                       kernel=bmaml_kernel(m, cfg.bandwidth_factor),
                       precision_lr_factor=cfg.precision_lr_factor)
    objective = BFALoss() if cfg.objective == "bfa" else ChaserLoss(include_precisions=cfg.objective == "chaser-full")
    return MetaLearner(model, guide, objective, name="bfa" if cfg.objective == "bfa" else "bmaml",
                       protocol=protocol(cfg))


def protocol(cfg: RunConfig) -> dict[str, Any]:
    regression = cfg.benchmark not in CLASSIFICATION_BENCHMARKS
    a_w, b_w = WEIGHT_PRECISION_PRIOR
    a_n, b_n = NOISE_PRECISION_PRIOR
    return {
        "paper": "Yoon et al., Bayesian Model-Agnostic Meta-Learning, NeurIPS 2018",
        "objective": cfg.objective,
        "objective_text": (
            "chaser loss: sum over particles of ||w_follower - stopgrad(w_leader)||^2 over the network weights "
            + ("and the log precisions (this library's option 'chaser-full')" if cfg.objective == "chaser-full"
               else "(log precisions excluded, as in the authors' code)")
            + ", mean over tasks; follower = inner_steps SVGD steps on the support posterior from the "
            "meta-learned initial particles, leader = leader_steps more on support + query"
            if cfg.objective != "bfa" else
            "BFA: -log (1/M) sum_m p(y_query | x_query, theta_m) per task (the whole query set's likelihood "
            "inside the mixture), mean over tasks; theta_m = the follower's particles"),
        "particles": cfg.particles,
        "priors": (f"w ~ N(0, 1/lambda); lambda ~ Gamma({a_w:g}, rate {b_w:g})"
                   + (f"; noise precision gamma ~ Gamma({a_n:g}, rate {b_n:g}); y ~ N(f(w, x), 1/gamma)"
                      if regression else "; y ~ Categorical(softmax(f(w, x)))")
                   + "; log lambda and log gamma carried in each particle (log-space densities)"),
        "initial_particles": ("weights from the network initializer, one seed per particle; lambda = 1"
                              + (f"; gamma = 1 / noise_std^2 = {1 / cfg.noise_std ** 2:g} (noise_std {cfg.noise_std:g}; "
                                 "the authors': 0.1)" if regression else "") + " (all meta-learned)"),
        "inner_loop": f"SVGD on p(theta | support), {cfg.inner_steps} step(s) in training, {cfg.inner_steps_eval} "
                      f"at test, step size {cfg.inner_lr:g}; log density from a Pyro trace of the model "
                      "(summed over support points, prior included)",
        "leader_steps": cfg.leader_steps if cfg.objective != "bfa" else "unused (BFA)",
        "precision_step": f"inner_lr x {cfg.precision_lr_factor:g} on log lambda" + (" and log gamma" if regression else "")
                          + (" (the authors' lambda_lr, 1)" if cfg.precision_lr_factor == 1.0 else " (this library's)"),
        "kernel": "RBF exp(-||x - y||^2 / h), one bandwidth h = "
                  + (f"{cfg.bandwidth_factor:g} x " if cfg.bandwidth_factor != 1.0 else "")
                  + "median pairwise squared distance / log M, detached (the authors' code"
                  + ("" if cfg.bandwidth_factor == 1.0 else ", but for the factor: this library's option")
                  + "; log(M + 1) when M = 1)",
        "prediction": "equal-weight mixture over the M particles (eval_samples = M: one draw per particle)",
        "likelihood": "Gaussian with each particle's own noise precision" if regression else "Categorical (softmax)",
        "gradient_order": ("first (scores detached in the inner loop; kernel terms differentiated)"
                           if cfg.first_order else "second"),
        "batch_norm": bn_text(cfg),
        "outer_scored_sets": "support (follower) and support + query (leader)" if cfg.objective != "bfa"
        else "query (predictive of the follower)",
    }


def defaults(benchmark: str, ways: int | None, shots: int) -> dict[str, Any]:
    """The authors' sinusoid protocol (ANCHORS.md): 10 particles, 1 follower and 1 leader SVGD step of
    1e-3, up to 10 steps at test. Omniglot: this library's choice (no protocol published): 5 particles,
    step 0.2, 2 steps at test. A particle's own term in the SVGD direction is ``lr / M`` times its log-likelihood gradient
    summed over the 5 support images, so at M = 5 it is a step of 0.2 on the mean cross-entropy (MAML's is
    0.4), before the kernel-weighted gradients of the other particles are added."""
    common = {"objective": "chaser", "leader_steps": 1, "inner_steps": 1, "inner_steps_eval": 10,
              "eval_samples": None, "bandwidth_factor": 1.0}
    if benchmark in CLASSIFICATION_BENCHMARKS:
        # the log lambda score holds D / 2 = 56,000 on conv4: a step of 0.2 on it would overflow lambda.
        # 2 SVGD steps at test, chosen on the validation episodes of a 747-step run (validation accuracy
        # 26% / 58% / 51% / 20% at 1 / 2 / 3 / 5 steps; at 10 the logits diverged): experiments/RESULTS.md
        return {**common, "particles": 5, "inner_lr": 0.2, "precision_lr_factor": 1e-4, "inner_steps_eval": 2}
    # noise_std: every particle's initial noise std, 1 / sqrt(gamma): the authors' 0.1
    if benchmark == "sinusoid_line":
        # Measured (sinusoid_line, 5 shots, seed 0, 3,000 steps, 600 test tasks; MSE / NLL / 90% coverage;
        # experiments/RESULTS_weightspace.md): the authors' chaser loss and noise start 4.44 / 39.6 / 0.34;
        # the chaser never trains the particles' noise precisions and SVGD barely spreads them, so the
        # predictive stays 4-5x too narrow whatever the noise start (std 0.32, the noise prior's mean: 2.89 /
        # 10.5 / 0.46). The paper's other objective, BFA (the query's log predictive under the follower's
        # particles), trains them: 4.29 / 1.69 / 0.90 with 45 targets (run_defaults) and 10 SVGD steps at
        # test; 5 follower steps in training made it worse (14.7 / 1.78 / 0.94). SVGD steps at test chosen
        # on the 100 validation tasks (NLL / coverage: 10 1.66 / 0.91, 20 1.58 / 0.90, 40 1.56 / 0.86): 20.
        return {**common, "objective": "bfa", "particles": 10, "inner_lr": 1e-3, "precision_lr_factor": 1.0,
                "noise_std": 0.32, "inner_steps_eval": 20}
    return {**common, "particles": 10, "inner_lr": 1e-3, "precision_lr_factor": 1.0, "noise_std": 0.1}


def run_defaults(benchmark: str) -> dict[str, Any]:
    """On ``sinusoid_line``: 45 target points per training task (the BFA objective's query set)."""
    return {"queries": 45} if benchmark == "sinusoid_line" else {}


def dependent(cfg: RunConfig) -> dict[str, Any]:
    """One predictive draw per particle: ``eval_samples = particles``."""
    return {"eval_samples": cfg.particles}


RECIPE = MethodInfo(
    "bmaml", "BMAML: SVGD particles per task from meta-learned initial particles; chaser loss or BFA",
    defaults, build, protocol, (*REGRESSION, "omniglot"), objectives=BMAML_OBJECTIVES, dependent=dependent,
    run_defaults=run_defaults)
