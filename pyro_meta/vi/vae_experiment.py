"""``pyro-meta vi vae`` (and ``experiments/vi_vae.py``): train the VAE of :mod:`pyro_meta.vi.vae` on
dynamically binarized 28x28 Omniglot with :func:`pyro_meta.train.fit`, then report the test
log-likelihood as the importance-weighted bound with ``--eval-k`` samples (5000, Burda et al.'s) beside
the published numbers, and draw reconstructions, prior samples and the latent space.

The run directory holds ``config.json`` (every setting), ``checkpoint.pt`` and ``metrics.jsonl`` (the
trainer's), ``eval.json`` (the bounds), ``results.md`` and ``vae.png``. Ctrl-C or SIGTERM leaves a
checkpoint at a step boundary; ``--resume`` continues it exactly (only the budget, evaluation and device
settings may change on resume).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .. import distributed
from ..config import ConfigError
from ..io import atomic_write_json
from ..rundir import RunLock
from ..threads import apply_threads
from ..train import CHECKPOINT, METRICS, fit, resolve_device
from .vae import (
    OBJECTIVES,
    VAE,
    ImageStream,
    active_units,
    binarize_once,
    evaluate_bounds,
    mean_image_logits,
    omniglot_images,
    plot_vae,
)

DEFAULTS: dict[str, Any] = {
    "objective": "elbo", "k": 1, "epochs": 10, "steps": None, "batch_size": 20, "lr": 1e-3, "latent": 50,
    "hidden": [200, 200], "output_bias": "data-mean", "seed": 0, "data_root": None, "device": "cpu",
    "threads": 1, "eval_k": 5000, "eval_images": None, "eval_seed": 1234, "max_minutes": None,
    "checkpoint_minutes": 10.0, "skip_nonfinite": False,
}
# settings that may differ on --resume: the budget, the evaluation and where it runs
RESUMABLE = {"epochs", "steps", "max_minutes", "eval_k", "eval_images", "device", "threads", "checkpoint_minutes",
             "data_root", "skip_nonfinite"}
QUICK = {"steps": 30, "eval_k": 50, "eval_images": 40, "hidden": [50], "latent": 8}
CONFIG, EVAL, RESULTS, FIGURE = "config.json", "eval.json", "results.md", "vae.png"
# Burda, Grosse & Salakhutdinov (2016), Table 1, Omniglot, one stochastic layer, test log-likelihood by
# the k = 5000 importance-weighted bound (their 28x28 release, 24,345 / 8,070 images, 3,280 passes).
PUBLISHED = {("elbo", 1): -108.11, ("elbo", 5): -107.62, ("elbo", 50): -107.80, ("iwae", 5): -106.12,
             ("iwae", 50): -104.67}
PUBLISHED_NOTE = ("Burda et al. 2016, Table 1 (Omniglot, 1 stochastic layer, their 28x28 release of the data, "
                  "3,280 passes): VAE k=1 -108.11, k=5 -107.62, k=50 -107.80; IWAE k=5 -106.12, k=50 -104.67. "
                  "VAE k=1 and IWAE k=50 agree with ANCHORS.md's figures (about -108, and -104.7 [R]); the "
                  "other three are from our reading of the paper and could not be checked here.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    S = argparse.SUPPRESS
    p.add_argument("--out", type=Path, required=True, help="the run directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--objective", choices=OBJECTIVES, default=S,
                   help="elbo (the VAE; k samples averaged) or iwae (the k-sample importance-weighted bound); "
                        "default elbo")
    p.add_argument("--k", type=int, default=S, help="samples per image in training (default 1; Burda et al.: 1, 5, 50)")
    p.add_argument("--epochs", type=int, default=S, help="passes over the 24,000 training drawings (default 10)")
    p.add_argument("--steps", type=int, default=S, help="minibatch steps (overrides --epochs)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=S, help="images per step (default 20, Burda's)")
    p.add_argument("--lr", type=float, default=S, help="Adam's step size (default 1e-3)")
    p.add_argument("--latent", type=int, default=S, help="latent dimensions (default 50)")
    p.add_argument("--hidden", type=int, nargs="+", default=S, help="hidden widths (default 200 200)")
    p.add_argument("--output-bias", dest="output_bias", choices=["data-mean", "zero"], default=S,
                   help="initial decoder output bias: logits of the mean training image (default) or PyTorch's")
    p.add_argument("--seed", type=int, default=S, help="initialization, minibatches and binarization (default 0)")
    p.add_argument("--data-root", dest="data_root", default=S,
                   help="folder with Omniglot's images_background/evaluation (.zip or extracted)")
    p.add_argument("--device", default=S, help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--threads", type=int, default=S, help="torch intra-op threads (default 1)")
    p.add_argument("--eval-k", dest="eval_k", type=int, default=S,
                   help="importance samples per test image for the log-likelihood bound (default 5000)")
    p.add_argument("--eval-images", dest="eval_images", type=int, default=S,
                   help="test drawings to evaluate (default all 8,460; a seeded subset otherwise)")
    p.add_argument("--max-minutes", dest="max_minutes", type=float, default=S,
                   help="training-time budget: stop training (checkpointed) once reached, then evaluate")
    p.add_argument("--checkpoint-minutes", dest="checkpoint_minutes", type=float, default=S,
                   help="checkpoint at least this often (default 10)")
    p.add_argument("--skip-nonfinite", dest="skip_nonfinite", action="store_true", default=S,
                   help="skip minibatches with a NaN/inf loss or gradient instead of stopping")
    p.add_argument("--quick", action="store_true", help=f"a smoke run: {QUICK}")
    p.add_argument("--no-progress", dest="no_progress", action="store_true", help="no progress bars")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return p.parse_args(argv)


def _given(args: argparse.Namespace) -> dict[str, Any]:
    given = {k: getattr(args, k) for k in DEFAULTS if hasattr(args, k)}
    if getattr(args, "quick", False):
        given = {**QUICK, **given}
    if given.get("data_root") is not None:
        given["data_root"] = str(given["data_root"])
    return given


def check_config(cfg: dict[str, Any]) -> None:
    def pos_int(name: str, allow_none: bool = False) -> None:
        v = cfg[name]
        if v is None and allow_none:
            return
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"{name} must be a positive integer, got {v!r}")

    for name in ("k", "epochs", "batch_size", "latent", "threads", "eval_k"):
        pos_int(name)
    pos_int("steps", allow_none=True)
    pos_int("eval_images", allow_none=True)
    if cfg["objective"] not in OBJECTIVES:
        raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, got {cfg['objective']!r}")
    if not cfg["hidden"] or not all(isinstance(h, int) and h > 0 for h in cfg["hidden"]):
        raise ConfigError(f"hidden must be positive integers, got {cfg['hidden']!r}")
    if not (isinstance(cfg["lr"], (int, float)) and math.isfinite(cfg["lr"]) and cfg["lr"] > 0):
        raise ConfigError(f"lr must be a positive number, got {cfg['lr']!r}")
    for name in ("max_minutes", "checkpoint_minutes"):
        v = cfg[name]
        if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ConfigError(f"{name} must be a positive number of minutes, got {v!r}")
    if cfg["output_bias"] not in ("data-mean", "zero"):
        raise ConfigError(f"output_bias must be data-mean or zero, got {cfg['output_bias']!r}")
    ks = eval_ks(cfg)
    if cfg["eval_k"] % cfg["k"] and cfg["k"] in ks:
        raise ConfigError("eval_k must be a multiple of k")


def eval_ks(cfg: dict[str, Any]) -> tuple[int, ...]:
    """The bounds reported: the ELBO (1), the training k, 50, 5000, each dividing eval_k."""
    K = cfg["eval_k"]
    return tuple(sorted({j for j in (1, 5, 50, cfg["k"], 500, K) if j <= K and K % j == 0}))


def resolve_config(args: argparse.Namespace) -> dict[str, Any]:
    """A new run's config (defaults, ``--quick``, then the flags given), or on ``--resume`` the saved one
    with the resumable flags applied; any other flag that differs is an error."""
    given = _given(args)
    path = args.out / CONFIG
    if args.resume:
        if not path.is_file():
            raise ConfigError(f"{str(args.out)!r} is not a VAE run directory: it has no {CONFIG}")
        saved = json.loads(path.read_text())
        clash = {k: (saved.get(k), v) for k, v in given.items() if k not in RESUMABLE and saved.get(k) != v}
        if clash:
            parts = "; ".join(f"{k}: run has {a!r}, given {b!r}" for k, (a, b) in sorted(clash.items()))
            raise ConfigError(f"cannot resume {str(args.out)!r} with a different config ({parts})")
        cfg = {**DEFAULTS, **saved, **{k: v for k, v in given.items() if k in RESUMABLE}}
    else:
        if (args.out / CHECKPOINT).exists():
            raise ConfigError(f"{str(args.out)!r} already holds a run; pass --resume to continue it, or choose "
                              "another --out (nothing was overwritten)")
        cfg = {**DEFAULTS, **given}
    check_config(cfg)
    return cfg


def command_line(cfg: dict[str, Any], out: Path, prog: str = "pyro-meta vi vae") -> str:
    flags: list[Any] = ["--out", out]
    for key, value in cfg.items():
        if value is None or value == DEFAULTS[key] and key not in ("objective", "k", "epochs"):
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            if value:
                flags.append(flag)
        elif isinstance(value, list):
            flags += [flag, *value]
        else:
            flags += [flag, value]
    return prog + " " + shlex.join(str(f) for f in flags)


def _read_metrics(out: Path) -> list[dict[str, Any]]:
    path = out / METRICS
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if "loss" in row:
            rows.append(row)
    return rows


def run(args: argparse.Namespace, command: str | None = None) -> int:
    """Train, evaluate and report. Under torchrun (``WORLD_SIZE`` > 1) the minibatch is split over the ranks
    (:mod:`pyro_meta.distributed`; ``--batch-size`` must be a multiple of their number): rank 0 resolves the
    config, owns the run directory and evaluates; the other ranks train their shares."""
    ctx = distributed.init_from_env(distributed.launch_device(getattr(args, "device", None), args.out / CONFIG,
                                                              args.resume, DEFAULTS["device"]))
    if ctx is not None and not ctx.is_main:
        return _train_share(args, distributed.receive_config())
    try:
        cfg = resolve_config(args)
    except Exception as e:
        if ctx is not None:
            distributed.send_error(e)
        raise
    if ctx is not None:
        distributed.send_config(cfg)
    out: Path = args.out
    dev = resolve_device(cfg["device"])
    apply_threads(cfg["threads"])
    progress = not getattr(args, "no_progress", False)
    data, stream, vae, steps = _build(cfg, progress)
    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out, "vi vae"):
        atomic_write_json(out / CONFIG, cfg)
        cmd = command or command_line(cfg, out)
        try:
            result = _fit(vae, stream, steps, cfg, out, args.resume, progress)
        except KeyboardInterrupt as e:
            e.resume_command = f"pyro-meta vi vae --out {shlex.quote(str(out))} --resume"
            raise
        epochs_done = result.step / stream.batches_per_epoch
        print(f"trained {result.step} steps ({epochs_done:.1f} epochs) in {result.seconds:.0f} s "
              f"({result.skipped} skipped)", file=sys.stderr)
        test = binarize_once(data.test, cfg["eval_seed"])
        alphabets = data.test_alphabets
        if cfg["eval_images"] is not None and cfg["eval_images"] < len(test):
            pick = torch.randperm(len(test), generator=torch.Generator().manual_seed(cfg["eval_seed"]))
            pick = pick[:cfg["eval_images"]].sort().values
            test, alphabets = test[pick], [alphabets[i] for i in pick.tolist()]
        vae.to(dev)
        t0 = time.perf_counter()
        ks = eval_ks(cfg)
        ev = evaluate_bounds(vae, test, k=cfg["eval_k"], ks=ks, seed=cfg["eval_seed"], progress=progress)
        eval_seconds = time.perf_counter() - t0
        count, _ = active_units(vae, test)
        report = {
            "objective": cfg["objective"], "k": cfg["k"], "steps": result.step, "epochs": round(epochs_done, 3),
            "train_seconds": round(result.seconds, 1), "out_of_time": result.out_of_time,
            "eval_k": cfg["eval_k"], "num_test_images": ev["num_images"], "eval_seconds": round(eval_seconds, 1),
            "test_bounds": {str(j): round(v, 3) for j, v in ev["bounds"].items()},
            "test_bounds_sem": {str(j): round(v, 3) for j, v in ev["sem"].items()},
            "test_log_likelihood": round(ev["bounds"][cfg["eval_k"]], 3),
            "active_units": count, "latent": cfg["latent"],
            "published": PUBLISHED.get((cfg["objective"], cfg["k"])), "command": cmd,
        }
        atomic_write_json(out / EVAL, report)
        metrics = _read_metrics(out)
        plot_vae(vae, test, alphabets, out / FIGURE, image_size=data.image_size, metrics=metrics,
                 title=f"VAE on binarized Omniglot: {cfg['objective']}, k = {cfg['k']}, {epochs_done:.1f} epochs; "
                       f"test log p(x) >= {report['test_log_likelihood']:.2f} nats (k = {cfg['eval_k']})")
        (out / RESULTS).write_text(results_markdown(report))
    print(results_markdown(report))
    print(f"wrote {out / EVAL}, {out / RESULTS} and {out / FIGURE}")
    return 0


def load_vae(run_dir: str | Path, device: str = "cpu") -> tuple[VAE, dict[str, Any]]:
    """The trained VAE of a run directory (its last checkpoint) and the run's config, for inspection::

        vae, cfg = load_vae("runs/vae-elbo-k1")
        probs = vae.sample_prior(16)            # [16, 784] pixel probabilities
    """
    from ..rundir import load_checkpoint

    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).is_file():
        raise ConfigError(f"{str(run_dir)!r} is not a VAE run directory: it has no {CONFIG}")
    cfg = {**DEFAULTS, **json.loads((run_dir / CONFIG).read_text())}
    vae = VAE(pixels=784, latent=cfg["latent"], hidden=cfg["hidden"], objective=cfg["objective"], k=cfg["k"])
    vae.load_state_dict(load_checkpoint(run_dir / CHECKPOINT)["learner"])
    return vae.to(resolve_device(device)), cfg


def _build(cfg: dict[str, Any], progress: bool) -> tuple[Any, ImageStream, VAE, int]:
    data = omniglot_images(cfg["data_root"], progress=progress)
    stream = ImageStream(data.train, cfg["batch_size"], seed=cfg["seed"])
    steps = cfg["steps"] or cfg["epochs"] * stream.batches_per_epoch
    torch.manual_seed(cfg["seed"])
    bias = mean_image_logits(data.train) if cfg["output_bias"] == "data-mean" else None
    vae = VAE(pixels=data.train.shape[1], latent=cfg["latent"], hidden=cfg["hidden"], objective=cfg["objective"],
              k=cfg["k"], output_bias=bias)
    return data, stream, vae, steps


def _train_share(args: argparse.Namespace, cfg: dict[str, Any]) -> int:
    """A rank other than 0: train its share of every minibatch; rank 0 writes and evaluates."""
    apply_threads(cfg["threads"])
    _, stream, vae, steps = _build(cfg, progress=False)
    _fit(vae, stream, steps, cfg, args.out, args.resume, progress=False)
    return 0


def _fit(vae: VAE, stream: ImageStream, steps: int, cfg: dict[str, Any], out: Path, resume: bool,
         progress: bool) -> Any:
    """:func:`fit` with the run's settings; what must match on resume is everything that shapes the
    training trajectory (all but :data:`RESUMABLE`)."""
    return fit(vae, stream, steps, meta_lr=cfg["lr"], grad_clip=None, out_dir=out, resume=resume,
               run_config={k: v for k, v in cfg.items() if k not in RESUMABLE}, device=cfg["device"], log_every=100,
               checkpoint_every=10**9, checkpoint_minutes=cfg["checkpoint_minutes"],
               skip_nonfinite=cfg["skip_nonfinite"], progress=progress,
               max_seconds=None if cfg["max_minutes"] is None else 60 * cfg["max_minutes"])


def results_markdown(r: dict[str, Any]) -> str:
    rows = ["| bound (nats per test image) | value ± s.e. |", "|---|---|"]
    for j, v in r["test_bounds"].items():
        name = "ELBO (k = 1)" if j == "1" else f"importance-weighted, k = {j}"
        rows.append(f"| {name} | {v:.2f} ± {r['test_bounds_sem'][j]:.2f} |")
    pub = r["published"]
    pub_text = f"{pub:.2f}" if pub is not None else "not in the paper's table"
    return "\n".join([
        f"# VAE on binarized Omniglot: {r['objective']}, k = {r['k']}", "",
        f"Command: `{r['command']}`", "",
        f"Trained {r['steps']:,} steps ({r['epochs']} epochs) in {r['train_seconds']:.0f} s"
        + (" (stopped by the time budget)" if r["out_of_time"] else "")
        + f"; evaluated on {r['num_test_images']:,} test drawings with {r['eval_k']:,} importance samples each "
          f"in {r['eval_seconds']:.0f} s. Active units: {r['active_units']} of {r['latent']}.", "",
        *rows, "",
        f"Test log-likelihood (the k = {r['eval_k']} bound): **{r['test_log_likelihood']:.2f}**; published for "
        f"this objective and k: {pub_text}.", "",
        PUBLISHED_NOTE + " Our data differ (the Vinyals split: test characters from alphabets unseen in training) and our "
        "budget is far smaller, so the numbers are beside each other, not a reproduction.", ""])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return run(args)
