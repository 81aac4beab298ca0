"""The meta-learned Gaussian process's recipe (a function-space peer, issue 27): defaults, builder, protocol.

Kernel hyperparameters, a constant mean and the noise variance are shared by all tasks and trained by
the library's ``fit`` on the summed marginal likelihood of the training tasks (empirical Bayes across
tasks; with ``kernel="deep"`` a feature MLP before the RBF, Deep Kernel Transfer, Patacchiola et al.,
NeurIPS 2020).
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import ConfigError, RunConfig
from ..guides.empty import NoLatentGuide
from ..infer import LeanTrace_ELBO
from ..learner import MetaLearner
from ..models.gp import (
    DEFAULT_PERIODS,
    JITTER,
    KERNEL_CHOICES,
    MIN_NOISE_VAR,
    ConstantMean,
    DeepKernel,
    GPModel,
    MLPMean,
    sum_kernel,
)
from ..nn import FunctionalNet
from .common import REGRESSION, MethodInfo

# Adam 3e-2 on meta-batches of 25 tasks for 3,000 steps, picked by measurement on sinusoid_line (test NLL
# after 3,000 steps: 5e-4 1.17, 3e-3 1.00, 1e-2 0.975, 3e-2 0.969; benchmarks/RESULTS_gp.md): a dozen
# hyperparameters converge long before the weight-space methods' 70,000 steps. These win over the regression
# benchmarks' defaults (pyro_meta.methods.protocol_defaults).
RUN_DEFAULTS = {"meta_lr": 3e-2, "meta_batch": 25, "steps": 3000}


def build(cfg: RunConfig, net: FunctionalNet) -> MetaLearner:
    torch.manual_seed(cfg.seed)  # the deep kernel's nn.Linear layers draw their weights from the global RNG
    x_dim = net.sizes[0]  # the benchmark's task MLP gives the input width (custom families included)
    kernel = DeepKernel(x_dim, cfg.hidden) if cfg.kernel == "deep" else sum_kernel(x_dim)
    mean = MLPMean(x_dim, cfg.encoder_hidden, net.sizes[-1]) if cfg.gp_mean == "mlp" else ConstantMean()
    model = GPModel(kernel, noise_var=cfg.noise_std**2, mean=mean)
    # no latent site: LeanTrace_ELBO's loss is -log p(y_support, y_query) per task, with no sampling
    return MetaLearner(model, NoLatentGuide(), LeanTrace_ELBO(), name="gp", protocol=protocol(cfg))


def kernel_text(cfg: RunConfig) -> str:
    if cfg.kernel == "deep":
        return (f"deep kernel: RBF (ARD) on the features of an MLP {[*cfg.hidden]} (ReLU between layers) shared "
                "by all tasks (Deep Kernel Transfer)")
    return (f"RBF (ARD) + linear v (b + x.z) + {len(DEFAULT_PERIODS)} periodic components with initial periods "
            f"{list(DEFAULT_PERIODS)} (a spread instead of restarts: one start settles on RBF + linear)")


def protocol(cfg: RunConfig) -> dict[str, Any]:
    return {
        "paper": "Rasmussen & Williams, Gaussian Processes for Machine Learning, 2006 (type-II maximum likelihood "
                 "across tasks); deep kernel: Patacchiola et al., NeurIPS 2020",
        "objective": "per task, -log p(y_support, y_query) under the GP (the exact joint marginal likelihood); the "
                     "meta-batch loss is the mean over tasks",
        "model_and_guide": "the model integrates each task's function out: a factor log p(y_support), the site "
                           "y_query with the per-point predictive N(mu_q, var_q) given the support, and, when the "
                           "query labels are present, a factor log p(y_query | y_support) - sum_q log N(y_q | mu_q, "
                           "var_q) (the joint conditional); the guide is empty (no latent site), so Trace_ELBO is "
                           "exactly -log p(y_support, y_query)",
        "kernel": kernel_text(cfg),
        "mean": (f"a learned MLP of x {[*cfg.encoder_hidden]} (ReLU between layers), shared by all tasks (PACOH-GP's "
                 "learned mean)" if cfg.gp_mean == "mlp" else "a learned constant"),
        "noise": f"learned variance {MIN_NOISE_VAR:g} + softplus(r), initialized at {cfg.noise_std:g}^2; jitter "
                 f"{JITTER:g} on the diagonal of each Cholesky",
        "hyperparameters": "softplus of unconstrained parameters, shared by all tasks",
        "batching": "a batched kernel over [T, N, D] (broadcast differences), one batched Cholesky of the "
                    "(S + Q) x (S + Q) covariance per task; no loop over tasks",
        "predictive": "exact GP posterior per query point, N(mu_q, var_q + noise) (eval_samples 1)",
        "network": {"type": "gp", "kernel": cfg.kernel, "mean": cfg.gp_mean, **({"features": [*cfg.hidden]} if cfg.kernel == "deep" else {})},
        "batch_norm": "none",
        "outer_scored_sets": "support+query",
        "outer_loop": f"Adam {cfg.meta_lr:g}, {cfg.meta_batch} tasks per meta-batch, {cfg.steps} steps",
    }


def defaults(benchmark: str, ways: int | None, shots: int) -> dict[str, Any]:
    # the predictive is exact: one pass; encoder_hidden: the widths of the MLP mean (gp_mean "mlp")
    return {"kernel": "sum", "gp_mean": "constant", "encoder_hidden": [32, 32], "noise_std": 0.3, "eval_samples": 1}


def check(cfg: RunConfig) -> dict[str, Any]:
    """Run by ``resolve`` on the filled-in config (as ``dependent``): refuse what the GP cannot use; fills nothing."""
    if cfg.kernel not in KERNEL_CHOICES:
        raise ConfigError(f"kernel must be one of {', '.join(KERNEL_CHOICES)}, got {cfg.kernel!r}")
    if cfg.noise_std**2 <= MIN_NOISE_VAR:
        raise ConfigError(f"noise_std (the GP's initial noise std) must exceed {MIN_NOISE_VAR**0.5:g}, got {cfg.noise_std!r}")
    return {}


RECIPE = MethodInfo(
    "gp", "Gaussian process, kernel hyperparameters meta-learned by the summed marginal likelihood of training tasks",
    defaults, build, protocol, REGRESSION, dependent=check, run_defaults=RUN_DEFAULTS)
