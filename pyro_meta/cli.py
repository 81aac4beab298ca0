"""``pyro-meta``: train / evaluate / inspect / list / demo."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

from .config import ConfigError, RunConfig
from .evaluate import LeakError
from .methods import METHODS, resolve
from .rundir import RunLockedError
from .tasks import BENCHMARKS, ProtocolError, TaskBatchError, all_benchmarks
from .train import CheckpointError, NonFiniteError, TaskSourceExhausted, Terminated

# CLI flag -> RunConfig field (only the flags a user gave are applied, so --resume can tell them apart)
TRAIN_FLAGS = {
    "method": "method", "shots": "shots", "steps": "steps", "meta_batch": "meta_batch",
    "inner_steps": "inner_steps", "device": "device", "seed": "seed", "first_order": "first_order",
    "skip_nonfinite": "skip_nonfinite", "inner_lr": "inner_lr", "meta_lr": "meta_lr",
    "ways": "ways", "queries": "queries", "eval_queries": "eval_queries", "data_root": "data_root",
    "split": "split", "test_tasks": "num_test_tasks", "val_tasks": "num_val_tasks", "eval_samples": "eval_samples",
    "batch_norm": "batch_norm", "objective": "objective", "threads": "threads",
    "checkpoint_every": "checkpoint_every", "checkpoint_minutes": "checkpoint_minutes", "skip_limit": "skip_limit",
    "kl_estimator": "kl_estimator", "learn_noise": "learn_noise", "noise_std": "noise_std",
    "prior_init_std": "prior_init_std", "gamma_init": "gamma_init", "amortize": "amortize",
    "encoder_hidden": "encoder_hidden", "learned_prior": "learned_prior", "train_samples": "train_samples",
    "inner_samples": "inner_samples", "inner_steps_eval": "inner_steps_eval", "hidden": "hidden",
    "kl_weight_inner": "kl_weight_inner", "kl_weight_outer": "kl_weight_outer", "noise_scaled_lr": "noise_scaled_lr",
    "inner_step": "inner_step", "hyperprior_weight": "hyperprior_weight",
    "prior_init_std_hidden": "prior_init_std_hidden", "particles": "particles", "leader_steps": "leader_steps",
    "precision_lr_factor": "precision_lr_factor", "bandwidth_factor": "bandwidth_factor",
    "train_tasks": "train_tasks", "micro_batches": "micro_batches", "precision": "precision",
    "kernel": "kernel", "gp_mean": "gp_mean",
}
# CLI flag -> key of the lr_schedule object (pyro_meta.schedule)
SCHEDULE_FLAGS = {"lr_schedule": "name", "lr_warmup": "warmup_steps", "lr_gamma": "gamma", "lr_every": "every",
                  "lr_min_factor": "min_factor", "lr_total_steps": "total_steps"}

# The demo's budget: small enough for 2 CPU cores in under 5 minutes, large enough to learn.
# the demo's recalibration maps on 100 validation tasks (a run's default is 500: a short demo)
DEMO_VAL_TASKS = 100
DEMO_STEPS = {"maml": 3000, "abml": 2000, "platipus": 2000}
DEMO_PLOT = "demo_predictive.png"


def _train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="meta-train a method on a benchmark into a run directory")
    S = argparse.SUPPRESS
    p.add_argument("benchmark", nargs="?", default=S,
                   help=f"one of: {', '.join(sorted(BENCHMARKS))}; or your task function's import path "
                        "module:function (see the README, 'Your own task family')")
    p.add_argument("--method", default=S, help=f"one of: {', '.join(sorted(METHODS))} (default maml)")
    p.add_argument("--shots", type=int, default=S, help="support points per task (per class) (default 5)")
    p.add_argument("--ways", type=int, default=S, help="classes per task (classification; default 5)")
    p.add_argument("--queries", type=int, default=S,
                   help="query points per training task (per class); default: the paper's")
    p.add_argument("--eval-queries", dest="eval_queries", type=int, default=S,
                   help="query points per test task (per class); Omniglot default: = shots")
    p.add_argument("--test-tasks", dest="test_tasks", type=int, default=S, help="fixed test tasks (600)")
    p.add_argument("--val-tasks", dest="val_tasks", type=int, default=S,
                   help="fixed validation tasks, on which the recalibration maps are fitted (regression 500, "
                        "classification 100)")
    p.add_argument("--eval-samples", dest="eval_samples", type=int, default=S,
                   help="posterior draws of the test predictive")
    p.add_argument("--data-root", dest="data_root", default=S,
                   help="folder with Omniglot's images_background/evaluation (.zip or extracted); default: "
                        "$PYRO_META_DATA, then the per-user cache directory")
    p.add_argument("--split", default=S, help="omniglot class split: vinyals (default) or lake")
    p.add_argument("--batch-norm", dest="batch_norm", default=S,
                   choices=["task", "support", "tasknorm", "instance", "none"],
                   help="conv4 normalization: task (statistics of the images passed together: transductive, "
                        "reads the query set), support (the support set's statistics), tasknorm (TaskNorm-I), "
                        "instance, none")
    p.add_argument("--objective", default=S,
                   help="the training objective; VERSA: ml-pip (default, the paper's) or elbo; ABML: predictive "
                        "(default), paper, joint or support; amortized: joint (default) or query; BMAML: chaser "
                        "(default), bfa or chaser-full; see `pyro-meta list` and the README")
    p.add_argument("--kl-estimator", dest="kl_estimator", choices=["mc", "analytic"], default=S,
                   help="KL term of the objective: mc (one sample, Trace_ELBO) or analytic (TraceMeanField_ELBO)")
    p.add_argument("--train-samples", dest="train_samples", type=int, default=S,
                   help="Monte Carlo samples of the training objective")
    p.add_argument("--inner-samples", dest="inner_samples", type=int, default=S,
                   help="ABML: Monte Carlo samples in the inner loop")
    p.add_argument("--learn-noise", dest="learn_noise", action=argparse.BooleanOptionalAction, default=S,
                   help="regression: learn the observation noise std (initialized at --noise-std)")
    p.add_argument("--noise-std", dest="noise_std", type=float, default=S,
                   help="regression: the observation noise std (fixed, or the initial value with --learn-noise)")
    p.add_argument("--noise-scaled-lr", dest="noise_scaled_lr", action=argparse.BooleanOptionalAction, default=S,
                   help="ABML: scale the inner step by the noise variance")
    p.add_argument("--prior-init-std", dest="prior_init_std", type=float, default=S,
                   help="initial std of a learned Gaussian prior over the weights (fixed prior: its std)")
    p.add_argument("--kl-weight-inner", dest="kl_weight_inner", type=float, default=S, help="ABML: inner KL weight")
    p.add_argument("--kl-weight-outer", dest="kl_weight_outer", type=float, default=S, help="ABML: outer KL weight")
    p.add_argument("--gamma-init", dest="gamma_init", type=float, default=S,
                   help="PLATIPUS: initial gamma_p and gamma_q")
    p.add_argument("--kernel", choices=["sum", "deep"], default=S,
                   help="GP: sum (RBF + linear + periodic components, default) or deep (an RBF on a feature "
                        "MLP of widths --hidden, Deep Kernel Transfer)")
    p.add_argument("--gp-mean", dest="gp_mean", choices=["constant", "mlp"], default=S,
                   help="GP: the mean function, constant (a learned constant, default) or mlp (a learned MLP of "
                        "x of widths --encoder-hidden, as PACOH-GP)")
    p.add_argument("--amortize", choices=["all", "last"], default=S,
                   help="amortized VI: a Gaussian over every weight (all) or over the last layer only")
    p.add_argument("--encoder-hidden", dest="encoder_hidden", type=int, nargs="+", default=S,
                   help="amortized VI: the support-set encoder's hidden widths")
    p.add_argument("--learned-prior", dest="learned_prior", action=argparse.BooleanOptionalAction, default=S,
                   help="amortized VI: learn the Gaussian prior over the weights (else fixed)")
    p.add_argument("--hidden", type=int, nargs="+", default=S,
                   help="regression: the task MLP's hidden widths (default 40 40)")
    p.add_argument("--inner-steps-eval", dest="inner_steps_eval", type=int, default=S, help="K at test")
    p.add_argument("--inner-step", dest="inner_step", choices=["sgd", "natural", "polyak"], default=S,
                   help="ABML: plain SGD on q (the paper's) or a natural-gradient step on q's mean; PLATIPUS: "
                        "plain SGD (the paper's) or each task's capped Polyak step (polyak)")
    p.add_argument("--hyperprior-weight", dest="hyperprior_weight", type=float, default=S,
                   help="ABML: scale of log p(theta) per meta-batch (see README, 'Protocol choices')")
    p.add_argument("--prior-init-std-hidden", dest="prior_init_std_hidden", type=float, default=S,
                   help="ABML: initial prior std of the hidden layers (default: --prior-init-std)")
    p.add_argument("--particles", type=int, default=S, help="BMAML: SVGD particles per task (default 10; Omniglot 5)")
    p.add_argument("--leader-steps", dest="leader_steps", type=int, default=S,
                   help="BMAML chaser: the leader's SVGD steps on support + query (default 1)")
    p.add_argument("--precision-lr-factor", dest="precision_lr_factor", type=float, default=S,
                   help="BMAML: SVGD step on the log precisions = --inner-lr x this (default 1; Omniglot 1e-4)")
    p.add_argument("--bandwidth-factor", dest="bandwidth_factor", type=float, default=S,
                   help="BMAML: scale the SVGD kernel's median bandwidth (default 1, the authors'; larger: more "
                        "repulsion at a distance, experiments/RESULTS_svgd.md)")
    p.add_argument("--train-tasks", dest="train_tasks", type=int, default=S,
                   help="regression: train on a finite set of this many tasks (BMAML's 100 / 1000); default: "
                        "fresh tasks every meta-batch")
    p.add_argument("--steps", type=int, default=S, help="meta-updates (default: the paper's)")
    p.add_argument("--meta-batch", dest="meta_batch", type=int, default=S,
                   help="tasks per meta-batch (default: the paper's)")
    p.add_argument("--inner-steps", dest="inner_steps", type=int, default=S, help="K in meta-training")
    p.add_argument("--inner-lr", dest="inner_lr", type=float, default=S, help="inner SGD step size")
    p.add_argument("--meta-lr", dest="meta_lr", type=float, default=S,
                   help="Adam step size (the paper's); on --resume, applied from the resumed step and recorded")
    p.add_argument("--lr-schedule", dest="lr_schedule", choices=["constant", "cosine", "exponential"], default=S,
                   help="meta learning-rate schedule (default constant)")
    p.add_argument("--lr-warmup", dest="lr_warmup", type=int, default=S, help="linear warm-up steps (0)")
    p.add_argument("--lr-gamma", dest="lr_gamma", type=float, default=S,
                   help="exponential: factor per --lr-every steps (BMAML: 0.98 per epoch)")
    p.add_argument("--lr-every", dest="lr_every", type=int, default=S,
                   help="exponential: steps per decay, i.e. an epoch in meta-batches (1)")
    p.add_argument("--lr-min-factor", dest="lr_min_factor", type=float, default=S,
                   help="cosine: final rate as a fraction of --meta-lr (0)")
    p.add_argument("--lr-total-steps", dest="lr_total_steps", type=int, default=S,
                   help="cosine: steps over which it decays (default: --steps)")
    p.add_argument("--threads", type=int, default=S,
                   help="torch intra-op threads (default: 1 for MLPs; see pyro_meta/threads.py)")
    p.add_argument("--first-order", dest="first_order", action="store_true", default=S,
                   help="drop second-order terms of the meta-gradient")
    p.add_argument("--skip-nonfinite", dest="skip_nonfinite", action="store_true", default=S,
                   help="skip meta-batches whose loss or gradient is NaN/inf instead of stopping")
    p.add_argument("--skip-limit", dest="skip_limit", type=float, default=S,
                   help="with --skip-nonfinite: stop once more steps were skipped than this: a count (>= 1) or a "
                        "fraction of the steps done (< 1; default 0.1)")
    p.add_argument("--checkpoint-every", dest="checkpoint_every", type=int, default=S,
                   help="checkpoint every N steps (default 1000) ...")
    p.add_argument("--checkpoint-minutes", dest="checkpoint_minutes", type=float, default=S,
                   help="... and whenever this many minutes have passed since the last one (default 10)")
    p.add_argument("--device", default=S, help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--seed", type=int, default=S, help="seed of initialization and training tasks (0)")
    p.add_argument("--config", type=Path, help="JSON file of RunConfig settings (flags override it)")
    p.add_argument("--out", type=Path, help="run directory (default runs/<benchmark>-<method>-<shots>shot-s<seed>)")
    p.add_argument("--resume", type=Path, metavar="DIR", help="continue the run in DIR from its checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--precision", choices=["fp32", "bf16", "tf32"], default=S,
                   help="fp32 (default); bf16: the conv4 trunk under autocast in bfloat16 (CPU or GPU); tf32: CUDA "
                        "matmuls and convolutions in TensorFloat-32")
    p.add_argument("--micro-batches", dest="micro_batches", type=int, default=S,
                   help="cut each meta-batch into this many shards with their own seeded noise and accumulate their "
                        "gradients (default: 1, or the number of ranks under torch.distributed); a run with "
                        "--micro-batches N in one process equals one on N ranks")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="train on N processes with DistributedDataParallel on this machine (gloo on CPU, nccl on "
                        "GPUs, one GPU per process); the same as `torchrun --standalone --nproc_per_node N -m "
                        "pyro_meta train ...`. Any meta-batch of at least N tasks: 25 on 2 ranks are shards of 13 and 12, "
                        "each weighted by its share")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyro-meta", description="Bayesian meta-learning as Pyro programs")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    p = sub.add_parser("evaluate", help="recompute eval.json of a run on the fixed test tasks")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--device", default=None)
    p = sub.add_parser("inspect", help="ArviZ summary of a run's posterior; posterior and PPC plots")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--max-weights", type=int, default=8, help="weights shown in the summary (8)")
    p = sub.add_parser("classify", help="classify your own images with a trained classification run: a support "
                                        "folder of labelled images (one sub-folder per class) and a query folder")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--support", type=Path, required=True,
                   help="one sub-folder per class, named after it, with that class's support images")
    p.add_argument("--query", type=Path, required=True,
                   help="the images to classify (files), or one sub-folder per class to score them")
    p.add_argument("--samples", type=int, default=None, help="posterior draws (the run's eval_samples)")
    sub.add_parser("list", help="the benchmarks and methods")
    p = sub.add_parser("download", help="fetch a dataset's canonical files and verify their MD5")
    p.add_argument("dataset", choices=["omniglot"])
    p.add_argument("--root", type=Path, default=None,
                   help="where to put them (default: the per-user cache directory)")
    p.add_argument("--url", default=None, help="base URL to fetch from (default: the canonical one)")
    p = sub.add_parser("demo", help="MAML vs ABML vs PLATIPUS on 5-shot sinusoid regression, a few minutes on a CPU")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--steps-scale", type=float, default=1.0, help="scale the demo's step budget")
    p.add_argument("--test-tasks", type=int, default=600, help="fixed test tasks to evaluate on (600)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: the policy's, 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    _compare_parser(sub)
    _vi_parser(sub)
    return parser


def _vi_parser(sub: argparse._SubParsersAction) -> None:
    from .vi import experiment, vae_experiment

    p = sub.add_parser("vi", help="variational inference from first principles (the examples before meta-learning)")
    vi = p.add_subparsers(dest="example", required=True)
    experiment.add_arguments(vi.add_parser(
        "mixture", help="the Bayesian mixture of Gaussians: CAVI vs SVI vs NUTS, side by side (ELBO traces, "
                        "posteriors over mu and assignments)"))
    vae_experiment.add_arguments(vi.add_parser(
        "vae", help="a VAE (or IWAE) on binarized 28x28 Omniglot, trained by the meta-learners' trainer; test "
                    "log-likelihood by the k = 5000 importance-weighted bound; reconstructions, samples, latents"))


def cmd_vi(args: argparse.Namespace) -> int:
    from .vi import experiment, vae_experiment

    return (vae_experiment if args.example == "vae" else experiment).run(args)


def _compare_parser(sub: argparse._SubParsersAction) -> None:
    from .compare import add_arguments

    p = sub.add_parser("compare", help="the scoreboard: every regression method on identical tasks, at equal "
                                       "iterations and equal wall time; a markdown table and figures")
    add_arguments(p)


def _given(args: argparse.Namespace) -> dict[str, Any]:
    given = {TRAIN_FLAGS[k]: v for k, v in vars(args).items() if k in TRAIN_FLAGS}
    schedule = {SCHEDULE_FLAGS[k]: v for k, v in vars(args).items() if k in SCHEDULE_FLAGS}
    if schedule:
        given["lr_schedule"] = schedule
    return given


def _train(cfg: RunConfig, out: Path, **kw: Any):  # noqa: ANN202 - train_run's result
    """``train_run``, with an interruption annotated by the checkpoint it leaves (see :func:`main`)."""
    from .run import train_run
    from .train import CHECKPOINT, load_checkpoint

    try:
        return train_run(cfg, out, **kw)
    except KeyboardInterrupt as e:
        if getattr(e, "checkpoint", None) is None:  # outside the training loop: what is on disk?
            ckpt = Path(out) / CHECKPOINT
            try:
                e.step, e.checkpoint = load_checkpoint(ckpt)["step"], ckpt
            except (CheckpointError, OSError):
                e.checkpoint = None
            e.run_dir = Path(out)
        raise


RANK_ERRORS = "PYRO_META_RANK_ERRORS"  # set by --nproc: a folder where each rank leaves its one-line error


def _launch(args: argparse.Namespace) -> int:
    """``--nproc N``: start N ranks of this same command under torchrun (``torch.distributed.run``).

    A rank's expected error goes to a file, not to stderr; when ranks fail, the launcher prints one line
    (the lowest failing rank's message, and how many ranks said the same), not one per rank and not
    torch elastic's failure block, whose loggers are turned down for the launch."""
    import logging
    import os
    import tempfile

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    argv, skip = [], False
    for a in args.argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            argv.append(a)
    launcher = get_args_parser().parse_args(["--standalone", f"--nproc_per_node={args.nproc}", "--module",
                                             "pyro_meta", *argv])
    from torch.distributed.elastic.multiprocessing.api import SignalException

    # one torch thread per rank (what torchrun sets, here without its banner); the user's value wins
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    quiet = [lg for name, lg in logging.root.manager.loggerDict.items()
             if name.startswith("torch.distributed") and isinstance(lg, logging.Logger)]
    levels = [lg.level for lg in quiet]
    with tempfile.TemporaryDirectory(prefix="pyro-meta-ranks-") as errors:
        os.environ[RANK_ERRORS] = errors
        try:
            for lg in quiet:
                lg.setLevel(logging.CRITICAL)
            run(launcher)
        except ChildFailedError as e:
            print(f"pyro-meta {args.command}: error: {_rank_failure(e, Path(errors))}", file=sys.stderr)
            return 1
        except SignalException as e:  # Ctrl-C or SIGTERM: the ranks stopped together at a step boundary
            where = args.resume or args.out
            again = (f"continue with `pyro-meta train --resume {where} --nproc {args.nproc}`" if where is not None
                     else "continue with `pyro-meta train --resume <run directory>`")
            print(f"interrupted; rank 0 wrote a checkpoint at the last step boundary: {again}", file=sys.stderr)
            return 128 + int(e.sigval)
        finally:
            os.environ.pop(RANK_ERRORS, None)
            for lg, level in zip(quiet, levels):
                lg.setLevel(level)
    return 0


def _rank_failure(e: Any, errors: Path) -> str:
    """One line for a failed ``--nproc`` launch: the lowest rank's own message (from ``errors``), or, for a
    rank that died without one, its exit code."""
    said = {}
    for f in errors.glob("rank*.txt"):
        try:
            said[int(f.stem[4:])] = f.read_text().strip()
        except (ValueError, OSError):
            continue
    if said:
        rank = min(said)
        same = sorted(r for r, m in said.items() if m == said[rank])
        return f"{said[rank]} (rank{'s' if len(same) > 1 else ''} {', '.join(map(str, same))})"
    rank, failure = min(e.failures.items())
    code = failure.exitcode
    how = f"killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
    return f"rank {rank} {how} without a message; its traceback, if any, is above"


def report_error(command: str, message: str) -> None:
    """The CLI's one line for an expected error: on stderr, or, in a rank that ``--nproc`` started, into the
    launcher's folder (the launcher prints one line for all ranks)."""
    import os

    folder = os.environ.get(RANK_ERRORS)
    if folder and os.environ.get("RANK") is not None:
        try:
            (Path(folder) / f"rank{int(os.environ['RANK'])}.txt").write_text(message)
        except (OSError, ValueError):
            pass  # fall back to stderr
        else:
            # the launcher prints the line. End here: left to interpreter shutdown, a rank's gloo threads
            # sometimes abort it with "terminate called without an active exception" on the shared stderr
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
    print(f"pyro-meta {command}: error: {message}", file=sys.stderr)


def cmd_train(args: argparse.Namespace) -> int:
    from .distributed import launched_by_torchrun

    if args.nproc is not None:
        if args.nproc < 1:
            raise ConfigError(f"--nproc must be a positive number of processes, got {args.nproc}")
        if args.nproc > 1 and not launched_by_torchrun():
            return _launch(args)

    given = _given(args)
    if getattr(args, "benchmark", None) is not None:
        given["benchmark"] = args.benchmark
    if given.get("method") in ("vae", "iwae") or given.get("benchmark") == "omniglot_images":
        raise ConfigError("the VAE on Omniglot images is not a meta-learner: train it with `pyro-meta vi vae --out DIR "
                          "[--objective elbo|iwae --k K]` (the same trainer; see the README, 'Variational "
                          "inference from first principles')")
    if args.resume is not None:
        if args.config is not None:
            raise ConfigError("--resume reads the run's own config.json; do not pass --config with it")
        if args.out is not None and args.out.resolve() != args.resume.resolve():
            raise ConfigError("--resume DIR continues the run in DIR; --out names another folder")
        out, res = _train(RunConfig(), args.resume, resume=True, progress=not args.no_progress,
                             overrides=given)
    else:
        base = RunConfig.load(args.config).to_dict() if args.config else {}
        if "lr_schedule" in given and isinstance(base.get("lr_schedule"), dict):
            old = base["lr_schedule"]
            new = given["lr_schedule"]
            if "name" not in new or new["name"] == old.get("name", "constant"):
                given["lr_schedule"] = {**old, **new}
        base.update(given)
        cfg = resolve(RunConfig.from_dict(base, source="command line"))
        ways = f"{cfg.ways}way-" if cfg.ways else ""
        bench = cfg.benchmark.replace(":", "-").replace("/", "-")  # an import path is not a folder name
        out = args.out or Path("runs") / f"{bench}-{cfg.method}-{ways}{cfg.shots}shot-s{cfg.seed}"
        out, res = _train(cfg, out, progress=not args.no_progress)
    from .distributed import current

    ctx = current()
    if ctx is not None and not ctx.is_main:
        return 0  # rank 0 reports
    print(f"trained {res.step} steps in {res.seconds:.1f} s ({res.skipped} skipped); run directory: {out}"
          + (f" ({ctx.world_size} ranks)" if ctx is not None else ""))
    ev = out / "eval.json"
    if ev.exists():
        from .run import format_metrics_table

        print(format_metrics_table([json.loads(ev.read_text())]))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .run import evaluate_run, format_metrics_table, load_run

    cfg, learner, bm = load_run(args.run_dir, device=args.device)
    report = evaluate_run(args.run_dir, cfg, learner, bm)
    print(format_metrics_table([report]))
    print(f"wrote {args.run_dir / 'eval.json'}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .inspect import inspect_run
    from .run import read_config
    from .threads import apply_threads

    apply_threads(read_config(args.run_dir).threads or 1)
    print(inspect_run(args.run_dir, max_weights=args.max_weights))
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    from .evaluate import predict
    from .nn import TRANSDUCTIVE_MODES
    from .run import load_learner
    from .tasks import CLASSIFICATION_BENCHMARKS
    from .tasks.images import task_from_folders

    cfg, learner = load_learner(args.run_dir)
    if cfg.benchmark not in CLASSIFICATION_BENCHMARKS:
        raise ConfigError(f"{args.run_dir} is a {cfg.benchmark!r} run; classify needs a classification run (omniglot)")
    batch, classes, files = task_from_folders(args.support, args.query)
    if len(classes) != cfg.ways:
        print(f"note: the run was trained on {cfg.ways}-way tasks; this task has {len(classes)} classes",
              file=sys.stderr)
    if batch.num_support // len(classes) != cfg.shots:
        print(f"note: the run was trained with {cfg.shots} shots; this support set has "
              f"{batch.num_support // len(classes)} per class", file=sys.stderr)
    if cfg.batch_norm in TRANSDUCTIVE_MODES:
        print(f"note: this run normalizes transductively (batch_norm {cfg.batch_norm!r}): each answer depends on "
              "the other query images in the folder", file=sys.stderr)
    samples = args.samples if args.samples is not None else max(cfg.eval_samples, 1)
    if samples < 1:
        raise ConfigError(f"--samples must be a positive number of draws, got {samples}")
    learner.eval()
    dev = next(iter(learner.parameters())).device
    probs = predict(learner, batch.to(dev), samples, cfg.seed, keep_latents=False).predictive_mean()[0]  # Q C
    right = 0
    for i, (f, p) in enumerate(zip(files, probs)):
        k = int(p.argmax())
        truth = "" if batch.y_query is None else f"  (true: {classes[int(batch.y_query[0, i])]})"
        right += batch.y_query is not None and k == int(batch.y_query[0, i])
        print(f"{f}: {classes[k]} p={float(p[k]):.3f}{truth}")
    if batch.y_query is not None:
        print(f"accuracy {right}/{len(files)} = {right / len(files):.3f}")
    return 0


def cmd_list(_: argparse.Namespace) -> int:
    print("benchmarks:")
    for k, v in sorted(all_benchmarks().items()):
        print(f"  {k:<15} {v}")
    print("methods:")
    for k, m in sorted(METHODS.items()):
        print(f"  {k:<15} {m.description}")
        if m.objectives:
            print(f"  {'':<15} objectives: {', '.join(m.objectives)}")
    print("settings (RunConfig, for --config JSON files):")
    print("  " + ", ".join(f.name for f in fields(RunConfig)))
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from .tasks.omniglot import CANONICAL_URL, default_cache_dir, download_omniglot

    root = args.root or default_cache_dir() / "omniglot"
    path = download_omniglot(root, base_url=args.url or CANONICAL_URL)
    print(f"Omniglot is in {path}; train with --data-root {root}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .plots import plot_regression_tasks
    from .run import format_metrics_table

    t0 = time.perf_counter()
    reports, learners = [], []
    for method, steps in DEMO_STEPS.items():
        cfg = resolve(RunConfig(benchmark="sinusoid", method=method, shots=5, device=args.device,
                                steps=max(1, int(steps * args.steps_scale)), log_every=50,
                                checkpoint_every=500, num_test_tasks=args.test_tasks, threads=args.threads,
                                num_val_tasks=DEMO_VAL_TASKS))
        out = args.out / method
        if (out / "checkpoint.pt").exists():  # continue an interrupted demo; a different run is refused
            out, _ = _train(cfg, out, resume=True, progress=not args.no_progress, overrides=cfg.to_dict())
        else:
            out, _ = _train(cfg, out, progress=not args.no_progress)
        from .run import load_run

        cfg, learner, bm = load_run(out)
        learners.append((method, learner, max(cfg.eval_samples, 1)))
        reports.append(json.loads((out / "eval.json").read_text()))
    plot = plot_regression_tasks(learners, bm.test, bm.family, args.out / DEMO_PLOT)
    print(f"\n5-shot sinusoid, {reports[0]['num_test_tasks']} fixed test tasks x {reports[0]['eval_queries']} "
          f"query points (mean +- 95% CI over tasks):")
    print(format_metrics_table(reports))
    print(f"\nrun directories: {', '.join(str(args.out / m) for m in DEMO_STEPS)}; comparison plot: {plot}")
    print(f"demo finished in {time.perf_counter() - t0:.0f} s")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import scoreboard_from_args

    board = scoreboard_from_args(args, "pyro-meta compare")
    print((args.out / "scoreboard.md").read_text())
    return 0 if all("error" not in r for r in board["rows"]) else 1


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "inspect": cmd_inspect, "list": cmd_list,
            "classify": cmd_classify,
            "download": cmd_download, "demo": cmd_demo, "compare": cmd_compare, "vi": cmd_vi}


def describe_os_error(e: OSError) -> str:
    """One line: what failed, on which path, and why (``could not write '/x/y': No space left on device``)."""
    what = e.strerror or str(e)
    if e.filename is not None:
        where = f"{e.filename!r}" + (f" -> {e.filename2!r}" if e.filename2 is not None else "")
        return f"{where}: {what}"
    return what


def _raise_terminated(signum, frame) -> None:  # noqa: ANN001 - signal handler signature
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    """The CLI's one error boundary: every expected failure is one line on stderr and exit code 2;
    Ctrl-C exits 130 and SIGTERM 143, after the checkpoint training writes on the way out."""
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    old_term = None
    if threading.current_thread() is threading.main_thread():
        old_term = signal.signal(signal.SIGTERM, _raise_terminated)  # outside training too: clean exit
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, CheckpointError, ProtocolError, TaskBatchError, NonFiniteError, FloatingPointError,
            ValueError, LeakError, TaskSourceExhausted, RunLockedError) as e:
        report_error(args.command, str(e))
        return 2
    except OSError as e:
        report_error(args.command, describe_os_error(e))
        return 2
    except KeyboardInterrupt as e:
        what = "terminated" if isinstance(e, Terminated) else "interrupted"
        ckpt, run = getattr(e, "checkpoint", None), getattr(e, "run_dir", None)
        if ckpt is not None:
            again = getattr(e, "resume_command", None) or f"pyro-meta train --resume {ckpt.parent}"
            msg = f"{what}; the run's checkpoint on disk is at step {e.step} ({ckpt}): continue with `{again}`"
        elif run is not None:
            msg = (f"{what} before the run's first checkpoint; nothing to resume: run the same command again "
                   f"(it reuses {run})")
        else:
            msg = f"{what}; this command wrote no new checkpoint"
        print(msg, file=sys.stderr)
        return Terminated.exit_code if isinstance(e, Terminated) else 130
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)


if __name__ == "__main__":
    raise SystemExit(main())
