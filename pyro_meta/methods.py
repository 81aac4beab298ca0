"""The method registry: name -> defaults and a builder of the MetaLearner (model, guide, objective)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from .config import ConfigError, RunConfig
from .guides import ABMLGuide, MAMLGuide
from .learner import MetaLearner
from .likelihoods import Gaussian
from .models import MSE_NOISE_STD, ABMLModel, MAMLModel
from .nn import MLP, FunctionalNet
from .tasks import BENCHMARKS

# Settings whose meaning and default depend on the method.
METHOD_FIELDS = ("inner_steps", "inner_steps_eval", "inner_lr", "noise_std", "learn_noise",
                 "prior_init_std", "inner_samples", "kl_weight_inner", "kl_weight_outer", "noise_scaled_lr",
                 "eval_samples")


@dataclass(frozen=True)
class MethodInfo:
    name: str
    description: str
    defaults: dict[str, Any]
    build: Callable[[RunConfig, FunctionalNet], MetaLearner]
    protocol: Callable[[RunConfig], dict[str, Any]]


def _net(cfg: RunConfig) -> FunctionalNet:
    if cfg.benchmark in ("sinusoid", "sinusoid_line"):
        return MLP([1, *cfg.hidden, 1], cfg.activation)
    raise ConfigError(f"no network is defined for benchmark {cfg.benchmark!r}")


def _init(net: FunctionalNet, seed: int) -> torch.Tensor:
    return net.init(torch.Generator().manual_seed(seed))


def _build_maml(cfg: RunConfig, net: FunctionalNet) -> MetaLearner:
    model = MAMLModel(net, Gaussian(cfg.noise_std, cfg.learn_noise))
    guide = MAMLGuide(model, _init(net, cfg.seed), cfg.inner_steps, cfg.inner_steps_eval, cfg.inner_lr,
                      cfg.first_order)
    return MetaLearner(model, guide, name="maml", protocol=_maml_protocol(cfg))


def _maml_protocol(cfg: RunConfig) -> dict[str, Any]:
    return {
        "paper": "Finn, Abbeel & Levine, Model-Agnostic Meta-Learning, ICML 2017",
        "objective": "query-set loss after adaptation (Trace_ELBO with a Delta guide and a flat prior)",
        "inner_loss": "mean squared error on the support set (Gaussian NLL, std 1/sqrt(2), minus const)"
        if not cfg.learn_noise and math.isclose(cfg.noise_std, MSE_NOISE_STD) else
        "mean Gaussian NLL on the support set",
        "gradient_order": "first" if cfg.first_order else "second",
        "batch_norm": "none (MLP)",
        "outer_scored_sets": "query",
    }


def _build_abml(cfg: RunConfig, net: FunctionalNet) -> MetaLearner:
    model = ABMLModel(net, Gaussian(cfg.noise_std, cfg.learn_noise), kl_weight=cfg.kl_weight_outer)
    guide = ABMLGuide(model, _init(net, cfg.seed), cfg.prior_init_std, cfg.inner_steps,
                      cfg.inner_steps_eval, cfg.inner_lr, cfg.inner_samples, cfg.kl_weight_inner,
                      cfg.first_order, cfg.noise_scaled_lr)
    return MetaLearner(model, guide, name="abml", protocol=_abml_protocol(cfg))


def _abml_protocol(cfg: RunConfig) -> dict[str, Any]:
    return {
        "paper": "Ravi & Beatson, Amortized Bayesian Meta-Learning, ICLR 2019",
        "hyperprior": "prior means ~ N(0, 1); prior precisions ~ Gamma(1, 0.01) (rate); MAP of theta",
        "objective": "Trace_ELBO over support + query: E_q[-log p(y_s, y_q | phi)] + kl_weight_outer * "
                     "KL(q || p(phi | theta)) per task, minus log p(theta); the meta-batch loss is the "
                     "mean over tasks (log p(theta) counted once per meta-batch, divided by T)",
        "outer_kl_estimator": "single-sample Monte Carlo (Trace_ELBO)",
        "inner_loss": "support ELBO per support point: (E_q[-log p(y_s | phi)] + kl_weight_inner * "
                      "KL(q || p(phi | theta))) / shots, closed-form KL, inner_samples MC draws",
        "inner_init": "q starts at the prior: mean mu_theta, std tau_theta^-1/2",
        "inner_step_size": "inner_lr * sigma^2 (noise-scaled, a deviation from plain SGD)"
        if cfg.noise_scaled_lr else "inner_lr (plain SGD, as in the paper)",
        "variance_parameterization": "q: log std (clamped to [-15, 5] where exponentiated); "
                                     "prior: precision = exp(r) + 1e-6 (r clamped at 40)",
        "gradient_order": "first" if cfg.first_order else "second",
        "batch_norm": "none (MLP)",
        "outer_scored_sets": "support+query",
    }


METHODS: dict[str, MethodInfo] = {
    "maml": MethodInfo(
        "maml", "MAML, the point-estimate baseline (Delta guide from K SGD steps)",
        {"inner_steps": 1, "inner_steps_eval": 10, "inner_lr": 0.01, "noise_std": MSE_NOISE_STD,
         "learn_noise": False, "eval_samples": 1},
        _build_maml, _maml_protocol),
    "abml": MethodInfo(
        "abml", "ABML: hyperprior on a Gaussian prior; Gaussian guide from K SGD steps on the support ELBO",
        # Observation noise: fixed at MAML's 1/sqrt(2) so both methods share one likelihood. A learned
        # noise (learn_noise=true) grew to ~1.6 on sinusoids and absorbed the misfit, and q stopped
        # moving away from the prior (README, "Protocol choices").
        {"inner_steps": 5, "inner_steps_eval": 5, "inner_lr": 0.01, "noise_std": MSE_NOISE_STD,
         "learn_noise": False, "prior_init_std": 0.1, "inner_samples": 1, "kl_weight_inner": 1.0,
         "kl_weight_outer": 1.0, "noise_scaled_lr": False, "eval_samples": 100},
        _build_abml, _abml_protocol),
}


def get_method(name: str) -> MethodInfo:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def resolve(cfg: RunConfig) -> RunConfig:
    """Fill every method-dependent ``None`` with the method's default; reject settings that the
    method does not use, unknown methods and unknown benchmarks."""
    cfg.check()
    info = get_method(cfg.method)
    if cfg.benchmark not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark {cfg.benchmark!r}; known: {', '.join(sorted(BENCHMARKS))}")
    updates: dict[str, Any] = {}
    for name in METHOD_FIELDS:
        v = getattr(cfg, name)
        if name not in info.defaults:
            if v is not None:
                raise ConfigError(f"{name} is not a setting of method {cfg.method!r} "
                                  f"(its settings: {sorted(info.defaults)})")
            continue
        updates[name] = info.defaults[name] if v is None else v
    if cfg.queries is None:
        updates["queries"] = cfg.shots
    out = replace(cfg, **updates)
    out.check()
    return out


def build_learner(cfg: RunConfig) -> MetaLearner:
    """The MetaLearner of a resolved config, with parameters initialized from ``cfg.seed``."""
    cfg = resolve(cfg)
    info = get_method(cfg.method)
    return info.build(cfg, _net(cfg))


def protocol_of(cfg: RunConfig) -> dict[str, Any]:
    cfg = resolve(cfg)
    return {**get_method(cfg.method).protocol(cfg), "network": _net(cfg).describe()}
