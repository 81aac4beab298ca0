"""The meta-training loop: optimizer, clipping, non-finite guard, atomic checkpoints, exact resume,
progress bar, metrics log, device selection."""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyro
import torch

from . import distributed
from .checks import check_learner
from .learner import MetaLearner
from .progress import Progress
from .rundir import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    RunLock,
    clean_temp_files,
    load_checkpoint,
    save_checkpoint,
)
from .schedule import lr_factor, normalize_schedule
from .tasks import TaskBatch
from .tasks.stream import DeviceChunks, as_task_source, is_resumable, place

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
__all__ = ["CHECKPOINT", "CHECKPOINT_FORMAT", "METRICS", "CheckpointError", "FitResult", "NonFiniteError",
           "TaskSourceExhausted", "Terminated", "fit", "load_checkpoint", "resolve_device"]


class NonFiniteError(FloatingPointError):
    """A loss, gradient or parameter became NaN or inf during meta-training."""


class TaskSourceExhausted(RuntimeError):
    """The iterator of meta-batches given to ``fit`` ended before the last step."""


class RunDirectoryGone(OSError):
    """The run directory was removed while the run was writing into it."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, ``docker stop``, ``timeout``): handled like Ctrl-C; exit code 143."""

    exit_code = 128 + signal.SIGTERM


def _interrupt(signum: int) -> KeyboardInterrupt:
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def resolve_device(name: str) -> torch.device:
    """``"cpu"``, ``"cuda"`` or ``"cuda:N"``; a clear error when CUDA is asked for but absent."""
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for, but torch sees no CUDA device on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} was asked for, but this machine has "
                         f"{torch.cuda.device_count()} CUDA device(s)")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {name!r}")
    return dev


@dataclass
class FitResult:
    step: int
    skipped: int
    seconds: float
    last_loss: float
    history: list[dict[str, float]] = field(default_factory=list)
    out_of_time: bool = False  # stopped by ``max_seconds`` before ``steps``


def _rng_state(stream: Any) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if hasattr(stream, "state_dict"):
        state["stream"] = stream.state_dict()
    return state


def _set_rng_state(state: dict[str, Any], stream: Any) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "stream" in state and hasattr(stream, "load_state_dict"):
        stream.load_state_dict(state["stream"])


def json_safe(x: Any) -> Any:
    """JSON has no NaN/inf: non-finite floats (a skipped step's loss, a CI over one task) become null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


class _DeferredInterrupt:
    """Ctrl-C or SIGTERM during a step is held until the step has finished, so the checkpoint written
    on interruption is a step boundary; a second signal during a step interrupts at once, and any
    signal while a checkpoint is being written waits for the write to finish (:meth:`saving`)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested: int | None = None
        self._saving = False
        self._pending: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _DeferredInterrupt:
        self._old = _set_handlers(self._handler)
        return self

    def _handler(self, signum, frame) -> None:  # noqa: ANN001 - signal handler signature
        if self._saving:
            self._pending = signum  # raised once the checkpoint is complete
        elif self.requested is not None:
            raise _interrupt(signum)
        else:
            self.requested = signum

    def check(self) -> None:
        if self.requested is not None:
            raise _interrupt(self.requested)

    def saving(self):  # noqa: ANN201 - a context manager
        outer = self

        class _Saving:
            def __enter__(self) -> None:
                outer._saving = True

            def __exit__(self, *exc: object) -> None:
                outer._saving = False
                pending, outer._pending = outer._pending, None
                if pending is not None and exc[0] is None:
                    outer.requested = outer.requested or pending
                    raise _interrupt(pending)

        return _Saving()

    def __exit__(self, *exc) -> None:
        _restore_handlers(self._old)


def _set_handlers(handler: Any) -> dict[int, Any]:
    """Install ``handler`` for SIGINT and SIGTERM (main thread only); returns the previous ones."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, handler) for sig in _DeferredInterrupt.SIGNALS}


def _restore_handlers(old: dict[int, Any]) -> None:
    for sig, handler in old.items():
        signal.signal(sig, handler)


class _SignalsIgnored:
    """SIGINT and SIGTERM are ignored inside (main thread only)."""

    def __enter__(self) -> None:
        self._old = _set_handlers(signal.SIG_IGN)

    def __exit__(self, *exc: object) -> None:
        _restore_handlers(self._old)


def _all_finite(learner: MetaLearner) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in learner.parameters())


def fit(
    learner: MetaLearner,
    tasks: Iterable[TaskBatch] | TaskBatch,
    steps: int,
    meta_lr: float = 1e-3,
    grad_clip: float | None = 10.0,
    out_dir: str | Path | None = None,
    resume: bool = False,
    run_config: dict[str, Any] | None = None,
    device: str = "cpu",
    log_every: int = 50,
    checkpoint_every: int = 1000,
    checkpoint_minutes: float | None = 10.0,
    skip_nonfinite: bool = False,
    skip_limit: float = 0.1,
    progress: bool = True,
    validate: bool = False,
    stop_after: int | None = None,
    lr_schedule: dict[str, Any] | str | None = None,
    check_first_step: bool = True,
    max_seconds: float | None = None,
    micro_batches: int | None = None,
) -> FitResult:
    """Meta-train ``learner`` on meta-batches drawn from ``tasks`` with Adam on ``learner.loss``.

    ``learner`` is a :class:`MetaLearner`, or any ``nn.Module`` with ``loss(batch)`` that names the
    batches it takes in a ``batch_type`` attribute (and may check the first one in ``check_batch``):
    :class:`pyro_meta.vi.vae.VAE` trains here on an image stream with the same checkpoints and guards.

    :param tasks: a task stream (``benchmark.train``: it saves and restores its position, so a resumed
        run sees the same tasks as an uninterrupted one), a ``TaskBatch`` or a list of them (cycled in
        order, position saved), or any iterable of ``TaskBatch`` (a generator trains, but a run on one
        cannot be resumed: it has no position to save).
    :param steps: total meta-updates (a resumed run continues up to this number).
    :param meta_lr: Adam's base step size; the rate of each update is ``meta_lr * factor(step)``.
    :param lr_schedule: see :mod:`pyro_meta.schedule` (default constant). Both it and ``meta_lr`` are
        saved in the checkpoint; given different values on resume, they apply from the resumed step on
        and the change is recorded in ``metrics.jsonl`` (an ``"event": "lr_change"`` line).
    :param grad_clip: max global gradient norm (``None``: no clipping).
    :param out_dir: where ``checkpoint.pt`` and ``metrics.jsonl`` go (``None``: no files). It is locked
        for the duration (:class:`pyro_meta.rundir.RunLock`): a second writer is refused.
    :param resume: continue from ``out_dir/checkpoint.pt``; its ``run_config`` must equal this one.
    :param checkpoint_every: checkpoint every this many steps, and also
    :param checkpoint_minutes: ... whenever this many minutes have passed since the last checkpoint
        (``None``: steps only), so an interruption loses little whatever the step time.
    :param skip_nonfinite: skip a meta-batch whose loss or gradient is not finite, instead of stopping;
        each skip is a warning and a ``"skipped_nonfinite"`` line in ``metrics.jsonl``.
    :param skip_limit: with ``skip_nonfinite``, stop (:class:`NonFiniteError`) once more steps were
        skipped than this: a count if >= 1, else a fraction of the steps done (checked from step 20 on).
    :param validate: Pyro's distribution validation in every step (slower; off for training, on in tests).
    :param check_first_step: run :func:`pyro_meta.checks.check_learner` on the first meta-batch (Pyro's
        validation on, model/guide shapes, plates, the ``y_query`` site, a guide blind to query labels):
        a miswired model fails at step 1 with the site named, not after an hour.
    :param stop_after: stop (with a checkpoint) after this many steps of this call, as an interruption
        would; for tests and time-sliced jobs.
    :param max_seconds: a training-time budget: stop (with a checkpoint) after the first step at which
        the run's training time (the checkpoint's ``seconds``: time in the training loop, earlier calls
        of a resumed run included) reaches it. The result then has
        ``out_of_time=True``, and ``metrics.jsonl`` a ``{"event": "time_budget", ...}`` line. A call
        always does at least one step unless the budget was spent before it started.
    :param micro_batches: cut each meta-batch into this many shards as equal as they can be (each weighted by
        its share of the tasks, so the gradient is the whole batch's mean), accumulate their gradients, and
        draw shard j's noise at step s from a seed of (run seed, s, j). Default: 1 in one process (no
        cutting; noise from the global torch RNG), the number of ranks under torch.distributed
        (:mod:`pyro_meta.distributed`: the ranks share the shards, and the result is the same on any number
        of ranks that divides them). On resume, the checkpoint's.
    :raises NonFiniteError: a non-finite loss/gradient (unless skipped) or parameter; the message names
        the step, and the last checkpoint on disk is left as it was.
    :raises ModelCheckError: the first-step check found a miswired model or guide.
    :raises KeyboardInterrupt: Ctrl-C or (:class:`Terminated`) SIGTERM, after a checkpoint at the last
        step boundary; its ``checkpoint`` attribute is the file written (``None`` without ``out_dir``).
    """
    _check_fit_args(steps, checkpoint_every, log_every, meta_lr, checkpoint_minutes, skip_limit)
    if max_seconds is not None and not (isinstance(max_seconds, (int, float)) and not isinstance(max_seconds, bool)
                                        and math.isfinite(max_seconds) and max_seconds > 0):
        raise ValueError(f"max_seconds must be a positive number of seconds or None, got {max_seconds!r}")
    if resume and out_dir is None:
        raise ValueError("resume needs out_dir")
    schedule = normalize_schedule(lr_schedule, steps)
    tasks = as_task_source(tasks)
    if out_dir is None:
        return _fit(learner, tasks, steps, meta_lr, grad_clip, None, resume, run_config, device, log_every,
                    checkpoint_every, checkpoint_minutes, skip_nonfinite, skip_limit, progress, validate,
                    stop_after, schedule, check_first_step, max_seconds, micro_batches)
    out = Path(out_dir)
    ctx = distributed.current()
    if ctx is not None and not ctx.is_main:  # rank 0 owns the folder; this rank only reads its checkpoint
        return _fit(learner, tasks, steps, meta_lr, grad_clip, out, resume, run_config, device, log_every,
                    checkpoint_every, checkpoint_minutes, skip_nonfinite, skip_limit, progress, validate,
                    stop_after, schedule, check_first_step, max_seconds, micro_batches)
    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out, "train"):
        clean_temp_files(out)
        return _fit(learner, tasks, steps, meta_lr, grad_clip, out, resume, run_config, device, log_every,
                    checkpoint_every, checkpoint_minutes, skip_nonfinite, skip_limit, progress, validate,
                    stop_after, schedule, check_first_step, max_seconds, micro_batches)


def _positive_int(name: str, v: Any) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")


def _check_fit_args(steps, checkpoint_every, log_every, meta_lr, checkpoint_minutes, skip_limit) -> None:  # noqa: ANN001
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer (0: no training), got {steps!r}")
    _positive_int("checkpoint_every", checkpoint_every)
    _positive_int("log_every", log_every)
    if not (isinstance(meta_lr, (int, float)) and math.isfinite(meta_lr) and meta_lr > 0):
        raise ValueError(f"meta_lr must be a positive finite number, got {meta_lr!r}")
    if checkpoint_minutes is not None and not (isinstance(checkpoint_minutes, (int, float))
                                               and math.isfinite(checkpoint_minutes) and checkpoint_minutes > 0):
        raise ValueError(f"checkpoint_minutes must be a positive number or None, got {checkpoint_minutes!r}")
    if not (isinstance(skip_limit, (int, float)) and math.isfinite(skip_limit) and skip_limit > 0):
        raise ValueError(f"skip_limit must be a positive number (a count >= 1 or a fraction < 1), got {skip_limit!r}")


def _fit(learner, tasks, steps, meta_lr, grad_clip, out, resume, run_config, device, log_every,  # noqa: ANN001, ANN202, C901
         checkpoint_every, checkpoint_minutes, skip_nonfinite, skip_limit, progress, validate, stop_after,
         schedule, check_first_step, max_seconds=None, micro_batches=None):
    ctx = distributed.current()
    writer = ctx is None or ctx.is_main  # rank 0 alone writes files and shows progress
    dev = resolve_device(distributed.rank_device(device, ctx))
    learner.to(dev)
    tasks = place(tasks, dev)  # a source that can keep its data on the device (no per-step image copies)
    params = [p for p in learner.parameters() if p.requires_grad]
    if not params and steps > 0:
        raise ValueError("the learner has no trainable parameters (a reference row trains with steps=0)")
    # a learner with nothing to learn (the reference rows, steps 0) still writes the run's checkpoint
    optimizer = torch.optim.Adam(params or [torch.zeros(0, requires_grad=True)], lr=meta_lr)
    step, skipped, elapsed = 0, 0, 0.0
    noise_seed = torch.initial_seed()  # with micro-batches, shard j of step s draws noise from (this, s, j)
    events: list[dict[str, Any]] = []
    if resume:
        if not is_resumable(tasks):
            raise CheckpointError(
                f"cannot resume from a {type(tasks).__name__}: it has no state_dict/load_state_dict, so the "
                "tasks after the checkpoint cannot be the ones an uninterrupted run would see. Train on a "
                "task stream (get_benchmark(...).train, or a TaskFamily's stream) or a list of TaskBatch")
        ckpt = load_checkpoint(out / CHECKPOINT)
        if run_config is not None and _set(ckpt.get("run_config") or {}) != _set(run_config):
            diff = _diff(ckpt.get("run_config") or {}, run_config)
            raise CheckpointError(f"cannot resume {str(out)!r}: the config differs from the checkpoint's: {diff}")
        try:
            learner.load_state_dict(ckpt["learner"])
            optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, KeyError, ValueError) as e:
            raise CheckpointError(f"checkpoint {str(out / CHECKPOINT)!r} does not fit this learner: "
                                  f"{str(e).splitlines()[0]}") from None
        _set_rng_state(ckpt["rng"], tasks)
        step, skipped, elapsed = ckpt["step"], ckpt["skipped"], ckpt["seconds"]
        noise_seed = ckpt.get("noise_seed", noise_seed)
        if micro_batches is None and ckpt.get("micro_batches", 1) > 1:
            micro_batches = ckpt["micro_batches"]  # the run's shards: its noise, on any number of ranks
        if steps < step:
            raise CheckpointError(f"the run in {str(out)!r} has already done {step} steps; asked for {steps}")
        if writer:
            _truncate_metrics(out / METRICS, step)
        old_lr = ckpt.get("meta_lr", optimizer.param_groups[0]["lr"])  # format 1: the saved optimizer's rate
        old_schedule = ckpt.get("lr_schedule", {"name": "constant", "warmup_steps": 0})
        if old_lr != meta_lr or old_schedule != schedule:
            events.append({"step": step, "event": "lr_change", "meta_lr": {"from": old_lr, "to": meta_lr},
                           "lr_schedule": {"from": old_schedule, "to": schedule}})

    def set_lr() -> float:
        lr = meta_lr * lr_factor(schedule, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    shards = micro_batches if micro_batches is not None else (ctx.world_size if ctx is not None else 1)
    world, rank = (ctx.world_size, ctx.rank) if ctx is not None else (1, 0)
    if not isinstance(shards, int) or isinstance(shards, bool) or shards < 1 or shards % world:
        raise ValueError(f"micro_batches must be a positive multiple of the {world} rank(s), got {shards!r}"
                         + (" (the run's checkpoint was written with that many shards: resume it on a number "
                            "of ranks that divides them)" if resume and micro_batches is None else ""))
    my_shards = range(rank * shards // world, (rank + 1) * shards // world)
    loss_of, ddp = learner.loss, None  # under torch.distributed: the DDP wrapper, built at the first step
    interrupt = _DeferredInterrupt()
    last_save = time.monotonic()

    def save(rng: dict[str, Any] | None = None) -> None:
        nonlocal last_save
        if out is None:
            return
        if not _all_finite(learner):
            raise NonFiniteError(f"step {step}: a parameter is not finite; the checkpoint was not written")
        rng = rng if rng is not None else _rng_state(tasks)
        extra = {"noise_seed": noise_seed, "micro_batches": shards, "world_size": world}
        if writer:
            with interrupt.saving():
                save_checkpoint({
                    "format": CHECKPOINT_FORMAT, "step": step, "skipped": skipped, "seconds": elapsed,
                    "learner": learner.state_dict(), "optimizer": optimizer.state_dict(),
                    "rng": rng, "run_config": run_config, "meta_lr": meta_lr, "lr_schedule": schedule, **extra,
                }, out / CHECKPOINT)
        last_save = time.monotonic()

    def log(rec: dict[str, Any]) -> None:
        if log_file is None:
            return
        if not out.is_dir():
            raise RunDirectoryGone(2, f"the run directory was removed while training (at step {step}); nothing "
                                      "more can be saved", str(out))
        log_file.write(json.dumps(json_safe(rec)) + "\n")
        log_file.flush()

    try:
        with interrupt:
            if not resume:
                save()  # step 0: a run that fails before its first periodic checkpoint can still be resumed
    except KeyboardInterrupt as e:  # a signal during that save: it completed first
        e.checkpoint, e.step = (out / CHECKPOINT if out is not None else None), step
        raise
    history: list[dict[str, float]] = []
    log_file = open(out / METRICS, "a") if out is not None and writer else None  # noqa: SIM115
    for ev in events:
        log(ev)
    bar = Progress(steps, step, getattr(learner, "progress_label", f"meta-train {learner.name}"),
                   enabled=progress and writer, quiet=not writer)
    batch_type, check = _batch_contract(learner)
    last_loss = float("nan")
    start_step, t0 = step, time.perf_counter()
    learner.train()
    step_start_rng: dict[str, Any] | None = None
    checked = not check_first_step
    out_of_time = False
    try:
        with pyro.validation_enabled(validate), interrupt:
            while step < steps:
                if stop_after is not None and step - start_step >= stop_after:
                    break
                spent = elapsed + (time.perf_counter() - t0 if step > start_step else 0.0)
                time_up = max_seconds is not None and spent >= max_seconds
                due = (checkpoint_minutes is not None and step > start_step
                       and time.monotonic() - last_save >= 60 * checkpoint_minutes)
                if ctx is not None:  # rank 0's clock decides; any rank's signal stops every rank
                    stop, time_up, due = distributed.agree(
                        [interrupt.requested is not None, time_up and writer, due and writer], dev)
                    if stop and interrupt.requested is None:
                        interrupt.requested = signal.SIGINT
                if time_up:
                    out_of_time = True
                    log({"step": step, "event": "time_budget", "max_seconds": max_seconds,
                         "seconds": round(spent, 3), "steps_asked": steps})
                    bar.write(f"time budget of {max_seconds:g} s reached at step {step} of {steps}")
                    break
                interrupt.check()
                if due:  # at this step boundary, before the next step begins
                    elapsed += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    save()
                # where this step starts: restored if the step is cut off before its update
                step_start_rng = _rng_state(tasks) if out is not None else None
                try:
                    batch = next(tasks)
                except StopIteration:
                    raise TaskSourceExhausted(
                        f"the task source ran out after {step - start_step} meta-batches of this call (step "
                        f"{step} of {steps}); give fit an endless stream (get_benchmark(...).train) or a list "
                        "of TaskBatch, which is cycled") from None
                if not isinstance(batch, batch_type):
                    raise TypeError(f"the task source gave a {type(batch).__name__}, not a {batch_type.__name__}")
                parts = [batch.to(dev)] if shards == 1 else [
                    p.to(dev) for p in distributed.split(batch, shards)[my_shards.start:my_shards.stop]]
                if not checked:
                    # with the RNG as it was, so a checked run draws exactly what an unchecked one does
                    with _forked_rng(dev):
                        check(parts[0])
                    checked = True
                if ctx is not None and ddp is None:
                    loss_of = ddp = _ddp(learner, parts[0], dev)
                lr = set_lr()
                optimizer.zero_grad(set_to_none=True)
                if shards == 1:
                    loss = loss_of(parts[0])
                    loss.backward()
                else:  # gradient accumulation over this rank's shards, each with its own seeded noise
                    loss = 0.0
                    weights = distributed.shard_weights(distributed.batch_size(batch), shards, world)
                    for i, (j, part) in enumerate(zip(my_shards, parts)):
                        hold = ddp.no_sync() if ddp is not None and i < len(parts) - 1 else nullcontext()
                        with hold, _forked_rng(dev):
                            torch.manual_seed(distributed.shard_seed(noise_seed, step, j))
                            part_loss = loss_of(part) * weights[j]
                            part_loss.backward()
                        loss = loss + part_loss.detach()
                if grad_clip is not None:
                    gnorm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
                else:
                    gnorm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
                finite = bool(torch.isfinite(loss) & torch.isfinite(gnorm))
                if ctx is not None:  # the gradients are shared already; a loss may differ by rank
                    finite = not distributed.agree([not finite], dev)[0]
                if not finite:
                    if not skip_nonfinite:
                        raise NonFiniteError(
                            f"step {step + 1}: non-finite loss ({loss.item()}) or gradient norm ({gnorm.item()}); "
                            f"the last checkpoint is untouched. Lower meta_lr/inner_lr, or pass "
                            f"--skip-nonfinite to skip such meta-batches")
                    skipped += 1
                    optimizer.zero_grad(set_to_none=True)
                    bar.write(f"warning: step {step + 1}: non-finite loss or gradient; meta-batch skipped "
                              f"({skipped} so far)")
                    log({"step": step + 1, "event": "skipped_nonfinite", "skipped": skipped})
                    limit = skip_limit if skip_limit >= 1 else skip_limit * max(step + 1, 20)
                    if skipped > limit:
                        raise NonFiniteError(
                            f"step {step + 1}: {skipped} of {step + 1} meta-batches were skipped as non-finite, "
                            f"more than the limit ({_limit_text(skip_limit)}); training stopped, the last "
                            "checkpoint is untouched. Lower meta_lr/inner_lr, or raise --skip-limit")
                else:
                    optimizer.step()
                step += 1
                step_start_rng = None
                bar.update()
                if step % log_every == 0 or step == steps:
                    last_loss = (distributed.mean_over_ranks(loss) if ctx is not None else loss).item()
                    now = elapsed + time.perf_counter() - t0
                    rec = json_safe({"step": step, "loss": last_loss, "grad_norm": gnorm.item(), "lr": lr,
                                     "skipped": skipped, "seconds": round(now, 3)})
                    history.append(rec)
                    bar.set(loss=f"{last_loss:.4g}", skipped=skipped)
                    log(rec)
                if step % checkpoint_every == 0 and step < steps:
                    elapsed += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    save()
    except KeyboardInterrupt as e:
        elapsed += time.perf_counter() - t0
        t0 = time.perf_counter()
        with _SignalsIgnored():  # we are stopping already: a further Ctrl-C/SIGTERM must not cut this save
            save(rng=step_start_rng)  # mid-step: the RNG and task stream as they were when it began
        e.checkpoint = out / CHECKPOINT if out is not None else None
        e.step = step
        bar.write(f"{'terminated' if isinstance(e, Terminated) else 'interrupted'} at step {step}; checkpoint "
                  + (f"written to {out / CHECKPOINT}" if out is not None else "not written (no out_dir)"))
        raise
    finally:
        bar.close()
        if log_file is not None:
            log_file.close()
        if isinstance(tasks, DeviceChunks):  # the caller's stream continues at the next unserved batch
            tasks.release()
    elapsed += time.perf_counter() - t0
    save()
    if ctx is not None:  # no rank leaves (and, say, resumes from the file) before rank 0's checkpoint is written
        distributed.barrier()
    return FitResult(step, skipped, elapsed, last_loss, history, out_of_time)


def _batch_contract(learner: Any) -> tuple[type, Any]:
    """What the learner trains on and how its first batch is checked: a :class:`MetaLearner` takes
    :class:`TaskBatch` and :func:`check_learner`; any other module with ``loss(batch)`` declares
    ``batch_type`` and may declare ``check_batch(batch)`` (the VAE of :mod:`pyro_meta.vi.vae` does)."""
    batch_type = getattr(learner, "batch_type", TaskBatch)
    check = getattr(learner, "check_batch", None)
    if check is None:
        def check(batch: Any) -> None:
            if isinstance(batch, TaskBatch):
                check_learner(learner, batch)
    return batch_type, check


def _forked_rng(dev: torch.device) -> Any:
    """The global RNG state (and ``dev``'s, on CUDA) as it was when the block is left."""
    return torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else [])


def _ddp(learner: Any, batch: Any, dev: torch.device) -> Any:
    """The learner in DistributedDataParallel (its forward is ``loss``). Parameters that one trial step on
    ``batch`` leaves without a gradient (a predictive-only guide, say) make DDP look for unused
    parameters every step; without any, that costly search is off."""
    from torch.nn.parallel import DistributedDataParallel

    with _forked_rng(dev):
        learner.zero_grad(set_to_none=True)
        learner.loss(batch).backward()
    unused = any(p.grad is None for p in learner.parameters() if p.requires_grad)
    learner.zero_grad(set_to_none=True)
    return DistributedDataParallel(learner, device_ids=[dev.index] if dev.type == "cuda" else None,
                                   find_unused_parameters=unused)


def _limit_text(limit: float) -> str:
    return f"{int(limit)} steps" if limit >= 1 else f"{limit:.0%} of the steps"


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint's step (they will be written again)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError):
            continue
    path.write_text("".join(k + "\n" for k in keep))


def _set(config: dict[str, Any]) -> dict[str, Any]:
    """A run config without its unset (``None``) entries: a setting added to the library after a checkpoint
    was written is absent from it, which is not a difference."""
    return {k: v for k, v in config.items() if v is not None}


def _diff(a: dict[str, Any], b: dict[str, Any]) -> str:
    keys = sorted(set(a) | set(b))
    parts = [f"{k}: checkpoint {a.get(k)!r} vs now {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]
    return "; ".join(parts) if parts else "(no field-level difference)"

