"""Smoke test of the Omniglot speed benchmark: its tiny settings, through a subprocess, as a user runs
it (synthetic images: no dataset needed)."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import REPO

SCRIPT = REPO / "benchmarks" / "bench_omniglot.py"


def test_bench_omniglot_quick_writes_table_and_passes_self_check(tmp_path):
    out = tmp_path / "r.md"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    text = out.read_text()
    assert "Self-check: PASSED" in text
    assert "| FAIL |" not in text
    # the self-check compares loss and gradients of every method, and its controls must differ
    for method in ("versa", "maml"):
        assert re.search(rf"^\| {method} protocol T=2 5w1s .*\| loss \| ", text, re.MULTILINE)
        assert re.search(rf"^\| control: {method} protocol .*\| ok \|$", text, re.MULTILINE)
    assert "| method | setting | T | queries/class |" in text
    assert "python benchmarks/bench_omniglot.py --quick --out" in text  # the exact command line
    assert "torch threads:" in text and "pyro-ppl:" in text
    # one row per method and setting (--quick: 2 tasks), every time, rate and ratio positive
    for method in ("versa", "maml"):
        for setting in ("5w1s", "20w1s"):
            row = re.search(rf"^\| {method} \| {setting} \| 2 \|.*$", text, re.MULTILINE)
            assert row is not None, f"no row for {method} {setting}:\n{text}"
            cells = [c.strip() for c in row.group(0).strip("|").split("|")]
            numbers = [float(c.split()[0].replace(",", "")) for c in cells[6:15]]  # times, rates, ratios
            assert all(v > 0 for v in numbers), f"non-positive entry in {row.group(0)}"
