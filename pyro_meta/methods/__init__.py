"""The method registry: name -> recipe (defaults, builder, protocol text).

Each method's recipe lives in its own module here (``methods/abml.py`` beside ``models/abml.py`` and
``guides/abml.py``); adding a method means writing those files and one line in :data:`METHODS`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ..config import REFERENCE_METHODS, ConfigError, RunConfig
from ..learner import MetaLearner
from ..schedule import normalize_schedule
from ..tasks import BENCHMARKS, CLASSIFICATION_BENCHMARKS, all_benchmarks, is_known_benchmark
from ..tasks.custom import custom_family
from ..threads import default_threads
from . import abml, amortized, anp, bmaml, cnp, gp, maml, platipus, reference, versa
from .common import MethodInfo, make_net

# the registry: one line per method
METHODS: dict[str, MethodInfo] = {r.name: r for r in (
    maml.RECIPE, abml.RECIPE, versa.RECIPE, platipus.RECIPE, amortized.RECIPE, bmaml.RECIPE,
    cnp.RECIPE, anp.RECIPE, gp.RECIPE,  # function-space peers
    reference.PRIOR, reference.ORACLE,  # reference rows (no training)
)}

# Settings whose meaning and default depend on the method.
METHOD_FIELDS = ("inner_steps", "inner_steps_eval", "inner_lr", "noise_std", "learn_noise",
                 "prior_init_std", "inner_samples", "kl_weight_inner", "kl_weight_outer", "noise_scaled_lr",
                 "objective", "train_samples", "local_reparam", "eval_samples", "kl_estimator", "gamma_init",
                 "encoder_hidden", "amortize", "learned_prior", "inner_step",
                 "hyperprior_weight", "prior_init_std_hidden", "particles", "leader_steps",
                 "precision_lr_factor", "bandwidth_factor", "kernel", "gp_mean")
# Settings that only classification benchmarks (images) have.
CLASSIFICATION_FIELDS = ("ways", "data_root", "split", "filters", "downsample", "batch_norm")

__all__ = ["METHODS", "METHOD_FIELDS", "MethodInfo", "build_learner", "get_method", "protocol_defaults",
           "protocol_of", "regression_methods", "resolve"]


def regression_methods() -> list[str]:
    """The methods that train on the regression benchmarks (the scoreboard's rows; the reference rows
    ``prior`` and ``oracle``, which do not train, are :data:`~pyro_meta.config.REFERENCE_METHODS`)."""
    return [name for name, m in METHODS.items() if "sinusoid" in m.benchmarks and name not in REFERENCE_METHODS]


# regression validation tasks: a task's query points share one posterior, so the recalibration maps' error
# goes with the number of tasks, not points. PLATIPUS on sinusoid_line (600 test tasks), isotonic map fitted
# on 100 / 300 / 500 validation tasks: test coverage 0.526 / 0.513 / 0.507 at 50%, 0.890 / 0.889 / 0.888 at 90%
REGRESSION_VAL_TASKS = 500


def protocol_defaults(benchmark: str, method: str, ways: int | None, shots: int) -> dict[str, Any]:
    """The benchmark-level settings a run gets when it does not set them (the papers' protocols)."""
    if benchmark == "sinusoid_bmaml":
        # BMAML's code: network 1-40-40-40-1, 10 tasks per meta-batch, Adam 1e-3 (ANCHORS.md)
        return {"steps": 70_000, "meta_batch": 10, "meta_lr": 1e-3, "queries": shots, "eval_queries": 100,
                "hidden": [40, 40, 40], "num_val_tasks": REGRESSION_VAL_TASKS}
    if benchmark not in CLASSIFICATION_BENCHMARKS:
        return {"steps": 70_000, "meta_batch": 25, "meta_lr": 1e-3, "queries": shots, "eval_queries": 100,
                "hidden": [40, 40], "num_val_tasks": REGRESSION_VAL_TASKS}
    ways = ways or 5
    # normalization: the support set's statistics, the best of the modes that never read the query set
    # (VERSA 5-way 1-shot, 1,000 steps, 600 test episodes: support 91.4%, tasknorm 88.2%, instance 86.0%;
    # the transductive "task" 93.0% with each query set whole, 39.6% with every image alone; README,
    # "Normalization"; experiments/RESULTS.md)
    out: dict[str, Any] = {"ways": ways, "split": "vinyals", "filters": 64, "batch_norm": "support",
                           "eval_queries": shots, "num_val_tasks": 100}  # test query = shot per class (MAML's and VERSA's code)
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
    objective = updates.get("objective")
    if objective is not None and objective not in info.objectives:
        raise ConfigError(f"objective {objective!r} is not one of method {cfg.method!r}'s: "
                          f"{', '.join(info.objectives)}")
    if not classification:
        given = [k for k in CLASSIFICATION_FIELDS if getattr(cfg, k) is not None]
        if given:
            raise ConfigError(f"{', '.join(given)}: setting(s) of classification benchmarks, not of {cfg.benchmark!r}")
    own = {}  # the method's own win over the benchmark's
    if not classification:
        own = info.run_defaults(cfg.benchmark) if callable(info.run_defaults) else info.run_defaults
    for name, v in {**protocol_defaults(cfg.benchmark, cfg.method, cfg.ways, cfg.shots), **own}.items():
        if getattr(cfg, name) is None:
            updates[name] = v
    if classification and info.network == "task" and cfg.hidden is not None:
        raise ConfigError(f"hidden is VERSA's amortizer width; {cfg.method!r} on {cfg.benchmark!r} uses conv4")
    if cfg.threads is None:
        updates["threads"] = default_threads("conv4" if classification else "mlp")
    out = replace(cfg, **updates)
    if info.dependent is not None:
        out = replace(out, **{k: v for k, v in info.dependent(out).items() if getattr(out, k) is None})
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


def _net(cfg: RunConfig):  # noqa: ANN202 - a FunctionalNet
    return make_net(cfg, features_only=get_method(cfg.method).network == "features")


def build_learner(cfg: RunConfig) -> MetaLearner:
    """The MetaLearner of a resolved config, with parameters initialized from ``cfg.seed``."""
    cfg = resolve(cfg)
    return get_method(cfg.method).build(cfg, _net(cfg))


def protocol_of(cfg: RunConfig) -> dict[str, Any]:
    cfg = resolve(cfg)
    # a method that builds its own networks (cnp, anp) describes them itself, under "network"
    return {"network": _net(cfg).describe(), **get_method(cfg.method).protocol(cfg)}
