"""Smoke runs of the experiment scripts with tiny settings, through a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO

TINY = json.dumps({"num_test_tasks": 6, "num_val_tasks": 2, "eval_queries": 8, "hidden": [8],
                   "eval_samples": 4})


def _run(args, cwd):
    env = {**os.environ, "MPLBACKEND": "Agg"}
    r = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env,
                       timeout=300)
    assert r.returncode == 0, f"{args} failed:\n{r.stdout}\n{r.stderr}"
    assert "Traceback" not in r.stderr
    return r


def test_sinusoid_experiment_tiny(tmp_path):
    out = tmp_path / "sx"
    maml = json.dumps({"eval_samples": 1})
    r = _run([REPO / "experiments/sinusoid.py", "--budget", "0.0002", "--shots", "5", "10", "--workers", "2",
              "--set", TINY, "--maml", maml, "--out", out], tmp_path)
    text = (out / "results.md").read_text()
    assert text.strip() == r.stdout.strip()
    for name in ("maml-5shot", "maml-10shot", "abml-5shot", "abml-10shot"):
        assert f"| {name} |" in text
        rep = json.loads((out / name / "eval.json").read_text())
        assert rep["step"] == 14 and rep["num_test_tasks"] == 6
        cfg = json.loads((out / name / "config.json").read_text())
        assert cfg["meta_batch"] == 25 and cfg["meta_lr"] == 1e-3
        assert cfg["resolved"]["method_protocol"]["gradient_order"] == "second"
    assert "1.13 ± 0.18" in text  # the paper's numbers stand beside ours
    # started again: finished runs are reused, not retrained
    again = _run([REPO / "experiments/sinusoid.py", "--budget", "0.0002", "--shots", "5", "10",
                  "--workers", "2", "--set", TINY, "--maml", maml, "--out", out], tmp_path)
    assert again.stdout.split("Wall time")[1].split("\n", 1)[1] == r.stdout.split("Wall time")[1].split("\n", 1)[1]


def test_sweep_tiny(tmp_path):
    out = tmp_path / "sw"
    base = json.dumps({"method": "maml", "steps": 3, "meta_batch": 2, **json.loads(TINY), "eval_samples": 1})
    _run([REPO / "experiments/sweep.py", "--base", base, "--grid", '{"inner_lr": [0.01, 0.02]}',
          "--workers", "2", "--out", out], tmp_path)
    text = (out / "sweep.md").read_text()
    assert "| inner_lr=0.01 |" in text and "| inner_lr=0.02 |" in text


def test_omniglot_experiment_tiny(tmp_path, monkeypatch, omniglot_root):
    data = omniglot_root  # generated: the table's shape is checked, not its accuracy
    out = tmp_path / "ox"
    tiny = json.dumps({"num_test_tasks": 5, "num_val_tasks": 2, "meta_batch": 2, "eval_samples": 3})
    monkeypatch.setenv("PYRO_META_CACHE", str(tmp_path / "cache"))
    r = _run([REPO / "experiments/omniglot.py", "--budget", "0.00004", "--settings", "5w1s", "--methods", "maml",
              "versa", "--data-root", data, "--set", tiny, "--versa", '{"queries": 2}', "--out", out], tmp_path)
    text = (out / "results.md").read_text()
    assert text.strip() == r.stdout.strip()
    for name, steps, paper in (("maml-5w1s", 2, "98.7 ± 0.4"), ("versa-5w1s", 3, "99.70 ± 0.20 [R]")):
        row = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
        assert f"| {steps} (" in row and paper in row
        rep = json.loads((out / name / "eval.json").read_text())
        assert rep["num_test_tasks"] == 5 and 0 <= rep["metrics"]["accuracy"]["mean"] <= 1
        assert (out / name / "plots" / "reliability.png").is_file()
