"""Every bad input gets a clear error that says what was expected and what came, and nothing
already on disk is lost."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyro_meta import cli
from pyro_meta.config import ConfigError, RunConfig
from pyro_meta.methods import build_learner, resolve
from pyro_meta.run import benchmark_of, protocol_config, train_run
from pyro_meta.tasks import (
    ProtocolError,
    Sinusoid,
    SinusoidLine,
    TaskBatch,
    TaskBatchError,
    get_benchmark,
)
from pyro_meta.train import CheckpointError, NonFiniteError, fit, load_checkpoint, resolve_device

TINY = {"hidden": [8], "meta_batch": 2, "num_test_tasks": 4, "num_val_tasks": 2, "eval_queries": 10,
        "log_every": 1, "eval_samples": 2}


def tiny_cfg(**kw) -> RunConfig:
    return RunConfig(**{**TINY, "steps": 4, "checkpoint_every": 2, **kw})


def cli_prefix() -> list[str]:
    """The installed console script (checks packaging) when it sits next to this interpreter."""
    script = Path(sys.executable).parent / "pyro-meta"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "pyro_meta.cli"]


def run_subprocess(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MPLBACKEND": "Agg"}
    return subprocess.run(cli_prefix() + [str(a) for a in args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def run_main(capsys, *args) -> tuple[int, str, str]:
    """``pyro-meta ARGS`` in this process: exit code, stdout, stderr. An exception that escapes
    ``main`` (a traceback for a user) fails the test."""
    capsys.readouterr()
    rc = cli.main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def snapshot(d: Path) -> dict[str, bytes | None]:
    """Every file's bytes and every folder (``None``) under ``d``, hidden temporary files included."""
    return {str(p.relative_to(d)): p.read_bytes() if p.is_file() else None for p in sorted(d.rglob("*"))}


def write_tiny_json(path: Path, **extra) -> Path:
    path.write_text(json.dumps({**TINY, **extra}))
    return path


@pytest.fixture(scope="module")
def template_run(tmp_path_factory) -> Path:
    """A 4-step maml run (config.json, checkpoint.pt, metrics.jsonl), trained once per module."""
    out = tmp_path_factory.mktemp("template") / "run"
    train_run(tiny_cfg(), out, progress=False, finalize_run=False)
    return out


@pytest.fixture
def run_dir(template_run, tmp_path) -> Path:
    d = tmp_path / "run"
    shutil.copytree(template_run, d)
    return d


# =============================================================================== TaskBatch
T, S, Q = 2, 5, 7


def _parts() -> dict[str, torch.Tensor]:
    return {"x_support": torch.zeros(T, S, 1), "y_support": torch.zeros(T, S, 1),
            "x_query": torch.zeros(T, Q, 1), "y_query": torch.zeros(T, Q, 1)}


def _with(t: torch.Tensor, index: tuple, value: float) -> torch.Tensor:
    t = t.clone()
    t[index] = value
    return t


BAD_BATCHES = {
    "x_support 2-D": ({"x_support": torch.zeros(T, S)}, ["x_support", "at least 3 dims", "(2, 5)"]),
    "x_support integer": ({"x_support": torch.zeros(T, S, 1, dtype=torch.long)},
                          ["x_support", "floating", "torch.int64"]),
    "x_support not a tensor": ({"x_support": [[[0.0]] * S] * T}, ["x_support", "torch.Tensor", "list"]),
    "x_query T differs": ({"x_query": torch.zeros(3, Q, 1), "y_query": torch.zeros(3, Q, 1)},
                          ["x_query", "T=2", "(3, 7, 1)"]),
    "y_query T differs": ({"y_query": torch.zeros(3, Q, 1)}, ["y_query", "(2, 7)", "(3, 7, 1)"]),
    "y_support T differs": ({"y_support": torch.zeros(3, S, 1)}, ["y_support", "(2, 5)", "(3, 5, 1)"]),
    "y_support S differs": ({"y_support": torch.zeros(T, 4, 1)}, ["y_support", "(2, 5)", "(2, 4, 1)"]),
    "float labels 2-D": ({"y_support": torch.zeros(T, S), "y_query": torch.zeros(T, Q)},
                         ["y_support", "[T, N, outputs]", "(2, 5)"]),
    "float labels 4-D": ({"y_support": torch.zeros(T, S, 1, 1)}, ["y_support", "[T, N, outputs]", "(2, 5, 1, 1)"]),
    "int64 labels 3-D": ({"y_support": torch.zeros(T, S, 1, dtype=torch.long),
                          "y_query": torch.zeros(T, Q, 1, dtype=torch.long)},
                         ["y_support", "[T, N] int64", "(2, 5, 1)"]),
    "int32 labels": ({"y_support": torch.zeros(T, S, dtype=torch.int32),
                      "y_query": torch.zeros(T, Q, dtype=torch.int32)},
                     ["y_support", "int64", "torch.int32"]),
    "y_query dtype differs": ({"y_query": torch.zeros(T, Q, 1, dtype=torch.float64)},
                              ["y_query", "torch.float32", "torch.float64"]),
    "y_query outputs differ": ({"y_query": torch.zeros(T, Q, 2)}, ["y_query", "(1,)", "(2, 7, 2)"]),
    "x_query trailing shape": ({"x_query": torch.zeros(T, Q, 2)}, ["x_query", "(1,)", "(2, 7, 2)"]),
    "x_query 1-D": ({"x_query": torch.zeros(T)}, ["x_query", "at least 3 dims", "(2,)"]),
    "x_query dtype": ({"x_query": torch.zeros(T, Q, 1, dtype=torch.float64)},
                      ["x_query", "torch.float32", "torch.float64"]),
    "NaN in x_support": ({"x_support": _with(torch.zeros(T, S, 1), (0, 1, 0), math.nan)},
                         ["x_support", "1 NaN or inf", "finite"]),
    "inf in y_support": ({"y_support": _with(torch.zeros(T, S, 1), (1, 4, 0), math.inf)},
                         ["y_support", "1 NaN or inf", "finite"]),
    "-inf in x_query": ({"x_query": _with(torch.zeros(T, Q, 1), (1, 0, 0), -math.inf)},
                        ["x_query", "1 NaN or inf", "finite"]),
    "NaN in y_query": ({"y_query": torch.full((T, Q, 1), math.nan)}, ["y_query", "14 NaN or inf", "finite"]),
}


@pytest.mark.parametrize("case", list(BAD_BATCHES))
def test_taskbatch_rejects_bad_tensors(case):
    change, fragments = BAD_BATCHES[case]
    with pytest.raises(TaskBatchError) as ei:
        TaskBatch(**{**_parts(), **change})
    msg = str(ei.value)
    for frag in fragments:
        assert frag in msg, f"{case}: {frag!r} not in {msg!r}"


def test_taskbatch_error_is_a_value_error():
    assert issubclass(TaskBatchError, ValueError)


def test_taskbatch_accepts_good_batches():
    """Controls for the rejections above: regression, classification and unlabeled queries."""
    TaskBatch(**_parts())
    TaskBatch(torch.zeros(T, S, 3, 4), torch.zeros(T, S, dtype=torch.long), torch.zeros(T, Q, 3, 4),
              torch.ones(T, Q, dtype=torch.long))
    b = TaskBatch(**{**_parts(), "y_query": None})
    assert b.y_query is None and b.num_query == Q


def test_taskbatch_rejects_scalar_x_query():
    with pytest.raises(TaskBatchError, match="x_query"):
        TaskBatch(**{**_parts(), "x_query": torch.tensor(1.0)})


def test_taskbatch_info_error_names_what_came():
    with pytest.raises(TaskBatchError) as ei:
        TaskBatch(**_parts(), info={"amplitude": torch.zeros(3)})
    msg = str(ei.value)
    assert "info['amplitude']" in msg and "T=2" in msg
    assert "(3,)" in msg, msg


# =============================================================================== protocol
def test_more_shots_than_the_evaluation_pool():
    with pytest.raises(ProtocolError) as ei:
        Sinusoid().fixed(4, 60, 10, seed=0)
    msg = str(ei.value)
    assert "60 shots" in msg and "50 support points" in msg and "sinusoid" in msg


def test_shots_equal_to_the_pool_is_allowed():
    b = Sinusoid().fixed(2, 50, 5, seed=0)
    assert b.x_support.shape == (2, 50, 1)


@pytest.mark.parametrize("name", ["sinusoid", "sinusoid_line"])
def test_get_benchmark_with_too_many_shots(name):
    with pytest.raises(ProtocolError, match=r"asked for 60 shots.*provides 50 support points"):
        get_benchmark(name, shots=60, num_val_tasks=2, num_test_tasks=2)


@pytest.mark.parametrize("shots,queries,what", [(0, 5, "shots"), (5, 0, "queries"), (2.5, 5, "shots")])
def test_non_positive_shots_or_queries(shots, queries, what):
    with pytest.raises(ProtocolError, match=rf"{what} must be a positive integer, got {queries if what == 'queries' else shots}"):
        SinusoidLine().fixed(2, shots, queries, seed=0)


def test_cli_too_many_shots(tmp_path, capsys):
    out = tmp_path / "x"
    rc, _, err = run_main(capsys, "train", "sinusoid", "--shots", "60", "--steps", "2", "--config",
                          write_tiny_json(tmp_path / "c.json"), "--out", out, "--no-progress")
    assert rc == 2
    assert "60 shots" in err and "50 support points" in err
    assert not out.exists()


# =============================================================================== method / benchmark
@pytest.mark.parametrize("fn", [resolve, build_learner])
def test_unknown_method_in_python(fn):
    with pytest.raises(ConfigError) as ei:
        fn(RunConfig(method="reptile"))
    msg = str(ei.value)
    assert "unknown method 'reptile'" in msg and "abml" in msg and "maml" in msg


@pytest.mark.parametrize("fn", [resolve, build_learner])
def test_unknown_benchmark_in_python(fn):
    with pytest.raises(ConfigError) as ei:
        fn(RunConfig(benchmark="cifar_fs"))
    msg = str(ei.value)
    assert "unknown benchmark 'cifar_fs'" in msg and "sinusoid" in msg and "omniglot" in msg


def test_get_benchmark_unknown_name():
    with pytest.raises(ProtocolError, match="unknown benchmark 'cifar_fs'.*sinusoid"):
        get_benchmark("cifar_fs")


@pytest.mark.parametrize("args,fragments", [
    (["sinusoid", "--method", "reptile"], ["unknown method 'reptile'", "abml", "maml"]),
    (["cifar_fs"], ["unknown benchmark 'cifar_fs'", "sinusoid", "omniglot"]),
])
def test_cli_unknown_method_or_benchmark(tmp_path, args, fragments):
    out = tmp_path / "x"
    r = run_subprocess("train", *args, "--steps", "2", "--out", out, "--no-progress", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert "pyro-meta train: error:" in r.stderr
    for frag in fragments:
        assert frag in r.stderr
    assert not out.exists()
    assert not (tmp_path / "runs").exists()


# =============================================================================== config files
BAD_CONFIGS = {
    "unknown key": ('{"shots": 5, "shotz": 3}', ["unknown key", "shotz", "known keys"]),
    "invalid JSON": ('{"shots": 5,', ["not valid JSON"]),
    "shots a string": ('{"shots": "five"}', ["shots", "positive integer", "'five'"]),
    "negative steps": ('{"steps": -3}', ["steps", "positive integer", "-3"]),
    "zero meta_batch": ('{"meta_batch": 0}', ["meta_batch", "positive integer", "got 0"]),
    "float meta_batch": ('{"meta_batch": 2.5}', ["meta_batch", "2.5"]),
    "bool shots": ('{"shots": true}', ["shots", "True"]),
    "string meta_lr": ('{"meta_lr": "fast"}', ["meta_lr", "positive finite number", "'fast'"]),
    "NaN meta_lr": ('{"meta_lr": NaN}', ["meta_lr", "finite", "nan"]),
    "negative noise_std": ('{"noise_std": -1.0}', ["noise_std", "-1.0"]),
    "bad hidden": ('{"hidden": [8, 0]}', ["hidden", "list of positive integers", "[8, 0]"]),
    "scalar hidden": ('{"hidden": 8}', ["hidden", "got 8"]),
    "string first_order": ('{"first_order": "yes"}', ["first_order", "true or false", "'yes'"]),
    "number method": ('{"method": 3}', ["method", "a string", "3"]),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_config_file_errors_name_the_key(tmp_path, case):
    text, fragments = BAD_CONFIGS[case]
    path = tmp_path / "cfg.json"
    path.write_text(text)
    with pytest.raises(ConfigError) as ei:
        RunConfig.load(path)
    msg = str(ei.value)
    assert str(path) in msg, msg
    for frag in fragments:
        assert frag in msg, f"{case}: {frag!r} not in {msg!r}"


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        RunConfig.load(tmp_path / "nope.json")


@pytest.mark.parametrize("text", ["[1, 2]", "null", '"shots"'])
def test_config_file_that_is_not_an_object(tmp_path, text):
    path = tmp_path / "cfg.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match="expected a JSON object"):
        RunConfig.load(path)


def test_config_file_that_is_not_text(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_bytes(b"\xff\xfe\x00garbage\x81")
    with pytest.raises(ConfigError) as ei:
        RunConfig.load(path)
    assert str(path) in str(ei.value)


@pytest.mark.parametrize("text,fragments", [
    ('{"shots": "five"}', ["shots", "'five'"]),
    ('{"steps": -3}', ["steps", "-3"]),
    ('{"shotz": 3}', ["shotz"]),
    ("{not json", ["not valid JSON"]),
    ('{"prior_init_std": 0.1}', ["prior_init_std", "maml"]),
])
def test_cli_config_file_errors(tmp_path, capsys, text, fragments):
    path = tmp_path / "cfg.json"
    path.write_text(text)
    out = tmp_path / "x"
    rc, _, err = run_main(capsys, "train", "sinusoid", "--config", path, "--out", out, "--no-progress")
    assert rc == 2
    assert err.startswith("pyro-meta train: error:")
    for frag in fragments:
        assert frag in err, err
    assert not out.exists()


@pytest.mark.parametrize("flag,value,key", [("--shots", "0", "shots"), ("--steps", "0", "steps"),
                                            ("--meta-batch", "-2", "meta_batch"),
                                            ("--meta-lr", "-0.1", "meta_lr")])
def test_cli_flag_values_out_of_range(tmp_path, capsys, flag, value, key):
    rc, _, err = run_main(capsys, "train", "sinusoid", flag, value, "--out", tmp_path / "x", "--no-progress")
    assert rc == 2
    assert f"command line: {key} must be" in err and value in err


def test_cli_flag_of_wrong_type_is_an_argparse_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as ei:
        cli.main(["train", "sinusoid", "--shots", "five", "--out", str(tmp_path / "x")])
    assert ei.value.code == 2
    assert "invalid int value: 'five'" in capsys.readouterr().err


# =============================================================================== method settings
@pytest.mark.parametrize("setting,value", [("prior_init_std", 0.1), ("kl_weight_inner", 1.0),
                                           ("inner_samples", 3)])
def test_setting_the_method_does_not_use(setting, value):
    with pytest.raises(ConfigError) as ei:
        resolve(RunConfig(method="maml", **{setting: value}))
    msg = str(ei.value)
    assert f"{setting} is not a setting of method 'maml'" in msg
    assert "inner_lr" in msg  # lists the settings it does have
    # the same setting is accepted by a method that uses it
    assert getattr(resolve(RunConfig(method="abml", **{setting: value})), setting) == value


# =============================================================================== checkpoints
def _garbage(p: Path) -> None:
    p.write_bytes(b"\x00this is not a checkpoint\xff" * 40)


def _truncated(p: Path) -> None:
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _empty(p: Path) -> None:
    p.write_bytes(b"")


def _foreign(p: Path) -> None:
    torch.save({"weights": torch.zeros(3)}, p)


CORRUPTIONS = {
    "missing": (lambda p: p.unlink(), ["no checkpoint at"]),
    "garbage": (_garbage, ["is corrupted or not a checkpoint"]),
    "truncated": (_truncated, ["is damaged", "digest does not match"]),
    "empty": (_empty, ["is corrupted or not a checkpoint"]),
    "foreign": (_foreign, ["is not a pyro_meta checkpoint"]),
}


@pytest.mark.parametrize("command", ["evaluate", "resume"])
@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_missing_or_corrupted_checkpoint(run_dir, capsys, command, corruption):
    damage, fragments = CORRUPTIONS[corruption]
    ckpt = run_dir / "checkpoint.pt"
    damage(ckpt)
    before = snapshot(run_dir)
    args = ["evaluate", run_dir] if command == "evaluate" else ["train", "--resume", run_dir, "--no-progress"]
    rc, out, err = run_main(capsys, *args)
    assert rc == 2
    assert err.startswith(f"pyro-meta {args[0]}: error:")
    assert str(ckpt) in err
    for frag in fragments:
        assert frag in err, err
    assert snapshot(run_dir) == before  # config.json, metrics.jsonl, the damaged checkpoint: untouched
    assert not (run_dir / "eval.json").exists()


@pytest.mark.parametrize("command", ["evaluate", "resume"])
def test_corrupted_checkpoint_through_the_console_script(run_dir, command):
    ckpt = run_dir / "checkpoint.pt"
    _garbage(ckpt)
    before = snapshot(run_dir)
    args = ["evaluate", run_dir] if command == "evaluate" else ["train", "--resume", run_dir, "--no-progress"]
    r = run_subprocess(*args, cwd=run_dir.parent)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert "corrupted or not a checkpoint" in r.stderr and str(ckpt) in r.stderr
    assert snapshot(run_dir) == before


def test_load_checkpoint_error_type(run_dir):
    _garbage(run_dir / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(run_dir / "checkpoint.pt")
    run_dir.joinpath("checkpoint.pt").write_bytes(b"PYRO_META_CHECKPOINT 2 sha256=" + b"0" * 64 + b"\nxyz")
    with pytest.raises(CheckpointError, match="is damaged"):
        load_checkpoint(run_dir / "checkpoint.pt")


def test_evaluate_a_folder_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc, _, err = run_main(capsys, "evaluate", tmp_path / "empty")
    assert rc == 2
    assert "is not a run directory" in err and "config.json" in err
    assert list((tmp_path / "empty").iterdir()) == []


# =============================================================================== resume
@pytest.mark.parametrize("args,field,saved,given", [
    (["--shots", "10"], "shots", "5", "10"),
    (["--method", "abml"], "method", "'maml'", "'abml'"),
    (["--inner-lr", "0.5"], "inner_lr", "0.01", "0.5"),
    (["--seed", "3"], "seed", "0", "3"),
    (["--first-order"], "first_order", "False", "True"),
    (["sinusoid_line"], "benchmark", "'sinusoid'", "'sinusoid_line'"),
])
def test_resume_with_a_different_config(run_dir, capsys, args, field, saved, given):
    before = snapshot(run_dir)
    rc, _, err = run_main(capsys, "train", *args, "--resume", run_dir, "--no-progress")
    assert rc == 2
    assert f"{field}: run has {saved}, given {given}" in err, err
    assert "cannot resume" in err
    assert snapshot(run_dir) == before


def test_resume_with_a_different_config_in_python(run_dir):
    before = snapshot(run_dir)
    with pytest.raises(ConfigError, match="shots: run has 5, given 10"):
        train_run(RunConfig(), run_dir, resume=True, overrides={"shots": 10}, progress=False)
    assert snapshot(run_dir) == before


def test_resume_with_config_file_is_refused(run_dir, capsys, tmp_path):
    before = snapshot(run_dir)
    rc, _, err = run_main(capsys, "train", "--resume", run_dir, "--config", write_tiny_json(tmp_path / "c.json"),
                          "--no-progress")
    assert rc == 2 and "do not pass --config" in err
    assert snapshot(run_dir) == before


def test_resume_with_more_steps_is_allowed(run_dir, capsys):
    # --shots 5 equals the run's value, so it is not a difference
    rc, out, err = run_main(capsys, "train", "--resume", run_dir, "--steps", "6", "--shots", "5", "--no-progress")
    assert rc == 0, err
    assert "trained 6 steps" in out
    assert load_checkpoint(run_dir / "checkpoint.pt")["step"] == 6
    assert json.loads((run_dir / "config.json").read_text())["steps"] == 6
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert json.loads((run_dir / "eval.json").read_text())["step"] == 6


def test_resume_with_fewer_steps_than_done(run_dir, capsys):
    before = snapshot(run_dir)
    rc, _, err = run_main(capsys, "train", "--resume", run_dir, "--steps", "2", "--no-progress")
    assert rc == 2, "a 4-step run resumed with --steps 2 should be refused"
    assert "4" in err and "steps" in err
    assert snapshot(run_dir) == before


def test_train_into_an_existing_run_without_resume(run_dir, capsys, tmp_path):
    before = snapshot(run_dir)
    rc, _, err = run_main(capsys, "train", "sinusoid", "--steps", "3", "--config",
                          write_tiny_json(tmp_path / "c.json"), "--out", run_dir, "--no-progress")
    assert rc == 2
    assert "already holds a run" in err and "--resume" in err and "nothing was overwritten" in err
    assert snapshot(run_dir) == before
    with pytest.raises(ConfigError, match="already holds a run"):
        train_run(tiny_cfg(), run_dir, progress=False)
    assert snapshot(run_dir) == before


# =============================================================================== device
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda(tmp_path, capsys, run_dir):
    with pytest.raises(ValueError, match="device 'cuda' was asked for, but torch sees no CUDA device"):
        resolve_device("cuda")
    out = tmp_path / "x"
    with pytest.raises(ValueError, match="no CUDA device"):
        train_run(tiny_cfg(device="cuda"), out, progress=False)
    assert not out.exists()
    rc, _, err = run_main(capsys, "train", "sinusoid", "--device", "cuda:0", "--config",
                          write_tiny_json(tmp_path / "c.json"), "--out", out, "--no-progress")
    assert rc == 2 and "'cuda:0'" in err and "no CUDA device" in err
    assert not out.exists()
    before = snapshot(run_dir)
    rc, _, err = run_main(capsys, "evaluate", run_dir, "--device", "cuda")
    assert rc == 2 and "no CUDA device" in err
    rc, _, err = run_main(capsys, "train", "--resume", run_dir, "--device", "cuda", "--no-progress")
    assert rc == 2 and "no CUDA device" in err
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("name", ["tpu", "gpu", "mps", ""])
def test_unknown_device_names(name):
    with pytest.raises(ValueError, match=r"device must be 'cpu', 'cuda' or 'cuda:N', got "):
        resolve_device(name)


# =============================================================================== non-finite loss
def _nan_loss_on_call(learner, bad_calls: set[int]):
    """Make ``learner.loss`` return NaN (with NaN gradients) on the given 1-based calls."""
    original = learner.loss
    calls = {"n": 0}

    def loss(batch):
        calls["n"] += 1
        value = original(batch)
        return value * math.nan if calls["n"] in bad_calls else value

    learner.loss = loss
    return learner


def _params_finite(state: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


@pytest.mark.filterwarnings("ignore:Encountered NaN:UserWarning")  # Pyro warns; we test the trainer
@pytest.mark.parametrize("method", ["maml", "abml"])
def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path, method):
    cfg = resolve(tiny_cfg(method=method, steps=6, checkpoint_every=1))
    learner = _nan_loss_on_call(build_learner(cfg), {3})
    torch.manual_seed(0)  # abml draws from the global RNG in its inner loop
    with pytest.raises(NonFiniteError) as ei:
        fit(learner, benchmark_of(cfg).train, 6, out_dir=tmp_path, run_config=protocol_config(cfg),
            checkpoint_every=1, log_every=1, progress=False)
    msg = str(ei.value)
    assert msg.startswith("step 3:") and "non-finite loss (nan)" in msg and "--skip-nonfinite" in msg
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["step"] == 2
    assert _params_finite(ckpt["learner"])
    # the checkpoint is exactly what two clean steps give
    clean = build_learner(cfg)
    torch.manual_seed(0)
    fit(clean, benchmark_of(cfg).train, 2, progress=False)
    for k, v in clean.state_dict().items():
        assert torch.equal(ckpt["learner"][k], v), k
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


@pytest.mark.filterwarnings("ignore:Encountered NaN:UserWarning")  # Pyro warns; we test the trainer
def test_non_finite_loss_can_be_skipped(tmp_path):
    cfg = resolve(tiny_cfg(steps=6, checkpoint_every=1))
    learner = _nan_loss_on_call(build_learner(cfg), {3, 5})
    result = fit(learner, benchmark_of(cfg).train, 6, out_dir=tmp_path, run_config=protocol_config(cfg),
                 checkpoint_every=1, log_every=1, skip_nonfinite=True, progress=False)
    assert result.step == 6 and result.skipped == 2
    assert _params_finite(learner.state_dict())
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["step"] == 6 and ckpt["skipped"] == 2
    assert _params_finite(ckpt["learner"])
    assert [r["skipped"] for r in result.history] == [0, 0, 1, 1, 2, 2]


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


@pytest.mark.filterwarnings("ignore:Encountered NaN:UserWarning")
def test_metrics_log_stays_strict_json_after_a_skipped_step(tmp_path):
    cfg = resolve(tiny_cfg(steps=4))
    learner = _nan_loss_on_call(build_learner(cfg), {2})
    fit(learner, benchmark_of(cfg).train, 4, out_dir=tmp_path, log_every=1, skip_nonfinite=True, progress=False)
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=_reject_constant)


@pytest.mark.filterwarnings("ignore:Encountered NaN:UserWarning")  # Pyro warns; we test the trainer
def test_non_finite_loss_through_the_cli(tmp_path, capsys, monkeypatch):
    import pyro_meta.run as run_module

    real = run_module.build_learner
    monkeypatch.setattr(run_module, "build_learner", lambda cfg: _nan_loss_on_call(real(cfg), {3}))
    out = tmp_path / "x"
    rc, _, err = run_main(capsys, "train", "sinusoid", "--steps", "5", "--config",
                          write_tiny_json(tmp_path / "c.json", checkpoint_every=1), "--out", out, "--no-progress")
    assert rc == 2
    assert "step 3:" in err and "non-finite" in err
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 2


@pytest.mark.filterwarnings("ignore:Encountered NaN:UserWarning")  # Pyro warns; we test the trainer
def test_advice_after_a_failure_before_the_first_checkpoint_can_be_followed(tmp_path, capsys, monkeypatch):
    import pyro_meta.run as run_module

    real = run_module.build_learner
    monkeypatch.setattr(run_module, "build_learner", lambda cfg: _nan_loss_on_call(real(cfg), {3}))
    out = tmp_path / "x"
    cfg_file = write_tiny_json(tmp_path / "c.json", checkpoint_every=1000)
    rc, _, err = run_main(capsys, "train", "sinusoid", "--steps", "5", "--config", cfg_file, "--out", out,
                          "--no-progress")
    assert rc == 2 and "step 3:" in err
    monkeypatch.undo()
    rc1, _, err1 = run_main(capsys, "train", "sinusoid", "--steps", "5", "--config", cfg_file, "--out", out,
                            "--no-progress")
    if rc1 == 0:
        return  # starting over in the same folder works: fine
    rc2, _, err2 = run_main(capsys, "train", "--resume", out, "--no-progress")
    assert not ("--resume" in err1 and rc2 != 0), f"advice: {err1!r}; following it: {err2!r}"


def test_precision_settings_are_checked(tmp_path):
    """bf16 is for the conv4 trunk (an MLP benchmark refuses it), tf32 for CUDA (a CPU run refuses it
    before its folder is touched), anything else is not a precision."""
    from pyro_meta.config import ConfigError, RunConfig
    from pyro_meta.methods import build_learner
    from pyro_meta.run import train_run

    with pytest.raises(ConfigError, match="conv4 trunk"):
        build_learner(RunConfig(benchmark="sinusoid", method="maml", precision="bf16"))
    with pytest.raises(ConfigError, match="CUDA setting"):
        train_run(RunConfig(benchmark="sinusoid", method="maml", precision="tf32", steps=1), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="precision"):
        RunConfig(precision="fp16").check()
