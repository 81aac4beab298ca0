"""One check shared by the peers' tests: a run stopped and resumed equals its uninterrupted twin, bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pyro_meta.config import RunConfig
from pyro_meta.methods import build_learner
from pyro_meta.run import train_run
from pyro_meta.train import load_checkpoint


def assert_resumes_bitwise(cfg: RunConfig, tmp_path: Path, steps: int) -> None:
    """Train ``cfg`` (``steps`` steps, ``log_every=1``) straight through, and again stopped after 3 steps and
    resumed twice: parameters, optimizer state, RNG and loss curve equal bit for bit, and training moved
    the parameters."""
    STEPS = steps
    full, part = tmp_path / "full", tmp_path / "part"
    train_run(cfg, full, progress=False, finalize_run=False)
    train_run(cfg, part, stop_after=3, progress=False, finalize_run=False)
    assert load_checkpoint(part / "checkpoint.pt")["step"] == 3
    train_run(RunConfig(), part, resume=True, overrides={}, stop_after=2, progress=False, finalize_run=False)
    _, res = train_run(RunConfig(), part, resume=True, overrides={}, progress=False, finalize_run=False)
    assert res.step == STEPS
    a, b = load_checkpoint(part / "checkpoint.pt"), load_checkpoint(full / "checkpoint.pt")
    assert a["learner"].keys() == b["learner"].keys()
    for k in b["learner"]:
        assert torch.equal(a["learner"][k], b["learner"][k]), k
    for pid, sb in b["optimizer"]["state"].items():
        for k, v in sb.items():
            assert torch.equal(a["optimizer"]["state"][pid][k], v), (pid, k)
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])

    def curve(run: Path) -> list:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        return [(r["step"], r["loss"], r["grad_norm"]) for r in rows if "loss" in r]

    assert curve(part) == curve(full) and len(curve(full)) == STEPS
    init = build_learner(cfg).state_dict()
    assert any(not torch.equal(init[k], b["learner"][k]) for k in init)  # training moved something
