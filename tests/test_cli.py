"""Smoke tests of every ``pyro-meta`` command, run as a user would (a subprocess, tiny settings)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import arviz as az
import pytest

from pyro_meta import cli
from pyro_meta.config import RunConfig
from pyro_meta.run import train_run
from pyro_meta.train import load_checkpoint

TINY = {"hidden": [8], "num_test_tasks": 4, "num_val_tasks": 2, "eval_queries": 10, "log_every": 5,
        "checkpoint_every": 10}
EVAL_SAMPLES = {"maml": 1, "abml": 4}  # maml: its default (a point estimate); abml: a few draws
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def cli_prefix() -> list[str]:
    """The installed console script when it sits next to this interpreter (that checks the packaging's
    entry point); otherwise the module."""
    script = Path(sys.executable).parent / "pyro-meta"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "pyro_meta.cli"]


def pyro_meta(*args, cwd: Path, ok: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "MPLBACKEND": "Agg"}
    r = subprocess.run(cli_prefix() + [str(a) for a in args], capture_output=True, text=True, cwd=cwd,
                       env=env, timeout=300)
    if ok:
        assert r.returncode == 0, f"pyro-meta {' '.join(map(str, args))} failed:\n{r.stdout}\n{r.stderr}"
        assert "Traceback" not in r.stderr
    return r


def assert_png(path: Path) -> None:
    assert path.is_file(), f"{path} missing"
    assert path.read_bytes()[:8] == PNG_MAGIC, f"{path} is not a PNG"


def metric_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_list(tmp_path):
    r = pyro_meta("list", cwd=tmp_path)
    for word in ("benchmarks:", "sinusoid", "sinusoid_line", "methods:", "maml", "abml", "settings",
                 "prior_init_std", "eval_samples"):
        assert word in r.stdout
    assert list(tmp_path.iterdir()) == []


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as ei:
        cli.main([])
    assert ei.value.code == 2
    assert "usage: pyro-meta" in capsys.readouterr().err


@pytest.fixture(scope="module", params=["maml", "abml"])
def trained(request, tmp_path_factory):
    """``pyro-meta train`` of a 20-step run, once per method."""
    method = request.param
    work = tmp_path_factory.mktemp(f"cli-{method}")
    cfg = work / "config.json"
    cfg.write_text(json.dumps({**TINY, **({"eval_samples": 4} if method == "abml" else {})}))
    out = work / "run"
    r = pyro_meta("train", "sinusoid", "--method", method, "--steps", 20, "--meta-batch", 2, "--config", cfg,
                  "--out", out, "--no-progress", cwd=work)
    return method, out, r


def test_train_writes_a_complete_run(trained):
    method, out, r = trained
    assert "trained 20 steps" in r.stdout and str(out) in r.stdout
    assert re.search(rf"^{method}\s+5\s", r.stdout, re.M), r.stdout  # the metrics table row

    config = json.loads((out / "config.json").read_text())
    for key in RunConfig().to_dict():
        assert key in config, key
    assert (config["method"], config["steps"], config["meta_batch"], config["hidden"]) == (method, 20, 2, [8])
    assert config["inner_steps"] is not None and config["queries"] == 5  # method defaults resolved
    resolved = config["resolved"]
    proto = resolved["method_protocol"]
    assert proto["gradient_order"] == "second"
    assert proto["batch_norm"] == "none (MLP)"
    assert proto["network"]["sizes"] == [1, 8, 1]
    assert resolved["benchmark_protocol"]["num_test_tasks"] == 4
    assert resolved["benchmark_protocol"]["shots"] == 5
    assert set(resolved["versions"]) >= {"pyro_meta", "torch", "pyro", "python"}

    assert load_checkpoint(out / "checkpoint.pt")["step"] == 20
    assert metric_steps(out) == [5, 10, 15, 20]

    report = json.loads((out / "eval.json").read_text())
    assert (report["method"], report["step"], report["num_test_tasks"]) == (method, 20, 4)
    assert report["eval_samples"] == EVAL_SAMPLES[method]
    assert set(report["metrics"]) >= {"mse", "nll", "coverage50", "coverage90"}
    assert report["metrics"].get("nonfinite_tasks", {"count": 0})["count"] == 0
    for name in ("mse", "nll", "coverage50", "coverage90"):
        m = report["metrics"][name]
        assert set(m) >= {"mean", "ci95"} and m["n"] == 4, name
        assert math.isfinite(m["mean"]) and math.isfinite(m["ci95"]) and m["ci95"] >= 0, name
    for c in ("coverage50", "coverage90"):
        assert 0.0 <= report["metrics"][c]["mean"] <= 1.0

    idata = az.from_netcdf(str(out / "posterior.nc"))
    assert idata.posterior["phi"].shape == (1, EVAL_SAMPLES[method], 4, 25)
    assert idata.heldout_log_likelihood["y_query"].shape == (1, EVAL_SAMPLES[method], 4, 10)
    lpd = report["metrics"]["heldout_lpd"]
    assert lpd["tasks"] == 4 and lpd["points"] == 40 and math.isfinite(lpd["total"])
    crps, cal = report["metrics"]["crps"], report["metrics"]["calibration_error"]
    assert crps["n"] == 4 and crps["mean"] > 0 and math.isfinite(crps["ci95"])
    assert (cal["levels"], cal["n"], cal["tasks"]) == (20, 40, 4) and 0 <= cal["mae"] <= cal["rmse"] <= 1

    for png in ("predictive.png", "training_loss.png"):
        assert_png(out / "plots" / png)


def test_evaluate_reproduces_eval_json(trained):
    _, out, _ = trained
    before = json.loads((out / "eval.json").read_text())
    (out / "eval.json").unlink()
    ckpt = (out / "checkpoint.pt").read_bytes()
    r = pyro_meta("evaluate", out, cwd=out.parent)
    assert f"wrote {out / 'eval.json'}" in r.stdout
    after = json.loads((out / "eval.json").read_text())
    assert after == before  # same checkpoint, fixed test tasks, seeded draws: identical numbers
    assert (out / "checkpoint.pt").read_bytes() == ckpt


def test_inspect(trained):
    method, out, _ = trained
    kept = {p: p.read_bytes() for p in (out / "checkpoint.pt", out / "eval.json", out / "posterior.nc")}
    r = pyro_meta("inspect", out, "--max-weights", 3, cwd=out.parent)
    assert f"posterior draws: {EVAL_SAMPLES[method]}" in r.stdout
    assert "tasks exported: 4" in r.stdout
    assert "phi on test task 0 (first 3 weights)" in r.stdout
    assert "w0[0,0]" in r.stdout and "w0[2,0]" in r.stdout and "w0[3,0]" not in r.stdout
    assert "held-out log predictive density of the query sets" in r.stdout
    assert "PSIS-LOO" in r.stdout and "query points" not in r.stdout.split("PSIS-LOO", 1)[1].split("\n")[0]
    if method == "abml":  # over the 4 tasks x 5 support points it conditioned on, never the query
        assert "PSIS-LOO over the 20 support points the posterior conditioned on" in r.stdout
    assert_png(out / "plots" / "posterior.png")
    assert_png(out / "plots" / "ppc.png")
    assert all(p.read_bytes() == b for p, b in kept.items())


def test_inspect_explains_why_loo_is_unavailable(tmp_path):
    from pyro_meta.inspect import inspect_run

    out = tmp_path / "run"
    train_run(RunConfig(method="maml", steps=2, meta_batch=2, **TINY), out, progress=False)
    loo_line = next(line for line in inspect_run(out).splitlines() if "PSIS-LOO" in line)
    assert "out of bounds" not in loo_line and "does not observe the support set" in loo_line, loo_line


def test_resume_with_more_steps(trained, tmp_path):
    method, out, _ = trained
    run = tmp_path / "run"
    shutil.copytree(out, run)
    r = pyro_meta("train", "--resume", run, "--steps", 30, "--no-progress", cwd=tmp_path)
    assert "trained 30 steps" in r.stdout
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 30
    assert metric_steps(run) == [5, 10, 15, 20, 25, 30]
    assert json.loads((run / "config.json").read_text())["steps"] == 30
    report = json.loads((run / "eval.json").read_text())
    assert report["step"] == 30 and report["method"] == method


def _demo_table(stdout: str) -> dict[str, str]:
    rows = {}
    for line in stdout.splitlines():
        m = re.match(r"^(maml|abml|platipus)\s+5\s+(.*)$", line)
        if m:
            rows[m.group(1)] = m.group(2)
    return rows


@pytest.mark.slow  # 29 s of the default suite's 6 minutes (since the runs fit recalibration maps, issue 28)
def test_demo_with_a_small_budget(tmp_path):
    """The whole demo command, scaled down (steps x0.005, 20 test tasks)."""
    out = tmp_path / "demo"
    r = pyro_meta("demo", "--steps-scale", 0.005, "--test-tasks", 20, "--out", out, "--no-progress",
                  cwd=tmp_path)
    rows = _demo_table(r.stdout)
    assert set(rows) == {"maml", "abml", "platipus"}, r.stdout
    for cells in rows.values():
        # mse, nll, coverage50, coverage90, crps, held-out lpd per point (+ the calibration error, mae/rmse)
        assert len(re.findall(r"[-\d.]+ \+-\s*[\d.]+", cells)) == 6
        assert re.search(r"\d\.\d{3}/\d\.\d{3}", cells), cells
    assert "20 fixed test tasks" in r.stdout and "demo finished" in r.stdout
    assert_png(out / "demo_predictive.png")
    # DEMO_STEPS scaled by 0.005: maml 3000 -> 15, abml and platipus 2000 -> 10
    assert load_checkpoint(out / "maml" / "checkpoint.pt")["step"] == 15
    assert load_checkpoint(out / "abml" / "checkpoint.pt")["step"] == 10
    assert load_checkpoint(out / "platipus" / "checkpoint.pt")["step"] == 10


def test_demo_refuses_a_different_run_in_its_folder(tmp_path):
    """A leftover run with other settings in --out/maml is not passed off as the demo's result."""
    out = tmp_path / "demo"
    train_run(RunConfig(method="maml", steps=3, meta_batch=2, **TINY), out / "maml", progress=False,
              finalize_run=False)
    before = (out / "maml" / "checkpoint.pt").read_bytes()
    r = pyro_meta("demo", "--steps-scale", 0.005, "--test-tasks", 20, "--out", out, "--no-progress",
                  cwd=tmp_path, ok=False)
    assert r.returncode == 2 and "cannot resume" in r.stderr, r.stderr
    assert (out / "maml" / "checkpoint.pt").read_bytes() == before


@pytest.mark.slow
def test_demo_from_scratch(tmp_path):
    """The demo as a user first runs it. About 90 s on 2 CPU cores even at --steps-scale 0.005: the
    evaluation on 600 test tasks (and its plots) dominates, so it is in the slow suite."""
    out = tmp_path / "demo"
    r = pyro_meta("demo", "--steps-scale", 0.005, "--out", out, "--no-progress", cwd=tmp_path)
    assert set(_demo_table(r.stdout)) == {"maml", "abml", "platipus"}, r.stdout
    assert "600 fixed test tasks" in r.stdout
    assert_png(out / "demo_predictive.png")
    for method in ("maml", "abml", "platipus"):
        assert (out / method / "eval.json").is_file()
