"""RunConfig: every choice a run makes, resolved before it starts and written to ``config.json``."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

# the methods that do not train (steps 0): pyro_meta.methods.reference
REFERENCE_METHODS = ("prior", "oracle")


class ConfigError(ValueError):
    """A configuration that cannot be used: unknown keys, wrong types, or a resume that differs."""


@dataclass
class RunConfig:
    """The settings of one meta-training run. ``None`` means "the method's default" and is replaced
    by a concrete value in :func:`pyro_meta.methods.resolve`."""

    # what
    benchmark: str = "sinusoid"
    method: str = "maml"
    # protocol (None: the default of the benchmark and method, see pyro_meta.methods.protocol_defaults)
    shots: int = 5
    ways: int | None = None  # classes per task (classification benchmarks only)
    queries: int | None = None  # query points per training task (per class for classification)
    meta_batch: int | None = None
    eval_queries: int | None = None  # query points per evaluation task (per class for classification)
    # fixed validation tasks (recalibration maps, model selection); None: 500 for regression, 100 episodes for
    # classification (pyro_meta.methods.protocol_defaults)
    num_val_tasks: int | None = None
    num_test_tasks: int = 600
    train_tasks: int | None = None  # regression: a finite training set of this many tasks (None: endless)
    # data (classification benchmarks)
    data_root: str | None = None  # None: $PYRO_META_DATA, then the per-user cache directory
    split: str | None = None  # omniglot: "vinyals" (train/val/test classes) or "lake" (background/evaluation)
    # network
    hidden: list[int] | None = None  # the task MLP's hidden widths (regression) or VERSA's amortizer's
    activation: str = "relu"
    filters: int | None = None  # conv4 channels
    downsample: str | None = None  # conv4: "maxpool" or "stride"
    batch_norm: str | None = None  # conv4 normalization: task (transductive), support, tasknorm, instance, none
    # optimization
    steps: int | None = None
    meta_lr: float | None = None
    # {"name": "constant" | "cosine" | "exponential", ...}, see pyro_meta.schedule; None: constant
    lr_schedule: dict | None = None
    grad_clip: float = 10.0
    # inner loop
    inner_steps: int | None = None
    inner_steps_eval: int | None = None
    inner_lr: float | None = None
    # ABML: "sgd" (the paper's plain SGD on q's mean and log std) or "natural" (the mean's step
    # preconditioned by q's variance, the natural gradient of a Gaussian mean; see guides/abml.py)
    inner_step: str | None = None
    # ABML: the scale of log p(theta) per meta-batch (1: once per meta-batch, the old default; see models/abml.py)
    hyperprior_weight: float | None = None
    # ABML: the initial prior std of the hidden layers' weights (None: prior_init_std for every layer)
    prior_init_std_hidden: float | None = None
    first_order: bool = False
    # likelihood
    noise_std: float | None = None
    learn_noise: bool | None = None
    # ABML
    prior_init_std: float | None = None
    inner_samples: int | None = None
    kl_weight_inner: float | None = None
    kl_weight_outer: float | None = None
    noise_scaled_lr: bool | None = None
    # the training objective; its choices depend on the method (pyro-meta list): VERSA "ml-pip" (the
    # paper's) or "elbo"; ABML "paper", "support" or "joint"; ...
    objective: str | None = None
    kl_estimator: str | None = None  # "mc" (Trace_ELBO's single sample) or "analytic" (TraceMeanField_ELBO)
    train_samples: int | None = None  # L, Monte Carlo samples of the training objective
    # VERSA
    local_reparam: bool | None = None
    # PLATIPUS
    gamma_init: float | None = None  # initial gamma_p and gamma_q (the steps that condition the prior and q)
    # amortized VI
    encoder_hidden: list[int] | None = None  # the support-set encoder's hidden widths
    amortize: str | None = None  # "all" (a Gaussian over every weight) or "last" (the last layer only)
    learned_prior: bool | None = None  # a learned Gaussian prior over the weights, else N(0, prior_init_std^2)
    # BMAML
    particles: int | None = None  # M, SVGD particles per task
    leader_steps: int | None = None  # s, the leader's further SVGD steps on support + query (chaser loss)
    precision_lr_factor: float | None = None  # the SVGD step on the log precisions: inner_lr x this
    bandwidth_factor: float | None = None  # BMAML: the kernel's median bandwidth x this (1: the authors')
    # GP: "sum" (RBF + linear + periodic components) or "deep" (an RBF on a feature MLP of widths `hidden`)
    kernel: str | None = None
    # GP: the mean function, "constant" (a learned constant) or "mlp" (a learned MLP of x of widths
    # encoder_hidden, shared by all tasks, as PACOH-GP's learned mean)
    gp_mean: str | None = None
    # evaluation
    eval_samples: int | None = None
    # run
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None  # torch intra-op threads; None: by network size (pyro_meta.threads)
    log_every: int = 50
    checkpoint_every: int = 1000
    checkpoint_minutes: float | None = 10.0  # also checkpoint when this many minutes have passed; None: off
    skip_nonfinite: bool = False
    skip_limit: float = 0.1  # with skip_nonfinite: stop past this many skipped steps (>= 1) or this fraction
    # shards per meta-batch, each with its own seeded noise, gradients accumulated (None: 1 in one process,
    # the number of ranks under torch.distributed); see pyro_meta.distributed
    micro_batches: int | None = None
    # "fp32" (default), "bf16" (the conv4 trunk under torch.autocast in bfloat16) or "tf32" (CUDA matmuls and
    # convolutions in TensorFloat-32); measured in experiments/RESULTS.md
    precision: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> RunConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object of settings, got {type(data).__name__}")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {unknown}; known keys: {sorted(known)}")
        cfg = cls(**data)
        cfg.check(source)
        return cfg

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise ConfigError(f"config file {str(path)!r} is not UTF-8 text; expected a JSON object") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"config file {str(path)!r} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r}: expected a JSON object of settings, "
                              f"got {type(data).__name__}")
        data.pop("resolved", None)
        return cls.from_dict(data, source=str(path))

    def check(self, source: str = "config") -> None:
        """Types and ranges of every field, with messages that say what was expected."""
        def want(cond: bool, name: str, expected: str) -> None:
            if not cond:
                raise ConfigError(f"{source}: {name} must be {expected}, got {getattr(self, name)!r}")

        def pos_int(name: str, allow_none: bool = False, allow_zero: bool = False) -> None:
            v = getattr(self, name)
            ok = (v is None and allow_none) or (
                isinstance(v, int) and not isinstance(v, bool) and (v >= 0 if allow_zero else v >= 1))
            want(ok, name, "a " + ("non-negative" if allow_zero else "positive") + " integer")

        def pos_float(name: str, allow_none: bool = False, allow_zero: bool = False) -> None:
            v = getattr(self, name)
            ok = (v is None and allow_none) or (
                isinstance(v, (int, float)) and not isinstance(v, bool) and (v >= 0 if allow_zero else v > 0)
                and v == v and v != float("inf"))
            want(ok, name, "a " + ("non-negative" if allow_zero else "positive") + " finite number")

        for name in ("benchmark", "method", "activation", "device"):
            want(isinstance(getattr(self, name), str), name, "a string")
        for name in ("shots", "num_test_tasks", "log_every", "checkpoint_every"):
            pos_int(name)
        for name in ("ways", "queries", "num_val_tasks", "meta_batch", "eval_queries", "filters", "train_samples",
                     "train_tasks", "particles", "leader_steps"):
            pos_int(name, allow_none=True)
        # 0 only for the reference rows (prior, oracle), which do not train: methods.resolve refuses it elsewhere
        zero_ok = self.method in REFERENCE_METHODS
        want(self.steps is None or (isinstance(self.steps, int) and not isinstance(self.steps, bool)
                                    and (self.steps >= 1 or zero_ok and self.steps == 0)), "steps",
             "a positive integer (0 only for the reference rows prior and oracle, which do not train)")
        pos_int("inner_steps", allow_none=True, allow_zero=True)
        pos_int("inner_steps_eval", allow_none=True, allow_zero=True)
        pos_int("inner_samples", allow_none=True)
        pos_int("eval_samples", allow_none=True)
        want(isinstance(self.seed, int) and not isinstance(self.seed, bool) and 0 <= self.seed < 2**32, "seed",
             "an integer from 0 to 2**32 - 1")
        pos_int("threads", allow_none=True)
        pos_int("micro_batches", allow_none=True)
        want(self.precision in (None, "fp32", "bf16", "tf32"), "precision", "one of fp32, bf16, tf32 or null")
        if self.lr_schedule is not None:
            from .schedule import ScheduleError, normalize_schedule

            try:  # steps not set yet: the method's or benchmark's default fills it in resolve, which checks again
                normalize_schedule(self.lr_schedule, self.steps if self.steps is not None else 2**62)
            except ScheduleError as e:
                raise ConfigError(f"{source}: {e}") from None
        pos_float("grad_clip")
        pos_float("checkpoint_minutes", allow_none=True)
        pos_float("skip_limit")
        for name in ("meta_lr", "inner_lr", "noise_std", "prior_init_std", "gamma_init", "prior_init_std_hidden",
                     "precision_lr_factor", "bandwidth_factor"):
            pos_float(name, allow_none=True)
        for name in ("kl_weight_inner", "kl_weight_outer", "hyperprior_weight"):
            pos_float(name, allow_none=True, allow_zero=True)
        for name in ("first_order", "skip_nonfinite"):
            want(isinstance(getattr(self, name), bool), name, "true or false")
        for name, choices in (("split", ("vinyals", "lake")), ("downsample", ("maxpool", "stride")),
                              ("batch_norm", ("task", "support", "tasknorm", "instance", "none")), ("kl_estimator", ("mc", "analytic")),
                              ("amortize", ("all", "last")), ("inner_step", ("sgd", "natural", "polyak")),
                              ("kernel", ("sum", "deep")),
                              ("gp_mean", ("constant", "mlp"))):
            v = getattr(self, name)
            want(v is None or v in choices, name, f"one of {list(choices)} or null")
        want(self.data_root is None or isinstance(self.data_root, str), "data_root", "a path string or null")
        want(self.objective is None or isinstance(self.objective, str), "objective",
             "a string (the method's objectives: pyro-meta list) or null")
        for name in ("learn_noise", "noise_scaled_lr", "local_reparam", "learned_prior"):
            want(getattr(self, name) is None or isinstance(getattr(self, name), bool), name, "true, false or null")
        from .nn import ACTIVATIONS

        want(self.activation in ACTIVATIONS, "activation", f"one of {sorted(ACTIVATIONS)}")
        want(self.hidden is None or (isinstance(self.hidden, (list, tuple)) and len(self.hidden) >= 1
             and all(isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in self.hidden)), "hidden",
             "a non-empty list of positive integers or null")
        want(self.encoder_hidden is None or (isinstance(self.encoder_hidden, (list, tuple))
             and len(self.encoder_hidden) >= 1 and all(isinstance(h, int) and not isinstance(h, bool) and h >= 1
                                                       for h in self.encoder_hidden)), "encoder_hidden",
             "a non-empty list of positive integers or null")
        if self.hidden is not None:
            self.hidden = list(self.hidden)
        if self.encoder_hidden is not None:
            self.encoder_hidden = list(self.encoder_hidden)
