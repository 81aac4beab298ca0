"""Run directories: train a configured method into a folder, reload it, evaluate, export, plot.

A run directory holds ``config.json`` (every protocol choice, resolved), ``checkpoint.pt`` (written
atomically), ``metrics.jsonl``, ``eval.json``, ``posterior.nc`` and ``plots/``.
"""

from __future__ import annotations

import errno
import json
import os
import platform
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyro
import torch

from . import distributed
from .arviz import to_inference_data
from .config import REFERENCE_METHODS, ConfigError, RunConfig
from .evaluate import evaluate, one_image_at_a_time, per_task_weights, predict
from .io import atomic_write_json
from .learner import MetaLearner
from .methods import build_learner, protocol_of, resolve
from .metrics import Z95
from .nn import TRANSDUCTIVE_MODES
from .plots import plot_regression_tasks, plot_reliability, plot_training_curve
from .rundir import RunLock, clean_temp_files
from .schedule import normalize_schedule
from .tasks import Benchmark, TaskBatch, get_benchmark
from .threads import apply_threads
from .train import CHECKPOINT, METRICS, FitResult, fit, json_safe, load_checkpoint, resolve_device

CONFIG = "config.json"
EVAL = "eval.json"
POSTERIOR = "posterior.nc"
# Settings that may change when a run is resumed: they do not change what is computed.
RESUMABLE = ("steps", "device", "log_every", "checkpoint_every", "checkpoint_minutes", "skip_nonfinite",
             "skip_limit", "data_root", "threads",
             # the rates: a change applies from the resumed step on and is recorded in metrics.jsonl
             "meta_lr", "lr_schedule")
# posterior.nc holds the first few test tasks: all 600 would be hundreds of MB of weight draws.
EXPORT_TASKS = 20
# ... and at most this many per-task weight values (draws x tasks x weights): conv4 has ~1e5 weights.
EXPORT_VALUES = 5_000_000
# free space kept beyond twice the export's size before posterior.nc is written
NETCDF_MARGIN = 16 * 2**20


def benchmark_of(cfg: RunConfig) -> Benchmark:
    return get_benchmark(cfg.benchmark, shots=cfg.shots, queries=cfg.queries, meta_batch=cfg.meta_batch,
                         eval_queries=cfg.eval_queries, num_val_tasks=cfg.num_val_tasks,
                         num_test_tasks=cfg.num_test_tasks, seed=cfg.seed, ways=cfg.ways,
                         data_root=cfg.data_root, split=cfg.split, train_tasks=cfg.train_tasks)


def protocol_config(cfg: RunConfig) -> dict[str, Any]:
    """The part of a config that a resumed run must share with its checkpoint."""
    return {k: v for k, v in cfg.to_dict().items() if k not in RESUMABLE}


def write_json_atomic(path: Path, data: Any) -> None:
    atomic_write_json(path, json_safe(data))


def write_config(run_dir: Path, cfg: RunConfig, bm: Benchmark) -> None:
    data = cfg.to_dict()
    data["resolved"] = {
        "method_protocol": protocol_of(cfg),
        "benchmark_protocol": bm.protocol,
        "versions": {"pyro_meta": _version(), "torch": torch.__version__, "pyro": pyro.__version__,
                     "python": platform.python_version()},
    }
    write_json_atomic(run_dir / CONFIG, data)


def _version() -> str:
    from . import __version__

    return __version__


def read_config(run_dir: str | Path) -> RunConfig:
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).is_file():
        raise ConfigError(f"{str(run_dir)!r} is not a run directory: it has no {CONFIG}")
    return resolve(RunConfig.load(run_dir / CONFIG))


def is_startup_leftover(run_dir: Path) -> bool:
    """A folder a run started in but left before its step-0 checkpoint: ``config.json``, and neither a
    ``checkpoint.pt`` nor a training log (a run that logged a step and lost its checkpoint is not a
    leftover: that is a damaged run). Nothing in it has value; a fresh start (or ``--resume``) may
    reuse it."""
    log = run_dir / METRICS
    return (run_dir / CONFIG).is_file() and not (run_dir / CHECKPOINT).exists() and (
        not log.exists() or log.stat().st_size == 0)


def _note(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def train_run(cfg: RunConfig, out: str | Path, resume: bool = False, progress: bool = True,
              stop_after: int | None = None, finalize_run: bool = True,
              overrides: dict[str, Any] | None = None, max_seconds: float | None = None) -> tuple[Path, FitResult]:
    """Meta-train ``cfg`` into the run directory ``out``; evaluate, export and plot at the end.

    Under torchrun (``WORLD_SIZE`` > 1) this joins the process group (:mod:`pyro_meta.distributed`): rank 0
    prepares the folder exactly as a single process would and sends the resolved config to the other
    ranks, every rank trains its share, and rank 0 alone writes, evaluates and plots.

    The folder is locked for the whole call (:class:`~pyro_meta.rundir.RunLock`): a second writer is
    refused, naming this one. A folder left before its first checkpoint (:func:`is_startup_leftover`)
    is reused by a fresh start, and ``--resume`` starts it from step 0 with its saved config.

    :param resume: continue ``out`` from its checkpoint. ``cfg`` is then read from ``out/config.json``
        and ``overrides`` may change only :data:`RESUMABLE` settings; any other difference is an error.
        A stale ``eval.json`` is removed (the finished run writes a new one).
    :param stop_after: stop after this many steps (checkpointed), as an interruption would.
    :param max_seconds: a training-time budget (equal-wall-time comparisons): stop after the first
        step at which the run's training time reaches it (``fit``'s ``max_seconds``; a resumed run's
        earlier time counts). ``cfg.steps`` is then a cap: a run stopped by its budget is finished at
        the step it reached. Its ``config.json`` says ``steps`` = the steps done (the checkpoint, the
        evaluation and :func:`finished_report` agree with it), and ``metrics.jsonl`` holds a
        ``{"event": "time_budget", "max_seconds": ..., "steps_asked": ...}`` line.
    """
    out = Path(out)
    ctx = distributed.init_from_env(distributed.launch_device((overrides or {}).get("device"), out / CONFIG, resume,
                                                              cfg.device or "cpu"))
    if ctx is None:
        return _train_run(cfg, out, resume, progress, stop_after, finalize_run, overrides, max_seconds, None)
    if not ctx.is_main:
        payload = distributed.receive_config()
        cfg, resume = RunConfig.from_dict(payload[0]), payload[1]
        apply_threads(cfg.threads)
        apply_precision(cfg)
        torch.manual_seed(cfg.seed)
        learner = build_learner(cfg)
        bm = benchmark_of(cfg)
        result = _fit_run(learner, bm, cfg, out, resume, False, stop_after, max_seconds)
        if finalize_run and (result.out_of_time or result.step >= cfg.steps):
            dev = distributed.rank_device(cfg.device, ctx)
            learner.to(resolve_device(dev))
            # this rank's share of the test tasks, gathered by rank 0's evaluation in finalize
            evaluate(learner, bm.test.to(dev), num_samples=cfg.eval_samples, seed=cfg.seed)
        return out, result
    sent = [False]
    try:
        return _train_run(cfg, out, resume, progress, stop_after, finalize_run, overrides, max_seconds, sent)
    except Exception as e:
        if not sent[0]:  # the other ranks are waiting for the config: tell them instead
            distributed.send_error(e)
        raise


def _fit_run(learner: MetaLearner, bm: Benchmark, cfg: RunConfig, out: Path, resume: bool, progress: bool,
             stop_after: int | None, max_seconds: float | None) -> FitResult:
    """:func:`fit` with every setting of the run's config."""
    return fit(learner, bm.train, cfg.steps, meta_lr=cfg.meta_lr, grad_clip=cfg.grad_clip, out_dir=out,
               resume=resume, run_config=protocol_config(cfg), device=cfg.device, log_every=cfg.log_every,
               checkpoint_every=cfg.checkpoint_every, checkpoint_minutes=cfg.checkpoint_minutes,
               skip_nonfinite=cfg.skip_nonfinite, skip_limit=cfg.skip_limit, progress=progress,
               stop_after=stop_after, lr_schedule=cfg.lr_schedule, max_seconds=max_seconds,
               micro_batches=cfg.micro_batches)


def apply_precision(cfg: RunConfig) -> None:
    """``tf32``: CUDA matmuls and cuDNN convolutions may use TensorFloat-32. Anything else (``fp32``, the
    default, and ``bf16``, which lives in the network's autocast) turns both off: PyTorch's own default lets
    cuDNN convolutions use TF32, so without this an "fp32" conv4 trunk on a GPU would not be float32 (on an
    H100, MAML Omniglot's fp32 and tf32 runs gave the same numbers before this)."""
    tf32 = cfg.precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def _train_run(cfg: RunConfig, out: Path, resume: bool, progress: bool, stop_after: int | None, finalize_run: bool,
               overrides: dict[str, Any] | None, max_seconds: float | None,
               sent: list[bool] | None) -> tuple[Path, FitResult]:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{str(out)!r} is a file, not a run directory; choose another --out")
    if resume and not (out / CONFIG).is_file():
        raise ConfigError(f"{str(out)!r} is not a run directory: it has no {CONFIG}")
    bm = None
    if not resume:  # every setting checked before the folder is touched
        cfg = resolve(cfg)
        resolve_device(cfg.device)
        if cfg.precision == "tf32" and not cfg.device.startswith("cuda"):
            raise ConfigError("precision tf32 is a CUDA setting (TensorFloat-32 matmuls and convolutions); on "
                              f"{cfg.device!r} use fp32 or bf16")
        bm = benchmark_of(cfg)
    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out, "train"):
        clean_temp_files(out)
        if is_startup_leftover(out):
            if resume:
                _note(f"{out} never reached its first checkpoint (the run stopped while starting): starting it "
                      "from step 0 with its saved config")
                cfg, resume, bm = _resumed_config(out, None, overrides), False, None
            else:
                _note(f"{out} holds only a start-up leftover (a config.json without a checkpoint: that run "
                      "stopped before its first step); reusing the folder")
            for name in (CONFIG, METRICS, EVAL):
                (out / name).unlink(missing_ok=True)
        if resume:
            done = load_checkpoint(out / CHECKPOINT)["step"]  # missing/corrupted: fails here, nothing touched
            cfg = _resumed_config(out, done, overrides)
            (out / EVAL).unlink(missing_ok=True)  # stale: it was of an earlier step
        elif (out / CHECKPOINT).exists() or (out / CONFIG).exists():
            raise ConfigError(f"{str(out)!r} already holds a run; pass --resume to continue it, or choose "
                              f"another --out (nothing was overwritten)")
        resolve_device(cfg.device)
        apply_threads(cfg.threads)
        apply_precision(cfg)
        bm = bm if bm is not None and not resume else benchmark_of(cfg)
        torch.manual_seed(cfg.seed)
        learner = build_learner(cfg)
        write_config(out, cfg, bm)
        if sent is not None:  # the other ranks train what rank 0 resolved
            distributed.send_config((cfg.to_dict(), resume))
            sent[0] = True
        result = _fit_run(learner, bm, cfg, out, resume, progress, stop_after, max_seconds)
        if result.out_of_time:  # the budget ends the run: the steps done are its steps
            cfg = replace(cfg, steps=result.step)
            write_config(out, cfg, bm)
        if finalize_run and result.step >= cfg.steps:
            finalize(out, cfg, learner, bm)
    return out, result


def _resumed_config(out: Path, done: int | None, overrides: dict[str, Any] | None) -> RunConfig:
    """The run's saved config with ``overrides`` applied (only :data:`RESUMABLE` ones may differ)."""
    saved = read_config(out)
    overrides = dict(overrides or {})
    if done is not None and overrides.get("steps") is not None and overrides["steps"] < done:
        raise ConfigError(f"cannot resume {str(out)!r} with steps={overrides['steps']}: the run has "
                          f"already done {done} steps")
    clash = {k: (getattr(saved, k), v) for k, v in overrides.items()
             if k not in RESUMABLE and k in saved.to_dict() and getattr(saved, k) != v}
    if clash:
        parts = "; ".join(f"{k}: run has {a!r}, given {b!r}" for k, (a, b) in sorted(clash.items()))
        raise ConfigError(f"cannot resume {str(out)!r} with a different config ({parts}); start a new "
                          f"run with another --out instead")
    partial = overrides.pop("lr_schedule", None)
    cfg = replace(saved, **{k: v for k, v in overrides.items() if k in RESUMABLE})
    if partial is not None:
        # settings given on resume, over the run's own schedule unless they name another one
        old = saved.lr_schedule or {"name": "constant"}
        same = "name" not in partial or partial["name"] == old.get("name")
        merged = {**old, **partial} if same else dict(partial)
        cfg = replace(cfg, lr_schedule=normalize_schedule(merged, cfg.steps))
    cfg.check()
    return cfg


def load_run(run_dir: str | Path, device: str | None = None) -> tuple[RunConfig, MetaLearner, Benchmark]:
    """The config, the trained learner (from ``checkpoint.pt``) and the benchmark of a run."""
    cfg, learner = load_learner(run_dir, device)
    return cfg, learner, benchmark_of(cfg)


def load_learner(run_dir: str | Path, device: str | None = None) -> tuple[RunConfig, MetaLearner]:
    """The config and the trained learner of a run, without its benchmark (no data root needed: e.g. to
    classify your own images, :func:`pyro_meta.tasks.images.task_from_folders`)."""
    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    if device is not None:
        cfg = replace(cfg, device=device)
    apply_threads(cfg.threads)
    ckpt = load_checkpoint(run_dir / CHECKPOINT)
    learner = build_learner(cfg)
    try:
        learner.load_state_dict(ckpt["learner"])
    except (RuntimeError, KeyError) as e:
        raise ConfigError(f"checkpoint of {str(run_dir)!r} does not match its config.json: {e}") from None
    learner.to(resolve_device(cfg.device))
    return cfg, learner


def evaluate_run(run_dir: str | Path, cfg: RunConfig | None = None, learner: MetaLearner | None = None,
                 bm: Benchmark | None = None) -> dict[str, Any]:
    """Recompute ``eval.json`` on the benchmark's fixed test tasks. It records the checkpoint's step, the
    run's ``steps`` and whether the run had ``finished`` (an evaluation of an interrupted run says so,
    here and in the file)."""
    run_dir = Path(run_dir)
    if learner is None:
        read_config(run_dir)  # not a run directory: an error before anything is touched
    with RunLock(run_dir, "evaluate"):
        clean_temp_files(run_dir)
        if learner is None:
            cfg, learner, bm = load_run(run_dir)
        assert cfg is not None and bm is not None
        return _evaluate_locked(run_dir, cfg, learner, bm)


def recalibrate_run(run_dir: Path, cfg: RunConfig, learner: MetaLearner, val: TaskBatch) -> dict[str, Any]:
    """Fit the recalibration maps (:mod:`pyro_meta.recalibrate`) on the validation tasks ``val`` (the only
    tasks it is given) and write ``recalibration.json``."""
    from .recalibrate import RECALIBRATION, fit_recalibration

    val = val.to(distributed.rank_device(cfg.device, distributed.current()))
    pred = predict(learner, val, num_samples=cfg.eval_samples, seed=cfg.seed, keep_latents=False)
    recal = fit_recalibration(pred, val)
    write_json_atomic(run_dir / RECALIBRATION, recal)
    return recal


def _evaluate_locked(run_dir: Path, cfg: RunConfig, learner: MetaLearner, bm: Benchmark) -> dict[str, Any]:
    from .recalibrate import read_recalibration, recalibrated_metrics

    # the maps come from the validation tasks, before the test tasks are predicted (the reference rows are
    # exact predictives: nothing to recalibrate)
    recal = None if cfg.method in REFERENCE_METHODS else \
        read_recalibration(run_dir) or recalibrate_run(run_dir, cfg, learner, bm.val)
    test = bm.test.to(distributed.rank_device(cfg.device, distributed.current()))
    metrics, pred = evaluate(learner, test, num_samples=cfg.eval_samples, seed=cfg.seed)
    ckpt_step = load_checkpoint(run_dir / CHECKPOINT)["step"] if (run_dir / CHECKPOINT).exists() else None
    finished = ckpt_step is not None and ckpt_step >= cfg.steps
    if not finished:
        _note(f"warning: the run in {run_dir} stopped at step {ckpt_step} of {cfg.steps}: these are the metrics "
              "of an unfinished run (eval.json says finished: false); `pyro-meta train --resume` finishes it")
    report = {"method": cfg.method, "benchmark": cfg.benchmark, "ways": cfg.ways, "shots": cfg.shots,
              "step": ckpt_step, "steps": cfg.steps, "finished": finished,
              "num_test_tasks": test.num_tasks, "eval_queries": cfg.eval_queries,
              "eval_samples": cfg.eval_samples, "inner_steps_eval": cfg.inner_steps_eval,
              "metrics": metrics}
    if recal is not None:
        report["recalibrated"] = {"fitted_on": recal["fitted_on"], **recalibrated_metrics(pred, test, recal)}
    if not test.is_classification and cfg.method not in REFERENCE_METHODS:
        report["versus_prior"] = versus_prior(cfg, pred, test)
    transductive = test.is_classification and cfg.batch_norm in TRANSDUCTIVE_MODES
    if transductive:
        report["transductive"] = (f"batch_norm {cfg.batch_norm!r} normalizes with the statistics of the query "
                                  "images passed together: 'metrics' scores each task's query set whole, and a "
                                  "prediction depends on which other images are in it; 'one_image_at_a_time' "
                                  "scores every image alone")
        report["one_image_at_a_time"] = one_image_at_a_time(learner, test, cfg.eval_samples, cfg.seed)
    for name, extra in bm.extra.items():  # e.g. Lake's within-alphabet episodes, every image scored alone
        extra = extra.to(test.x_support.device)
        whole = evaluate(learner, extra, num_samples=cfg.eval_samples, seed=cfg.seed)[0]
        report[name] = {"protocol": bm.protocol.get(name, name), "num_tasks": extra.num_tasks, "metrics": whole}
        if transductive:  # every image alone, and beside it each episode's query set scored whole
            report[name].update(metrics=one_image_at_a_time(learner, extra, cfg.eval_samples, cfg.seed),
                                whole_query_set=whole)
    write_json_atomic(run_dir / EVAL, report)
    if "one_image_at_a_time" in report:
        print(f"note: transductive normalization (batch_norm {cfg.batch_norm!r}): accuracy "
              f"{metrics['accuracy']['mean']:.4f} with each query set scored whole, "
              f"{report['one_image_at_a_time']['accuracy']['mean']:.4f} with every image alone (eval.json)",
              file=sys.stderr, flush=True)
    vp = report.get("versus_prior") or {}
    if vp.get("worse"):
        print(f"warning: {cfg.method} is worse than knowing nothing: its NLL on the first {vp['tasks']} test tasks, "
              f"{vp['method_nll']:.3f}, is above that of the family's prior predictive, which ignores the support "
              f"({vp['prior_nll']:.3f}; --method prior)", file=sys.stderr, flush=True)
    bad = dropped_count(metrics)
    if bad:
        absurd = metrics.get("absurd_tasks", {})
        print(f"warning: {bad} of {test.num_tasks} test tasks gave non-finite or absurd predictions (their "
              f"adaptation diverged; tasks {(metrics['nonfinite_tasks'].get('tasks', []) + absurd.get('tasks', []))[:10]}"
              f"{', ...' if bad > 10 else ''}, in eval.json); the metrics are over the other {test.num_tasks - bad}",
              flush=True)
    return report


# the end-of-run comparison with the prior row: on the first tasks of the test set, a coarser quadrature
VERSUS_PRIOR_TASKS, VERSUS_PRIOR_GRID, VERSUS_PRIOR_COMPONENTS = 100, 40, 128


def versus_prior(cfg: RunConfig, pred: Any, test: TaskBatch) -> dict[str, Any] | None:
    """The run's NLL against the family's prior predictive (the ``prior`` reference row, which ignores the
    support) on the first :data:`VERSUS_PRIOR_TASKS` test tasks whose prediction is finite, with a
    :data:`VERSUS_PRIOR_GRID`-point quadrature per axis and :data:`VERSUS_PRIOR_COMPONENTS` strata (the row
    itself: 100 and 256; on 100 test tasks the prior's NLL moved by 0.00000 on ``sinusoid_line``, 0.0009 on
    ``sinusoid``, 0.005 on ``sinusoid_bmaml`` with 12 points per axis instead of 30; 10 s instead of 80 on
    ``sinusoid_line``). ``None`` when the family has no prior row."""
    from .evaluate import _points, finite_tasks, regression_metrics
    from .guides.empty import NoLatentGuide
    from .metrics import mixture_nll
    from .models.reference import ReferenceModel
    from .tasks.registry import family_of

    family = family_of(cfg.benchmark)
    if family is None:
        return None
    keep = finite_tasks(pred).nonzero()[:, 0][:VERSUS_PRIOR_TASKS].to(test.x_query.device)
    if keep.numel() == 0:
        return None
    sub = test.select(keep)
    grid = max(2, round(VERSUS_PRIOR_GRID ** (2 / 3))) if cfg.benchmark == "sinusoid_bmaml" else VERSUS_PRIOR_GRID
    try:
        prior = ReferenceModel(family, "prior", grid, VERSUS_PRIOR_COMPONENTS)
    except ValueError:
        return None
    # this process alone (under torch.distributed the other ranks are not in this evaluation)
    prior_pred = predict(MetaLearner(prior, NoLatentGuide(), name="prior"), sub, num_samples=1, keep_latents=False)
    prior_nll = regression_metrics(prior_pred, sub)["nll"]["mean"]
    lw = None if pred.log_weights is None else pred.log_weights[:, keep]
    log_lik = pred.log_lik[:, keep]
    method_nll = float(mixture_nll(_points(log_lik), lw).mean())
    return {"tasks": int(keep.numel()), "method_nll": method_nll, "prior_nll": prior_nll,
            "worse": bool(method_nll > prior_nll)}


def dropped_count(m: dict[str, Any]) -> int:
    """Test tasks left out of a report's means: non-finite and absurd predictions."""
    return sum((m.get(k) or {}).get("count", 0) for k in ("nonfinite_tasks", "absurd_tasks"))


def export_run(run_dir: Path, cfg: RunConfig, learner: MetaLearner, bm: Benchmark,
               recalibration: dict[str, Any] | None = None) -> Path:
    """``posterior.nc``: :func:`~pyro_meta.arviz.to_inference_data` on the first test tasks, with the run's
    ``recalibration`` (its ``recalibration.json``) applied beside the raw draws."""
    sub = bm.test.select(slice(0, EXPORT_TASKS)).to(cfg.device)
    samples = max(cfg.eval_samples, 1)
    d = per_task_weights(learner)
    if d:
        samples = max(1, min(samples, EXPORT_VALUES // (sub.num_tasks * d)))
    pred = predict(learner, sub, samples, seed=cfg.seed)
    idata = to_inference_data(learner, sub, prediction=pred, recalibration=recalibration)
    return write_netcdf(idata, run_dir / POSTERIOR)


def write_netcdf(idata: Any, path: Path) -> Path:
    """``idata`` to ``path`` via a temporary file and a rename. The netCDF/HDF5 library can crash the
    process (a segmentation fault, seen here) when the disk fills while it writes, so the free space is
    checked first: too little is an ``OSError`` (ENOSPC) naming the file, before anything is written."""
    need = sum(v.nbytes for g in idata.groups() for v in idata[g].data_vars.values())
    free = shutil.disk_usage(path.parent).free
    if free < 2 * need + NETCDF_MARGIN:
        raise OSError(errno.ENOSPC, f"not enough free disk space to write it: about {need / 2**20:.1f} MiB "
                                    f"needed, {free / 2**20:.1f} MiB free", str(path))
    tmp = path.parent / f".{path.name}.tmp"
    try:
        idata.to_netcdf(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def finalize(run_dir: Path, cfg: RunConfig, learner: MetaLearner, bm: Benchmark) -> dict[str, Any]:
    """``recalibration.json`` (fitted on the validation tasks), ``eval.json``, ``posterior.nc`` and the plots
    of a finished run."""
    recal = recalibrate_run(run_dir, cfg, learner, bm.val) if cfg.method not in REFERENCE_METHODS else None
    report = evaluate_run(run_dir, cfg, learner, bm)
    export_run(run_dir, cfg, learner, bm, recal)
    if bm.is_classification:
        m = report["metrics"]
        plot_reliability(m["reliability"], run_dir / "plots" / "reliability.png",
                         title=f"{cfg.method}, Omniglot {cfg.ways}-way {cfg.shots}-shot: accuracy "
                               f"{m['accuracy']['mean']:.3f}, ECE {m['ece']['value']:.3f}")
    elif getattr(bm.family, "x_range", None) is not None and bm.test.x_support.shape[2:] == (1,) \
            and bm.test.y_support.shape[-1] == 1:  # predictive bands: 1-D inputs and outputs only
        plot_regression_tasks([(cfg.method, learner, max(cfg.eval_samples, 1))], bm.test.to(cfg.device),
                              bm.family, run_dir / "plots" / "predictive.png", seed=cfg.seed, recalibration=recal)
    if (run_dir / METRICS).exists():
        plot_training_curve(run_dir / METRICS, run_dir / "plots" / "training_loss.png",
                            title=f"{cfg.method} on {cfg.benchmark}, {cfg.shots}-shot: meta-training loss")
    return report


def format_metrics_table(reports: list[dict[str, Any]]) -> str:
    """A plain-text table of test metrics (mean +- 95% CI over tasks), one row per run."""
    if reports and "accuracy" in reports[0]["metrics"]:
        return _format_classification(reports)
    cols = ("mse", "nll", "coverage50", "coverage90", "crps")
    head = (f"{'method':<8} {'shots':>5} " + " ".join(f"{c:>17}" for c in cols) + f" {'calib err mae/rmse':>18}"
            f" {'heldout lpd/point':>17}")
    lines = [head, "-" * len(head)]
    for r in reports:
        m = r["metrics"]
        cells = " ".join(_stat_cell(m.get(c)) for c in cols) + _calibration_error_cell(m) + _lpd_cell(m)
        bad = dropped_count(m)
        lines.append(f"{r['method']:<8} {r['shots']:>5} {cells}" + (f"  ({bad} diverged tasks left out)" if bad else ""))
        rec = r.get("recalibrated") or {}
        for name, label in (("scale", "+scale"), ("isotonic", "+iso")):
            if rec.get(name):
                rm = rec[name]
                cells = " ".join(_stat_cell(rm.get(c)) for c in cols) + _calibration_error_cell(rm)
                value = f"  (width x {rm['value']:.3g})" if "value" in rm else ""
                lines.append(f"{label:<8} {r['shots']:>5} {cells}{' ' * 18}{value}")
    notes = {r["recalibrated"]["fitted_on"]["tasks"] for r in reports if r.get("recalibrated")}
    if notes:
        lines.append(f"+scale / +iso: recalibrated (one width factor / Kuleshov's isotonic map of the PIT) on "
                     f"{', '.join(map(str, sorted(notes)))} validation tasks, never the test tasks (recalibration.json)")
    return "\n".join(lines)


def _stat_cell(stat: dict[str, Any] | None) -> str:
    """``mean +- 95% CI`` over tasks (blank for a metric an older eval.json lacks, e.g. crps)."""
    return f"{'':>17}" if not stat else f"{stat['mean']:>9.3f} +-{stat['ci95']:>6.3f}"


def _calibration_error_cell(m: dict[str, Any]) -> str:
    """PACOH's calibration error of the pooled PIT values, ``mae/rmse`` (blank if absent)."""
    c = m.get("calibration_error")
    return f" {'':>18}" if not c else f" {c['mae']:>9.3f}/{c['rmse']:<8.3f}"


def _lpd_cell(m: dict[str, Any]) -> str:
    """The held-out log predictive density per query point, +- 95% CI over tasks (blank if absent)."""
    h = m.get("heldout_lpd")
    if not h:
        return f" {'':>17}"
    ci = Z95 * h["per_point_se"] if h.get("per_point_se") is not None else float("nan")
    return f" {h['per_point']:>9.3f} +-{ci:>6.3f}"


def _format_classification(reports: list[dict[str, Any]]) -> str:
    head = (f"{'method':<8} {'ways':>4} {'shots':>5} {'accuracy':>17} {'nll':>17} {'brier':>17} "
            f"{'ECE':>6} {'MCE':>6} {'heldout lpd/point':>17}")
    lines = [head, "-" * len(head)]
    for r in reports:
        m = r["metrics"]
        cells = " ".join(f"{m[c]['mean']:>9.4f} +-{m[c]['ci95']:>6.4f}" for c in ("accuracy", "nll", "brier"))
        bad = m.get("nonfinite_tasks", {}).get("count", 0)
        lines.append(f"{r['method']:<8} {r.get('ways', ''):>4} {r['shots']:>5} {cells} {m['ece']['value']:>6.4f} "
                     f"{m['mce']['value']:>6.4f}" + _lpd_cell(m) + (f"  ({bad} diverged tasks left out)" if bad else ""))
        t = (r.get("recalibrated") or {}).get("temperature")
        if t:
            cells = " ".join(f"{t[c]['mean']:>9.4f} +-{t[c]['ci95']:>6.4f}" for c in ("accuracy", "nll", "brier"))
            lines.append(f"{'+temp':<8} {r.get('ways', ''):>4} {r['shots']:>5} {cells} {t['ece']['value']:>6.4f} "
                         f"{t['mce']['value']:>6.4f}  (T = {t['value']:.3g}, fitted on "
                         f"{r['recalibrated']['fitted_on']['tasks']} validation tasks)")
    return "\n".join(lines)


def finished_report(run_dir: Path, steps: int | None = None) -> dict[str, Any] | None:
    """``eval.json`` of a run that finished (``steps`` of them, when given), else ``None``: an
    ``eval.json`` of an unfinished run, or of fewer steps than asked for, does not count."""
    try:
        report = json.loads((run_dir / EVAL).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict) or report.get("step") is None:
        return None
    finished = report.get("finished")
    if finished is None:  # an eval.json from before the flag: compare with the run's own steps
        try:
            finished = report["step"] >= json.loads((run_dir / CONFIG).read_text())["steps"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
    if not finished or (steps is not None and report["step"] < steps):
        return None
    return report


def _run_one(cfg_dict: dict[str, Any], out: str, max_seconds: float | None = None) -> dict[str, Any]:
    """Worker of :func:`run_many`: one thread, skip finished runs, resume interrupted ones. With
    ``max_seconds`` the run's ``steps`` is a cap (see :func:`train_run`): any finished run counts."""
    torch.set_num_threads(1)  # workers run side by side: one thread each, whatever the network
    cfg_dict = {**cfg_dict, "threads": cfg_dict.get("threads") or 1}
    out_p = Path(out)
    done = finished_report(out_p, cfg_dict.get("steps") if max_seconds is None else None)
    if done is not None:
        return done
    resume = (out_p / CHECKPOINT).exists()
    try:
        if resume:
            train_run(RunConfig(), out_p, resume=True, progress=False, overrides={"steps": cfg_dict["steps"]}
                      if "steps" in cfg_dict else None, max_seconds=max_seconds)
        else:
            train_run(RunConfig.from_dict(cfg_dict), out_p, progress=False, max_seconds=max_seconds)
    except Exception as e:  # noqa: BLE001 - one failed configuration must not stop the others
        return {"error": f"{type(e).__name__}: {e}"}
    return json.loads((out_p / EVAL).read_text())


def _warm_imports() -> None:
    """Import here what every worker would import on its own: torch's first optimizer imports
    ``torch._dynamo`` (seconds), and forked workers inherit the modules of this process."""
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])


def run_many(jobs: dict[str, dict[str, Any]], out: str | Path, workers: int = 2,
             max_seconds: dict[str, float] | None = None, verbose: bool = True) -> dict[str, dict[str, Any]]:
    """Train several configurations (``name -> RunConfig settings``) into ``out/<name>`` in parallel
    worker processes of one torch thread each; returns ``name -> eval.json`` (or ``{"error": ...}``).
    Started again, it skips finished runs and resumes interrupted ones from their checkpoints.

    :param max_seconds: ``name -> training-time budget`` of the jobs that have one (their ``steps`` is
        then a cap; :func:`train_run`).
    :param verbose: a line on stderr as each run ends."""
    import sys
    from concurrent.futures import ProcessPoolExecutor, as_completed

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    _warm_imports()
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        limits = max_seconds or {}
        futs = {pool.submit(_run_one, cfg, str(out / name), limits.get(name)): name for name, cfg in jobs.items()}
        for fut in as_completed(futs):
            name = futs[fut]
            results[name] = fut.result()
            status = results[name].get("error", "done")
            if verbose:
                print(f"[{len(results)}/{len(jobs)}] {name}: {status}", file=sys.stderr, flush=True)
    return results


def markdown_table(results: dict[str, dict[str, Any]]) -> str:
    """``name -> eval.json`` as a markdown table of test metrics (mean +- 95% CI over tasks)."""
    lines = ["| run | test MSE | NLL | 50% coverage | 90% coverage | CRPS | calibration error MAE/RMSE |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, rep in sorted(results.items()):
        if "error" in rep:
            lines.append(f"| {name} | failed: {rep['error']} | | | | | |")
            continue
        m = rep["metrics"]
        cells = " | ".join(f"{m[k]['mean']:.3f} ± {m[k]['ci95']:.3f}" if k in m else "n/a"
                           for k in ("mse", "nll", "coverage50", "coverage90", "crps"))
        cal = m.get("calibration_error")
        cells += " | " + ("n/a" if not cal else f"{cal['mae']:.3f} / {cal['rmse']:.3f}")
        bad = m.get("nonfinite_tasks", {}).get("count", 0)
        lines.append(f"| {name} | {cells} |" + (f" ({bad} diverged tasks left out)" if bad else ""))
    return "\n".join(lines)
