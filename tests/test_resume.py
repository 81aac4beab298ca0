"""A run that is interrupted and resumed ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import pyro_meta.run as run_module
from pyro_meta import cli
from pyro_meta.config import RunConfig
from pyro_meta.run import train_run
from pyro_meta.train import load_checkpoint

STEPS = 12


def tiny_cfg(method: str) -> RunConfig:
    extra = {"eval_samples": 2} if method == "abml" else {}
    return RunConfig(method=method, hidden=[8], meta_batch=2, steps=STEPS, num_test_tasks=4, num_val_tasks=2,
                     eval_queries=10, log_every=1, checkpoint_every=4, **extra)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def assert_same_training(resumed: Path, full: Path) -> None:
    """Checkpoints equal bit for bit (learner, optimizer, RNG) and identical loss curves."""
    a, b = load_checkpoint(resumed / "checkpoint.pt"), load_checkpoint(full / "checkpoint.pt")
    assert a["step"] == b["step"] == STEPS
    assert a["learner"].keys() == b["learner"].keys()
    for k in b["learner"]:
        assert torch.equal(a["learner"][k], b["learner"][k]), f"learner parameter {k} differs"
    for pid, sb in b["optimizer"]["state"].items():
        for k, v in sb.items():
            assert torch.equal(a["optimizer"]["state"][pid][k], v), f"optimizer state {pid}/{k} differs"
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"]), "global torch RNG state differs"
    assert torch.equal(a["rng"]["stream"]["generator"], b["rng"]["stream"]["generator"]), "task stream differs"
    ma, mb = metrics(resumed), metrics(full)
    steps = [r["step"] for r in ma]
    assert steps == list(range(1, STEPS + 1)), f"duplicate or missing steps in metrics.jsonl: {steps}"
    assert [(r["loss"], r["grad_norm"]) for r in ma] == [(r["loss"], r["grad_norm"]) for r in mb]


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory) -> dict[str, Path]:
    """Uninterrupted reference runs, trained once per module."""
    runs = {}
    for method in ("maml", "abml"):
        out = tmp_path_factory.mktemp("full") / method
        _, res = train_run(tiny_cfg(method), out, progress=False, finalize_run=False)
        assert res.step == STEPS
        runs[method] = out
    return runs


def test_reference_run_learns_something(full_runs):
    """The comparison is meaningful: training moved the parameters and abml's loss is random."""
    from pyro_meta.methods import build_learner

    for method, out in full_runs.items():
        init = build_learner(tiny_cfg(method)).state_dict()
        trained = load_checkpoint(out / "checkpoint.pt")["learner"]
        assert any(not torch.equal(init[k], trained[k]) for k in init), method


@pytest.mark.parametrize("method", ["maml", "abml"])
@pytest.mark.parametrize("stops", [[5], [3, 4], [4]], ids=["once", "twice", "at-a-checkpoint"])
def test_resume_equals_uninterrupted(tmp_path, full_runs, method, stops):
    out = tmp_path / "run"
    _, res = train_run(tiny_cfg(method), out, stop_after=stops[0], progress=False, finalize_run=False)
    assert res.step == stops[0]
    assert load_checkpoint(out / "checkpoint.pt")["step"] == stops[0]
    done = stops[0]
    for more in stops[1:]:
        _, res = train_run(RunConfig(), out, resume=True, overrides={}, stop_after=more, progress=False,
                           finalize_run=False)
        done += more
        assert res.step == done
    _, res = train_run(RunConfig(), out, resume=True, overrides={}, progress=False, finalize_run=False)
    assert res.step == STEPS
    assert_same_training(out, full_runs[method])


@pytest.mark.parametrize("method", ["maml", "abml"])
def test_resume_after_a_stale_log(tmp_path, full_runs, method):
    """Log lines written after the last checkpoint (a crash between checkpoints) are dropped on resume,
    so metrics.jsonl ends with no duplicate steps."""
    out = tmp_path / "run"
    train_run(tiny_cfg(method), out, stop_after=6, progress=False, finalize_run=False)
    ckpt = out / "checkpoint.pt"
    saved = ckpt.read_bytes()
    # run on to step 9 (log lines 7..9), then put the step-6 checkpoint back, as a crash would leave it
    train_run(RunConfig(), out, resume=True, overrides={}, stop_after=3, progress=False, finalize_run=False)
    assert [r["step"] for r in metrics(out)][-1] == 9
    ckpt.write_bytes(saved)
    train_run(RunConfig(), out, resume=True, overrides={}, progress=False, finalize_run=False)
    assert_same_training(out, full_runs[method])


class InterruptingStream:
    """A task stream whose ``next()`` raises KeyboardInterrupt once ``after`` batches were drawn."""

    def __init__(self, stream, after: int):
        self.stream, self.after, self.drawn = stream, after, 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.drawn == self.after:
            raise KeyboardInterrupt
        self.drawn += 1
        return next(self.stream)

    def state_dict(self):
        return self.stream.state_dict()

    def load_state_dict(self, state):
        self.stream.load_state_dict(state)


def _interrupt_stream_at(monkeypatch, step: int) -> None:
    real = run_module.benchmark_of
    monkeypatch.setattr(run_module, "benchmark_of",
                        lambda cfg: dataclasses.replace(bm := real(cfg), train=InterruptingStream(bm.train, step)))


@pytest.mark.parametrize("method", ["maml", "abml"])
def test_keyboard_interrupt_checkpoints_and_resumes_exactly(tmp_path, full_runs, monkeypatch, method):
    out = tmp_path / "run"
    _interrupt_stream_at(monkeypatch, 7)  # checkpoint_every=4: the last periodic checkpoint is step 4
    with pytest.raises(KeyboardInterrupt):
        train_run(tiny_cfg(method), out, progress=False, finalize_run=False)
    monkeypatch.undo()
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 7
    assert [r["step"] for r in metrics(out)] == list(range(1, 8))
    train_run(RunConfig(), out, resume=True, overrides={}, progress=False, finalize_run=False)
    assert_same_training(out, full_runs[method])


def test_keyboard_interrupt_in_the_cli(tmp_path, capsys, monkeypatch, full_runs):
    out = tmp_path / "run"
    cfg = tiny_cfg("maml").to_dict()
    cfg.pop("method")
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    _interrupt_stream_at(monkeypatch, 5)
    rc = cli.main(["train", "sinusoid", "--config", str(tmp_path / "c.json"), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 130
    assert "interrupted" in err and "--resume" in err
    monkeypatch.undo()
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 5
    assert cli.main(["train", "--resume", str(out), "--no-progress"]) == 0
    assert_same_training(out, full_runs["maml"])


class InterruptingLoss:
    """Wraps a learner so that its ``loss`` raises KeyboardInterrupt on call ``at`` (1-based): the
    interrupt lands after that step's batch was drawn, while the loss is computed, where a real
    Ctrl-C most often lands."""

    def __init__(self, at: int):
        self.at, self.calls = at, 0

    def install(self, learner):
        original = learner.loss

        def loss(batch):
            self.calls += 1
            if self.calls == self.at:
                raise KeyboardInterrupt
            return original(batch)

        learner.loss = loss
        return learner


@pytest.mark.parametrize("method", ["maml", "abml"])
def test_keyboard_interrupt_inside_a_step_resumes_exactly(tmp_path, full_runs, monkeypatch, method):
    out = tmp_path / "run"
    real = run_module.build_learner
    monkeypatch.setattr(run_module, "build_learner", lambda cfg: InterruptingLoss(8).install(real(cfg)))
    with pytest.raises(KeyboardInterrupt):
        train_run(tiny_cfg(method), out, progress=False, finalize_run=False)
    monkeypatch.undo()
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 7
    train_run(RunConfig(), out, resume=True, overrides={}, progress=False, finalize_run=False)
    assert_same_training(out, full_runs[method])


def test_a_setting_added_after_the_checkpoint_does_not_block_its_resume(tmp_path):
    """A checkpoint written before a setting existed lacks its key; unset (None) now, it is no difference,
    while a changed value still is (issue 27: the gp recipe's ``kernel`` setting)."""
    from pyro_meta.methods import build_learner, resolve
    from pyro_meta.run import benchmark_of
    from pyro_meta.train import CheckpointError, fit

    cfg = resolve(RunConfig(method="maml", meta_batch=2, num_test_tasks=2, num_val_tasks=2, steps=4))
    out = tmp_path / "r"

    def go(run_config, resume):
        torch.manual_seed(0)
        return fit(build_learner(cfg), benchmark_of(cfg).train, 4, out_dir=out, resume=resume, progress=False,
                   run_config=run_config, stop_after=None if resume else 2)

    go({"a": 1}, False)
    assert go({"a": 1, "added_later": None}, True).step == 4
    with pytest.raises(CheckpointError, match="a: checkpoint 1 vs now 2"):
        go({"a": 2, "added_later": None}, True)
