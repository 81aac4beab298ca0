"""Runs that survive anything: checkpoints that cannot run code and carry a digest, one writer per run,
SIGTERM, start-up leftovers, honest eval.json, and every OS error a one-line message."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pyro_meta.cli import main
from pyro_meta.config import RunConfig
from pyro_meta.run import finished_report, train_run
from pyro_meta.rundir import (
    MAGIC,
    CheckpointError,
    RunLock,
    clean_temp_files,
    load_checkpoint,
    save_checkpoint,
)
from pyro_meta.train import NonFiniteError

TINY = {"meta_batch": 2, "num_test_tasks": 3, "num_val_tasks": 1, "hidden": [8]}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}


def cli(*args, cwd=None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pyro_meta.cli", *map(str, args)], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=300, **kw)


def popen(*args, cwd=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pyro_meta.cli", *map(str, args)], cwd=cwd, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def run_dir(tmp_path) -> Path:
    out, _ = train_run(RunConfig(method="maml", steps=4, **TINY), tmp_path / "run", progress=False)
    return out


class _Plant:
    """Unpickling this runs a shell command (what a planted checkpoint would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("fmt", [1, 2])
def test_a_planted_pickle_never_runs(run_dir, tmp_path, fmt):
    marker = tmp_path / "PWNED"
    evil = {**load_checkpoint(run_dir / "checkpoint.pt"), "format": fmt, "extra": _Plant(marker)}
    if fmt == 1:
        torch.save(evil, run_dir / "checkpoint.pt")
    else:  # even with a correct digest
        save_checkpoint(evil, run_dir / "checkpoint.pt")
    for args in (["evaluate", run_dir], ["inspect", run_dir], ["train", "--resume", run_dir, "--steps", 6]):
        if args[0] == "inspect":
            (run_dir / "posterior.nc").unlink(missing_ok=True)  # force a load of the checkpoint
        r = cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert "never loaded (they could run code)" in r.stderr and "Traceback" not in r.stderr
        assert not marker.exists()


def test_a_flipped_bit_is_detected(run_dir):
    path = run_dir / "checkpoint.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="digest does not match"):
        load_checkpoint(path)
    r = cli("train", "--resume", run_dir, "--steps", 8)
    assert r.returncode == 2 and "is damaged" in r.stderr and str(path) in r.stderr


def test_a_checkpoint_missing_a_key(run_dir):
    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    del ckpt["optimizer"]
    save_checkpoint(ckpt, run_dir / "checkpoint.pt")
    r = cli("train", "--resume", run_dir, "--steps", 8)
    assert r.returncode == 2 and "lacks 'optimizer'" in r.stderr


def test_format_1_checkpoints_still_load(run_dir):
    ckpt = {**load_checkpoint(run_dir / "checkpoint.pt"), "format": 1}
    torch.save(ckpt, run_dir / "checkpoint.pt")
    with pytest.warns(UserWarning, match="no digest"):
        assert load_checkpoint(run_dir / "checkpoint.pt")["step"] == 4


def test_checkpoint_file_starts_with_its_header(run_dir):
    head = (run_dir / "checkpoint.pt").read_bytes()[:100]
    assert head.startswith(MAGIC + b" 2 sha256=")


def test_a_second_writer_is_refused_naming_the_holder(run_dir):
    with RunLock(run_dir, "train"):
        r = cli("train", "--resume", run_dir, "--steps", 8)
        assert r.returncode == 2
        assert "is in use by another process" in r.stderr and f"pid {os.getpid()}" in r.stderr
        r = cli("evaluate", run_dir)
        assert r.returncode == 2 and "in use" in r.stderr
    assert load_checkpoint(run_dir / "checkpoint.pt")["step"] == 4  # untouched


def test_two_fresh_runs_into_one_folder(tmp_path):
    first = popen("train", "--method", "abml", "--steps", 3000, "--meta-batch", 5, "--test-tasks", 3, "--val-tasks", 5,
                  "--out", tmp_path / "x", "--no-progress")
    try:
        _wait_for(lambda: (tmp_path / "x" / "checkpoint.pt").exists(), first)
        r = cli("train", "--method", "maml", "--steps", 5, "--test-tasks", 3, "--val-tasks", 5, "--out", tmp_path / "x")
        assert r.returncode == 2 and "in use by another process" in r.stderr, r.stderr
    finally:
        first.kill()
        first.wait()


def test_a_stale_lock_of_a_killed_process_does_not_block(run_dir):
    code = (f"import os, signal; from pyro_meta.rundir import RunLock; l = RunLock({str(run_dir)!r}); "
            "l.__enter__(); os.kill(os.getpid(), signal.SIGKILL)")
    r = subprocess.run([sys.executable, "-c", code], env=ENV)
    assert r.returncode == -signal.SIGKILL
    assert (run_dir / ".lock.holder").exists()  # the killed holder's note is left behind...
    with RunLock(run_dir):  # ...but the lock is free
        pass


def _wait_for(cond, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    t0 = time.time()
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"the process ended early: {proc.stderr.read()}")
        if time.time() - t0 > timeout:
            raise AssertionError("timed out")
        time.sleep(0.05)


def _logged_steps(out: Path) -> int:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
        return max((json.loads(x).get("step", 0) for x in lines if x.strip()), default=0)
    except (OSError, ValueError):
        return 0


def test_sigterm_checkpoints_and_a_resume_equals_an_uninterrupted_run(tmp_path):
    # a meta-batch of 5 keeps the runs short (issue 20); the signal comes at step 200 or soon after, with
    # about 2 s of training left
    args = ["--method", "maml", "--steps", 800, "--meta-batch", 5, "--test-tasks", 3, "--val-tasks", 5, "--no-progress",
            "--checkpoint-every", 100000]
    full = cli("train", *args, "--out", tmp_path / "full")
    assert full.returncode == 0, full.stderr
    p = popen("train", *args, "--out", tmp_path / "cut")
    _wait_for(lambda: _logged_steps(tmp_path / "cut") >= 200, p)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 143, err
    step = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["step"]
    assert 200 <= step < 800 and f"terminated at step {step}; checkpoint written" in err
    assert not (tmp_path / "cut" / "eval.json").exists()
    r = cli("train", "--resume", tmp_path / "cut", "--no-progress")
    assert r.returncode == 0, r.stderr
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")["learner"]
    b = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["learner"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_signal_during_the_interrupt_checkpoint_waits_for_it(tmp_path, monkeypatch):
    """Ctrl-C, then a second Ctrl-C while the checkpoint is being written: the write completes."""
    import pyro_meta.train as train_mod

    real = train_mod.save_checkpoint
    calls = []

    def save(obj, path):
        calls.append(obj["step"])
        if len(calls) == 1 and obj["step"] == 0:
            return real(obj, path)
        if len(calls) == 2:  # the periodic path is not used: this is the interrupt's save
            os.kill(os.getpid(), signal.SIGINT)  # the second signal, during the save
            time.sleep(0.05)
        return real(obj, path)

    def stop_at_step_3(*a, **k):
        if len(calls) == 1 and stop_at_step_3.n == 3:
            os.kill(os.getpid(), signal.SIGINT)  # the first signal, mid-run
        stop_at_step_3.n += 1
        return orig_update(*a, **k)

    from pyro_meta import progress

    orig_update = progress.Progress.update
    stop_at_step_3.n = 0
    monkeypatch.setattr(train_mod, "save_checkpoint", save)
    monkeypatch.setattr(progress.Progress, "update", stop_at_step_3)
    with pytest.raises(KeyboardInterrupt) as e:
        train_run(RunConfig(method="maml", steps=50, **TINY), tmp_path / "r", progress=False)
    assert e.value.checkpoint == tmp_path / "r" / "checkpoint.pt"
    assert load_checkpoint(tmp_path / "r" / "checkpoint.pt")["step"] == e.value.step >= 3


def test_a_start_up_leftover_is_reused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(RunConfig(method="maml", steps=3, **TINY).to_dict()))
    (out / ".checkpoint.pt.abc123.tmp").write_bytes(b"half a file")  # an interrupted write
    assert main(["train", "--method", "maml", "--steps", "3", "--meta-batch", "2", "--test-tasks", "3", "--val-tasks", "5",
                 "--out", str(out), "--no-progress"]) == 0
    assert "start-up leftover" in capsys.readouterr().err
    assert not list(out.glob(".*.tmp"))
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 3


def test_resume_of_a_start_up_leftover_starts_from_step_0(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    from pyro_meta.methods import resolve

    (out / "config.json").write_text(json.dumps(resolve(RunConfig(method="maml", steps=3, **TINY)).to_dict()))
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    assert "never reached its first checkpoint" in capsys.readouterr().err
    assert finished_report(out) is not None


def test_ctrl_c_before_any_checkpoint_says_so(tmp_path, capsys, monkeypatch):
    import pyro_meta.run as run_mod

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_mod, "build_learner", boom)
    assert main(["train", "--method", "maml", "--steps", "3", "--out", str(tmp_path / "r")]) == 130
    err = capsys.readouterr().err
    assert "before the run's first checkpoint; nothing to resume" in err and "--resume" not in err


def test_eval_json_says_whether_the_run_finished(tmp_path, capsys):
    out, _ = train_run(RunConfig(method="maml", steps=6, **TINY), tmp_path / "r", progress=False, stop_after=3)
    assert main(["evaluate", str(out)]) == 0
    assert "stopped at step 3 of 6" in capsys.readouterr().err
    rep = json.loads((out / "eval.json").read_text())
    assert (rep["step"], rep["steps"], rep["finished"]) == (3, 6, False)
    assert finished_report(out) is None
    train_run(RunConfig(), out, resume=True, progress=False, finalize_run=False)
    assert not (out / "eval.json").exists()  # the stale result is gone
    train_run(RunConfig(), out, resume=True, progress=False)
    rep = finished_report(out)
    assert rep is not None and (rep["step"], rep["finished"]) == (6, True)
    assert finished_report(out, steps=10) is None  # fewer steps than asked for: not done


def test_run_many_finishes_an_unfinished_run(tmp_path):
    from pyro_meta.run import run_many

    job = {"method": "maml", "steps": 6, **TINY}
    train_run(RunConfig(**job), tmp_path / "many" / "a", progress=False, stop_after=3)
    main(["evaluate", str(tmp_path / "many" / "a")])  # an eval.json of step 3
    res = run_many({"a": job}, tmp_path / "many", workers=1)
    assert res["a"]["step"] == 6 and res["a"]["finished"] is True


def test_skipped_steps_are_warned_about_and_limited(tmp_path, monkeypatch, capsys):
    from pyro_meta.learner import MetaLearner

    monkeypatch.setattr(MetaLearner, "loss", lambda self, batch: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(NonFiniteError, match=r"3 of 3 meta-batches were skipped.*limit \(2 steps\)"):
        train_run(RunConfig(method="maml", steps=50, skip_nonfinite=True, skip_limit=2, **TINY), tmp_path / "r",
                  progress=False)
    lines = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x.get("event") == "skipped_nonfinite"] == [1, 2, 3]
    assert capsys.readouterr().err.count("meta-batch skipped") == 3


def test_settings_are_checked_before_the_first_step(tmp_path):
    r = cli("train", "--method", "maml", "--steps", 3, "--seed", -1, "--out", tmp_path / "r")
    assert r.returncode == 2 and "seed must be an integer from 0 to 2**32 - 1" in r.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("labels, fragment", [(-1, "found -1"), (7, "label 7 in a 5-way batch")])
def test_labels_outside_the_ways_are_refused(labels, fragment):
    from pyro_meta import TaskBatch
    from pyro_meta.tasks import TaskBatchError

    ys = torch.arange(5).expand(2, 5).contiguous()
    yq = ys.clone()
    yq[0, 0] = labels
    with pytest.raises(TaskBatchError, match=fragment):
        TaskBatch(torch.rand(2, 5, 3), ys, torch.rand(2, 5, 3), yq, {"classes": torch.zeros(2, 5)})


def test_out_naming_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert main(["train", "--method", "maml", "--steps", "2", "--out", str(tmp_path / "f")]) == 2
    assert "is a file, not a run directory" in capsys.readouterr().err


def test_disk_full_at_a_checkpoint_is_one_line_and_keeps_the_last(run_dir, capsys, monkeypatch):
    import pyro_meta.rundir as rundir_mod

    def full(path, write, binary=True):  # the checkpoint's write hits a full disk
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    before = (run_dir / "checkpoint.pt").read_bytes()
    monkeypatch.setattr(rundir_mod, "atomic_write", full)
    assert main(["train", "--resume", str(run_dir), "--steps", "8", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err and "checkpoint.pt" in err
    assert (run_dir / "checkpoint.pt").read_bytes() == before


def test_too_little_space_for_posterior_nc_is_an_error_not_a_crash(run_dir, capsys, monkeypatch):
    import shutil

    (run_dir / "posterior.nc").unlink()
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    assert main(["inspect", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "posterior.nc" in err and "not enough free disk space" in err
    assert not (run_dir / "posterior.nc").exists() and not list(run_dir.glob(".*.tmp"))


def test_a_read_only_folder_is_one_line(tmp_path, capsys, monkeypatch):
    def denied(self, *a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", denied)
    assert main(["train", "--method", "maml", "--steps", "2", "--out", str(tmp_path / "ro" / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pyro-meta train: error: ") and "Permission denied" in err and "Traceback" not in err


def test_the_run_folder_removed_mid_run(tmp_path, capsys, monkeypatch):
    import shutil

    from pyro_meta import progress

    orig = progress.Progress.update

    def remove_at_5(self):
        orig(self)
        if self.n == 5:
            shutil.rmtree(tmp_path / "r")

    monkeypatch.setattr(progress.Progress, "update", remove_at_5)
    code = main(["train", "--method", "maml", "--steps", "40", "--meta-batch", "2", "--test-tasks", "3", "--val-tasks", "5",
                 "--out", str(tmp_path / "r"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "was removed while training" in err, err


def test_a_damaged_posterior_nc_is_rebuilt(run_dir, capsys):
    (run_dir / "posterior.nc").write_bytes(b"not netcdf")
    assert main(["inspect", str(run_dir)]) == 0
    assert "is damaged" in capsys.readouterr().err
    import arviz as az

    assert az.from_netcdf(str(run_dir / "posterior.nc")).posterior.sizes["task"] == 3


def test_temp_files_are_cleaned(tmp_path):
    for name in (".checkpoint.pt.x1.tmp", ".posterior.nc.tmp", ".eval.json.y.tmp"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "keep.txt").write_text("x")
    assert len(clean_temp_files(tmp_path)) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_evaluate_with_nothing_to_evaluate():
    from pyro_meta import TaskBatch, get_benchmark
    from pyro_meta.evaluate import evaluate
    from pyro_meta.methods import build_learner, resolve

    learner = build_learner(resolve(RunConfig(method="maml", hidden=[8])))
    b = get_benchmark("sinusoid", num_test_tasks=2, num_val_tasks=1).test
    empty = TaskBatch(b.x_support, b.y_support, b.x_query[:, :0], b.y_query[:, :0])
    with pytest.raises(ValueError, match="nothing to evaluate"):
        evaluate(learner, empty)
    with pytest.raises(ValueError, match="nothing to evaluate"):
        evaluate(learner, b.select(slice(0, 0)))


def test_bad_fit_arguments():
    from pyro_meta import get_benchmark
    from pyro_meta.methods import build_learner, resolve
    from pyro_meta.train import fit

    learner = build_learner(resolve(RunConfig(method="maml", hidden=[8])))
    stream = get_benchmark("sinusoid", num_test_tasks=2, num_val_tasks=1).train
    for kw, frag in (({"checkpoint_every": 0}, "checkpoint_every"), ({"checkpoint_minutes": 0}, "checkpoint_minutes"),
                     ({"skip_limit": -1}, "skip_limit"), ({"log_every": 0}, "log_every")):
        with pytest.raises(ValueError, match=frag):
            fit(learner, stream, 2, progress=False, **kw)


def test_a_kill_in_the_start_up_window_then_resume_always_works(tmp_path):
    """SIGKILL as soon as config.json appears (before or just after the step-0 checkpoint): `--resume`
    continues either way, from step 0 if no checkpoint was written."""
    out = tmp_path / "r"
    p = popen("train", "--method", "maml", "--steps", 5, "--meta-batch", 2, "--test-tasks", 3, "--val-tasks", 5, "--out", out,
              "--no-progress")
    _wait_for(lambda: (out / "config.json").exists(), p)
    p.kill()
    p.wait()
    r = cli("train", "--resume", out, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert finished_report(out) is not None
