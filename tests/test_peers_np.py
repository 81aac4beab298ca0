"""The function-space peers of issue 27: conditional neural process (``cnp``) and attentive neural process
(``anp``), as Pyro programs trained by ``fit`` and scored by ``evaluate``.

Known answers: a hand-set decoder's loss is the Gaussian log density exactly; on tasks ``y = c + noise``
with ``c ~ N(0, 1)`` the trained CNP's test NLL approaches the exact posterior predictive's.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pyro
import pytest
import torch
from conftest import assert_close
from resume_check import assert_resumes_bitwise
from torch.nn import functional as F

from pyro_meta import TaskBatch
from pyro_meta.config import RunConfig
from pyro_meta.evaluate import evaluate, predict
from pyro_meta.methods import METHODS, build_learner, protocol_of, resolve
from pyro_meta.models.cnp import MIN_STD
from pyro_meta.run import benchmark_of
from pyro_meta.tasks import register_benchmark, unregister_benchmark
from pyro_meta.train import fit

ROOT = Path(__file__).resolve().parents[1]
# every peer configuration: (method, extra settings)
PEERS = [("cnp", {}), ("anp", {}), ("anp", {"objective": "elbo"})]
PEER_IDS = ["cnp", "anp", "anp-latent"]
NOISE = 0.5  # the constant family's observation noise


def constant_tasks(num_tasks: int, shots: int, queries: int, generator: torch.Generator) -> TaskBatch:
    """``y = c + N(0, 0.5^2)``, ``c ~ N(0, 1)`` per task; inputs ``x ~ U[-1, 1]^2`` carry no information
    (two features: the peers read a custom family's input width)."""
    c = torch.randn(num_tasks, 1, 1, generator=generator)  # T 1 1
    x = 2 * torch.rand(num_tasks, shots + queries, 2, generator=generator) - 1  # T N 2
    y = c + NOISE * torch.randn(num_tasks, shots + queries, 1, generator=generator)  # T N 1
    return TaskBatch(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:], {"c": c[:, 0, 0]})


@pytest.fixture
def constant():
    register_benchmark("np_constant_test", constant_tasks, replace=True)
    yield "np_constant_test"
    unregister_benchmark("np_constant_test")


def tiny(method: str, benchmark: str = "sinusoid_line", **kw) -> RunConfig:
    small = {"hidden": [16], "encoder_hidden": [16, 16],  # 16: a multiple of the ANP's 8 heads
             "meta_batch": 3, "num_test_tasks": 6, "num_val_tasks": 2, "eval_queries": 7}
    return RunConfig(benchmark=benchmark, method=method, **{**small, **kw})


def exact_predictive_nll(shots: int) -> float:
    """Expected test NLL of the exact predictive of the constant family: ``c | support ~ N(m, v)`` with
    ``v = 1 / (1 + shots / noise^2)``, so ``y* ~ N(m, v + noise^2)``: ``0.5 log(2 pi (v + noise^2)) + 0.5``."""
    var = 1.0 / (1.0 + shots / NOISE**2) + NOISE**2
    return 0.5 * math.log(2 * math.pi * var) + 0.5


def test_registered_and_listed(capsys):
    from pyro_meta import cli

    assert {"cnp", "anp"} <= set(METHODS)
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "cnp" in out and "anp" in out and "conditional neural process" in out


@pytest.mark.parametrize("family", ["sinusoid", "sinusoid_line", "sinusoid_bmaml"])
@pytest.mark.parametrize("method", ["cnp", "anp"])
def test_defaults_are_the_peer_figures(method, family):
    """Adam 5e-4, 25 tasks, 4 x 128 decoder: the method's own values win over the benchmarks' (1e-3, 40s)."""
    cfg = resolve(RunConfig(benchmark=family, method=method))
    assert (cfg.meta_lr, cfg.meta_batch, cfg.hidden) == (5e-4, 25, [128] * 4)
    assert cfg.encoder_hidden == ([128] * 4 if method == "cnp" else [128] * 3)
    assert cfg.eval_samples == 1
    # a setting given on the command line still wins, and the other regression methods keep 1e-3
    assert resolve(RunConfig(benchmark=family, method=method, meta_lr=1e-3)).meta_lr == 1e-3
    assert resolve(RunConfig(benchmark=family, method="maml")).meta_lr == 1e-3
    proto = protocol_of(RunConfig(benchmark=family, method=method))
    assert proto["network"]["type"] == method and proto["outer_scored_sets"] == "query"
    assert "query set only" in proto["training_targets"]


def test_noise_std_is_not_a_setting():
    from pyro_meta.config import ConfigError

    with pytest.raises(ConfigError, match="noise_std is not a setting"):
        resolve(RunConfig(method="cnp", noise_std=0.3))


@pytest.mark.parametrize("method", ["cnp", "anp"])
def test_hand_set_decoder_gives_the_gaussian_density_exactly(method):
    """Decoder zeroed but for the last bias: mu = 0.7, sigma = 0.01 + softplus(raw) = 0.4 at every point, so
    the loss is the mean over tasks of -sum_q log N(y_q | 0.7, 0.4^2), float64; evaluate's NLL per point too."""
    learner = build_learner(tiny(method, steps=1)).double()
    b = benchmark_of(resolve(tiny(method, steps=1))).test
    batch = TaskBatch(*(t.double() for t in (b.x_support, b.y_support, b.x_query, b.y_query)))
    last = learner.model.decoder.net[-1]
    with torch.no_grad():
        for p in learner.model.decoder.parameters():
            p.zero_()
        last.bias.copy_(torch.tensor([0.7, math.log(math.expm1(0.4 - MIN_STD))], dtype=torch.float64))
    expected = -torch.distributions.Normal(torch.tensor(0.7, dtype=torch.float64), torch.tensor(0.4, dtype=torch.float64)).log_prob(batch.y_query).sum((1, 2))  # T
    loss = learner.loss(batch)
    assert loss.dtype == torch.float64
    assert_close(loss, expected.mean(), atol=1e-12, rtol=1e-12)
    metrics, _ = evaluate(learner, batch, num_samples=1)
    assert_close(metrics["nll"]["mean"], expected.mean() / batch.num_query, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize(("method", "extra"), PEERS, ids=PEER_IDS)
def test_shapes_under_a_samples_plate(method, extra):
    """The evaluator's samples plate at dim -3 broadcasts over the predictive: means [S, T, Q, O]; the latent
    path draws one z per sample and task ([S, T, Z]), so its draws' means differ by sample."""
    cfg = resolve(tiny(method, **extra))
    learner = build_learner(cfg)
    test = benchmark_of(cfg).test
    pred = predict(learner, test, num_samples=4)
    t, q = test.num_tasks, test.num_query
    assert pred.mean.shape == pred.stddev.shape == (4, t, q, 1)
    assert pred.log_lik.shape == (4, t, q) and pred.gaussian
    assert (pred.stddev >= MIN_STD).all()
    if extra.get("objective") == "elbo":
        assert pred.latents["z"].shape == (4, t, 128) and pred.per_task == ("z",)
        assert not torch.equal(pred.mean[0], pred.mean[1])
    else:
        assert pred.latents == {} and torch.equal(pred.mean[0], pred.mean[3])


@pytest.mark.parametrize(("method", "extra"), PEERS, ids=PEER_IDS)
def test_float64_and_gradients_reach_every_parameter(method, extra):
    cfg = resolve(tiny(method, **extra))
    learner = build_learner(cfg).double()
    b = benchmark_of(cfg).test
    batch = TaskBatch(*(t.double() for t in (b.x_support, b.y_support, b.x_query, b.y_query)))
    loss = learner.loss(batch)
    loss.backward()
    assert loss.dtype == torch.float64 and torch.isfinite(loss)
    missing = [n for n, p in learner.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


@pytest.mark.parametrize(("method", "extra"), PEERS, ids=PEER_IDS)
def test_the_predictive_never_reads_the_query_labels(method, extra):
    """The query labels change the training loss, never the predictive (a blind run, as the evaluator's)."""
    cfg = resolve(tiny(method, **extra))
    learner = build_learner(cfg)
    test = benchmark_of(cfg).test
    other = TaskBatch(test.x_support, test.y_support, test.x_query, test.y_query + 1.0)
    a, b = predict(learner, test, num_samples=3, seed=1), predict(learner, other, num_samples=3, seed=1)
    assert torch.equal(a.mean, b.mean) and torch.equal(a.stddev, b.stddev)


@pytest.mark.parametrize(("method", "extra"), PEERS, ids=PEER_IDS)
def test_evaluate_returns_finite_metrics(method, extra):
    cfg = resolve(tiny(method, **extra))
    learner = build_learner(cfg)
    metrics, _ = evaluate(learner, benchmark_of(cfg).test, num_samples=cfg.eval_samples)
    for key in ("mse", "nll", "coverage50", "coverage90"):
        assert key in metrics and math.isfinite(metrics[key]["mean"]), key


@pytest.mark.parametrize(("method", "steps"), [("cnp", 1200), ("anp", 500)], ids=["cnp", "anp"])
def test_learns_the_exact_predictive_of_a_gaussian_family(constant, method, steps):
    """Tasks y = c + N(0, 0.5^2), c ~ N(0, 1), 5 shots, on a custom family with 2 input features: after
    training, the test NLL is within 0.06 of the exact posterior predictive's (0.813) and the zero
    predictor's MSE is beaten by the amount the posterior mean predicts."""
    cfg = resolve(tiny(method, constant, steps=steps, meta_batch=25, queries=20, meta_lr=3e-3, num_test_tasks=200,
                       eval_queries=20, hidden=[32], encoder_hidden=[32, 32]))
    learner = build_learner(cfg)
    bm = benchmark_of(cfg)
    fit(learner, bm.train, cfg.steps, meta_lr=cfg.meta_lr, progress=False, log_every=10_000)
    metrics, _ = evaluate(learner, bm.test, num_samples=1)
    exact = exact_predictive_nll(cfg.shots)
    assert abs(metrics["nll"]["mean"] - exact) < 0.06, (metrics["nll"], exact)
    # exact predictive MSE: v + noise^2 = 0.298; the noise alone is 0.25
    assert metrics["mse"]["mean"] < 0.33
    assert 0.85 < metrics["coverage90"]["mean"] < 0.95


STEPS = 8


@pytest.mark.parametrize(("method", "extra"), PEERS, ids=PEER_IDS)
def test_resume_equals_uninterrupted(tmp_path, method, extra):
    """Stopped after 3 steps (a checkpoint at step 4 lies between) and resumed: bit for bit the
    uninterrupted run's parameters, optimizer state, RNG and loss curve."""
    cfg = tiny(method, steps=STEPS, log_every=1, checkpoint_every=4, **extra)
    assert_resumes_bitwise(cfg, tmp_path, STEPS)


def test_cli_trains_and_evaluates(tmp_path):
    """``pyro-meta train sinusoid_line --method cnp`` for a few steps: eval.json with finite metrics."""
    from pyro_meta import cli

    out = tmp_path / "run"
    pyro.clear_param_store()
    rc = cli.main(["train", "sinusoid_line", "--method", "cnp", "--steps", "3", "--meta-batch", "2",
                   "--hidden", "8", "--encoder-hidden", "8", "--test-tasks", "4", "--val-tasks", "5", "--out", str(out), "--no-progress"])
    assert rc == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["method"] == "cnp" and report["finished"]
    assert all(math.isfinite(report["metrics"][k]["mean"]) for k in ("mse", "nll", "coverage90"))
    config = json.loads((out / "config.json").read_text())
    assert config["meta_lr"] == 5e-4 and config["hidden"] == [8] and config["encoder_hidden"] == [8]


def test_bench_quick(tmp_path):
    """The benchmark script runs end to end in its smoke mode and writes its table."""
    out = tmp_path / "RESULTS_np.md"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_np.py"), "--quick", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    text = out.read_text()
    assert "| cnp |" in text and "| anp |" in text and "ms/step" in text


def test_decoder_std_floor():
    """sigma = 0.01 + softplus(raw): never below the floor, however negative raw is."""
    assert_close(MIN_STD + F.softplus(torch.tensor(-100.0, dtype=torch.float64)), MIN_STD, atol=1e-15, rtol=0)
