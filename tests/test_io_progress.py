"""Run files get the umask's permissions; the progress bar's rate follows the recent steps; the
threading policy is applied and recorded."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from pyro_meta.config import RunConfig
from pyro_meta.io import atomic_write_json
from pyro_meta.methods import resolve
from pyro_meta.progress import Progress, RecentRate
from pyro_meta.run import train_run


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda m: os.umask(m)
    os.umask(old)


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_atomic_writes_respect_the_umask(tmp_path, umask, mask):
    umask(mask)
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    assert _mode(tmp_path / "a.json") == 0o666 & ~mask
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_every_run_file_has_the_same_permissions(tmp_path, umask):
    umask(0o022)
    cfg = RunConfig(method="maml", steps=3, meta_batch=2, num_test_tasks=3, num_val_tasks=1, hidden=[8])
    out, _ = train_run(cfg, tmp_path / "run", progress=False)
    for name in ("config.json", "eval.json", "checkpoint.pt", "metrics.jsonl", "posterior.nc"):
        assert _mode(out / name) == 0o644, name


def test_recent_rate_follows_the_recent_steps():
    now = [0.0]
    r = RecentRate(window=5.0, clock=lambda: now[0])
    r.update(0)
    now[0] = 30.0  # a slow start: the first step took 30 s
    r.update(1)
    assert r.rate() == pytest.approx(1 / 30)
    for k in range(2, 2002):  # then 250 steps/s for 8 s
        now[0] += 1 / 250
        r.update(k)
    assert r.rate() == pytest.approx(250, rel=0.01)
    assert "250 step/s" in r.text(2001, 4001) and "00:08 left" in r.text(2001, 4001)


def test_progress_bar_in_a_log_file_shows_the_recent_rate(capsys):
    now = [0.0]
    bar = Progress(total=1000, initial=0, desc="meta-train", enabled=True, window=2.0, clock=lambda: now[0])
    now[0] = 20.0
    bar.update()
    for _ in range(998):
        now[0] += 0.004
        bar.update()
    now[0] += 0.004
    bar.update()
    assert "250 step/s" in bar.postfix()
    bar.close()
    assert "250 step/s" in capsys.readouterr().err  # the final line a log file gets


def test_threads_are_resolved_by_network_and_recorded(tmp_path):
    assert resolve(RunConfig(method="maml")).threads == 1
    assert resolve(RunConfig(method="maml", threads=2)).threads == 2
    cfg = RunConfig(method="maml", steps=2, meta_batch=2, num_test_tasks=3, num_val_tasks=1, hidden=[8], threads=1)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        out, _ = train_run(cfg, tmp_path / "run", progress=False)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert json.loads((out / "config.json").read_text())["threads"] == 1
