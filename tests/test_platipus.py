"""PLATIPUS (Finn, Xu & Levine, NeurIPS 2018): its meta-gradient against float64 finite differences, a
test path that never reads the query labels, a short run far below the zero predictor, and its
protocol, settings, CLI run and first-step checks."""

from __future__ import annotations

import json
import warnings

import pyro
import pytest
import torch
from conftest import assert_close, central_differences

from pyro_meta import TaskBatch
from pyro_meta.checks import ModelCheckWarning, check_learner
from pyro_meta.cli import main
from pyro_meta.config import ConfigError, RunConfig
from pyro_meta.evaluate import LeakError, evaluate, predict
from pyro_meta.learner import MetaLearner
from pyro_meta.methods import build_learner, protocol_of, resolve
from pyro_meta.models.base import TASK_DIM
from pyro_meta.tasks import Sinusoid, get_benchmark
from pyro_meta.train import fit

EPS = 1e-6
PARAMS = ["model.mu", "model.log_sigma", "model.log_gamma_p", "guide.log_v_q", "guide.log_gamma_q",
          "model.likelihood.raw_noise"]


def _setup(first_order: bool = False, kl_estimator: str = "analytic", noise_scaled_lr: bool = False,
           inner_step: str = "sgd", inner_lr: float = 0.05):
    """A [1, 4, 1] MLP, 3 tasks of 4 support and 6 query points, float64, a learned noise (so its
    gradient through the inner loops is checked too), gammas and sigma away from their defaults."""
    cfg = RunConfig(method="platipus", hidden=[4], inner_steps=2, first_order=first_order, meta_batch=3,
                    learn_noise=True, noise_std=0.5, gamma_init=0.05, inner_lr=inner_lr, prior_init_std=0.2,
                    kl_estimator=kl_estimator, noise_scaled_lr=noise_scaled_lr, inner_step=inner_step)
    learner = build_learner(cfg).double()
    with torch.no_grad():  # q and p of different widths, so every term of the KL has a gradient
        learner.model.log_sigma.add_(0.3 * torch.randn(learner.model.log_sigma.shape, dtype=torch.float64))
    batch = Sinusoid().sample(3, 4, 6, torch.Generator().manual_seed(3)).to(dtype=torch.float64)
    return learner, batch


def _loss(learner, batch, seed=7):
    torch.manual_seed(seed)  # the same eps at every evaluation: the loss is a fixed function of the params
    return learner.loss(batch)


def _autograd(learner, batch, name):
    learner.zero_grad()
    _loss(learner, batch).backward()
    return dict(learner.named_parameters())[name].grad.detach().clone().view(-1)


def _fd_grad(learner, batch, name, idx):
    return central_differences(lambda: _loss(learner, batch), dict(learner.named_parameters())[name], idx, EPS)


@pytest.mark.parametrize("kl_estimator, noise_scaled_lr, inner_step, inner_lr", [
    ("analytic", False, "sgd", 0.05), ("mc", False, "sgd", 0.05), ("analytic", True, "sgd", 0.05),
    ("analytic", False, "polyak", 5.0), ("analytic", True, "polyak", 0.06)])
def test_second_order_meta_gradient_matches_finite_differences(kl_estimator, noise_scaled_lr, inner_step, inner_lr):
    """d loss / d (mu, log sigma, log gamma_p, log v_q, log gamma_q, noise): central differences,
    step 1e-6, rtol 1e-5 (float64), through the prior's and q's gradient steps and the K inner steps
    (with ``noise_scaled_lr`` also through the noise in the inner step size; with the Polyak step through
    each task's step size: uncapped at inner_lr 5; at 0.06 x s^2 = 0.015 two of the three tasks are capped)."""
    learner, batch = _setup(kl_estimator=kl_estimator, noise_scaled_lr=noise_scaled_lr, inner_step=inner_step,
                            inner_lr=inner_lr)
    for name in PARAMS:
        p = dict(learner.named_parameters())[name]
        idx = list(range(min(p.numel(), 13)))
        g = _autograd(learner, batch, name)[idx]
        fd = _fd_grad(learner, batch, name, idx)
        assert g.abs().max() > 1e-4, f"{name}: gradient is ~0, the check would be vacuous"
        assert_close(g, fd, rtol=1e-5, atol=1e-7, msg=f"{kl_estimator} {noise_scaled_lr} {inner_step} {name}")


def test_first_order_differs_from_second_order():
    learner, batch = _setup()
    fo, _ = _setup(first_order=True)
    fo.load_state_dict(learner.state_dict())
    for name in ("model.mu", "guide.log_gamma_q"):
        g2, g1 = _autograd(learner, batch, name), _autograd(fo, batch, name)
        assert torch.isfinite(g1).all()
        assert (g2 - g1).abs().max() > 1e-3 * g2.abs().max(), name


def test_the_gradient_step_is_each_tasks_own():
    """The conditional prior's mean, mu - gamma_p grad L(mu; support_t), matches one task at a time."""
    learner, batch = _setup()
    model = learner.model
    loc = model.conditional_prior(batch).mean  # T 1 D
    for t in range(batch.num_tasks):
        mu = model.mu.detach().clone().requires_grad_()
        f = model.net(mu, batch.x_support[t])  # S O
        (g,) = torch.autograd.grad(model.likelihood.point_loss(f, batch.y_support[t]).mean(), mu)
        assert_close(loc[t, 0], mu.detach() - model.gamma_p.detach() * g, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- the test-time path
class _NoQueryLabels:
    """A batch whose query labels cannot be read: any access raises."""

    def __init__(self, batch: TaskBatch):
        self._batch = batch

    def __getattr__(self, name):
        if name == "y_query":
            raise AssertionError("the predictive path read y_query")
        return getattr(self._batch, name)


def _small():
    learner = build_learner(resolve(RunConfig(method="platipus", hidden=[8], inner_steps_eval=3)))
    batch = Sinusoid().sample(4, 5, 7, torch.Generator().manual_seed(0))
    return learner, batch


def test_prediction_is_the_same_whatever_the_query_labels():
    learner, batch = _small()
    poisoned = TaskBatch(batch.x_support, batch.y_support, batch.x_query, batch.y_query + 1e6)
    a, b = predict(learner, batch, 6, seed=0), predict(learner, poisoned, 6, seed=0)
    assert torch.equal(a.mean, b.mean) and torch.equal(a.stddev, b.stddev)
    assert torch.equal(a.latents["theta"], b.latents["theta"])
    assert a.latents["theta"].shape == (6, 4, learner.model.net.num_params)  # S T D


def test_the_predictive_guide_never_reads_query_labels():
    learner, batch = _small()
    guide = learner.predictive_guide
    assert guide is not learner.guide
    for grad in (False, True):  # at evaluation (no_grad) and inside a differentiable program alike
        with torch.set_grad_enabled(grad):
            pyro.set_rng_seed(1)
            blind = pyro.poutine.trace(guide).get_trace(_NoQueryLabels(batch))
            pyro.set_rng_seed(1)
            plain = pyro.poutine.trace(guide).get_trace(batch.without_query_labels())
        assert torch.equal(blind.nodes["theta"]["value"], plain.nodes["theta"]["value"])
        assert blind.nodes["theta"]["value"].shape == (4, 1, learner.model.net.num_params)  # T 1 D


def test_the_training_guide_needs_query_labels_and_says_so():
    learner, batch = _small()
    with pytest.raises(ValueError, match="needs the query labels.*PlatipusPredictiveGuide"):
        learner.guide(batch.without_query_labels())
    # without the declared predictive path, evaluation refuses loudly instead of reading the answers
    bare = MetaLearner(learner.model, learner.guide, learner.objective)
    with pytest.raises(LeakError, match="predictive_guide"):
        predict(bare, batch, 2)


def test_test_path_draws_from_the_conditional_prior():
    """theta at test: mean mu - gamma_p grad L(mu; support), std sigma (checked on 4000 draws)."""
    learner, batch = _small()
    with torch.no_grad():
        learner.model.log_sigma.fill_(-1.0)
        prior = learner.model.conditional_prior(batch)
    theta = predict(learner, batch, 4000, seed=0).latents["theta"]  # S T D
    assert_close(theta.mean(0), prior.mean.squeeze(TASK_DIM), atol=0.02)
    assert_close(theta.std(0).mean(), torch.exp(torch.tensor(-1.0)), rtol=0.02)


# ----------------------------------------------------------------------------- training
def test_short_training_run_is_far_below_the_zero_predictor():
    """Sinusoid 5-shot, 600 steps of 10 tasks (the defaults otherwise, but Adam 3e-3 to fit the time of a
    test), 100 fixed test tasks. Measured at this seed on a 2-core CPU: MSE 0.27 of the zero predictor's,
    ~15 s of training; with Adam 1e-3 the same 600 steps reach 0.64."""
    cfg = resolve(RunConfig(method="platipus", shots=5, meta_batch=10, meta_lr=3e-3, seed=0, eval_samples=20))
    bench = get_benchmark("sinusoid", shots=5, meta_batch=10, num_test_tasks=100, seed=0)
    torch.manual_seed(0)
    learner = build_learner(cfg)
    before, _ = evaluate(learner, bench.test, num_samples=cfg.eval_samples)
    fit(learner, bench.train, steps=600, meta_lr=cfg.meta_lr, progress=False)
    after, _ = evaluate(learner, bench.test, num_samples=cfg.eval_samples)
    zero = float((bench.test.y_query**2).flatten(1).mean(-1).mean())
    mse = after["mse"]["mean"]
    print(f"platipus: untrained {before['mse']['mean']:.3f}, trained {mse:.3f}, zero predictor {zero:.3f}")
    assert mse < 0.5 * zero, f"test MSE {mse:.3f} vs zero predictor {zero:.3f}"
    assert after["nll"]["mean"] < before["nll"]["mean"]
    assert after["nonfinite_tasks"]["count"] == 0


# ----------------------------------------------------------------------------- protocol and settings
def test_resolved_config_holds_the_protocol():
    cfg = resolve(RunConfig(method="platipus"))
    for name in ("inner_steps", "inner_steps_eval", "inner_lr", "noise_std", "learn_noise", "prior_init_std",
                 "gamma_init", "kl_estimator", "eval_samples"):
        assert getattr(cfg, name) is not None, name
    assert (cfg.meta_batch, cfg.meta_lr, cfg.hidden) == (25, 1e-3, [40, 40])
    proto = protocol_of(cfg)
    assert "Probabilistic Model-Agnostic Meta-Learning" in proto["paper"]
    assert proto["network"]["sizes"] == [1, 40, 40, 1]
    for key in ("objective", "outer_kl_estimator", "inner_loss", "inner_steps", "inner_step_size", "test_path",
                "parameterizations", "likelihood", "gradient_order", "prior", "guide_training"):
        assert key in proto, key
    assert "support set alone" in proto["test_path"]
    line = resolve(RunConfig(method="platipus", benchmark="sinusoid_line"))
    # issue 28's measured defaults there: a learned noise from the data's 0.3 and the noise-scaled step
    assert (line.noise_std, line.learn_noise, line.noise_scaled_lr, line.inner_lr) == (0.3, True, True, 0.01)
    assert "noise_scaled_lr" in protocol_of(RunConfig(method="platipus", benchmark="sinusoid_line"))["inner_step_size"]
    paper = resolve(RunConfig(method="platipus", benchmark="sinusoid_line", learn_noise=False, noise_scaled_lr=False,
                              inner_lr=0.002))
    assert "fixed" in protocol_of(paper)["inner_step_size"]


@pytest.mark.parametrize("setting", [{"objective": "paper"}, {"inner_samples": 2}, {"kl_weight_outer": 0.5},
                                     {"local_reparam": True}, {"encoder_hidden": [8]}])
def test_settings_of_other_methods_are_refused(setting):
    with pytest.raises(ConfigError, match="not a setting of method 'platipus'"):
        resolve(RunConfig(method="platipus", **setting))


def test_classification_is_refused():
    with pytest.raises(ConfigError, match="runs on sinusoid"):
        resolve(RunConfig(method="platipus", benchmark="omniglot"))


def test_first_step_checks_pass():
    learner, batch = _small()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ModelCheckWarning)
        check_learner(learner, batch)


def test_cli_train(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "sinusoid", "--method", "platipus", "--steps", "3", "--test-tasks", "5", "--val-tasks", "5",
                 "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "platipus" and config["kl_estimator"] is not None
    assert config["resolved"]["method_protocol"]["test_path"].startswith("theta ~ p(theta | support)")
    report = json.loads((out / "eval.json").read_text())
    assert report["step"] == 3 and report["metrics"]["mse"]["n"] == 5


def test_a_user_regression_family_trains_and_evaluates():
    """``custom``: a registered task family with 2 inputs and 2 outputs (y = A x + b per task)."""
    from pyro_meta.tasks import register_benchmark, unregister_benchmark

    def linear2(num_tasks, shots, queries, generator):
        a = torch.randn(num_tasks, 1, 2, 2, generator=generator)
        x = torch.rand(num_tasks, shots + queries, 2, generator=generator)
        y = (a @ x.unsqueeze(-1)).squeeze(-1)  # T N 2
        return TaskBatch(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:])

    register_benchmark("platipus_linear2", linear2, replace=True)
    try:
        cfg = resolve(RunConfig(method="platipus", benchmark="platipus_linear2", hidden=[8], meta_batch=4,
                                eval_samples=3))
        assert cfg.noise_std == pytest.approx(2**-0.5) and cfg.inner_lr == 0.01
        learner = build_learner(cfg)
        bench = get_benchmark("platipus_linear2", shots=5, meta_batch=4, num_test_tasks=6, seed=0)
        fit(learner, bench.train, steps=3, progress=False)
        metrics, pred = evaluate(learner, bench.test, num_samples=3)
        assert metrics["mse"]["n"] == 6 and pred.mean.shape == (3, 6, bench.test.num_query, 2)
    finally:
        unregister_benchmark("platipus_linear2")


def test_noise_scaled_step_is_the_squared_error_step():
    """With noise_scaled_lr the K inner steps from the same theta give the same phi whatever the noise (the
    step on (y - f)^2 / (2 s^2) times s^2 is the step on (y - f)^2 / 2); without it they differ."""
    phis = {}
    for scaled in (False, True):
        for noise in (0.3, 1.5):
            learner, batch = _setup(noise_scaled_lr=scaled)
            m = learner.model
            with torch.no_grad():  # the learned noise set to exactly `noise` (softplus(raw) + min_noise)
                v = torch.tensor(noise - m.likelihood.min_noise, dtype=torch.float64)
                m.likelihood.raw_noise.copy_(v + torch.log(-torch.expm1(-v)))
            assert abs(float(m.likelihood.noise_std) - noise) < 1e-12
            theta = m.mu.detach().expand(batch.num_tasks, 1, -1).clone()
            phis[(scaled, noise)] = m.adapt(theta, batch).detach()
    assert torch.allclose(phis[(True, 0.3)], phis[(True, 1.5)], rtol=1e-10, atol=1e-12)
    assert not torch.allclose(phis[(False, 0.3)], phis[(False, 1.5)], rtol=1e-3)
