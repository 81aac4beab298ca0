"""The small benchmark scripts run end to end with tiny settings and print their tables."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(*args: str) -> str:
    r = subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_bench_check_tiny():
    out = _run("benchmarks/bench_check.py", "--repeats", "2", "--meta-batch", "2", "--methods", "maml")
    assert "| maml |" in out and "check / step" in out


def test_bench_checkpoint_tiny():
    out = _run("benchmarks/bench_checkpoint.py", "--repeats", "2")
    assert "ABML, Omniglot 5-way conv4 (112,261 weights)" in out and "MiB" in out


@pytest.mark.slow  # 22 s alone, 52 s beside other work: it times thread contention on purpose
def test_bench_threads_tiny(tmp_path):
    out = _run("benchmarks/bench_threads.py", "--steps", "1", "--cases", "maml-mlp", "--out", str(tmp_path / "t.md"))
    table = (tmp_path / "t.md").read_text()
    assert "| MAML, sinusoid" in table and table.count(" ms") == 4 and "busy, 2 threads" in out
