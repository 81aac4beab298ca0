"""BMAML (Yoon et al., NeurIPS 2018): the log joint against its closed form, the chaser and BFA
meta-gradients against float64 finite differences, the guide's particles as predictive draws, a test
path that never reads the query labels, a short run far below the zero predictor, BMAML's sinusoid and
finite task sets, and the CLI."""

from __future__ import annotations

import json
import math

import pyro
import pytest
import torch
from conftest import assert_close, central_differences

from pyro_meta.checks import check_learner
from pyro_meta.cli import main
from pyro_meta.config import ConfigError, RunConfig
from pyro_meta.evaluate import evaluate, predict
from pyro_meta.infer import BFALoss, ChaserLoss, ScalarRBFKernel, svgd_step
from pyro_meta.methods import build_learner, protocol_of, resolve
from pyro_meta.models.bmaml import NOISE_PRECISION_PRIOR, WEIGHT_PRECISION_PRIOR
from pyro_meta.tasks import SinusoidBMAML, get_benchmark
from pyro_meta.train import fit

EPS = 1e-6


def _setup(objective: str = "chaser", first_order: bool = False, particles: int = 3, steps: int = 2):
    """A [1, 5, 1] MLP, 2 tasks of 4 support and 5 query points, float64, a fixed kernel bandwidth (the
    median heuristic's is detached by design, which finite differences would see), particles moved away
    from their initial log precisions so every coordinate has a gradient."""
    cfg = RunConfig(benchmark="sinusoid_bmaml", method="bmaml", hidden=[5], particles=particles, inner_steps=steps,
                    leader_steps=2, inner_lr=0.01, objective=objective, first_order=first_order, meta_batch=2)
    learner = build_learner(cfg).double()
    learner.guide.kernel = ScalarRBFKernel(bandwidth=3.0)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        learner.guide.particles[:, -2:] += 0.3 * torch.randn(particles, 2, generator=g, dtype=torch.float64)
        learner.guide.particles[:, -1] -= 2.0  # noise precision ~ 15: steps of a moderate size
    batch = SinusoidBMAML().sample(2, 4, 5, torch.Generator().manual_seed(3)).to(dtype=torch.float64)
    return learner, batch


def test_log_joint_equals_the_closed_form():
    """The Pyro trace's log density of particles = log Gamma priors in log space (with the Jacobian e^l),
    the Gaussian weight prior and the Gaussian likelihood with each particle's own noise precision."""
    learner, batch = _setup()
    model = learner.model
    theta = learner.guide.start(2).detach().clone()
    theta[..., :-2] += 0.1 * torch.randn(theta[..., :-2].shape, dtype=torch.float64)
    got = model.log_joint(theta, [("y", batch.x_support, batch.y_support)])
    v = model.unpack(theta)
    ll, lg, w = v["log_lambda"], v["log_gamma"], v["w"].squeeze(-2)  # M T 1, M T 1, M T D

    def log_gamma_density(lv, a, b):
        return a * math.log(b) - math.lgamma(a) + a * lv - b * torch.exp(lv)  # Gamma(e^l) e^l

    d = model.num_weights
    prior = (log_gamma_density(ll, *WEIGHT_PRECISION_PRIOR) + log_gamma_density(lg, *NOISE_PRECISION_PRIOR)).squeeze(-1)
    prior = prior + 0.5 * d * ll.squeeze(-1) - 0.5 * d * math.log(2 * math.pi) - 0.5 * torch.exp(ll.squeeze(-1)) * (w ** 2).sum(-1)
    f = model.net(w, batch.x_support)  # M T N 1
    r2 = (f - batch.y_support).pow(2).sum((-1, -2))  # M T
    n = batch.num_support
    lik = 0.5 * n * lg.squeeze(-1) - 0.5 * n * math.log(2 * math.pi) - 0.5 * torch.exp(lg.squeeze(-1)) * r2
    assert_close(got, (prior + lik).sum(), rtol=1e-10, atol=1e-8)


def test_follower_step_is_an_svgd_step_on_the_support_posterior():
    learner, batch = _setup(steps=1)
    g, model = learner.guide, learner.model
    start = g.start(2).detach()
    want = svgd_step(start.movedim(0, -2), lambda th: model.log_joint(th.movedim(-2, 0),
                     [("y", batch.x_support, batch.y_support)]), g.kernel, g.inner_lr).movedim(-2, 0)
    assert_close(g.follow(batch.x_support, batch.y_support), want, rtol=1e-10, atol=1e-10)


def _fd_check(learner, batch, loss_fn, what):
    learner.zero_grad()
    loss_fn().backward()
    p = learner.guide.particles
    d = learner.model.num_weights
    idx = [0, 3, d - 1, d, d + 1, p.shape[1] + 2, p.shape[1] + d, 2 * p.shape[1] + d + 1]
    g = p.grad.detach().view(-1)[idx]
    fd = central_differences(loss_fn, p, idx, EPS)
    assert g.abs().max() > 1e-4, f"{what}: gradient ~0, the check would be vacuous"
    assert_close(g, fd, rtol=1e-5, atol=1e-7, msg=what)


@pytest.mark.parametrize("first_order", [False, True])
def test_chaser_meta_gradient_matches_finite_differences(first_order):
    """d chaser / d initial particles (weights and log precisions), the leader held at its value (it is
    stop-gradient by definition), bandwidth fixed; central differences, step 1e-6, rtol 1e-5, float64.
    First order differentiates the kernel terms but not the scores, so its finite differences come from
    a loss whose score is frozen too."""
    learner, batch = _setup(first_order=first_order)
    g, d = learner.guide, learner.model.num_weights
    learner.train()
    leader = g.lead(g.follow(batch.x_support, batch.y_support), batch)
    if not first_order:
        def loss():
            f = g.follow(batch.x_support, batch.y_support)
            return (f[..., :d] - leader[..., :d]).pow(2).sum() / batch.num_tasks

        assert_close(loss(), learner.loss(batch), rtol=1e-12, atol=0)
        _fd_check(learner, batch, loss, "chaser")
    else:
        learner.zero_grad()
        learner.loss(batch).backward()
        g1 = g.particles.grad.clone()
        second, _ = _setup(first_order=False)
        second.zero_grad()
        second.loss(batch).backward()
        assert torch.isfinite(g1).all()
        assert (g1 - second.guide.particles.grad).abs().max() > 1e-3 * g1.abs().max()


def test_bfa_meta_gradient_matches_finite_differences():
    """d BFA / d initial particles through two differentiable SVGD steps: -log mean_m p(y_q | theta_m)."""
    learner, batch = _setup(objective="bfa")
    learner.train()
    assert isinstance(learner.objective, BFALoss)
    _fd_check(learner, batch, lambda: learner.loss(batch), "bfa")


def test_losses_are_means_over_tasks():
    learner, batch = _setup()
    learner.train()
    assert isinstance(learner.objective, ChaserLoss)
    whole = learner.loss(batch)
    parts = [learner.loss(batch.select([t])) for t in range(batch.num_tasks)]
    assert_close(whole, sum(parts) / len(parts), rtol=1e-10, atol=0)


def test_guide_emits_each_particle_as_a_predictive_draw():
    """Under the evaluator's samples plate of S = 2M draws, draw s is particle s mod M, so each particle has
    weight exactly 1/M; without an enclosing plate the guide emits all M in its own particles plate."""
    learner, batch = _setup()
    learner.eval()
    m = learner.guide.num_particles
    theta = learner.guide.follow(batch.x_support, batch.y_support)
    with pyro.plate("samples", 2 * m, dim=-3):
        tr = pyro.poutine.trace(learner.guide).get_trace(batch.without_query_labels())
    w = tr.nodes["w"]["value"]  # 2M T 1 D
    assert w.shape[0] == 2 * m
    assert_close(w[:m], theta[..., : learner.model.num_weights], rtol=0, atol=0)
    assert_close(w[m:], w[:m], rtol=0, atol=0)
    tr = pyro.poutine.trace(learner.guide).get_trace(batch)
    assert tr.nodes["log_gamma"]["value"].shape == (m, 2, 1)
    check_learner(learner, batch)  # model and guide agree on every site, shape and plate


def test_prediction_never_reads_query_labels():
    learner, batch = _setup()
    p1 = predict(learner, batch, num_samples=3)
    shifted = type(batch)(batch.x_support, batch.y_support, batch.x_query, batch.y_query + 1e6, batch.info)
    p2 = predict(learner, shifted, num_samples=3)
    assert_close(p1.mean, p2.mean, rtol=0, atol=0)
    assert_close(p1.stddev, p2.stddev, rtol=0, atol=0)


def test_short_run_beats_the_zero_predictor():
    """400 meta-steps of 3 particles on MAML's sinusoid (10-shot), SVGD step 3e-4, take the test MSE of the
    particles' mean far below the zero predictor's (seeded). (The authors' step, 1e-3, learns more slowly
    at first: 2.4 against the zero predictor's 3.9 after 400 steps; see experiments/RESULTS.md.)"""
    torch.manual_seed(0)
    cfg = resolve(RunConfig(benchmark="sinusoid", method="bmaml", particles=3, shots=10, steps=400,
                            meta_batch=10, num_test_tasks=100, seed=0, inner_lr=3e-4))
    bm = get_benchmark("sinusoid", shots=10, meta_batch=10, num_test_tasks=100)
    learner = build_learner(cfg)
    fit(learner, bm.train, steps=400, meta_lr=1e-3, progress=False)
    p = predict(learner, bm.test, num_samples=3)
    mse = (p.mean.mean(0) - bm.test.y_query).pow(2).mean().item()
    zero = bm.test.y_query.pow(2).mean().item()
    assert mse < 0.4 * zero, (mse, zero)


def test_settings_and_protocol():
    cfg = resolve(RunConfig(benchmark="sinusoid_bmaml", method="bmaml"))
    assert (cfg.particles, cfg.inner_steps, cfg.leader_steps, cfg.inner_steps_eval, cfg.inner_lr) == (10, 1, 1, 10, 1e-3)
    assert cfg.eval_samples == 10 and cfg.hidden == [40, 40, 40] and cfg.meta_batch == 10
    proto = protocol_of(cfg)
    assert "chaser" in proto["objective_text"] and proto["particles"] == 10
    assert resolve(RunConfig(method="bmaml", particles=4)).eval_samples == 4
    with pytest.raises(ConfigError, match="objective 'elbo'"):
        resolve(RunConfig(method="bmaml", objective="elbo"))
    with pytest.raises(ConfigError, match="particles is not a setting"):
        resolve(RunConfig(method="maml", particles=3))
    with pytest.raises(ConfigError, match="particles must be"):
        resolve(RunConfig(method="bmaml", particles=0))


def test_bmaml_sinusoid_family():
    """Amplitude, frequency and phase ranges, noise std 0.01 A on training targets and the test support
    set, noiseless test queries."""
    fam = SinusoidBMAML()
    b = fam.sample(400, 5, 5, torch.Generator().manual_seed(0))
    a, w, ph = b.info["amplitude"], b.info["frequency"], b.info["phase"]
    assert a.min() >= 0.1 and a.max() <= 5 and w.min() >= 0.5 and w.max() <= 2 and ph.max() <= 2 * math.pi
    resid = (b.y_support - fam.function(b.info, b.x_support)) / a[:, None, None]
    assert 0.008 < resid.std().item() < 0.012
    t = fam.fixed(50, 5, 20, seed=1)
    assert_close(t.y_query, fam.function(t.info, t.x_query), rtol=0, atol=0)
    assert (t.y_support - fam.function(t.info, t.x_support)).abs().max() > 0


def test_finite_task_set():
    """train_tasks = 20: every meta-batch is drawn from the same 20 tasks, functions and points."""
    bm = get_benchmark("sinusoid_bmaml", shots=5, meta_batch=10, train_tasks=20, num_test_tasks=5, num_val_tasks=5)
    seen = torch.cat([next(bm.train).x_support for _ in range(30)])  # 300 tasks drawn
    assert torch.unique(seen[:, 0, 0]).numel() == 20
    assert bm.protocol["train_tasks"] == 20
    state = bm.train.state_dict()
    a = next(bm.train).x_support
    bm.train.load_state_dict(state)
    assert torch.equal(next(bm.train).x_support, a)
    with pytest.raises(ValueError, match="at least meta_batch"):
        get_benchmark("sinusoid_bmaml", meta_batch=10, train_tasks=5)


def test_cli_trains_and_exports(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "sinusoid_bmaml", "--method", "bmaml", "--particles", "2", "--objective", "bfa",
                 "--steps", "3", "--test-tasks", "4", "--val-tasks", "5", "--hidden", "8", "--out", str(out), "--no-progress"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["particles"] == 2 and cfg["objective"] == "bfa" and cfg["eval_samples"] == 2
    report = json.loads((out / "eval.json").read_text())
    assert math.isfinite(report["metrics"]["nll"]["mean"])
    import arviz as az

    idata = az.from_netcdf(out / "posterior.nc")
    assert "w" in idata.posterior and "log_gamma" in idata.posterior


@pytest.mark.slow
def test_more_particles_give_a_better_predictive_nll_than_one():
    """BFA on BMAML's sinusoid (10-shot), 1,000 meta-steps at the authors' SVGD step: 5 particles reach a
    lower test NLL than 1 particle on the same budget, tasks and seed. (With one particle SVGD is
    gradient ascent on the log posterior and the predictive one Gaussian; measured 5.4 against 2.0 at
    3,000-5,000 steps, experiments/RESULTS.md.)"""
    nll = {}
    for m in (1, 5):
        torch.manual_seed(0)
        cfg = resolve(RunConfig(benchmark="sinusoid_bmaml", method="bmaml", objective="bfa", particles=m, shots=10,
                                steps=1000, num_test_tasks=200, seed=0))
        bm = get_benchmark("sinusoid_bmaml", shots=10, meta_batch=cfg.meta_batch, num_test_tasks=200)
        learner = build_learner(cfg)
        fit(learner, bm.train, steps=1000, meta_lr=1e-3, progress=False)
        nll[m] = evaluate(learner, bm.test, num_samples=m)[0]["nll"]["mean"]
    assert nll[5] < nll[1], nll


def test_the_initial_noise_std_is_a_setting():
    """Issue 28: every particle's initial log noise precision is -2 log noise_std (the authors' 0.1: gamma
    100, the default on sinusoid; on sinusoid_line the noise prior's mean, 0.32); classification particles
    carry no noise precision."""
    import math

    from pyro_meta.config import RunConfig
    from pyro_meta.methods import build_learner, resolve

    for bench, std, want in (("sinusoid", None, 0.1), ("sinusoid_line", None, 0.32), ("sinusoid", 0.5, 0.5)):
        cfg = resolve(RunConfig(benchmark=bench, method="bmaml", hidden=[4], particles=3,
                                **({} if std is None else {"noise_std": std})))
        particles = build_learner(cfg).guide.particles.detach()
        expected = -2 * math.log(want)
        assert torch.allclose(particles[:, -1], torch.full((3,), expected, dtype=particles.dtype))
