"""What every method's recipe shares: the recipe type, the task network, the likelihood, the
initialization and the protocol text for batch norm."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import ConfigError, RunConfig
from ..infer import LeanTrace_ELBO, LeanTraceMeanField_ELBO
from ..learner import MetaLearner
from ..likelihoods import Categorical, Gaussian, Likelihood
from ..nn import MLP, Conv4, FunctionalNet
from ..tasks import CLASSIFICATION_BENCHMARKS
from ..tasks.custom import custom_family

REGRESSION = ("sinusoid", "sinusoid_line", "sinusoid_bmaml", "custom")


@dataclass(frozen=True)
class MethodInfo:
    """One method's recipe.

    :param name: the ``--method`` name.
    :param description: one line for ``pyro-meta list``.
    :param defaults: ``defaults(benchmark, ways, shots) -> {setting: value}``: the method's settings
        (``METHOD_FIELDS``) on a benchmark; a setting missing there is refused for that method.
    :param build: ``build(cfg, net) -> MetaLearner`` from a resolved config.
    :param protocol: ``protocol(cfg) -> dict``: every protocol choice in words, written to config.json.
    :param benchmarks: where it runs (``"custom"``: user regression task families).
    :param objectives: the values ``objective`` may take for this method (empty: it has none).
    :param network: ``"task"`` (the whole task network is per-task, a ``ways``-wide head on images) or
        ``"features"`` (a shared feature extractor with no head, as in VERSA).
    :param dependent: ``dependent(cfg) -> {setting: value}``, run on the config with every other default
        filled in: defaults that depend on other settings (ABML's hyperprior weight on ``steps``). It
        only fills settings that are still ``None``.
    :param run_defaults: benchmark-level settings (``meta_lr``, ``hidden``, ...) whose default this method
        sets itself on the regression benchmarks: they win over :func:`~pyro_meta.methods.protocol_defaults`.
        A dict, or ``run_defaults(benchmark) -> dict`` where they differ by benchmark.
    """

    name: str
    description: str
    defaults: Callable[[str, int | None, int], dict[str, Any]]
    build: Callable[[RunConfig, FunctionalNet], MetaLearner]
    protocol: Callable[[RunConfig], dict[str, Any]]
    benchmarks: tuple[str, ...]
    objectives: tuple[str, ...] = field(default=())
    network: str = "task"
    dependent: Callable[[RunConfig], dict[str, Any]] | None = None
    run_defaults: dict[str, Any] | Callable[[str], dict[str, Any]] = field(default_factory=dict, hash=False)


def make_net(cfg: RunConfig, features_only: bool = False) -> FunctionalNet:
    """The task network (with a ``ways``-wide head on images) or, ``features_only``, a conv4 trunk."""
    if cfg.precision == "bf16" and cfg.benchmark not in CLASSIFICATION_BENCHMARKS:
        raise ConfigError("precision bf16 applies to the conv4 trunk of the image benchmarks (omniglot); "
                          f"{cfg.benchmark!r} trains an MLP in float32")
    if cfg.benchmark in ("sinusoid", "sinusoid_line", "sinusoid_bmaml"):
        return MLP([1, *cfg.hidden, 1], cfg.activation)
    family = custom_family(cfg.benchmark)
    if family is not None:
        x_shape, y_dim = family.probe["x_shape"], family.probe["y_dim"]
        return MLP([x_shape[0], *cfg.hidden, y_dim], cfg.activation)
    if cfg.benchmark in CLASSIFICATION_BENCHMARKS:
        return Conv4(None if features_only else cfg.ways, in_channels=1, image_size=28,
                     filters=cfg.filters, downsample=cfg.downsample, batch_norm=cfg.batch_norm,
                     precision="bf16" if cfg.precision == "bf16" else "fp32")
    raise ConfigError(f"no network is defined for benchmark {cfg.benchmark!r}")


def make_likelihood(cfg: RunConfig) -> Likelihood:
    if cfg.benchmark in CLASSIFICATION_BENCHMARKS:
        return Categorical()
    return Gaussian(cfg.noise_std, bool(cfg.learn_noise))


def init_weights(net: FunctionalNet, seed: int) -> torch.Tensor:
    return net.init(torch.Generator().manual_seed(seed))


def elbo(kl_estimator: str, samples: int = 1):  # noqa: ANN201 - a Pyro ELBO
    """``Trace_ELBO`` (``kl_estimator="mc"``) or ``TraceMeanField_ELBO`` (``"analytic"``: closed-form KL
    between the guide's and the model's Normal sites), with ``samples`` vectorized draws per step; both on
    the short path of :mod:`pyro_meta.infer.elbo` (same estimate and gradient)."""
    kw = {"num_particles": samples, "vectorize_particles": True, "max_plate_nesting": 2} if samples > 1 else {}
    return LeanTraceMeanField_ELBO(**kw) if kl_estimator == "analytic" else LeanTrace_ELBO(**kw)


def bn_text(cfg: RunConfig) -> str:
    if cfg.benchmark not in CLASSIFICATION_BENCHMARKS:
        return "none (MLP)"
    return BN_TEXT[cfg.batch_norm]


BN_TEXT = {
    "none": "none",
    "task": "per-task batch statistics, computed separately over each task's support set and over its query set, "
            "in training and at test: TRANSDUCTIVE, a query image's prediction depends on the other query images "
            "passed with it (no running averages)",
    "support": "the support set's statistics (per task, channel, block), applied to support and query images; "
               "a query image's prediction depends on the support set and itself only",
    "tasknorm": "TaskNorm-I (Bronskill et al., ICML 2020): the support set's moments blended with each image's "
                "own by a learned weight sigmoid(scale x support size + offset) per block; not transductive",
    "instance": "instance norm: each image's own statistics over its feature map; not transductive",
}


def likelihood_text(cfg: RunConfig) -> str:
    if cfg.benchmark in CLASSIFICATION_BENCHMARKS:
        return "Categorical (softmax)"
    if cfg.learn_noise:
        return (f"Gaussian, noise std learned (softplus(r) + 1e-3, initialized at {cfg.noise_std:g}), one "
                "meta-parameter")
    return f"Gaussian, noise std fixed at {cfg.noise_std:g}"
