"""The reference rows (``prior``, ``oracle``): the prior predictive against Monte Carlo, the oracle against
the closed-form posterior predictive of a conjugate line family, the equal-mass strata's moments, the
evaluator's reading of a mixture predictive, and the CLI."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import assert_close
from test_cli import pyro_meta
from torch import nn

from pyro_meta import MetaLearner, TaskBatch
from pyro_meta.config import ConfigError, RunConfig
from pyro_meta.evaluate import evaluate
from pyro_meta.guides.empty import NoLatentGuide
from pyro_meta.methods import resolve
from pyro_meta.models import full_plate, tasks_plate
from pyro_meta.models.reference import ReferenceModel, strata
from pyro_meta.tasks.regression import RegressionFamily, SinusoidLine


def _law(model: ReferenceModel, batch: TaskBatch) -> dist.MixtureSameFamily:
    tr = pyro.poutine.trace(model).get_trace(batch)
    return tr.nodes["y_query"]["fn"]


def test_the_prior_row_is_the_prior_predictive_by_monte_carlo():
    """At 4 inputs and 5 values each, the prior row's log density equals a Monte Carlo estimate over
    2,000,000 tasks drawn by the family's own sampler within 0.01 nats where the density is above e^-5
    (there the Monte Carlo error is below 0.005; three seeds of it spread by 0.008 at e^-6.4), and within
    0.1 nats down to e^-8; far in the tails both are e^-20 and below."""
    fam = SinusoidLine()
    x = torch.tensor([-4.0, -1.0, 0.5, 3.0], dtype=torch.float64).reshape(1, 4, 1)
    y = torch.tensor([-6.0, -1.0, 0.0, 2.0, 9.0], dtype=torch.float64)
    batch = TaskBatch(x[:, :1], torch.zeros(1, 1, 1, dtype=torch.float64), x, None)
    law = _law(ReferenceModel(fam, "prior", n=100, components=256), batch)  # batch [1, 4]
    ours = torch.stack([law.log_prob(torch.full((1, 4, 1), v, dtype=torch.float64)) for v in y], -1)[0]  # 4 5
    g = torch.Generator().manual_seed(0)
    params = fam.draw_params(2_000_000, g)
    f = fam.function(params, x.expand(2_000_000, -1, -1))[..., 0].double()  # M 4
    dens = torch.exp(-0.5 * ((y[None, None] - f[..., None]) / 0.3) ** 2) / (0.3 * math.sqrt(2 * math.pi))
    mc = dens.mean(0).log()  # 4 5
    dense, mid = mc > -5, (mc > -8) & (mc <= -5)
    assert dense.sum() >= 12 and mid.sum() >= 1
    assert_close(ours[dense], mc[dense], atol=0.01, rtol=0.0)
    assert_close(ours[mid], mc[mid], atol=0.1, rtol=0.0)
    assert (ours[mc < -20] < -15).all()


@dataclass(frozen=True)
class GaussianLine(RegressionFamily):
    """Lines with slope and intercept ~ N(0, 1) independently, noise 0.3: a conjugate family."""

    noise_std: float = 0.3
    name = "gaussian_line"

    def draw_params(self, n, g):
        return {"slope": torch.randn(n, generator=g), "intercept": torch.randn(n, generator=g)}

    def function(self, params, x):
        return params["slope"][:, None, None] * x + params["intercept"][:, None, None]

    def prior_grid(self, n):
        z = -6 + 12 * (torch.arange(n, dtype=torch.float64) + 0.5) / n
        a, b = torch.meshgrid(z, z, indexing="ij")
        logw = -0.5 * (a**2 + b**2).reshape(-1)
        return {"slope": a.reshape(-1), "intercept": b.reshape(-1)}, torch.log_softmax(logw, 0)

    def grid_function(self, params, x):
        return params["slope"] * x.double() + params["intercept"]


def test_the_oracle_is_the_closed_form_posterior_predictive_of_a_conjugate_family():
    fam = GaussianLine()
    batch = fam.sample(3, 4, 6, torch.Generator().manual_seed(1)).to(dtype=torch.float64)
    law = _law(ReferenceModel(fam, "oracle", n=300, components=512), batch)
    ours = law.log_prob(batch.y_query)  # T Q
    phi = lambda x: torch.cat([x, torch.ones_like(x)], -1)  # noqa: E731 - (x, 1): slope then intercept
    Xs, Xq = phi(batch.x_support), phi(batch.x_query)  # T N 2
    prec = torch.eye(2, dtype=torch.float64) + Xs.transpose(-1, -2) @ Xs / 0.09
    cov = torch.linalg.inv(prec)
    mean = (cov @ (Xs.transpose(-1, -2) @ batch.y_support / 0.09))[..., 0]  # T 2
    mu = (Xq * mean[:, None]).sum(-1)  # T Q
    var = 0.09 + torch.einsum("tqi,tij,tqj->tq", Xq, cov, Xq)
    exact = torch.distributions.Normal(mu, var.sqrt()).log_prob(batch.y_query[..., 0])
    assert_close(ours, exact, atol=2e-3, rtol=0.0)
    assert_close(law.mean[..., 0], mu, atol=1e-3, rtol=0.0)


def test_strata_keep_the_mixtures_mean_and_variance():
    """Mass and value cuts together: the strata's masses sum to 1, the half cut by mass are at least
    1/16 of the mass apart, none is wider than the range over 17, and the mixture's mean and variance (law
    of total variance) are the weighted values' exactly."""
    g = torch.Generator().manual_seed(0)
    f = torch.randn(3, 1000, generator=g, dtype=torch.float64) ** 3  # heavy tails
    w = torch.softmax(torch.randn(3, 1000, generator=g, dtype=torch.float64), -1)
    log_mass, mean, var = strata(f, w, 16, 16)
    mass = log_mass.exp()
    assert mean.shape == (3, 32) and (var >= 0).all() and torch.isfinite(mean).all()
    assert_close(mass.sum(-1), torch.ones(3, dtype=torch.float64), rtol=1e-12)
    assert (mean[:, 1:] >= mean[:, :-1] - 1e-12).all()  # strata in order
    assert (mass <= 1 / 16 + 1e-12).all()
    m = (w * f).sum(-1)
    assert_close((mass * mean).sum(-1), m, rtol=1e-10, atol=1e-12)
    total = (w * (f - m[:, None]) ** 2).sum(-1)
    assert_close((mass * (var + (mean - m[:, None]) ** 2)).sum(-1), total, rtol=1e-9, atol=1e-12)
    width = (f.max(-1).values - f.min(-1).values) / 17
    assert (var.sqrt() <= width[:, None] + 1e-9).all()  # a stratum's spread is within its width


class _TwoComponents(nn.Module):
    """y_query ~ 0.25 N(-1, 0.5) + 0.75 N(2, 1) at every point."""

    def forward(self, batch):
        t, q = batch.num_tasks, batch.num_query
        logits = torch.tensor([0.25, 0.75]).log().expand(t, q, 2)
        loc = torch.tensor([-1.0, 2.0]).expand(t, q, 2).unsqueeze(-1)
        scale = torch.tensor([0.5, 1.0]).expand(t, q, 2).unsqueeze(-1)
        law = dist.MixtureSameFamily(dist.Categorical(logits=logits), dist.Normal(loc, scale).to_event(1))
        with tasks_plate(t), full_plate("y_query_points", q, -1):
            pyro.sample("y_query", law, obs=batch.y_query)


def test_the_evaluator_reads_a_mixture_predictive_with_its_weights():
    y = torch.tensor([[-1.0, 0.0, 2.0, 5.0]]).unsqueeze(-1)  # 1 4 1
    batch = TaskBatch(torch.zeros(1, 1, 1), torch.zeros(1, 1, 1), torch.zeros(1, 4, 1), y)
    metrics, pred = evaluate(MetaLearner(_TwoComponents(), NoLatentGuide()), batch, num_samples=1)
    n = torch.distributions.Normal
    dens = 0.25 * n(-1.0, 0.5).log_prob(y[0, :, 0]).exp() + 0.75 * n(2.0, 1.0).log_prob(y[0, :, 0]).exp()
    assert_close(metrics["nll"]["mean"], -dens.log().mean(), rtol=1e-6)
    assert_close(metrics["mse"]["mean"], ((1.25 - y[0, :, 0]) ** 2).mean(), rtol=1e-6)  # mean 0.25*-1 + 0.75*2
    cdf = 0.25 * n(-1.0, 0.5).cdf(y[0, :, 0]) + 0.75 * n(2.0, 1.0).cdf(y[0, :, 0])
    inside50 = ((2 * cdf - 1).abs() <= 0.5).double().mean()
    assert_close(metrics["coverage50"]["mean"], inside50, rtol=1e-9)
    assert pred.log_weights.shape == (2, 1, 4) and pred.mean.shape == (2, 1, 4, 1)


def test_reference_rows_resolve_without_training_and_refuse_what_has_no_density():
    cfg = resolve(RunConfig(benchmark="sinusoid_line", method="oracle"))
    assert cfg.steps == 0 and cfg.eval_samples == 1
    for bench in ("sinusoid", "sinusoid_line", "sinusoid_bmaml"):
        assert resolve(RunConfig(benchmark=bench, method="prior")).steps == 0
    # noiseless targets: the exact posterior predictive is a point mass
    with pytest.raises(ConfigError, match="point mass"):
        resolve(RunConfig(benchmark="sinusoid", method="oracle"))
    # sinusoid_bmaml's posterior quadrature needs 3 points
    assert resolve(RunConfig(benchmark="sinusoid_bmaml", method="oracle", shots=5)).steps == 0
    with pytest.raises(ConfigError, match="at least 3 shots"):
        resolve(RunConfig(benchmark="sinusoid_bmaml", method="oracle", shots=2))
    with pytest.raises(ConfigError, match="omniglot"):
        resolve(RunConfig(benchmark="omniglot", method="prior"))
    from pyro_meta.methods import regression_methods

    assert not {"prior", "oracle"} & set(regression_methods())  # they are the scoreboard's reference rows


@pytest.mark.parametrize("family", ["sinusoid", "sinusoid_bmaml"])
def test_the_noiseless_prior_row_is_the_law_of_f_by_monte_carlo(family):
    """Noiseless query targets: the prior row's CDF at 3 inputs equals the empirical CDF of f(x) over
    400,000 tasks drawn by the family's sampler within 0.01 (Kolmogorov distance over 41 values), and its
    log density is finite."""
    from pyro_meta.tasks.registry import family_of

    fam = family_of(family)
    n = 100 if family == "sinusoid" else 30
    x = torch.tensor([-4.0, 0.5, 3.0], dtype=torch.float64).reshape(1, 3, 1)
    batch = TaskBatch(x[:, :1], torch.zeros(1, 1, 1, dtype=torch.float64), x, None)
    law = _law(ReferenceModel(fam, "prior", n=n, components=256), batch)
    f = fam.function(fam.draw_params(400_000, torch.Generator().manual_seed(0)), x.float().expand(400_000, -1, -1))
    ys = torch.linspace(-4.9, 4.9, 41, dtype=torch.float64)
    w = law.mixture_distribution.probs  # 1 3 K
    comp = law.component_distribution.base_dist  # loc/scale 1 3 K 1
    for v in ys:
        cdf = (w * torch.distributions.Normal(comp.loc[..., 0], comp.scale[..., 0]).cdf(v)).sum(-1)[0]  # 3
        emp = (f[..., 0].double() <= v).double().mean(0)
        assert (cdf - emp).abs().max() < 0.01, (float(v), cdf, emp)
    assert torch.isfinite(law.log_prob(torch.full((1, 3, 1), 0.3, dtype=torch.float64))).all()


def test_a_custom_familys_prior_row_by_monte_carlo_matches_the_quadrature():
    """``sinusoid_line`` registered as a user's family (no quadrature): the prior row from its sampler's
    pooled draws (nearest inputs) scores the same test tasks within 0.03 nats/point of the exact quadrature
    (measured on 100 tasks: 0.011)."""
    from pyro_meta.evaluate import evaluate as ev
    from pyro_meta.methods import build_learner
    from pyro_meta.run import benchmark_of
    from pyro_meta.tasks import register_benchmark, unregister_benchmark

    register_benchmark("line_or_sine", SinusoidLine())
    try:
        nll, test = {}, None
        for bench in ("sinusoid_line", "line_or_sine"):  # both on the built-in's test tasks
            cfg = resolve(RunConfig(benchmark=bench, method="prior", num_test_tasks=30, eval_queries=30))
            learner = build_learner(cfg)
            test = test or benchmark_of(cfg).test
            nll[bench] = ev(learner, test, num_samples=1)[0]["nll"]["mean"]
        assert "Monte Carlo" in learner.protocol["quadrature"]
        assert abs(nll["line_or_sine"] - nll["sinusoid_line"]) < 0.03, nll
    finally:
        unregister_benchmark("line_or_sine")


def test_cli_evaluates_the_oracle_like_any_run(tmp_path):
    out = tmp_path / "oracle"
    r = pyro_meta("train", "sinusoid_line", "--method", "oracle", "--test-tasks", 4, "--eval-queries", 10, "--out", out,
                  "--no-progress",
                  cwd=tmp_path)
    assert "trained 0 steps" in r.stdout and "oracle" in r.stdout
    ev = json.loads((out / "eval.json").read_text())
    m = ev["metrics"]
    assert m["nll"]["n"] == 4 and m["nll"]["mean"] < 1.5 and m["heldout_lpd"]["joint"] is False
    r = pyro_meta("evaluate", out, cwd=tmp_path)
    assert json.loads((out / "eval.json").read_text())["metrics"]["nll"] == m["nll"]


def test_the_bmaml_oracle_matches_a_brute_force_grid_around_the_posterior():
    """sinusoid_bmaml, 10 noisy support points (noise 0.01 A): the oracle's predictive mean and std of the
    noiseless f at 5 query inputs equal those of an independent brute-force quadrature, a 70^3 grid over
    (A, w, p) in a box of +-7 posterior standard deviations (prior x exact likelihood): the means within 1% of
    the std, the stds within 2.5% (measured: 1.5% wider, the cells' spread added on the 16 x 16 (a, b) grid
    of 0.75-std cells); and the true function's values sit within 4 std of the mean."""
    from pyro_meta.tasks.regression import SinusoidBMAML

    fam = SinusoidBMAML()
    batch = fam.fixed(1, 10, 5, seed=7).to(dtype=torch.float64)
    law = _law(ReferenceModel(fam, "oracle", n=30, components=256, posterior_n=8000), batch)
    mean, std = law.mean[0, :, 0], law.variance[0, :, 0].sqrt()
    params, log_w, _ = fam.posterior_grid(batch.x_support[0], batch.y_support[0], 8000)
    wts = log_w.exp()
    centre = {k: (wts * v).sum() for k, v in params.items()}
    spread = {k: ((wts * (v - centre[k]) ** 2).sum()).sqrt() for k, v in params.items()}
    axes = [torch.linspace(float(centre[k] - 7 * spread[k]), float(centre[k] + 7 * spread[k]), 70, dtype=torch.float64)
            for k in ("amplitude", "frequency", "phase")]
    a, w, p = (g.reshape(-1) for g in torch.meshgrid(*axes, indexing="ij"))
    x_s, y_s = batch.x_support[0, :, 0], batch.y_support[0, :, 0]
    f_s = a[:, None] * torch.sin(w[:, None] * x_s + p[:, None])  # G N
    sd = 0.01 * a[:, None]
    log_post = (-0.5 * ((y_s - f_s) / sd) ** 2 - sd.log()).sum(-1)  # the uniform prior is flat in the box
    post = torch.softmax(log_post, 0)
    f_q = a[:, None] * torch.sin(w[:, None] * batch.x_query[0, :, 0] + p[:, None])  # G Q
    bf_mean = (post[:, None] * f_q).sum(0)
    bf_std = ((post[:, None] * (f_q - bf_mean) ** 2).sum(0)).sqrt()
    assert ((mean - bf_mean).abs() < 0.01 * bf_std).all(), (mean, bf_mean, bf_std)
    assert ((std - bf_std).abs() < 0.025 * bf_std).all(), (std, bf_std)
    assert ((batch.y_query[0, :, 0] - mean).abs() < 4 * std).all()
