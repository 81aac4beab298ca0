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
