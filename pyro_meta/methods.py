"""The method registry: name -> defaults and a builder of the MetaLearner (model, guide, objective)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from pyro.infer import Trace_ELBO

from .config import ConfigError, RunConfig
from .guides import ABMLGuide, MAMLGuide, VERSAGuide
from .infer import MLPIP
from .learner import MetaLearner
from .likelihoods import Categorical, Gaussian, Likelihood
from .models import MSE_NOISE_STD, ABMLModel, MAMLModel, VERSAModel
from .nn import MLP, Conv4, FunctionalNet
from .schedule import normalize_schedule
from .tasks import BENCHMARKS, CLASSIFICATION_BENCHMARKS, all_benchmarks, is_known_benchmark
from .tasks.custom import custom_family
from .threads import default_threads

# Settings whose meaning and default depend on the method.
METHOD_FIELDS = ("inner_steps", "inner_steps_eval", "inner_lr", "noise_std", "learn_noise",
                 "prior_init_std", "inner_samples", "kl_weight_inner", "kl_weight_outer", "noise_scaled_lr",
                 "objective", "train_samples", "local_reparam", "eval_samples")
# Settings that only classification benchmarks (images) have.
CLASSIFICATION_FIELDS = ("ways", "data_root", "split", "filters", "downsample", "batch_norm")


@dataclass(frozen=True)
class MethodInfo:
    """``defaults(benchmark, ways, shots)``: the method's settings (``METHOD_FIELDS``) on a benchmark."""

    name: str
    description: str
    defaults: Callable[[str, int | None, int], dict[str, Any]]
    build: Callable[[RunConfig, FunctionalNet], MetaLearner]
    protocol: Callable[[RunConfig], dict[str, Any]]
    benchmarks: tuple[str, ...]


def _net(cfg: RunConfig) -> FunctionalNet:
    """The task network (MAML, ABML: with a ``ways``-wide head) or feature extractor (VERSA)."""
    if cfg.benchmark in ("sinusoid", "sinusoid_line"):
        return MLP([1, *cfg.hidden, 1], cfg.activation)
    family = custom_family(cfg.benchmark)
    if family is not None:
        x_shape, y_dim = family.probe["x_shape"], family.probe["y_dim"]
        return MLP([x_shape[0], *cfg.hidden, y_dim], cfg.activation)
    if cfg.benchmark in CLASSIFICATION_BENCHMARKS:
        return Conv4(None if cfg.method == "versa" else cfg.ways, in_channels=1, image_size=28,
                     filters=cfg.filters, downsample=cfg.downsample, batch_norm=cfg.batch_norm)
    raise ConfigError(f"no network is defined for benchmark {cfg.benchmark!r}")


def _likelihood(cfg: RunConfig) -> Likelihood:
    if cfg.benchmark in CLASSIFICATION_BENCHMARKS:
        return Categorical()
    return Gaussian(cfg.noise_std, cfg.learn_noise)


def _init(net: FunctionalNet, seed: int) -> torch.Tensor:
    return net.init(torch.Generator().manual_seed(seed))


def _build_maml(cfg: RunConfig, net: FunctionalNet) -> MetaLearner:
    model = MAMLModel(net, _likelihood(cfg))
    guide = MAMLGuide(model, _init(net, cfg.seed), cfg.inner_steps, cfg.inner_steps_eval, cfg.inner_lr,
                      cfg.first_order)
    return MetaLearner(model, guide, name="maml", protocol=_maml_protocol(cfg))


def _maml_protocol(cfg: RunConfig) -> dict[str, Any]:
    return {
        "paper": "Finn, Abbeel & Levine, Model-Agnostic Meta-Learning, ICML 2017",
        "objective": "query-set loss after adaptation (Trace_ELBO with a Delta guide and a flat prior)",
        "inner_loss": _maml_inner_loss(cfg),
        "gradient_order": "first" if cfg.first_order else "second",
        "batch_norm": _bn_text(cfg),
        "outer_scored_sets": "query",
    }


def _maml_inner_loss(cfg: RunConfig) -> str:
    if cfg.benchmark in CLASSIFICATION_BENCHMARKS:
        return "mean softmax cross-entropy on the support set (Categorical NLL)"
    if not cfg.learn_noise and math.isclose(cfg.noise_std, MSE_NOISE_STD):
        return "mean squared error on the support set (Gaussian NLL, std 1/sqrt(2), minus const)"
    return "mean Gaussian NLL on the support set"


def _bn_text(cfg: RunConfig) -> str:
    if cfg.benchmark not in CLASSIFICATION_BENCHMARKS:
        return "none (MLP)"
    if cfg.batch_norm == "none":
        return "none"
    return ("per-task batch statistics, computed separately over each task's support set and over its "
            "query set, in training and at test (transductive over the query set; no running averages)")


def _build_abml(cfg: RunConfig, net: FunctionalNet) -> MetaLearner:
    model = ABMLModel(net, _likelihood(cfg), kl_weight=cfg.kl_weight_outer)
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
        "batch_norm": _bn_text(cfg),
        "outer_scored_sets": "support+query",
    }


def _build_versa(cfg: RunConfig, net: FunctionalNet) -> MetaLearner:
    model = VERSAModel(net, _init(net, cfg.seed))
    torch.manual_seed(cfg.seed)  # the amortizer's nn.Linear layers draw from the global RNG
    guide = VERSAGuide(model, cfg.hidden)
    objective = MLPIP(cfg.train_samples, cfg.local_reparam) if cfg.objective == "ml-pip" else \
        Trace_ELBO(num_particles=cfg.train_samples, vectorize_particles=True, max_plate_nesting=2)
    return MetaLearner(model, guide, objective, name="versa", protocol=_versa_protocol(cfg))


def _versa_protocol(cfg: RunConfig) -> dict[str, Any]:
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
        "batch_norm": _bn_text(cfg),
        "outer_scored_sets": "query",
    }


def _maml_defaults(benchmark: str, ways: int | None, shots: int) -> dict[str, Any]:
    if benchmark in CLASSIFICATION_BENCHMARKS:
        # MAML's Omniglot protocol (ANCHORS.md): 5-way: 1 inner step of 0.4; 20-way: 5 steps of 0.1.
        # At test, 10 steps (our choice; the step size is the training one).
        five = (ways or 5) <= 5
        return {"inner_steps": 1 if five else 5, "inner_steps_eval": 10, "inner_lr": 0.4 if five else 0.1,
                "eval_samples": 1}
    return {"inner_steps": 1, "inner_steps_eval": 10, "inner_lr": 0.01, "noise_std": MSE_NOISE_STD,
            "learn_noise": False, "eval_samples": 1}


def _abml_defaults(benchmark: str, ways: int | None, shots: int) -> dict[str, Any]:
    if benchmark in CLASSIFICATION_BENCHMARKS:
        # The ABML paper has no Omniglot protocol: ours. inner_lr * prior precision / support points must
        # stay below 2 for the inner mean update to be stable (0.05 * 100 / 5 = 1 at 5-way 1-shot).
        return {"inner_steps": 5, "inner_steps_eval": 10, "inner_lr": 0.05, "prior_init_std": 0.1,
                "inner_samples": 1, "kl_weight_inner": 1.0, "kl_weight_outer": 1.0, "eval_samples": 10}
    # Observation noise: fixed at MAML's 1/sqrt(2) so both methods share one likelihood. A learned
    # noise (learn_noise=true) grew to ~1.6 on sinusoids and absorbed the misfit, and q stopped
    # moving away from the prior (README, "Protocol choices").
    return {"inner_steps": 5, "inner_steps_eval": 5, "inner_lr": 0.01, "noise_std": MSE_NOISE_STD,
            "learn_noise": False, "prior_init_std": 0.1, "inner_samples": 1, "kl_weight_inner": 1.0,
            "kl_weight_outer": 1.0, "noise_scaled_lr": False, "eval_samples": 100}


def _versa_defaults(benchmark: str, ways: int | None, shots: int) -> dict[str, Any]:
    # VERSA's protocol (ANCHORS.md): L = 10, ML-PIP with local reparameterization
    return {"objective": "ml-pip", "train_samples": 10, "local_reparam": True, "eval_samples": 100}


METHODS: dict[str, MethodInfo] = {
    "maml": MethodInfo(
        "maml", "MAML, the point-estimate baseline (Delta guide from K SGD steps)",
        _maml_defaults, _build_maml, _maml_protocol, ("sinusoid", "sinusoid_line", "omniglot", "custom")),
    "abml": MethodInfo(
        "abml", "ABML: hyperprior on a Gaussian prior; Gaussian guide from K SGD steps on the support ELBO",
        _abml_defaults, _build_abml, _abml_protocol, ("sinusoid", "sinusoid_line", "omniglot", "custom")),
    "versa": MethodInfo(
        "versa", "VERSA: per-class amortized Gaussian over a linear head on a shared feature extractor; ML-PIP",
        _versa_defaults, _build_versa, _versa_protocol, ("omniglot",)),
}


def protocol_defaults(benchmark: str, method: str, ways: int | None, shots: int) -> dict[str, Any]:
    """The benchmark-level settings a run gets when it does not set them (the papers' protocols)."""
    if benchmark not in CLASSIFICATION_BENCHMARKS:
        return {"steps": 70_000, "meta_batch": 25, "meta_lr": 1e-3, "queries": shots, "eval_queries": 100,
                "hidden": [40, 40]}
    ways = ways or 5
    out: dict[str, Any] = {"ways": ways, "split": "vinyals", "filters": 64, "batch_norm": "task",
                           "eval_queries": shots}  # test query = shot per class (MAML's and VERSA's code)
    if method == "versa":
        # 80k iterations (20-way 5-shot 60k, 20-way 1-shot 100k), 16 tasks, Adam 1e-4, 15 queries per class
        steps = 100_000 if (ways, shots) == (20, 1) else 60_000 if (ways, shots) == (20, 5) else 80_000
        out.update(steps=steps, meta_batch=16, meta_lr=1e-4, queries=15, downsample="maxpool",
                   hidden=[256, 256, 256])
    else:
        # MAML: 60k iterations, Adam 1e-3, meta-batch 32 (5-way) / 16 (20-way), strided convs, K/K split
        out.update(steps=60_000, meta_batch=32 if ways <= 5 else 16, meta_lr=1e-3, queries=shots,
                   downsample="stride")
    return out


def get_method(name: str) -> MethodInfo:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def resolve(cfg: RunConfig) -> RunConfig:
    """Fill every ``None`` with the benchmark's and method's default; reject settings that the method or
    the benchmark does not use, unknown methods and unknown benchmarks."""
    cfg.check()
    info = get_method(cfg.method)
    if not is_known_benchmark(cfg.benchmark):
        raise ConfigError(f"unknown benchmark {cfg.benchmark!r}; known: {', '.join(sorted(all_benchmarks()))}, or a "
                          "task function's import path 'module:function'")
    family = custom_family(cfg.benchmark) if cfg.benchmark not in BENCHMARKS else None
    if family is not None:
        _check_custom(cfg, info, family)
    elif cfg.benchmark not in info.benchmarks:
        raise ConfigError(f"method {cfg.method!r} runs on {', '.join(info.benchmarks)}, not on {cfg.benchmark!r}")
    classification = cfg.benchmark in CLASSIFICATION_BENCHMARKS
    updates: dict[str, Any] = {}
    defaults = info.defaults(cfg.benchmark, cfg.ways, cfg.shots)
    for name in METHOD_FIELDS:
        v = getattr(cfg, name)
        if name not in defaults:
            if v is not None:
                raise ConfigError(f"{name} is not a setting of method {cfg.method!r} on {cfg.benchmark!r} "
                                  f"(its settings: {sorted(defaults)})")
            continue
        updates[name] = defaults[name] if v is None else v
    if not classification:
        given = [k for k in CLASSIFICATION_FIELDS if getattr(cfg, k) is not None]
        if given:
            raise ConfigError(f"{', '.join(given)}: setting(s) of classification benchmarks, not of {cfg.benchmark!r}")
    for name, v in protocol_defaults(cfg.benchmark, cfg.method, cfg.ways, cfg.shots).items():
        if getattr(cfg, name) is None:
            updates[name] = v
    if classification and cfg.method != "versa" and cfg.hidden is not None:
        raise ConfigError(f"hidden is VERSA's amortizer width; {cfg.method!r} on {cfg.benchmark!r} uses conv4")
    if cfg.threads is None:
        updates["threads"] = default_threads("conv4" if classification else "mlp")
    out = replace(cfg, **updates)
    out = replace(out, lr_schedule=normalize_schedule(out.lr_schedule, out.steps))
    out.check()
    return out


def _check_custom(cfg: RunConfig, info: MethodInfo, family) -> None:
    """Built-in methods on a user task family: regression with flat inputs ``[T, N, F]`` (an MLP)."""
    if "custom" not in info.benchmarks:
        raise ConfigError(f"method {cfg.method!r} does not run on user task families (it runs on "
                          f"{', '.join(info.benchmarks)}); write its model and guide for your tasks instead")
    if family.kind != "regression":
        raise ConfigError(f"task family {cfg.benchmark!r} draws classification tasks; the built-in methods run on "
                          "user task families for regression (a classification family works with your own model "
                          "and guide through fit/evaluate)")
    if len(family.probe["x_shape"]) != 1:
        raise ConfigError(f"task family {cfg.benchmark!r} draws inputs of shape {list(family.probe['x_shape'])} per "
                          "point; the built-in methods' MLP needs flat inputs [T, N, F]")


def build_learner(cfg: RunConfig) -> MetaLearner:
    """The MetaLearner of a resolved config, with parameters initialized from ``cfg.seed``."""
    cfg = resolve(cfg)
    info = get_method(cfg.method)
    return info.build(cfg, _net(cfg))


def protocol_of(cfg: RunConfig) -> dict[str, Any]:
    cfg = resolve(cfg)
    return {**get_method(cfg.method).protocol(cfg), "network": _net(cfg).describe()}
