"""DistributedDataParallel meta-training on CPU with two gloo ranks (issue 12): the same parameters as a
single process with the same global meta-batch, exact resume under DDP and across a change in the number
of ranks, only rank 0 writes."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pyro_meta.config import RunConfig
from pyro_meta.methods import build_learner, resolve
from pyro_meta.run import benchmark_of
from pyro_meta.train import fit

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def omniglot_env(omniglot_root, tmp_path, monkeypatch):
    """The generated Omniglot as ``$PYRO_META_DATA`` (read by every rank that :func:`_on_ranks` spawns), its
    cache in ``tmp_path``."""
    monkeypatch.setenv("PYRO_META_DATA", str(omniglot_root))
    monkeypatch.setenv("PYRO_META_CACHE", str(tmp_path / "cache"))
    return omniglot_root


def _cfg(method: str, meta_batch: int = 4) -> RunConfig:
    if method == "versa":  # a small Omniglot protocol: 5-way 1-shot, 1 query per class, 4 tasks; data from
        # $PYRO_META_DATA (the omniglot_env fixture)
        return resolve(RunConfig(benchmark="omniglot", method="versa", ways=5, shots=1, queries=1,
                                 meta_batch=meta_batch, seed=0, steps=10))
    inner = {"inner_steps": 1} if method in ("maml", "abml", "platipus", "bmaml") else {}
    return resolve(RunConfig(benchmark="sinusoid", method=method, shots=5, meta_batch=meta_batch, seed=0, steps=10,
                             **inner))


def _train(method: str, steps: int, out: str | None, dtype: str, resume: bool = False,
           stop_after: int | None = None, micro_batches: int | None = None,
           meta_batch: int = 4) -> dict[str, torch.Tensor]:
    """Build, train and return the parameters, the same way in a single process and on every rank."""
    torch.set_default_dtype(getattr(torch, dtype))
    torch.set_num_threads(1)
    cfg = _cfg(method, meta_batch)
    torch.manual_seed(cfg.seed)
    learner = build_learner(cfg)
    stream = benchmark_of(cfg).train
    if method == "versa":  # Omniglot's images come as float32
        stream = _Cast(stream, torch.get_default_dtype())
    seen: list[int] = []  # tasks per forward call through DDP (a single process calls loss directly)
    learner.register_forward_pre_hook(lambda module, args: seen.append(args[0].num_tasks))
    fit(learner, stream, steps, meta_lr=1e-2, out_dir=out, resume=resume, progress=False, stop_after=stop_after,
        log_every=1, checkpoint_every=2, checkpoint_minutes=None, run_config={"method": method},
        micro_batches=micro_batches)
    return {**{k: v.detach().clone() for k, v in learner.state_dict().items()}, "_seen": torch.tensor(seen)}


class _Cast:
    """A task stream whose batches are cast to ``dtype`` (resumable like the stream it wraps)."""

    def __init__(self, stream, dtype):
        self.stream, self.dtype = stream, dtype

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.stream).to(dtype=self.dtype)

    def state_dict(self):
        return self.stream.state_dict()

    def load_state_dict(self, state):
        self.stream.load_state_dict(state)


def _train_vae(steps: int, **_: object) -> dict[str, torch.Tensor]:
    from pyro_meta.vi.vae import VAE, ImageStream

    torch.manual_seed(0)
    vae = VAE(pixels=16, latent=2, hidden=[8], objective="iwae", k=3)
    probs = torch.rand(40, 16, generator=torch.Generator().manual_seed(0))
    fit(vae, ImageStream(probs, 8, seed=0), steps, meta_lr=1e-2, progress=False)
    return {k: v.detach().clone() for k, v in vae.state_dict().items()}


def _evaluate(method: str, dtype: str, **_: object) -> dict[str, torch.Tensor]:
    """Metrics of a freshly built learner on 11 test tasks (sharded 6 + 5 under DDP)."""
    from pyro_meta.evaluate import evaluate

    torch.set_default_dtype(getattr(torch, dtype))
    cfg = _cfg(method)
    torch.manual_seed(cfg.seed)
    metrics, pred = evaluate(build_learner(cfg), benchmark_of(cfg).test.select(slice(0, 11)), num_samples=4, seed=0)
    return {"mse": torch.tensor(metrics["mse"]["mean"]), "nll": torch.tensor(metrics["nll"]["mean"]),
            "mean": pred.mean}


def _worker(rank: int, world: int, port: int, result_dir: str, calls: list[dict]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for i, kw in enumerate(calls):
            run = _evaluate if kw.pop("kind", None) == "evaluate" else _train_vae if kw["method"] == "vae" else _train
            params = run(**kw)
            torch.save(params, Path(result_dir) / f"call{i}-rank{rank}.pt")
    except BaseException:
        import traceback

        (Path(result_dir) / f"error-rank{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def _on_ranks(tmp_path: Path, world: int, calls: list[dict]) -> list[list[dict[str, torch.Tensor]]]:
    """Run ``calls`` (keyword arguments of :func:`_train`) in order on ``world`` gloo ranks; each call's
    parameters on each rank."""
    res = tmp_path / f"results-{world}"
    res.mkdir()
    try:
        mp.spawn(_worker, args=(world, _free_port(), str(res), calls), nprocs=world, join=True)
    except Exception as e:
        errors = "\n".join(f"--- {p.name}:\n{p.read_text()}" for p in sorted(res.glob("error-rank*.txt")))
        raise AssertionError(f"a rank failed:\n{errors}") from e
    return [[torch.load(res / f"call{i}-rank{r}.pt") for r in range(world)] for i in range(len(calls))]


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if k == "_seen":
            continue
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def test_maml_on_two_ranks_equals_one_process_with_the_global_meta_batch(tmp_path):
    """Second-order MAML, float64, 5 steps: with 4 tasks per step split 2 + 2, and with 5 split unevenly
    3 + 2 (each shard's mean loss weighted by its share of the tasks), the parameters equal a single
    process's on the whole meta-batch within 1e-6 (they agree to float reduction order), and both ranks
    hold the same parameters."""
    even, uneven = _on_ranks(tmp_path, 2, [dict(method="maml", steps=5, out=None, dtype="float64"),
                                           dict(method="maml", steps=5, out=None, dtype="float64", meta_batch=5)])
    for ranks, meta_batch, seen in ((even, 4, ([2] * 5, [2] * 5)), (uneven, 5, ([3] * 5, [2] * 5))):
        single = _train("maml", 5, None, "float64", meta_batch=meta_batch)
        _assert_same(ranks[0], ranks[1], atol=0)
        _assert_same(ranks[0], single, atol=1e-6)
        assert (ranks[0]["_seen"].tolist(), ranks[1]["_seen"].tolist()) == seen  # each rank's share of the tasks
        init = _cfg_params()
        moved = max((single[k] - init[k]).abs().max().item() for k in init)
        assert moved > 1e-3  # the comparison is of trained parameters, not of the initialization


def _cfg_params() -> dict[str, torch.Tensor]:
    torch.set_default_dtype(torch.float64)
    cfg = _cfg("maml")
    torch.manual_seed(cfg.seed)
    return {k: v.detach().clone() for k, v in build_learner(cfg).state_dict().items()}


def test_resume_under_ddp_is_exact_and_only_rank_0_writes(tmp_path):
    """ABML (it samples in training: each rank's noise stream must be restored): 2 ranks stopped after
    3 steps and resumed to 6 equal 2 ranks run 6 steps straight, bit for bit; metrics.jsonl has each step
    once (rank 0 alone writes)."""
    a, b = str(tmp_path / "straight"), str(tmp_path / "resumed")
    calls = [dict(method="abml", steps=6, out=a, dtype="float32"),
             dict(method="abml", steps=6, out=b, dtype="float32", stop_after=3),
             dict(method="abml", steps=6, out=b, dtype="float32", resume=True)]
    straight, _, resumed = _on_ranks(tmp_path, 2, calls)
    _assert_same(resumed[0], straight[0], atol=0)
    _assert_same(resumed[1], straight[1], atol=0)
    steps = [json.loads(line)["step"] for line in Path(b, "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert {p.name for p in Path(b).iterdir()} <= {"checkpoint.pt", "metrics.jsonl", ".lock", ".lock.holder"}


@pytest.mark.slow
def test_a_ddp_checkpoint_resumes_in_one_process(tmp_path):
    """MAML trained 3 steps on 2 ranks, resumed to 5 steps in a single process, equals 5 single-process
    steps (the task stream is global; MAML draws no noise)."""
    out = str(tmp_path / "run")
    _on_ranks(tmp_path, 2, [dict(method="maml", steps=5, out=out, dtype="float64", stop_after=3)])
    resumed = _train("maml", 5, out, "float64", resume=True)
    single = _train("maml", 5, None, "float64")
    _assert_same(resumed, single, atol=1e-6)


def test_an_uneven_split_weights_each_shard_by_its_share_of_the_tasks():
    """5 tasks in 2 shards are 3 + 2 (in 3: 2 + 2 + 1), weighted so the accumulated gradient is the whole
    meta-batch's mean: one process accumulating 2 or 3 uneven shards equals one process on the whole
    batch (MAML draws no noise), float64, 3 steps. Fewer tasks than shards is refused."""
    from pyro_meta.distributed import shard_weights, split

    batch = benchmark_of(_cfg("maml", meta_batch=5)).train.__next__()
    assert [p.num_tasks for p in split(batch, 2)] == [3, 2]
    assert [p.num_tasks for p in split(batch, 3)] == [2, 2, 1]
    assert torch.equal(torch.cat([p.x_support for p in split(batch, 3)]), batch.x_support)  # contiguous, in order
    assert shard_weights(5, 2, 1) == [0.6, 0.4] and shard_weights(4, 2, 2) == [1.0, 1.0]
    whole = _train("maml", 3, None, "float64", meta_batch=5)
    for shards in (2, 3):
        _assert_same(_train("maml", 3, None, "float64", meta_batch=5, micro_batches=shards), whole, atol=1e-10)
    with pytest.raises(ValueError, match="a meta-batch of 5 cannot be cut into 6 shards"):
        split(batch, 6)
    with pytest.raises(ValueError, match="micro_batches must be a positive multiple"):
        fit(build_learner(_cfg("maml")), benchmark_of(_cfg("maml")).train, 1, progress=False, micro_batches=0)


@pytest.mark.parametrize("method", [pytest.param("abml", marks=pytest.mark.slow), "versa"])
def test_a_sampling_method_on_two_ranks_equals_one_process_accumulating_two_shards(tmp_path, method, request):
    """ABML (SGD inner loop on a sampled ELBO) and VERSA (ML-PIP, sampled logits), float64, 4 steps: 2 ranks
    equal one process with the same global meta-batch in 2 micro-batches within 1e-6, because each shard's
    noise is seeded by the shard, not by the rank."""
    if method == "versa":
        request.getfixturevalue("omniglot_env")
    single = _train(method, 4, None, "float64", micro_batches=2)
    (ranks,) = _on_ranks(tmp_path, 2, [dict(method=method, steps=4, out=None, dtype="float64")])
    _assert_same(ranks[0], ranks[1], atol=0)
    _assert_same(ranks[0], single, atol=1e-6)
    plain = _train(method, 4, None, "float64")  # one shard: other noise, so other parameters
    assert max((plain[k] - single[k]).abs().max().item() for k in plain if k != "_seen") > 1e-6


def test_resume_on_another_number_of_ranks_is_exact(tmp_path):
    """ABML: 3 steps on 2 ranks, then 3 more in one process with the same 2 micro-batches, equal 6 steps
    on 2 ranks."""
    out = str(tmp_path / "run")
    straight, _ = _on_ranks(tmp_path, 2, [dict(method="abml", steps=6, out=None, dtype="float64"),
                                          dict(method="abml", steps=6, out=out, dtype="float64", stop_after=3)])
    resumed = _train("abml", 6, out, "float64", resume=True)  # the checkpoint says: 2 shards
    _assert_same(resumed, straight[0], atol=1e-6)


@pytest.mark.slow
def test_every_method_trains_on_two_ranks(tmp_path, omniglot_env):
    """Every method (and the VAE) takes 2 DDP steps on 2 ranks; both ranks end with the same parameters and
    each equals one process accumulating the same 2 shards."""
    methods = ["maml", "abml", "platipus", "amortized", "bmaml", "vae", "versa"]
    calls = [dict(method=m, steps=2, out=None, dtype="float64") for m in methods]
    results = _on_ranks(tmp_path, 2, calls)
    for m, ranks in zip(methods, results):
        _assert_same(ranks[0], ranks[1], atol=0)
        if m != "vae":
            _assert_same(ranks[0], _train(m, 2, None, "float64", micro_batches=2), atol=1e-6)


def test_cli_nproc_launches_two_ranks(tmp_path):
    """``pyro-meta train --nproc 2`` runs under torchrun: one run directory, written once, evaluated; an
    odd meta-batch (5: shards of 3 and 2) trains; a launch whose ranks fail prints one line, with no torch
    elastic block and no banner."""
    import subprocess
    import sys

    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # no banner even when unset
    cmd = [sys.executable, "-m", "pyro_meta", "train", "sinusoid", "--method", "maml", "--meta-batch", "5",
           "--steps", "6", "--test-tasks", "10", "--val-tasks", "5", "--no-progress", "--nproc", "2", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "run directory:" in proc.stdout and "(2 ranks)" in proc.stdout
    assert proc.stdout.count("trained 6 steps") == 1  # rank 0 alone reports
    # quiet: no OMP_NUM_THREADS banner, no launcher warnings; the one line a 6-step run earns is the library's
    # own "worse than knowing nothing" (its NLL against the prior row's)
    assert all("worse than knowing nothing" in line for line in proc.stderr.splitlines()), proc.stderr
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 6
    assert (out / "eval.json").is_file()
    bad = subprocess.run(cmd[:-1] + [str(tmp_path / "one")] + ["--meta-batch", "1"], capture_output=True,
                         text=True, timeout=300, env=env)
    assert bad.returncode != 0
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1, bad.stderr
    assert lines[0].startswith("pyro-meta train: error: a meta-batch of 1 cannot be cut into 2 shards")
    assert lines[0].endswith("(ranks 0, 1)"), lines[0]


def test_evaluation_is_sharded_over_ranks_and_gathered(tmp_path):
    """Each rank predicts its share of the test tasks; every rank gets all of them back in order. MAML's
    predictive draws no noise, so the metrics equal one process's exactly (ABML's within Monte Carlo
    error: rank 1 draws its own noise)."""
    (ranks,) = _on_ranks(tmp_path, 2, [dict(kind="evaluate", method="maml", dtype="float64")])
    single = _evaluate("maml", "float64")
    assert single["mean"].shape[1] == 11
    for got in ranks:
        for k in single:
            torch.testing.assert_close(got[k], single[k], rtol=1e-9, atol=1e-12)


@pytest.mark.slow
def test_torchrun_launches_the_vae_on_two_ranks(tmp_path, omniglot_root):
    """``torchrun -m pyro_meta vi vae``: the minibatch is split over 2 ranks, rank 0 writes the run
    directory and the report once (on the generated Omniglot)."""
    import subprocess
    import sys

    out = tmp_path / "vae"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYRO_META_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "pyro_meta",
           "vi", "vae", "--quick", "--out", str(out), "--data-root", str(omniglot_root), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("# VAE on binarized Omniglot") == 1
    assert json.loads((out / "eval.json").read_text())["steps"] == 30


@pytest.mark.slow
def test_ctrl_c_stops_every_rank_at_one_step_boundary_and_the_run_resumes(tmp_path):
    """SIGINT to the ``--nproc 2`` launcher: the ranks agree to stop, rank 0 writes one checkpoint, the
    launcher exits 130 with the command that continues; the run then resumes on 2 ranks to the end."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pyro_meta", "train", "sinusoid", "--method", "maml", "--meta-batch", "4",
           "--steps", "1000000", "--test-tasks", "10", "--val-tasks", "5", "--no-progress", "--nproc", "2", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").stat().st_size):
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, f"rc {proc.returncode}:\n{err[-3000:]}"
    assert f"--resume {out} --nproc 2" in err, err[-3000:]
    from pyro_meta.rundir import load_checkpoint

    step = load_checkpoint(out / "checkpoint.pt")["step"]
    assert 0 < step < 1_000_000, (step, err[-3000:])
    done = subprocess.run([sys.executable, "-m", "pyro_meta", "train", "--resume", str(out), "--steps", str(step + 20),
                           "--nproc", "2", "--no-progress"], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"trained {step + 20} steps" in done.stdout, (done.stdout[-2000:], done.stderr[-2000:])
