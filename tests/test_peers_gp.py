"""The meta-learned Gaussian process (``gp``, issue 27) as a Pyro program trained by ``fit``.

Known answers: the batched kernels equal pyro.contrib.gp's on one task; the predictive is the closed-form
GP posterior and the loss minus the exact joint marginal likelihood (float64, by hand with torch.linalg);
with a linear kernel alone the predictive NLL is Bayesian linear regression's, computed in weight space.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pyro
import pyro.contrib.gp as gp
import pytest
import torch
from conftest import assert_close
from resume_check import assert_resumes_bitwise

from pyro_meta import TaskBatch
from pyro_meta.config import ConfigError, RunConfig
from pyro_meta.evaluate import evaluate, predict
from pyro_meta.guides.empty import NoLatentGuide
from pyro_meta.learner import MetaLearner, local_params
from pyro_meta.methods import METHODS, build_learner, protocol_of, resolve
from pyro_meta.models.gp import (
    JITTER,
    MIN_NOISE_VAR,
    RBF,
    DeepKernel,
    GPModel,
    Linear,
    Periodic,
    Sum,
    sum_kernel,
)
from pyro_meta.run import benchmark_of, train_run
from pyro_meta.tasks import register_benchmark, unregister_benchmark

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64


def tiny(benchmark: str = "sinusoid_line", **kw) -> RunConfig:
    small = {"meta_batch": 3, "num_test_tasks": 6, "num_val_tasks": 2, "eval_queries": 7}
    return RunConfig(benchmark=benchmark, method="gp", **{**small, **kw})


def random_batch(t: int = 4, s: int = 5, q: int = 3, d: int = 1, o: int = 1, seed: int = 0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    x = 4 * torch.rand(t, s + q, d, generator=g, dtype=F64) - 2  # T N D
    y = torch.sin(x.sum(-1, keepdim=True)).expand(t, s + q, o) + 0.3 * torch.randn(t, s + q, o, generator=g, dtype=F64)
    return TaskBatch(x[:, :s], y[:, :s], x[:, s:], y[:, s:])


def set_positive(param: torch.Tensor, value: float) -> None:
    """Set a softplus-parameterized float64 parameter to exactly ``value`` (a float32 initial value, cast, is
    1e-8 off)."""
    v = torch.as_tensor(value, dtype=F64)
    param.data = v + torch.log(-torch.expm1(-v))


def dense_covariance(model: GPModel, x: torch.Tensor) -> torch.Tensor:
    """``K + (noise + jitter) I`` of one task, ``x [N, D] -> [N, N]``, with the kernel on unbatched inputs."""
    k = model.kernel(x, x)
    return k + (model.noise_var.detach() + JITTER) * torch.eye(x.shape[0], dtype=F64)


def test_registered_and_listed(capsys):
    from pyro_meta import cli

    assert "gp" in METHODS
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "gp" in out and "Gaussian process" in out


@pytest.mark.parametrize("family", ["sinusoid", "sinusoid_line", "sinusoid_bmaml"])
def test_defaults(family):
    """The method's own Adam rate and meta-batch win over the regression benchmarks' 1e-3; a given one wins."""
    cfg = resolve(RunConfig(benchmark=family, method="gp"))
    assert (cfg.meta_lr, cfg.meta_batch, cfg.kernel, cfg.eval_samples) == (METHODS["gp"].run_defaults["meta_lr"], 25,
                                                                          "sum", 1)
    assert resolve(RunConfig(benchmark=family, method="gp", meta_lr=1e-3)).meta_lr == 1e-3
    assert resolve(RunConfig(benchmark=family, method="maml")).meta_lr == 1e-3
    proto = protocol_of(RunConfig(benchmark=family, method="gp"))
    assert proto["network"]["type"] == "gp" and "empty" in proto["model_and_guide"]
    with pytest.raises(ConfigError, match="kernel"):
        resolve(RunConfig(benchmark=family, method="gp", kernel="spectral"))
    with pytest.raises(ConfigError, match="kernel is not a setting"):
        resolve(RunConfig(benchmark=family, method="maml", kernel="sum"))


@pytest.mark.parametrize("d", [1, 2])
def test_batched_kernels_equal_pyro_contrib_gp(d):
    """RBF (ARD), linear (contrib's Polynomial of degree 1) and periodic on one task equal pyro.contrib.gp's in
    float64; on a batch [T, N, D] against [T, M, D] every task's block equals the one-task kernel."""
    g = torch.Generator().manual_seed(1)
    X, Z = torch.randn(6, d, generator=g, dtype=F64), torch.randn(4, d, generator=g, dtype=F64)
    ls = torch.tensor([0.7, 1.9][:d], dtype=F64)
    ours = [RBF(d).double(), Linear().double(), Periodic().double()]
    for k, values in zip(ours, ({"variance": 1.3, "lengthscale": ls}, {"variance": 0.8, "bias": 0.4},
                                {"variance": 0.6, "lengthscale": 1.2, "period": 2.5})):
        for name, v in values.items():  # set in float64: a float32 initial value would differ by 1e-8
            v = torch.as_tensor(v, dtype=F64)
            getattr(k, f"raw_{name}").data = v + torch.log(-torch.expm1(-v))
    # module-local params: contrib's kernels are PyroModules whose top-level "variance" would otherwise be one
    # entry of the global param store, shared by all three
    with local_params():
        theirs = kernels_of_contrib(d, ls)
    for a, b in zip(ours, theirs):
        with local_params():
            assert_close(a(X, Z), b(X, Z), rtol=1e-12, atol=1e-14, msg=type(a).__name__)
    total = Sum(ours)
    Xb, Zb = torch.randn(3, 6, d, generator=g, dtype=F64), torch.randn(3, 4, d, generator=g, dtype=F64)
    kb = total(Xb, Zb)  # T N M
    assert kb.shape == (3, 6, 4)
    for t in range(3):
        with local_params():
            expected = sum(b(Xb[t], Zb[t]) for b in theirs)
        assert_close(kb[t], expected, rtol=1e-12, atol=1e-14)
    # extra leading dims (the evaluator's samples) broadcast too
    assert_close(total(Xb.expand(2, 3, 6, d), Zb), kb.expand(2, 3, 6, 4), rtol=0, atol=0)


def kernels_of_contrib(d: int, ls: torch.Tensor) -> list:
    return [gp.kernels.RBF(d, torch.tensor(1.3, dtype=F64), ls),
            gp.kernels.Polynomial(d, torch.tensor(0.8, dtype=F64), torch.tensor(0.4, dtype=F64), degree=1),
            gp.kernels.Periodic(d, torch.tensor(0.6, dtype=F64), torch.tensor(1.2, dtype=F64),
                                torch.tensor(2.5, dtype=F64))]


@pytest.mark.parametrize("o", [1, 2])
def test_predictive_and_loss_are_the_closed_form_gp(o):
    """float64, hand-computed per task with torch.linalg: the y_query site's per-point law is the GP posterior
    N(m + K_qs C_ss^-1 (y_s - m), diag(C_qq - K_qs C_ss^-1 K_sq)) (C = K + noise + jitter); the training loss
    times T equals -sum_t log N([y_s; y_q] | m, C) (the joint marginal likelihood, not the per-point product)."""
    model = GPModel(sum_kernel(2, (3.0, 5.0)), noise_var=0.2).double()
    with torch.no_grad():
        model.mean.constant.fill_(0.3)
    learner = MetaLearner(model, NoLatentGuide(), name="gp")
    batch = random_batch(t=4, s=5, q=3, d=2, o=o)
    pred = predict(learner, batch, num_samples=3)
    loss = learner.loss(batch)
    total, product = torch.zeros((), dtype=F64), torch.zeros((), dtype=F64)
    for t in range(batch.num_tasks):
        x = torch.cat([batch.x_support[t], batch.x_query[t]])
        y = torch.cat([batch.y_support[t], batch.y_query[t]])  # N O
        C = dense_covariance(model, x)
        Css, Cqs, Cqq = C[:5, :5], C[5:, :5], C[5:, 5:]
        mu = 0.3 + Cqs @ torch.linalg.solve(Css, batch.y_support[t] - 0.3)  # Q O
        cov = Cqq - Cqs @ torch.linalg.solve(Css, Cqs.T)
        for s in range(3):
            assert_close(pred.mean[s, t], mu, rtol=1e-10, atol=1e-12)
            assert_close(pred.stddev[s, t], cov.diagonal().sqrt()[:, None].expand(3, o), rtol=1e-10, atol=1e-12)
        mvn = torch.distributions.MultivariateNormal(torch.full((8,), 0.3, dtype=F64), C)
        total = total + mvn.log_prob(y.T).sum()
        per_point = torch.distributions.Normal(mu, cov.diagonal().sqrt()[:, None]).log_prob(batch.y_query[t]).sum(-1)
        assert_close(pred.log_lik[0, t], per_point, rtol=1e-10, atol=1e-12)
        support = torch.distributions.MultivariateNormal(torch.full((5,), 0.3, dtype=F64), Css)
        product = product + support.log_prob(batch.y_support[t].T).sum() + per_point.sum()
    assert loss.dtype == F64
    assert_close(loss * batch.num_tasks, -total, rtol=1e-10, atol=1e-10)
    # log p(y_s) times the per-point marginals is a different number: the joint correction factor matters
    assert abs(float((product - total).detach())) > 1e-2


def test_linear_kernel_nll_is_bayesian_linear_regression():
    """A GP with the linear kernel v (b + x z) is y = w x + c + eps with w ~ N(0, v), c ~ N(0, v b): its
    predictive, computed here in weight space (the conjugate posterior over (c, w)), gives the per-point
    NLL that evaluate() reports (float64, under a samples plate of 2)."""
    v, b, noise = 1.7, 0.6, 0.25
    model = GPModel(Linear(), noise_var=noise).double()
    set_positive(model.kernel.raw_variance, v)
    set_positive(model.kernel.raw_bias, b)
    set_positive(model.raw_noise, noise - MIN_NOISE_VAR)
    learner = MetaLearner(model, NoLatentGuide(), name="gp")
    batch = random_batch(t=3, s=4, q=5)
    nll = []
    s2 = noise + JITTER
    for t in range(3):
        phi_s = torch.cat([torch.ones(4, 1, dtype=F64), batch.x_support[t]], 1)  # S 2: features (1, x)
        prior_prec = torch.diag(torch.tensor([1 / (v * b), 1 / v], dtype=F64))
        cov = torch.linalg.inv(prior_prec + phi_s.T @ phi_s / s2)  # 2 2
        mean = cov @ phi_s.T @ batch.y_support[t] / s2  # 2 1
        phi_q = torch.cat([torch.ones(5, 1, dtype=F64), batch.x_query[t]], 1)
        mu, var = phi_q @ mean, (phi_q @ cov * phi_q).sum(-1, keepdim=True) + s2  # Q 1
        nll.append(-torch.distributions.Normal(mu, var.sqrt()).log_prob(batch.y_query[t]).mean())
    metrics, _ = evaluate(learner, batch, num_samples=2)
    assert_close(metrics["nll"]["mean"], torch.stack(nll).mean(), rtol=1e-9, atol=1e-10)


def test_evaluate_under_a_samples_plate_and_blind():
    """The predictive broadcasts over the evaluator's samples plate (dim -3): [S, T, Q, O], equal draws; the
    query labels never change it; evaluate() returns finite metrics."""
    cfg = resolve(tiny())
    learner = build_learner(cfg)
    test = benchmark_of(cfg).test
    pred = predict(learner, test, num_samples=4)
    t, q = test.num_tasks, test.num_query
    assert pred.mean.shape == pred.stddev.shape == (4, t, q, 1) and pred.log_lik.shape == (4, t, q)
    assert pred.gaussian and pred.latents == {} and torch.equal(pred.mean[0], pred.mean[3])
    other = TaskBatch(test.x_support, test.y_support, test.x_query, test.y_query + 1.0)
    again = predict(learner, other, num_samples=4)
    assert torch.equal(pred.mean, again.mean) and torch.equal(pred.stddev, again.stddev)
    metrics, _ = evaluate(learner, test, num_samples=cfg.eval_samples)
    for key in ("mse", "nll", "coverage50", "coverage90"):
        assert math.isfinite(metrics[key]["mean"]), key


@pytest.mark.parametrize("kernel", ["sum", "deep"])
def test_gradients_reach_every_parameter(kernel):
    cfg = resolve(tiny(kernel=kernel, hidden=[8, 4]))
    learner = build_learner(cfg).double()
    b = benchmark_of(cfg).test
    batch = TaskBatch(*(x.double() for x in (b.x_support, b.y_support, b.x_query, b.y_query)))
    loss = learner.loss(batch)
    loss.backward()
    assert torch.isfinite(loss)
    missing = [n for n, p in learner.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    if kernel == "deep":
        assert isinstance(learner.model.kernel, DeepKernel)


def test_learns_the_sine_period():
    """300 steps on sinusoid tasks (period 2 pi): the periodic component that carries the most variance
    ends within 10% of 2 pi, and the held-out NLL beats the untrained kernel's."""
    cfg = resolve(tiny("sinusoid", steps=300, meta_batch=25, num_test_tasks=50, eval_queries=20))
    learner = build_learner(cfg)
    bm = benchmark_of(cfg)
    before = evaluate(learner, bm.test, num_samples=1)[0]["nll"]["mean"]
    from pyro_meta.train import fit

    fit(learner, bm.train, cfg.steps, meta_lr=cfg.meta_lr, progress=False, log_every=10_000)
    after = evaluate(learner, bm.test, num_samples=1)[0]["nll"]["mean"]
    bank = next(k for k in learner.model.kernel.parts if isinstance(k, Periodic))
    period = max(bank.components(), key=lambda c: c["variance"])["period"]
    assert abs(period - 2 * math.pi) < 0.1 * 2 * math.pi, period
    assert after < before - 0.2, (before, after)


STEPS = 8


def test_resume_equals_uninterrupted(tmp_path):
    """Stopped after 3 steps and resumed twice: bit for bit the uninterrupted run's parameters, optimizer
    state, RNG and loss curve."""
    cfg = tiny(steps=STEPS, log_every=1, checkpoint_every=4)
    assert_resumes_bitwise(cfg, tmp_path, STEPS)


def test_cli_trains_and_evaluates(tmp_path):
    """``pyro-meta train sinusoid_line --method gp`` for a few steps: eval.json with finite metrics."""
    from pyro_meta import cli

    out = tmp_path / "run"
    pyro.clear_param_store()
    rc = cli.main(["train", "sinusoid_line", "--method", "gp", "--steps", "3", "--meta-batch", "2",
                   "--test-tasks", "4", "--val-tasks", "5", "--out", str(out), "--no-progress"])
    assert rc == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["method"] == "gp" and report["finished"]
    assert all(math.isfinite(report["metrics"][k]["mean"]) for k in ("mse", "nll", "coverage50", "coverage90"))
    config = json.loads((out / "config.json").read_text())
    assert config["kernel"] == "sum" and config["meta_lr"] == METHODS["gp"].run_defaults["meta_lr"]


def two_feature_tasks(num_tasks: int, shots: int, queries: int, generator: torch.Generator) -> TaskBatch:
    """``y = a . x + N(0, 0.1^2)`` with ``x ~ U[-1, 1]^2``: a user family with flat 2-feature inputs."""
    a = torch.randn(num_tasks, 1, 2, generator=generator)  # T 1 2
    x = 2 * torch.rand(num_tasks, shots + queries, 2, generator=generator) - 1  # T N 2
    y = (x * a).sum(-1, keepdim=True) + 0.1 * torch.randn(num_tasks, shots + queries, 1, generator=generator)
    return TaskBatch(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:])


@pytest.mark.parametrize("kernel", ["sum", "deep"])
def test_custom_family_with_flat_inputs(tmp_path, kernel):
    register_benchmark("gp_two_features_test", two_feature_tasks, replace=True)
    try:
        cfg = tiny("gp_two_features_test", steps=3, kernel=kernel, hidden=[8])
        train_run(cfg, tmp_path / "run", progress=False)
        report = json.loads((tmp_path / "run" / "eval.json").read_text())
        assert math.isfinite(report["metrics"]["nll"]["mean"])
    finally:
        unregister_benchmark("gp_two_features_test")


def test_bench_quick(tmp_path):
    """The benchmark script runs end to end in its smoke mode and writes its table."""
    out = tmp_path / "RESULTS_gp.md"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gp.py"), "--quick", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    text = out.read_text()
    assert "ms/step" in text and "| library |" in text and "| plain |" in text
