"""Your own task family: a seeded function becomes a resumable stream and fixed evaluation sets for
fit, evaluate, run_many and the CLI; learning-rate schedules; what fit accepts as a task source."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from pyro_meta import TaskBatch, get_benchmark
from pyro_meta.config import ConfigError, RunConfig
from pyro_meta.methods import build_learner, resolve
from pyro_meta.run import train_run
from pyro_meta.schedule import ScheduleError, lr_factor, normalize_schedule
from pyro_meta.tasks import ProtocolError, TaskFamily, register_benchmark, unregister_benchmark
from pyro_meta.train import CheckpointError, TaskSourceExhausted, fit, load_checkpoint

TASKS_MODULE = '''
import torch
from pyro_meta import TaskBatch


def make_tasks(num_tasks, shots, queries, generator):
    """Cubic tasks: y = a x^3 + b x + N(0, 0.1^2), a ~ U[-0.5, 0.5], b ~ U[-1, 1], x ~ U[-2, 2]."""
    a = torch.rand(num_tasks, 1, 1, generator=generator) - 0.5  # T 1 1
    b = 2 * torch.rand(num_tasks, 1, 1, generator=generator) - 1
    x = 4 * torch.rand(num_tasks, shots + queries, 1, generator=generator) - 2  # T N 1
    y = a * x**3 + b * x + 0.1 * torch.randn(x.shape, generator=generator)
    return TaskBatch(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:], {"a": a[:, 0, 0], "b": b[:, 0, 0]})
'''


def make_tasks(num_tasks, shots, queries, generator):
    a = torch.rand(num_tasks, 1, 1, generator=generator) - 0.5
    x = 4 * torch.rand(num_tasks, shots + queries, 1, generator=generator) - 2
    y = a * x**3 + 0.1 * torch.randn(x.shape, generator=generator)
    return TaskBatch(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:], {"a": a[:, 0, 0]})


@pytest.fixture
def cubic():
    register_benchmark("cubic_test", make_tasks, replace=True)
    yield "cubic_test"
    unregister_benchmark("cubic_test")


def test_registered_family_gives_stream_and_fixed_sets(cubic):
    bm = get_benchmark(cubic, shots=5, queries=7, meta_batch=3, eval_queries=11, num_val_tasks=4, num_test_tasks=6)
    b = next(bm.train)
    assert (b.num_tasks, b.num_support, b.num_query) == (3, 5, 7)
    assert (bm.test.num_tasks, bm.test.num_query, bm.val.num_tasks) == (6, 11, 4)
    again = get_benchmark(cubic, shots=5, queries=7, meta_batch=3, eval_queries=11, num_val_tasks=4, num_test_tasks=6)
    assert torch.equal(bm.test.y_query, again.test.y_query)  # fixed, seeded
    assert not torch.equal(bm.test.y_query[:4], bm.val.y_query)  # val and test differ
    assert bm.protocol["family"]["kind"] == "regression"
    assert not bm.is_classification


def test_family_that_uses_the_global_rng_is_refused():
    def bad(num_tasks, shots, queries, generator):
        x = torch.rand(num_tasks, shots + queries, 1)  # not from the generator
        return TaskBatch(x[:, :shots], x[:, :shots], x[:, shots:], x[:, shots:])

    with pytest.raises(ProtocolError, match="draw every random number from the generator"):
        TaskFamily(bad, name="bad")


def test_family_that_ignores_its_generator_is_refused():
    def fixed(num_tasks, shots, queries, generator):
        x = torch.linspace(0, 1, num_tasks * (shots + queries)).reshape(num_tasks, -1, 1)
        return TaskBatch(x[:, :shots], x[:, :shots], x[:, shots:], x[:, shots:])

    with pytest.raises(ProtocolError, match="ignores its generator"):
        TaskFamily(fixed, name="fixed")


def test_family_that_returns_the_wrong_thing():
    with pytest.raises(TypeError, match="must return a pyro_meta.TaskBatch"):
        TaskFamily(lambda n, s, q, g: torch.rand(n, generator=g), name="bad")


def test_builtin_names_cannot_be_taken():
    with pytest.raises(ValueError, match="built-in"):
        register_benchmark("sinusoid", make_tasks)


def test_import_path_errors_are_clear():
    with pytest.raises(ProtocolError, match="cannot import module 'no_such_module_xyz'"):
        get_benchmark("no_such_module_xyz:make")
    with pytest.raises(ProtocolError, match="has no attribute 'nope'"):
        get_benchmark("math:nope")


def _run(cfg: RunConfig, out, **kw):
    return train_run(cfg, out, progress=False, **kw)


def test_resume_with_a_family_and_a_schedule_equals_an_uninterrupted_run(cubic, tmp_path):
    cfg = RunConfig(benchmark=cubic, method="maml", steps=12, meta_batch=4, num_test_tasks=5, num_val_tasks=2,
                    checkpoint_every=5, log_every=1,
                    lr_schedule={"name": "cosine", "warmup_steps": 3, "min_factor": 0.1})
    _, full = _run(cfg, tmp_path / "full")
    _run(cfg, tmp_path / "cut", stop_after=5)
    _run(RunConfig(), tmp_path / "cut", resume=True)
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")["learner"]
    b = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["learner"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows]
    expect = [1e-3 * lr_factor(normalize_schedule(cfg.lr_schedule, 12), k) for k in range(12)]
    assert lrs == pytest.approx(expect, rel=1e-12)
    assert lrs[0] < lrs[2] and lrs[-1] < lrs[3]  # warm-up, then decay


def test_changing_the_meta_lr_on_resume_is_applied_and_recorded(cubic, tmp_path):
    cfg = RunConfig(benchmark=cubic, method="maml", steps=6, meta_batch=4, num_test_tasks=5, num_val_tasks=2,
                    log_every=1)
    _run(cfg, tmp_path / "r", stop_after=3)
    _run(RunConfig(), tmp_path / "r", resume=True, overrides={"meta_lr": 5e-4})
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    events = [r for r in rows if r.get("event") == "lr_change"]
    assert len(events) == 1 and events[0]["step"] == 3
    assert events[0]["meta_lr"] == {"from": 1e-3, "to": 5e-4}
    assert [r["lr"] for r in rows if "lr" in r] == [1e-3] * 3 + [5e-4] * 3
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["meta_lr"] == 5e-4


def test_changing_the_schedule_on_resume_through_the_cli(cubic, tmp_path, capsys):
    from pyro_meta.cli import main

    # a registered name does not exist in a new process, but main() runs in this one
    out = tmp_path / "r"
    assert main(["train", cubic, "--method", "maml", "--steps", "4", "--meta-batch", "3", "--test-tasks", "4", "--val-tasks", "5",
                 "--out", str(out), "--no-progress"]) == 0
    assert main(["train", "--resume", str(out), "--steps", "8", "--lr-schedule", "exponential",
                 "--lr-gamma", "0.5", "--lr-every", "2", "--no-progress"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["lr_schedule"] == {"name": "exponential", "warmup_steps": 0, "gamma": 0.5, "every": 2}
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert any('"lr_change"' in line for line in lines)


@pytest.mark.parametrize("spec, fragment", [
    ({"name": "linear"}, "must be one of"),
    ({"name": "exponential"}, "needs gamma"),
    ({"name": "exponential", "gamma": 1.5}, "gamma must be"),
    ({"name": "cosine", "gamma": 0.5}, "not ['gamma']"),
    ({"name": "cosine", "total_steps": 10, "warmup_steps": 10}, "must exceed"),
    ({"name": "constant", "warmup_steps": -1}, "warmup_steps must be"),
])
def test_bad_schedules_are_clear_errors(spec, fragment):
    with pytest.raises(ScheduleError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        normalize_schedule(spec, steps=100)
    with pytest.raises(ConfigError):
        resolve(RunConfig(steps=100, lr_schedule=spec))


def test_cosine_takes_its_length_from_the_methods_default_steps():
    """A cosine schedule without total_steps on a run whose steps come from the method's defaults (the GP's
    3,000): resolve fills both in (the CLI once refused it: its check ran before the defaults)."""
    cfg = resolve(RunConfig(benchmark="sinusoid_line", method="gp", lr_schedule="cosine"))
    assert cfg.steps == 3000 and cfg.lr_schedule["total_steps"] == 3000


def test_schedule_factors():
    exp = normalize_schedule({"name": "exponential", "gamma": 0.98, "every": 10})
    assert [lr_factor(exp, k) for k in (0, 9, 10, 25)] == pytest.approx([1, 1, 0.98, 0.98**2])
    cos = normalize_schedule({"name": "cosine", "warmup_steps": 4}, steps=14)
    assert [lr_factor(cos, k) for k in (0, 3, 4, 9, 14, 100)] == pytest.approx([0.25, 1, 1, 0.5, 0, 0])


def test_fit_accepts_a_list_and_resumes_it(tmp_path):
    bm = get_benchmark("sinusoid", shots=5, meta_batch=4, num_test_tasks=3, num_val_tasks=1)
    batches = [next(bm.train) for _ in range(3)]
    cfg = resolve(RunConfig(method="maml", steps=7))
    a, b = build_learner(cfg), build_learner(cfg)
    fit(a, batches, steps=7, progress=False, out_dir=tmp_path / "a")
    fit(b, batches, steps=7, progress=False, out_dir=tmp_path / "b", stop_after=4)
    fit(b, batches, steps=7, progress=False, out_dir=tmp_path / "b", resume=True)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_a_generator_trains_but_cannot_be_resumed(tmp_path):
    bm = get_benchmark("sinusoid", shots=5, meta_batch=4, num_test_tasks=3, num_val_tasks=1)
    learner = build_learner(resolve(RunConfig(method="maml", steps=3)))
    fit(learner, (next(bm.train) for _ in range(3)), steps=3, progress=False, out_dir=tmp_path)
    with pytest.raises(CheckpointError, match="cannot resume from a generator"):
        fit(learner, (next(bm.train) for _ in range(3)), steps=5, progress=False, out_dir=tmp_path, resume=True)


def test_an_exhausted_iterator_is_a_clear_error():
    bm = get_benchmark("sinusoid", shots=5, meta_batch=4, num_test_tasks=3, num_val_tasks=1)
    learner = build_learner(resolve(RunConfig(method="maml", steps=5)))
    with pytest.raises(TaskSourceExhausted, match="ran out after 2 meta-batches"):
        fit(learner, iter([next(bm.train), next(bm.train)]), steps=5, progress=False)


def test_built_in_methods_refuse_classification_families():
    def classes(num_tasks, shots, queries, generator):
        x = torch.rand(num_tasks, shots + queries, 3, generator=generator)
        y = (x[..., 0] > 0.5).long()
        return TaskBatch(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:])

    register_benchmark("cls_test", classes, replace=True)
    try:
        with pytest.raises(ConfigError, match="classification tasks"):
            resolve(RunConfig(benchmark="cls_test", method="maml"))
    finally:
        unregister_benchmark("cls_test")


@pytest.fixture
def tasks_module(tmp_path):
    (tmp_path / "mytasks.py").write_text(textwrap.dedent(TASKS_MODULE))
    return tmp_path


def test_cli_trains_evaluates_and_inspects_an_import_path(tasks_module):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    cmd = [sys.executable, "-m", "pyro_meta.cli"]
    script = os.path.join(os.path.dirname(sys.executable), "pyro-meta")  # the console script: cwd not on sys.path
    r = subprocess.run([script, "train", "mytasks:make_tasks", "--method", "abml", "--steps", "30", "--meta-batch",
                              "5", "--test-tasks", "20", "--val-tasks", "10", "--out", "run", "--no-progress"],
                       cwd=tasks_module, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    ev = json.loads((tasks_module / "run" / "eval.json").read_text())
    assert ev["benchmark"] == "mytasks:make_tasks" and ev["metrics"]["mse"]["n"] == 20
    assert (tasks_module / "run" / "plots" / "predictive.png").exists()
    r = subprocess.run(cmd + ["evaluate", "run"], cwd=tasks_module, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads((tasks_module / "run" / "eval.json").read_text())["metrics"] == ev["metrics"]
    r = subprocess.run(cmd + ["inspect", "run"], cwd=tasks_module, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "held-out log predictive density" in r.stdout and "PSIS-LOO over the" in r.stdout


def test_run_many_with_an_import_path(tasks_module, monkeypatch):
    from pyro_meta.run import run_many

    monkeypatch.chdir(tasks_module)
    jobs = {"maml": {"benchmark": "mytasks:make_tasks", "method": "maml", "steps": 5, "meta_batch": 3,
                     "num_test_tasks": 4, "num_val_tasks": 2}}
    res = run_many(jobs, tasks_module / "many", workers=1)
    assert "error" not in res["maml"], res
    assert res["maml"]["metrics"]["mse"]["n"] == 4


def test_a_regression_family_subclass_with_its_own_inputs(tmp_path):
    from dataclasses import dataclass

    from pyro_meta.tasks import RegressionFamily

    @dataclass(frozen=True)
    class Slopes(RegressionFamily):
        """y = s x, s ~ U[-2, 2]; inputs clustered near the ends of [-5, 5]."""

        def draw_params(self, n, g):
            return {"slope": 4 * torch.rand(n, generator=g) - 2}

        def function(self, params, x):
            return params["slope"][:, None, None] * x

        def draw_x(self, n, m, g):
            side = torch.where(torch.rand(n, m, 1, generator=g) < 0.5, -1.0, 1.0)
            return side * (4 + torch.rand(n, m, 1, generator=g))  # |x| in [4, 5]

    register_benchmark("slopes_test", Slopes(), replace=True)
    try:
        bm = get_benchmark("slopes_test", shots=3, meta_batch=2, num_test_tasks=3, num_val_tasks=1)
        assert (next(bm.train).x_support.abs() >= 4).all()
        out, _ = train_run(RunConfig(benchmark="slopes_test", method="maml", steps=3, meta_batch=2,
                                     num_test_tasks=3, num_val_tasks=1), tmp_path / "r", progress=False)
        assert (out / "plots" / "predictive.png").exists()
    finally:
        unregister_benchmark("slopes_test")
