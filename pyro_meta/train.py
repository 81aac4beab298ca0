"""The meta-training loop: optimizer, clipping, non-finite guard, atomic checkpoints, exact resume,
progress bar, metrics log, device selection."""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyro
import torch

from .checks import check_learner
from .io import atomic_write
from .learner import MetaLearner
from .progress import Progress
from .schedule import lr_factor, normalize_schedule
from .tasks import TaskBatch
from .tasks.stream import as_task_source, is_resumable

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
CHECKPOINT_FORMAT = 1


class NonFiniteError(FloatingPointError):
    """A loss, gradient or parameter became NaN or inf during meta-training."""


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, or from a different run."""


class TaskSourceExhausted(RuntimeError):
    """The iterator of meta-batches given to ``fit`` ended before the last step."""


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


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` atomically (:func:`pyro_meta.io.atomic_write`): a crash leaves either
    the old file or the new one, never half of one; the file gets the umask's permissions."""
    atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {str(path)!r}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a corrupted file
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupted or not a checkpoint ({type(e).__name__}: "
                              f"{e})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a pyro_meta checkpoint (format {CHECKPOINT_FORMAT})")
    return ckpt


@dataclass
class FitResult:
    step: int
    skipped: int
    seconds: float
    last_loss: float
    history: list[dict[str, float]] = field(default_factory=list)


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
    """Ctrl-C during a step is held until the step has finished, so the checkpoint written on
    interruption is a step boundary; a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._old = None

    def __enter__(self) -> _DeferredInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame) -> None:  # noqa: ANN001 - signal handler signature
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


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
    skip_nonfinite: bool = False,
    progress: bool = True,
    validate: bool = False,
    stop_after: int | None = None,
    lr_schedule: dict[str, Any] | str | None = None,
    check_first_step: bool = True,
) -> FitResult:
    """Meta-train ``learner`` on meta-batches drawn from ``tasks`` with Adam on ``learner.loss``.

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
    :param out_dir: where ``checkpoint.pt`` and ``metrics.jsonl`` go (``None``: no files).
    :param resume: continue from ``out_dir/checkpoint.pt``; its ``run_config`` must equal this one.
    :param skip_nonfinite: skip a meta-batch whose loss or gradient is not finite, instead of stopping.
    :param validate: Pyro's distribution validation in every step (slower; off for training, on in tests).
    :param check_first_step: run :func:`pyro_meta.checks.check_learner` on the first meta-batch (Pyro's
        validation on, model/guide shapes, plates, the ``y_query`` site, a guide blind to query labels):
        a miswired model fails at step 1 with the site named, not after an hour.
    :param stop_after: stop (with a checkpoint) after this many steps of this call, as an interruption
        would; for tests and time-sliced jobs.
    :raises NonFiniteError: a non-finite loss/gradient (unless skipped) or parameter; the message names
        the step, and the last checkpoint on disk is left as it was.
    :raises ModelCheckError: the first-step check found a miswired model or guide.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not isinstance(checkpoint_every, int) or isinstance(checkpoint_every, bool) or checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be a positive integer, got {checkpoint_every!r}")
    if not isinstance(log_every, int) or isinstance(log_every, bool) or log_every < 1:
        raise ValueError(f"log_every must be a positive integer, got {log_every!r}")
    if not (isinstance(meta_lr, (int, float)) and math.isfinite(meta_lr) and meta_lr > 0):
        raise ValueError(f"meta_lr must be a positive finite number, got {meta_lr!r}")
    schedule = normalize_schedule(lr_schedule, steps)
    tasks = as_task_source(tasks)
    dev = resolve_device(device)
    learner.to(dev)
    params = [p for p in learner.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the learner has no trainable parameters")
    optimizer = torch.optim.Adam(params, lr=meta_lr)
    out = Path(out_dir) if out_dir is not None else None
    step, skipped, elapsed = 0, 0, 0.0
    events: list[dict[str, Any]] = []
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    if resume:
        if out is None:
            raise ValueError("resume needs out_dir")
        if not is_resumable(tasks):
            raise CheckpointError(
                f"cannot resume from a {type(tasks).__name__}: it has no state_dict/load_state_dict, so the "
                "tasks after the checkpoint cannot be the ones an uninterrupted run would see. Train on a "
                "task stream (get_benchmark(...).train, or a TaskFamily's stream) or a list of TaskBatch")
        ckpt = load_checkpoint(out / CHECKPOINT)
        if run_config is not None and ckpt.get("run_config") != run_config:
            diff = _diff(ckpt.get("run_config") or {}, run_config)
            raise CheckpointError(f"cannot resume {str(out)!r}: the config differs from the checkpoint's: {diff}")
        learner.load_state_dict(ckpt["learner"])
        optimizer.load_state_dict(ckpt["optimizer"])
        _set_rng_state(ckpt["rng"], tasks)
        step, skipped, elapsed = ckpt["step"], ckpt["skipped"], ckpt["seconds"]
        if steps < step:
            raise CheckpointError(f"the run in {str(out)!r} has already done {step} steps; asked for {steps}")
        _truncate_metrics(out / METRICS, step)
        old_lr = ckpt.get("meta_lr", optimizer.param_groups[0].get("initial_lr", optimizer.param_groups[0]["lr"]))
        old_schedule = ckpt.get("lr_schedule", {"name": "constant", "warmup_steps": 0})
        if old_lr != meta_lr or old_schedule != schedule:
            events.append({"step": step, "event": "lr_change", "meta_lr": {"from": old_lr, "to": meta_lr},
                           "lr_schedule": {"from": old_schedule, "to": schedule}})

    def set_lr() -> float:
        lr = meta_lr * lr_factor(schedule, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def save(rng: dict[str, Any] | None = None) -> None:
        if out is None:
            return
        if not _all_finite(learner):
            raise NonFiniteError(f"step {step}: a parameter is not finite; the checkpoint was not written")
        atomic_save({
            "format": CHECKPOINT_FORMAT, "step": step, "skipped": skipped, "seconds": elapsed,
            "learner": learner.state_dict(), "optimizer": optimizer.state_dict(),
            "rng": rng if rng is not None else _rng_state(tasks), "run_config": run_config,
            "meta_lr": meta_lr, "lr_schedule": schedule,
        }, out / CHECKPOINT)

    if not resume:
        save()  # step 0: a run that fails before its first periodic checkpoint can still be resumed

    history: list[dict[str, float]] = []
    log_file = open(out / METRICS, "a") if out is not None else None  # noqa: SIM115
    for ev in events:
        if log_file is not None:
            log_file.write(json.dumps(json_safe(ev)) + "\n")
            log_file.flush()
    bar = Progress(steps, step, f"meta-train {learner.name}", enabled=progress)
    last_loss = float("nan")
    start_step, t0 = step, time.perf_counter()
    learner.train()
    step_start_rng: dict[str, Any] | None = None
    checked = not check_first_step
    try:
        with pyro.validation_enabled(validate), _DeferredInterrupt() as interrupt:
            while step < steps:
                if stop_after is not None and step - start_step >= stop_after:
                    break
                if interrupt.requested:
                    raise KeyboardInterrupt
                # where this step starts: restored if the step is cut off before its update
                step_start_rng = _rng_state(tasks) if out is not None else None
                try:
                    batch = next(tasks)
                except StopIteration:
                    raise TaskSourceExhausted(
                        f"the task source ran out after {step - start_step} meta-batches of this call (step "
                        f"{step} of {steps}); give fit an endless stream (get_benchmark(...).train) or a list "
                        "of TaskBatch, which is cycled") from None
                if not isinstance(batch, TaskBatch):
                    raise TypeError(f"the task source gave a {type(batch).__name__}, not a TaskBatch")
                batch = batch.to(dev)
                if not checked:
                    # with the RNG as it was, so a checked run draws exactly what an unchecked one does
                    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
                        check_learner(learner, batch)
                    checked = True
                lr = set_lr()
                loss = learner.loss(batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if grad_clip is not None:
                    gnorm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
                else:
                    gnorm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
                if not (torch.isfinite(loss) & torch.isfinite(gnorm)):
                    if not skip_nonfinite:
                        raise NonFiniteError(
                            f"step {step + 1}: non-finite loss ({loss.item()}) or gradient norm ({gnorm.item()}); "
                            f"the last checkpoint is untouched. Lower meta_lr/inner_lr, or pass "
                            f"--skip-nonfinite to skip such meta-batches")
                    skipped += 1
                    optimizer.zero_grad(set_to_none=True)
                else:
                    optimizer.step()
                step += 1
                step_start_rng = None
                bar.update()
                if step % log_every == 0 or step == steps:
                    last_loss = loss.item()
                    now = elapsed + time.perf_counter() - t0
                    rec = json_safe({"step": step, "loss": last_loss, "grad_norm": gnorm.item(), "lr": lr,
                                     "skipped": skipped, "seconds": round(now, 3)})
                    history.append(rec)
                    bar.set(loss=f"{last_loss:.4g}", skipped=skipped)
                    if log_file is not None:
                        log_file.write(json.dumps(rec) + "\n")
                        log_file.flush()
                if step % checkpoint_every == 0 and step < steps:
                    elapsed += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    save()
    except KeyboardInterrupt:
        elapsed += time.perf_counter() - t0
        t0 = time.perf_counter()
        save(rng=step_start_rng)  # mid-step: the RNG and task stream as they were when it began
        bar.write(f"interrupted at step {step}; checkpoint written"
                  + (f" to {out / CHECKPOINT}" if out is not None else ""))
        raise
    finally:
        bar.close()
        if log_file is not None:
            log_file.close()
    elapsed += time.perf_counter() - t0
    save()
    return FitResult(step, skipped, elapsed, last_loss, history)


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


def _diff(a: dict[str, Any], b: dict[str, Any]) -> str:
    keys = sorted(set(a) | set(b))
    parts = [f"{k}: checkpoint {a.get(k)!r} vs now {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]
    return "; ".join(parts) if parts else "(no field-level difference)"

