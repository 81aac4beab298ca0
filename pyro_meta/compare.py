"""The scoreboard: every regression method trained on identical task streams and scored on identical
fixed test tasks, at an equal iteration budget and at equal wall time.

Every run shares the seed, so every method meets the same training meta-batches in the same order
(the benchmark's seeded task stream; meta-batch and query counts are the benchmark's, not the
method's) and the same fixed test tasks. Each run is its own run directory under ``out/runs``::

    <benchmark>/<shots>shot/iterations-<steps>/<method>/    equal iterations
    <benchmark>/<shots>shot/wall-<seconds>s/<method>/        equal wall time

so a scoreboard started again skips the finished runs (:func:`pyro_meta.run.finished_report`) and
resumes interrupted ones from their checkpoints. ``out`` also gets ``scoreboard.md``,
``scoreboard.json``, ``ambiguous_tasks.png`` and ``calibration.png``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import pyro
import torch

from .config import ConfigError, RunConfig
from .io import atomic_write_json
from .methods import METHODS, regression_methods, resolve
from .metrics import Z95
from .models.reference import ORACLE_NONE
from .plots import plot_ambiguous_tasks, plot_calibration_curves
from .run import load_run, run_many
from .tasks import CLASSIFICATION_BENCHMARKS
from .threads import apply_threads, available_cores
from .train import CHECKPOINT, json_safe, load_checkpoint

FULL_STEPS = 70_000  # MAML's sinusoid protocol: 70,000 meta-iterations; --budget is a fraction of it
BENCHMARKS = ("sinusoid", "sinusoid_line")
SHOTS = (1, 2, 5, 10)
MODES = ("iterations", "wall")
MODE_CHOICES = {"iterations": ("iterations",), "wall": ("wall",), "both": MODES}
# the equal-wall-time budget of a (benchmark, shots) cell, from its equal-iteration runs' training times
WALL_FROM = {"median": statistics.median, "max": max}
WALL_STEP_CAP = 10_000_000  # a wall-time run's steps: a cap that its time budget ends long before
AMBIGUOUS_BENCHMARK = "sinusoid_line"
FUNCTION_DRAWS = 5
# rows that are a registered method with an objective other than its default: row name -> settings
ROW_VARIANTS: dict[str, dict[str, Any]] = {"bfa": {"method": "bmaml", "objective": "bfa"}}
# the reference rows of every cell: no training (pyro_meta.methods.reference), evaluated on the same test tasks
REFERENCE_ROWS = ("prior", "oracle")
# the scoreboard's settings that the reference rows use (they have no network, optimizer or training tasks)
REFERENCE_SETTINGS = ("eval_queries", "device", "num_val_tasks")
__all__ = ["ROW_VARIANTS", "row_methods", "BENCHMARKS", "FULL_STEPS", "MODES", "SHOTS", "add_arguments", "run_scoreboard", "scoreboard_command",
           "scoreboard_from_args", "scoreboard_jobs", "scoreboard_markdown", "wall_budgets"]


def row_methods() -> list[str]:
    """The scoreboard's default rows: every registered regression method, each followed by its
    :data:`ROW_VARIANTS` (``bmaml``, then ``bfa``)."""
    rows = []
    for method in regression_methods():
        rows += [method] + [name for name, v in ROW_VARIANTS.items() if v["method"] == method]
    return rows


def scoreboard_jobs(methods: list[str], benchmarks: list[str], shots: list[int], steps: int,
                    settings: dict[str, Any], seed: int, num_test_tasks: int) -> dict[str, dict[str, Any]]:
    """``run name -> RunConfig settings`` of the equal-iteration runs (the wall-time runs copy them).
    Everything but the method is the same in every run of a (benchmark, shots) cell. A row name in
    :data:`ROW_VARIANTS` runs its method with its settings (e.g. ``bfa``: BMAML's BFA objective); the
    run's folder, the last part of its name, is the row name."""
    jobs = {}
    for bench in benchmarks:
        for k in shots:
            for row in methods:
                variant = ROW_VARIANTS.get(row, {"method": row})
                cfg = {"benchmark": bench, "method": variant["method"], "shots": k, "steps": steps, "seed": seed,
                       "num_test_tasks": num_test_tasks, "threads": 1,
                       "log_every": max(1, min(250, steps // 10)),
                       "checkpoint_every": max(1, min(5000, steps // 4)), **settings,
                       **{key: v for key, v in variant.items() if key != "method"}}
                jobs[_run_name(bench, k, f"iterations-{steps}", row)] = cfg
    return jobs


def row_of(run_name: str) -> str:
    """A run's row name: the last part of its name (a method, or a :data:`ROW_VARIANTS` name)."""
    return run_name.rsplit("/", 1)[-1]


def _run_name(bench: str, shots: int, mode_dir: str, method: str) -> str:
    folder = bench.replace(":", "-").replace("/", "-")
    return f"{folder}/{shots}shot/{mode_dir}/{method}"


def _check(jobs: dict[str, dict[str, Any]]) -> None:
    """Every job's config, resolved before anything trains: a typo fails at once, not in a worker."""
    for cfg in jobs.values():
        if cfg["benchmark"] in CLASSIFICATION_BENCHMARKS:
            raise ConfigError(f"the scoreboard is for regression benchmarks, not {cfg['benchmark']!r}")
        if cfg["method"] not in METHODS:  # a row variant names a registered method
            raise ConfigError(f"unknown method {cfg['method']!r}; known: {', '.join(sorted(METHODS))}")
        resolve(RunConfig.from_dict(cfg, source="scoreboard settings"))


def reference_jobs(benchmarks: list[str], shots: list[int], seed: int, num_test_tasks: int,
                   settings: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """The reference rows (:data:`REFERENCE_ROWS`) of every (benchmark, shots) cell: ``run name -> RunConfig
    settings`` of those that exist, and a row saying why for those that do not (the oracle of a family with
    noiseless query targets)."""
    jobs, missing = {}, []
    for bench in benchmarks:
        for k in shots:
            for row in REFERENCE_ROWS:
                cfg = {"benchmark": bench, "method": row, "shots": k, "steps": 0, "seed": seed,
                       "num_test_tasks": num_test_tasks, "threads": 1,
                       **{key: v for key, v in settings.items() if key in REFERENCE_SETTINGS}}
                try:
                    resolve(RunConfig.from_dict(cfg, source="scoreboard reference row"))
                except ConfigError as e:
                    why = (ORACLE_NONE if "point mass" in str(e) else str(e).splitlines()[0]).replace("|", "/")
                    missing.append({"benchmark": bench, "shots": k, "method": row, "mode": "reference",
                                    "unavailable": why})
                    continue
                jobs[_run_name(bench, k, "reference", row)] = cfg
    return jobs, missing


def run_info(run_dir: Path) -> dict[str, Any]:
    """Steps done and training seconds of a run (its checkpoint), and what its ``metrics.jsonl`` says
    about a time budget."""
    ckpt = load_checkpoint(run_dir / CHECKPOINT)
    info = {"steps": int(ckpt["step"]), "train_seconds": float(ckpt["seconds"])}
    log = run_dir / "metrics.jsonl"
    if log.exists():
        for line in log.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("event") == "time_budget":
                info["time_budget"] = rec
    return info


def wall_budgets(rows: list[dict[str, Any]], how: str) -> dict[tuple[str, int], float]:
    """``(benchmark, shots) -> seconds``: the ``how`` (median or max) of the cell's equal-iteration
    training times, rounded to 10 ms (the value in the wall-time runs' folder names)."""
    times: dict[tuple[str, int], list[float]] = {}
    for r in rows:
        if r["mode"] == "iterations" and "error" not in r:
            times.setdefault((r["benchmark"], r["shots"]), []).append(r["train_seconds"])
    return {cell: max(0.01, round(WALL_FROM[how](ts), 2)) for cell, ts in times.items()}


def _row(name: str, cfg: dict[str, Any], mode: str, report: dict[str, Any], out: Path,
         max_seconds: float | None = None) -> dict[str, Any]:
    """One scoreboard row from a run's ``eval.json`` (or its error) and checkpoint."""
    row: dict[str, Any] = {"benchmark": cfg["benchmark"], "shots": cfg["shots"], "method": row_of(name),
                           "mode": mode, "run": name, "max_seconds": max_seconds}
    if "error" in report:
        return {**row, "error": report["error"]}
    info = run_info(out / name)
    m = report["metrics"]
    lpd = m["heldout_lpd"]
    se = lpd.get("per_point_se")
    meta_batch = json.loads((out / name / "config.json").read_text())["meta_batch"]
    return {**row, **info, "meta_batch": meta_batch,
            "tasks_per_second": info["steps"] * meta_batch / info["train_seconds"] if info["train_seconds"] else None,
            "metrics": {**{k: m[k] for k in ("mse", "nll", "coverage50", "coverage90")},
                        # absent from an eval.json written before these metrics existed
                        "crps": m.get("crps"), "calibration_error": m.get("calibration_error"),
                        "heldout_lpd_per_point": {"mean": lpd["per_point"], "ci95": None if se is None else Z95 * se},
                        "calibration": m["calibration"], "nonfinite_tasks": m.get("nonfinite_tasks"),
                        "absurd_tasks": m.get("absurd_tasks")},
            "recalibrated": _recalibrated(report.get("recalibrated"))}


def _recalibrated(rec: dict[str, Any] | None) -> dict[str, Any] | None:
    """NLL and 50%/90% coverage under each recalibration map of a run's ``eval.json`` (``None`` if none)."""
    if not rec:
        return None
    out = {"validation_tasks": rec["fitted_on"]["tasks"]}
    for name in ("scale", "isotonic"):
        if rec.get(name):
            out[name] = {k: rec[name].get(k) for k in ("nll", "coverage50", "coverage90", "value")}
    return out


def machine_text() -> str:
    """The machine in one line: OS, CPU, cores, library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{platform.platform()}, {cpu}, {available_cores()} usable CPU core(s) of {os.cpu_count()}; "
            f"Python {platform.python_version()}, torch {torch.__version__}, pyro {pyro.__version__}")


def run_scoreboard(out: str | Path, methods: list[str] | None = None, benchmarks: list[str] | tuple = BENCHMARKS,
                   shots: list[int] | tuple = SHOTS, budget: float = 1.0, steps: int | None = None,
                   mode: str = "both", wall_seconds: float | None = None, wall_from: str = "median",
                   workers: int = 2, num_test_tasks: int = 600, seed: int = 0,
                   settings: dict[str, Any] | None = None, progress: bool = True,
                   command: str | None = None, references: bool = True) -> dict[str, Any]:
    """Train and score every method on every (benchmark, shots) cell; write the scoreboard.

    :param methods: default :func:`~pyro_meta.methods.regression_methods` (every registered one).
    :param budget: the fraction of :data:`FULL_STEPS` (MAML's 70,000 meta-iterations) each run trains
        in the equal-iterations mode; ``steps`` overrides it with a step count.
    :param mode: ``"iterations"``, ``"wall"`` or ``"both"``.
    :param wall_seconds: the training-time budget of every equal-wall-time run; ``None``: per cell,
        the ``wall_from`` (``"median"`` or ``"max"``) of the cell's equal-iteration runs' training
        times (those runs are then trained, and reported, in the wall mode too).
    :param workers: runs trained side by side, each a process with one torch thread.
    :param num_test_tasks: fixed test tasks per cell (100 query points each, the benchmark's).
    :param settings: RunConfig settings applied to every run (e.g. ``{"hidden": [8]}``).
    :param command: the command line to print at the top of ``scoreboard.md``.
    :param references: the reference rows ``prior`` and ``oracle`` (no training; the exact prior and
        posterior predictives where the family allows them) in every table.
    :returns: the content of ``scoreboard.json``.
    """
    t0 = time.perf_counter()
    out = Path(out)
    methods = list(methods or row_methods())
    benchmarks, shots = list(benchmarks), sorted(set(shots))
    if mode not in MODE_CHOICES:
        raise ConfigError(f"mode must be one of {sorted(MODE_CHOICES)}, got {mode!r}")
    if wall_from not in WALL_FROM:
        raise ConfigError(f"wall_from must be one of {sorted(WALL_FROM)}, got {wall_from!r}")
    if wall_seconds is not None and not wall_seconds > 0:
        raise ConfigError(f"wall_seconds must be a positive number of seconds, got {wall_seconds!r}")
    if not (methods and benchmarks and shots):
        raise ConfigError("the scoreboard needs at least one method, one benchmark and one shots value")
    if steps is None:
        if not budget > 0:
            raise ConfigError(f"budget must be a positive fraction of {FULL_STEPS} steps, got {budget!r}")
        steps = max(1, round(FULL_STEPS * budget))
    own = sorted(set(settings or {}) & {"benchmark", "method", "shots", "steps", "seed", "num_test_tasks"})
    if own:
        raise ConfigError(f"settings {own} are the scoreboard's own (its flags set them), not per-run settings")
    modes = MODE_CHOICES[mode]
    apply_threads(1)  # this process loads runs for the figures; the workers set their own
    jobs = scoreboard_jobs(methods, benchmarks, shots, steps, dict(settings or {}), seed, num_test_tasks)
    _check(jobs)
    rows, budgets = _train(jobs, modes, wall_seconds, wall_from, out / "runs", workers, progress)
    if references:
        ref, missing = reference_jobs(benchmarks, shots, seed, num_test_tasks, dict(settings or {}))
        _note(progress, f"{len(ref)} reference rows (no training) into {out / 'runs'}")
        done = run_many(ref, out / "runs", workers, verbose=progress)
        rows += [_row(name, cfg, "reference", done[name], out / "runs") for name, cfg in ref.items()] + missing
    board = {
        "command": command, "machine": machine_text(),
        "settings": {"methods": methods, "benchmarks": benchmarks, "shots": shots, "modes": list(modes),
                     "budget": budget, "full_steps": FULL_STEPS, "steps": steps, "wall_seconds": wall_seconds,
                     "wall_from": None if wall_seconds is not None else wall_from, "workers": workers,
                     "num_test_tasks": num_test_tasks, "seed": seed, "settings": dict(settings or {}),
                     "references": references},
        "wall_budgets": [{"benchmark": b, "shots": k, "seconds": s} for (b, k), s in sorted(budgets.items())],
        "rows": rows, "figures": {},
    }
    board["figures"] = _figures(board, out, out / "runs")
    board["seconds"] = time.perf_counter() - t0
    atomic_write_json(out / "scoreboard.json", json_safe(board))
    (out / "scoreboard.md").write_text(scoreboard_markdown(board))
    _note(progress, f"wrote {out / 'scoreboard.md'}, {out / 'scoreboard.json'} and the figures")
    return board


def _train(jobs: dict[str, dict[str, Any]], modes: tuple[str, ...], wall_seconds: float | None, wall_from: str,
           runs: Path, workers: int, progress: bool) -> tuple[list[dict[str, Any]], dict[tuple[str, int], float]]:
    """Train (or find finished) every run; the scoreboard rows and the time budget of each cell.
    Given ``wall_seconds``, all runs share one pool of workers; otherwise the equal-iteration runs
    come first, as their training times set the wall-time budgets."""
    explicit = wall_seconds is not None
    reference = "iterations" in modes or not explicit
    budgets = {(c["benchmark"], c["shots"]): float(wall_seconds) for c in jobs.values()} \
        if explicit and "wall" in modes else {}
    wall_cfgs, limits = _wall_jobs(jobs, budgets)
    first = {**(jobs if reference else {}), **{n: wall_cfgs[n] for n in limits}}
    _note(progress, f"{len(first)} runs into {runs}" + (f", equal-iteration runs of {_steps(jobs)} steps"
                                                       if reference else ""))
    results = run_many(first, runs, workers, max_seconds=limits, verbose=progress)
    rows = [_row(name, cfg, "iterations", results[name], runs) for name, cfg in jobs.items()] if reference else []
    if "wall" in modes and not explicit:
        budgets = wall_budgets(rows, wall_from)
        wall_cfgs, limits = _wall_jobs(jobs, budgets)
        _note(progress, f"equal wall time: {len(limits)} runs, time budgets "
                        + ", ".join(f"{b} {k}-shot {s:g} s" for (b, k), s in sorted(budgets.items())))
        wall = {n: wall_cfgs[n] for n in limits}
        results.update(run_many(wall, runs, workers, max_seconds=limits, verbose=progress) if wall else {})
    if "wall" in modes:
        no_budget = {"error": "no equal-iteration run of this cell finished, so it has no time budget"}
        rows += [_row(name, cfg, "wall", results.get(name, no_budget), runs, limits.get(name))
                 for name, cfg in wall_cfgs.items()]
    return rows, budgets


def _steps(jobs: dict[str, dict[str, Any]]) -> int:
    return next(iter(jobs.values()))["steps"]


def _wall_jobs(jobs: dict[str, dict[str, Any]], budgets: dict[tuple[str, int], float],
               ) -> tuple[dict[str, dict[str, Any]], dict[str, float]]:
    """The equal-wall-time run of every equal-iteration job (``steps``: :data:`WALL_STEP_CAP`), and
    ``name -> seconds`` for those whose cell has a budget."""
    cfgs, limits = {}, {}
    for job, cfg in jobs.items():
        cell = (cfg["benchmark"], cfg["shots"])
        folder = f"wall-{budgets[cell]:.2f}s" if cell in budgets else "wall-none"
        name = _run_name(cfg["benchmark"], cfg["shots"], folder, row_of(job))
        cfgs[name] = {**cfg, "steps": WALL_STEP_CAP}
        if cell in budgets:
            limits[name] = budgets[cell]
    return cfgs, limits


def _note(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def _figures(board: dict[str, Any], out: Path, runs: Path) -> dict[str, str]:
    """``ambiguous_tasks.png`` and ``calibration.png``; name -> file name (in ``out``) of those written."""
    figures = {}
    ok = [r for r in board["rows"] if "error" not in r]
    modes = board["settings"]["modes"]
    panels: dict[str, list] = {}
    for r in ok:
        if r["mode"] in modes:
            panels.setdefault(f"{r['benchmark']}, {r['shots']}-shot", []).append(
                (r["method"], r["mode"], r["metrics"]["calibration"]))
    if panels:
        figures["calibration"] = plot_calibration_curves(
            panels, out / "calibration.png", ncols=len(board["settings"]["shots"])).name
    path = _ambiguous_figure(ok, board["settings"], out, runs)
    if path is not None:
        figures["ambiguous_tasks"] = path.name
    return figures


def _ambiguous_figure(rows: list[dict[str, Any]], settings: dict[str, Any], out: Path, runs: Path) -> Path | None:
    """Each method's posterior on the same fixed 1- and 2-shot ``sinusoid_line`` tasks (the smallest
    shots there are, and the first benchmark, when those are not on the board)."""
    benchmarks = settings["benchmarks"]
    bench = AMBIGUOUS_BENCHMARK if AMBIGUOUS_BENCHMARK in benchmarks else benchmarks[0]
    small = [k for k in settings["shots"] if k <= 2] or settings["shots"][:1]
    mode = "iterations" if "iterations" in settings["modes"] else "wall"
    learners: dict[str, dict[int, tuple]] = {m: {} for m in settings["methods"]}
    batches, family = {}, None
    for r in rows:
        if r["benchmark"] == bench and r["shots"] in small and r["mode"] == mode:
            cfg, learner, bm = load_run(runs / r["run"])
            learners[r["method"]][r["shots"]] = (learner, max(cfg.eval_samples, 1))
            batches[r["shots"]], family = bm.test, bm.family
    if family is None or getattr(family, "x_range", None) is None:
        return None
    tasks = _pick_tasks(next(iter(batches.values())))
    what = "equal iterations" if mode == "iterations" else "equal wall time"
    return plot_ambiguous_tasks(learners, batches, family, out / "ambiguous_tasks.png", tasks=tasks,
                                draws=FUNCTION_DRAWS, title=f"{bench}, {what}: each method's posterior predictive\nand "
                                f"{FUNCTION_DRAWS} posterior function draws on the same test tasks")


def _pick_tasks(batch: Any, count: int = 2) -> list[int]:
    """The first sine and the first line task of a sinusoid-or-line test set, else the first tasks."""
    is_line = batch.info.get("is_line") if batch.info else None
    if is_line is None:
        return list(range(min(count, batch.num_tasks)))
    picks = [int(i) for flag in (0.0, 1.0) for i in (is_line == flag).nonzero()[:1, 0]]
    return picks or [0]


# ---------------------------------------------------------------------------- the markdown
COLUMNS = ("method", "shots", "steps", "MSE", "NLL", "held-out lpd/point", "cov50", "cov90", "CRPS",
           "calib. error MAE/RMSE", "calibration gap", "recal. width: NLL, cov50/90",
           "recal. isotonic: NLL, cov50/90", "train wall time (s)", "tasks/s")


def _pm(stat: dict[str, Any] | None, digits: int = 3) -> str:
    if not stat or stat.get("mean") is None:
        return "n/a"
    ci = stat.get("ci95")
    return f"{stat['mean']:.{digits}f}" + ("" if ci is None or ci != ci else f" ± {ci:.{digits}f}")


def _calibration_error_text(cal: dict[str, Any] | None) -> str:
    return "n/a" if not cal else f"{cal['mae']:.3f} / {cal['rmse']:.3f}"


def _recal_text(rec: dict[str, Any] | None) -> str:
    if not rec or not rec.get("coverage90"):
        return "n/a"
    nll = "n/a" if not rec.get("nll") else f"{rec['nll']['mean']:.3f}"
    width = f" (x{rec['value']:.2f})" if rec.get("value") is not None else ""
    return f"{nll}, {rec['coverage50']['mean']:.2f}/{rec['coverage90']['mean']:.2f}{width}"


def _table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| " + " | ".join(COLUMNS) + " |", "| " + " | ".join("---" for _ in COLUMNS) + " |"]
    for r in sorted(rows, key=lambda r: (r["shots"], r.get("mode") != "reference")):
        if "unavailable" in r:
            lines.append(f"| {r['method']} (reference) | {r['shots']} | none: {r['unavailable']} |"
                         + " |" * (len(COLUMNS) - 3))
            continue
        if "error" in r:
            why = (r["error"].splitlines() or [""])[0].replace("|", "/")
            lines.append(f"| {r['method']} | {r['shots']} | failed: {why} |" + " |" * (len(COLUMNS) - 3))
            continue
        m = r["metrics"]
        rate = r.get("tasks_per_second")
        bad = (m.get("nonfinite_tasks") or {}).get("count", 0) + (m.get("absurd_tasks") or {}).get("count", 0)
        name = r["method"] + (" (reference)" if r.get("mode") == "reference" else "")
        cells = [name + (f" ({bad} diverged test tasks left out)" if bad else ""), str(r["shots"]),
                 str(r["steps"]), _pm(m["mse"]), _pm(m["nll"]), _pm(m["heldout_lpd_per_point"]),
                 _pm(m["coverage50"], 2), _pm(m["coverage90"], 2), _pm(m.get("crps")),
                 _calibration_error_text(m.get("calibration_error")), f"{m['calibration']['gap']:.3f}",
                 *(_recal_text((r.get("recalibrated") or {}).get(name)) for name in ("scale", "isotonic")),
                 f"{r['train_seconds']:.1f}", "n/a" if rate is None else f"{rate:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def scoreboard_markdown(board: dict[str, Any]) -> str:
    """``scoreboard.md``: the command, the machine, the protocol, and one table per benchmark and mode."""
    s = board["settings"]
    lines = ["# Scoreboard: regression methods on identical tasks", ""]
    if board.get("command"):
        lines += [f"Command: `{board['command']}`", ""]
    lines += [f"Machine: {board['machine']}; {s['workers']} runs side by side, one torch thread each.", "",
              f"Protocol: every run has seed {s['seed']}, so every method trains on the same stream of "
              f"meta-batches ({_meta_batch_text(board)}, K support points per training task and K query points unless the method sets its own, as the CNP and, on the sinusoids, amortized VI do: 45) and is tested on the same {s['num_test_tasks']} fixed test tasks per benchmark and shots "
              "(100 query points each). Equal iterations: "
              f"{s['steps']} meta-iterations per run ({_steps_text(s)}). "
              + _wall_text(board) + (f" Settings of every run: `{json.dumps(s['settings'])}`." if s["settings"] else ""),
              "",
              "Columns: mean ± 95% CI over test tasks; held-out lpd/point: the log predictive density of each "
              "task's query set given its support set, per query point; cov50/cov90: the fraction of query "
              "points inside the central 50%/90% predictive interval; CRPS: continuous ranked probability score "
              "per query point (lower is better); calib. error MAE/RMSE: PACOH's calibration error, the mean "
              "absolute and root mean square gap between q and the fraction of query points (all tasks pooled) "
              "whose PIT F(y) is <= q, over 20 levels q from 0.05 to 0.95; calibration gap: mean |observed - nominal| "
              "coverage over the levels 0.05, 0.10, ..., 0.95 (calibration.png); train wall time: seconds in "
              "the training loop (evaluation not included); tasks/s: training tasks per second "
              "(steps x meta-batch / train wall time). recal.: the run's predictive recalibrated on the benchmark's "
              "validation tasks (never the test tasks): one width factor (its value in brackets), or Kuleshov et "
              "al.'s isotonic map of the PIT (pyro_meta.recalibrate). Rows marked (reference) are not trained: `prior` is the "
              "family's exact prior predictive (it ignores the support set), `oracle` the exact posterior "
              "predictive given the support (pyro_meta.methods.reference); a method worse than `prior` has not "
              "learned to use its support.", ""]
    for bench in s["benchmarks"]:
        for mode in ("iterations", "wall"):
            rows = [r for r in board["rows"] if r["benchmark"] == bench and r["mode"] == mode]
            if not rows:
                continue
            rows = [r for r in board["rows"] if r["benchmark"] == bench and r["mode"] == "reference"] + rows
            head = f"## {bench}, equal iterations ({s['steps']} steps)" if mode == "iterations" else \
                f"## {bench}, equal wall time"
            if mode == "iterations" and mode not in s["modes"]:
                head += ": the reference runs that set the time budgets"
            lines += [head, ""]
            if mode == "wall":
                budgets = [f"{b['shots']}-shot {b['seconds']:g} s" for b in board["wall_budgets"]
                           if b["benchmark"] == bench]
                lines += ["Time budget per run: " + (", ".join(budgets) or "none") + ".", ""]
            lines += _table(rows) + [""]
    figs = board.get("figures", {})
    if figs:
        lines += ["Figures: " + ", ".join(f"`{name}`" for name in figs.values()) + ".", ""]
    lines.append(f"Scoreboard time: {board.get('seconds', 0):.0f} s.")
    return "\n".join(lines) + "\n"


def _meta_batch_text(board: dict[str, Any]) -> str:
    sizes = sorted({r["meta_batch"] for r in board["rows"] if "meta_batch" in r})
    return f"{' or '.join(map(str, sizes))} tasks each" if sizes else "the benchmark's meta-batch size"


def _steps_text(s: dict[str, Any]) -> str:
    if s["steps"] == max(1, round(s["full_steps"] * s["budget"])):
        return f"budget {s['budget']:g} of MAML's {s['full_steps']:,}"
    return f"set directly; MAML's protocol has {s['full_steps']:,}"


def _wall_text(board: dict[str, Any]) -> str:
    s = board["settings"]
    if "wall" not in s["modes"]:
        return ""
    if s["wall_seconds"] is not None:
        return f"Equal wall time: every run trains for {s['wall_seconds']:g} s of training time."
    return (f"Equal wall time: every run of a (benchmark, shots) cell trains for the {s['wall_from']} of that "
            "cell's equal-iteration training times (it stops after the first step past it), as many steps as "
            "that allows. Times are measured with the runs side by side on this machine, so they carry its "
            "load.")


def scoreboard_command(prog: str, methods: list[str] | None, benchmarks: list[str], shots: list[int],
                       budget: float, steps: int | None, mode: str, wall_seconds: float | None, wall_from: str,
                       workers: int, num_test_tasks: int, seed: int, settings: dict[str, Any] | None,
                       out: str | Path, references: bool = True) -> str:
    """The command line (``prog`` plus every setting spelled out) that reproduces a scoreboard."""
    parts = [prog, "--methods", *(methods or row_methods()), "--benchmarks", *benchmarks,
             "--shots", *map(str, shots)]
    parts += ["--steps", str(steps)] if steps is not None else ["--budget", f"{budget:g}"]
    parts += ["--mode", mode]
    parts += ["--wall-seconds", f"{wall_seconds:g}"] if wall_seconds is not None else ["--wall-from", wall_from]
    parts += ["--workers", str(workers), "--test-tasks", str(num_test_tasks), "--seed", str(seed)]
    if settings:
        parts += ["--set", "'" + json.dumps(settings) + "'"]
    if not references:
        parts.append("--no-references")
    return " ".join(parts + ["--out", str(out)])




# ---------------------------------------------------------------------------- command line
def add_arguments(p: Any) -> None:
    """The scoreboard's flags on an ``argparse`` parser (``pyro-meta compare`` and
    ``experiments/scoreboard.py``)."""
    p.add_argument("--methods", nargs="+", default=None,
                   help="methods to compare (default: every registered regression method, and bfa: BMAML's BFA "
                        "objective)")
    p.add_argument("--benchmarks", nargs="+", default=list(BENCHMARKS), help="default: sinusoid sinusoid_line")
    p.add_argument("--shots", nargs="+", type=int, default=list(SHOTS), help="default: 1 2 5 10")
    p.add_argument("--budget", type=float, default=1.0,
                   help=f"equal-iteration runs train this fraction of {FULL_STEPS:,} meta-iterations (MAML's "
                        "protocol); e.g. 0.02 on 2 CPU cores")
    p.add_argument("--steps", type=int, default=None, help="meta-iterations per run (overrides --budget)")
    p.add_argument("--mode", choices=sorted(MODE_CHOICES), default="both",
                   help="equal iterations, equal wall time, or both (default)")
    p.add_argument("--wall-seconds", dest="wall_seconds", type=float, default=None,
                   help="training seconds of every equal-wall-time run (default: per benchmark and shots, "
                        "--wall-from of the equal-iteration runs' times)")
    p.add_argument("--wall-from", dest="wall_from", choices=sorted(WALL_FROM), default="median",
                   help="the equal-wall-time budget from the equal-iteration times: median (default) or max")
    p.add_argument("--workers", type=int, default=2, help="runs side by side, one torch thread each (2)")
    p.add_argument("--test-tasks", dest="test_tasks", type=int, default=600,
                   help="fixed test tasks per benchmark and shots (600)")
    p.add_argument("--seed", type=int, default=0, help="the seed of every run (0)")
    p.add_argument("--set", dest="settings", default=None,
                   help='JSON RunConfig settings for every run, e.g. \'{"hidden": [8]}\'')
    p.add_argument("--out", type=Path, default=Path("runs/scoreboard"), help="output folder (runs/scoreboard)")
    p.add_argument("--no-references", dest="no_references", action="store_true",
                   help="leave out the reference rows prior and oracle (the exact predictives; no training)")
    p.add_argument("--no-progress", dest="no_progress", action="store_true", help="no status lines on stderr")


def scoreboard_from_args(args: Any, prog: str) -> dict[str, Any]:
    """:func:`run_scoreboard` with the flags of :func:`add_arguments`; ``prog`` starts the command
    line written to ``scoreboard.md``."""
    try:
        settings = json.loads(args.settings) if args.settings else {}
    except json.JSONDecodeError as e:
        raise ConfigError(f"--set must be a JSON object of RunConfig settings: {e}") from None
    if not isinstance(settings, dict):
        raise ConfigError(f"--set must be a JSON object of RunConfig settings, got {args.settings!r}")
    kw = {"methods": args.methods, "benchmarks": args.benchmarks, "shots": args.shots, "budget": args.budget,
          "steps": args.steps, "mode": args.mode, "wall_seconds": args.wall_seconds, "wall_from": args.wall_from,
          "workers": args.workers, "num_test_tasks": args.test_tasks, "seed": args.seed, "settings": settings,
          "references": not args.no_references}
    command = scoreboard_command(prog, **kw, out=args.out)
    return run_scoreboard(args.out, **kw, progress=not args.no_progress, command=command)
