"""Smoke test of the speed benchmark: its tiny settings, through a subprocess, as a user runs it."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from conftest import REPO


def _quick(tmp_path, script: str, *extra: str, timeout: int = 60) -> str:
    """Run ``benchmarks/<script> --quick [extra] --out <tmp>`` as a user would (with the data cache in
    ``tmp_path``); the report it wrote."""
    out = tmp_path / "r.md"
    env = {**os.environ, "PYRO_META_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--quick", *extra, "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return out.read_text()


def test_bench_sinusoid_quick_writes_table_and_passes_self_check(tmp_path):
    text = _quick(tmp_path, "bench_sinusoid.py")
    assert "Self-check: PASSED" in text
    assert "| FAIL |" not in text
    assert "| method | T | K | lib ms/step |" in text
    assert "python benchmarks/bench_sinusoid.py --quick --out" in text  # the exact command line
    assert "torch threads:" in text and "pyro-ppl:" in text
    # one row per method and T (--quick: T in {2, 4}, K = 1); the loop is timed at T = 4
    for method in ("maml", "abml"):
        for tasks in (2, 4):
            row = re.search(rf"^\| {method} \| {tasks} \| 1 \| ([0-9.]+) \|", text, re.MULTILINE)
            assert row is not None, f"no row for {method} T={tasks}:\n{text}"
            assert float(row.group(1)) > 0
        loop_row = re.search(rf"^\| {method} \| 4 \| 1 \|.*$", text, re.MULTILINE).group(0)
        cells = [c.strip() for c in loop_row.strip("|").split("|")]
        assert float(cells[12]) > 0, f"no loop/vec ratio in {loop_row}"


def test_bench_bmaml_quick_writes_rows_for_every_configuration(tmp_path):
    text = _quick(tmp_path, "bench_bmaml.py")
    assert "python benchmarks/bench_bmaml.py --quick --out" in text  # the exact command line
    assert "torch threads:" in text and "pyro-ppl:" in text
    assert "| configuration | M | ms/step (median) |" in text
    # --quick: MAML, the chaser at M = 1 and 2, first order and BFA at M = 2; T = 2 tasks
    expected = [("MAML, 1 SGD step", "-", 3401), ("BMAML chaser, 2nd order", "1", 3403),
                ("BMAML chaser, 2nd order", "2", 2 * 3403), ("BMAML chaser, 1st order", "2", 2 * 3403),
                ("BMAML bfa, 2nd order", "2", 2 * 3403)]
    for label, m, per_task in expected:
        row = re.search(rf"^\| {re.escape(label)} \| {m} \| ([0-9.]+) \|.*$", text, re.MULTILINE)
        assert row is not None, f"no row for {label} M={m}:\n{text}"
        cells = [c.strip() for c in row.group(0).strip("|").split("|")]
        assert float(cells[2]) > 0 and float(cells[4].replace(",", "")) > 0  # ms/step, tasks/s
        assert cells[7] == f"{per_task:,}" and cells[8] == f"{2 * per_task:,}"  # values per task, per batch
    assert "**Step time against M**" in text and "Verdict:" in text
    for method, m in (("MAML", "-"), ("BMAML", "2")):
        row = re.search(rf"^\| {method} \| {m} \| 2 \| 5 \| ([0-9.]+) \|.*\| yes \|$", text, re.MULTILINE)
        assert row is not None, f"no evaluation row for {method}:\n{text}"
    assert "Warning: non-finite" not in text


def test_bench_vae_quick_passes_its_self_check_and_writes_every_row(tmp_path):
    text = _quick(tmp_path, "bench_vae.py", "--configs", "elbo:1,iwae:5", timeout=120)
    assert "python benchmarks/bench_vae.py --quick --configs elbo:1,iwae:5 --out" in text
    assert "torch threads:" in text and "pyro-ppl:" in text
    for obj, k in (("elbo", 1), ("iwae", 5)):
        row = re.search(rf"^\| {obj} \| {k} \| ([0-9.]+) \| ([0-9.]+) \|", text, re.MULTILINE)
        assert row is not None and float(row.group(1)) > 0 and float(row.group(2)) > 0, text
    errs = [float(e) for e in re.findall(r"k=\d+ ([0-9]\.[0-9]e[+-][0-9]+)", text.split("Self-check")[1].split("\n")[0])]
    assert len(errs) == 3 and max(errs) < 1e-9, text


@pytest.mark.slow
def test_bench_ddp_quick_times_one_and_two_ranks(tmp_path):
    text = _quick(tmp_path, "bench_ddp.py", timeout=300)
    assert "python benchmarks/bench_ddp.py --quick --out" in text
    row = re.search(r"^\| MAML, sinusoid.*$", text, re.MULTILINE).group(0)
    assert row.count("tasks/s") == 3 and row.count("x |") == 2, row


def test_bench_device_quick_times_every_quick_case_and_the_precision_runs(tmp_path, omniglot_root):
    """On the generated Omniglot (the accuracy figures mean nothing there; the table's shape is checked)."""
    text = _quick(tmp_path, "bench_device.py", "--accuracy", "2", "--data-root", str(omniglot_root), timeout=240)
    assert "python benchmarks/bench_device.py --quick --accuracy 2 --data-root" in text
    for case, source, unit in (("maml-sinusoid", "TaskStream", "tasks"), ("abml-sinusoid", "TaskStream", "tasks"),
                               ("vae-omniglot", "ImageStream", "images")):
        row = re.search(rf"^\| {case} \| [^|]+ \| ([0-9.]+) \| ([0-9,]+) {unit} \| {source} \|", text, re.MULTILINE)
        assert row is not None and float(row.group(1)) > 0, f"no row for {case}:\n{text}"
    assert "sinusoid, 5 shots, MLP 1-40-40-1, T=25" in text  # the protocol comes from the resolved config
    for mode in ("fp32", "bf16"):  # the CPU's modes (tf32 is CUDA's)
        assert re.search(rf"^\| {mode} \| [0-9.]+ \| [0-9.]+ ± [0-9.]+% \| [0-9.]+ \| [0-9.]+ \|$", text, re.MULTILINE), text


def test_bench_device_names_what_issued_each_host_to_device_copy():
    """The profiler-trace reading of bench_device, on a hand-made trace: copies are counted by direction
    and each host-to-device copy is traced to the operator and the project frames around its launch."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import bench_device
    finally:
        sys.path.pop(0)

    def ev(cat, name, ts, dur, tid=1, **args):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 0, "tid": tid, "args": args}

    events = [
        ev("python_function", "pyro_meta/train.py(400): _fit", 0, 100),
        ev("python_function", "pyro_meta/models/abml.py(50): model", 10, 20),
        ev("cpu_op", "aten::to", 12, 10),
        ev("cpu_op", "aten::copy_", 13, 8),
        ev("cuda_runtime", "cudaMemcpyAsync", 14, 2, correlation=7),
        ev("gpu_memcpy", "Memcpy HtoD (Pageable -> Device)", 20, 1, tid=99, correlation=7, bytes=400),
        ev("cpu_op", "aten::item", 50, 10),
        ev("cuda_runtime", "cudaMemcpyAsync", 52, 2, correlation=8),
        ev("gpu_memcpy", "Memcpy DtoH (Device -> Pageable)", 55, 1, tid=99, correlation=8, bytes=4),
        ev("cuda_runtime", "cudaMemcpyAsync", 70, 2, tid=2, correlation=9),  # no frames on its thread
        ev("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", 75, 1, tid=99, correlation=9, bytes=100),
    ]
    got = bench_device._copies(events)
    assert (got["htod"], got["htod_bytes"], got["dtoh"]) == (2, 500, 1)
    assert got["htod_sources"] == {
        "aten::copy_ < pyro_meta/models/abml.py(50): model < pyro_meta/train.py(400): _fit": 1, "(no frame)": 1}


def test_bench_ddp_layouts_on_the_cpu_and_on_cuda():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import bench_ddp
    finally:
        sys.path.pop(0)
    assert bench_ddp.layouts_for([1, 2], "cpu") == [(1, 1, False), (1, 2, False), (2, 1, True)]
    assert bench_ddp.layouts_for([1, 2], "cuda") == [(1, 1, False), (1, 1, True), (2, 1, True)]
