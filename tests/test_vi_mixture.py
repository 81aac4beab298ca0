"""The Bayesian mixture of Gaussians: CAVI, the closed-form ELBO, SVI and NUTS against each other.

Data: :func:`simulate_mixture` with n=200, K=3, sigma=5, seed 0 (true means -6, 0, 6, unit noise),
so the posterior sds of mu are ~0.12. Every tolerance below was set from errors measured on seeds 0-4
(stated per test) with a margin of at least 2x; the test runs seed 0.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_close

from pyro_meta.vi.mixture import (
    cavi,
    closed_form_elbo,
    initial_q,
    log_joint,
    run_nuts,
    run_svi,
    simulate_mixture,
    to_inference_data,
)

K, SIGMA = 3, 5.0
F64 = {"dtype": torch.float64}


def _normal(loc, scale):
    return torch.distributions.Normal(torch.as_tensor(loc, **F64), torch.as_tensor(scale, **F64))


@pytest.fixture(scope="module")
def data():
    x, mu, c = simulate_mixture(200, K, SIGMA, seed=0)
    return x, mu, c


@pytest.fixture(scope="module")
def cavi_fit(data):
    return cavi(data[0], K, SIGMA, iters=100)


def test_cavi_elbo_never_decreases(data, cavi_fit):
    """Each CAVI update is its block's exact maximizer, so the ELBO is non-decreasing; allowed slack
    1e-9 nats (float64 rounding of a sum of ~-500: measured worst drop 3.4e-13). Also a start from a
    poor initialization (all means near 0), where the climb is long."""
    x = data[0]
    assert cavi_fit.elbo_trace.diff().min() >= -1e-9
    assert cavi_fit.elbo_trace[-1] - cavi_fit.elbo_trace[0] > 1.0  # it did climb
    m0 = torch.tensor([-0.1, 0.0, 0.1], dtype=torch.float64)
    poor = cavi(x, K, SIGMA, iters=200, init=(m0, torch.ones(K, dtype=torch.float64), None))
    assert poor.elbo_trace.diff().min() >= -1e-9
    assert poor.elbo_trace[-1] - poor.elbo_trace[0] > 100.0
    # converged: the last rounds move less than 1e-8 nats
    assert cavi_fit.elbo_trace[-10:].diff().abs().max() < 1e-8


def test_cavi_optimum_is_stationary(data, cavi_fit):
    """At CAVI's fixed point the closed-form ELBO's gradient in (m, log s2, phi's logits) vanishes:
    autograd in float64, max |grad| < 1e-9 (measured <= 6e-14 on seeds 0-4 after 100 rounds). This
    catches update errors too small to move q visibly (e.g. the sign of s2 in phi's update)."""
    x = data[0]
    m = cavi_fit.m.clone().requires_grad_()
    log_s2 = (2 * cavi_fit.s.log()).requires_grad_()
    logits = cavi_fit.phi.clamp_min(1e-300).log().requires_grad_()
    value = closed_form_elbo(x, K, SIGMA, m, log_s2.exp(), torch.softmax(logits, -1))
    grads = torch.autograd.grad(value, (m, log_s2, logits))
    worst = max(g.abs().max() for g in grads)
    assert worst < 1e-9, worst


def _mc_elbo(x, m, s2, phi, num: int, seed: int):
    """E_q[log p(x, c, mu) - log q(c, mu)] by plain Monte Carlo (``num`` joint draws of mu and c):
    (estimate, standard error)."""
    g = torch.Generator().manual_seed(seed)
    mu = m + s2.sqrt() * torch.randn(num, K, generator=g, dtype=torch.float64)  # S K
    c = torch.multinomial(phi, num, replacement=True, generator=g).T  # S n

    log_p = (_normal(0.0, SIGMA).log_prob(mu).sum(-1) - x.numel() * math.log(K)
             + _normal(mu.gather(1, c), 1.0).log_prob(x).sum(-1))  # S
    log_q = _normal(m, s2.sqrt()).log_prob(mu).sum(-1) + phi.log().gather(1, c.T).T.sum(-1)  # S
    w = log_p - log_q
    return w.mean(), w.std() / math.sqrt(num)


@pytest.mark.parametrize("where", ["optimum", "init", "random"])
def test_closed_form_elbo_matches_monte_carlo(data, cavi_fit, where):
    """The closed form equals a 20,000-draw Monte Carlo estimate of E_q[log p - log q] within 4
    standard errors (SE measured 0.004 nats at the optimum, 0.027 at the init, 0.88 at the random q;
    |error|/SE <= 2.5 over 3 MC seeds each; a 4-SE band fails by chance with probability 6e-5).
    Checked at CAVI's optimum, at the initialization and at a random q (diffuse phi, wide q(mu)),
    where every term of the formula matters. The hand-written log joint used here is first checked
    against a trace of the Pyro model."""
    x = data[0]
    if where == "optimum":
        m, s2, phi = cavi_fit.m, cavi_fit.s**2, cavi_fit.phi
    elif where == "init":
        m, s2, phi = initial_q(x, K, SIGMA)
    else:
        g = torch.Generator().manual_seed(1)
        m = 3 * torch.randn(K, generator=g, dtype=torch.float64)
        s2 = torch.rand(K, generator=g, dtype=torch.float64) + 0.5
        phi = torch.softmax(torch.randn(x.numel(), K, generator=g, dtype=torch.float64), -1)
    mu, c = m.clone(), phi.argmax(-1)
    hand = (_normal(0.0, SIGMA).log_prob(mu).sum() - x.numel() * math.log(K)
            + _normal(mu[c], 1.0).log_prob(x).sum())
    assert_close(log_joint(x, K, SIGMA, mu, c), hand, rtol=1e-12)
    est, se = _mc_elbo(x, m, s2, phi, 20_000, seed=2)
    exact = closed_form_elbo(x, K, SIGMA, m, s2, phi)
    assert abs(est - exact) < 4 * se, f"MC {est:.4f} ± {se:.4f} vs closed form {exact:.4f}"


def test_guide_side_enumeration_is_the_mean_field_elbo(data, cavi_fit):
    """TraceEnum_ELBO with the guide's c enumerated estimates the same mean-field ELBO (only mu is
    sampled): 20 repeats of 500 vectorized particles average to the closed form within 4 SE of their
    mean (the q here has 3x the init's sds, so mu's sampling noise shows: SE measured 0.09-0.17 nats,
    |error| <= 0.8 SE over 3 seeds)."""
    from pyro.infer import TraceEnum_ELBO

    from pyro_meta.vi.mixture import MixtureGuide, mixture_model

    x = data[0]
    m, s2, phi = initial_q(x, K, SIGMA)
    guide = MixtureGuide(m, 3 * s2.sqrt(), phi)
    elbo = TraceEnum_ELBO(max_plate_nesting=1, num_particles=500, vectorize_particles=True)
    vals = torch.tensor([-elbo.loss(mixture_model, guide, x, K, SIGMA) for _ in range(20)], dtype=torch.float64)
    exact = closed_form_elbo(x, K, SIGMA, m, 9 * s2, phi)
    se = vals.std() / math.sqrt(vals.numel())
    assert abs(vals.mean() - exact) < 4 * se, f"{vals.mean():.4f} ± {se:.4f} vs {exact:.4f}"


@pytest.fixture(scope="module")
def svi_local(data):
    return run_svi(data[0], K, SIGMA, variant="local", steps=1000, seed=0)


@pytest.fixture(scope="module")
def svi_enum(data):
    return run_svi(data[0], K, SIGMA, variant="enum", steps=1000, seed=0)


def test_svi_local_reaches_cavi_optimum(cavi_fit, svi_local):
    """SVI over the full mean-field family (1000 Adam steps, lr 0.05 -> 0.001) ends within 0.03 nats
    of CAVI's optimum (closed-form ELBO at its final q; measured gap 0.002-0.009 on seeds 0-4), never
    above it by more than rounding, with max|m - m_CAVI| < 0.025 (measured <= 0.0095, ~0.08
    posterior sd) and s within 15% of CAVI's (measured <= 5.6%)."""
    gap = cavi_fit.elbo - svi_local.elbo
    assert -1e-6 < gap < 0.03, gap
    assert_close(svi_local.m, cavi_fit.m, rtol=0, atol=0.025)
    assert_close(svi_local.s, cavi_fit.s, rtol=0.15)
    # its -loss trace ends near the optimum too (one-draw noise: mean of the last 100 steps)
    assert abs(svi_local.elbo_trace[-100:].mean() - cavi_fit.elbo) < 0.3


def test_svi_enum_q_mu_matches_cavi(cavi_fit, svi_enum):
    """The collapsed family's q(mu) optimum differs from the mean-field one only through points with
    responsibilities away from 0/1 (about 1% of the points here), a shift far below SVI's own noise;
    tolerances as for the local guide, with s within 20% (measured <= 9.9%, max|dm| <= 0.0095). Its
    mean-field ELBO with phi set by CAVI's update is within 0.05 nats of the optimum (measured
    <= 0.013), and its collapsed -loss lies above it (Jensen)."""
    assert_close(svi_enum.m, cavi_fit.m, rtol=0, atol=0.025)
    assert_close(svi_enum.s, cavi_fit.s, rtol=0.2)
    assert 0 <= cavi_fit.elbo - svi_enum.info["meanfield_elbo_phi_opt"] < 0.05
    assert svi_enum.elbo_trace[-100:].mean() > cavi_fit.elbo - 0.3


def test_nuts_agrees_with_cavi(data, cavi_fit):
    """NUTS (c enumerated; 200 warmup + 200 draws, ~4 s) against CAVI's q(mu): |mean difference| <
    0.4 CAVI sds (measured <= 0.10 on seeds 0-5; Monte Carlo error of a mean with ESS ~100 is ~0.1 sd);
    each sd within 45% of CAVI's (measured <= 22%: the sd of 200 correlated draws is the noisier
    statistic) and their mean ratio within 20% (measured 0.92-1.10), which a sqrt(2) error in s or a
    noise sd of 1.3 in the model would break; assignment probabilities within 0.1 (measured <= 0.024).
    With components 6 noise sds apart the chain never switches labels (relabelled fraction 0)."""
    nuts = run_nuts(data[0], K, SIGMA, num_samples=200, warmup_steps=200, seed=0)
    assert nuts.mu_draws.shape == (200, K)
    assert nuts.info["relabelled"] == 0.0
    assert ((nuts.m - cavi_fit.m) / cavi_fit.s).abs().max() < 0.4
    assert_close(nuts.s, cavi_fit.s, rtol=0.45)
    assert abs((nuts.s / cavi_fit.s).mean() - 1) < 0.2
    # assignment probabilities agree too (they are nearly 0/1 except near the boundaries)
    assert (nuts.phi - cavi_fit.phi).abs().max() < 0.1
    idata = to_inference_data(nuts)
    assert idata.posterior["mu"].shape == (1, 200, K)
    q = to_inference_data(cavi_fit, num_draws=4000)
    assert_close(torch.as_tensor(q.posterior["mu"].mean(("chain", "draw")).values), cavi_fit.m,
                 rtol=0, atol=0.02)


def test_bad_input_messages():
    x = torch.zeros(5, 2)
    with pytest.raises(ValueError, match="1-D"):
        cavi(x, K, SIGMA)
    with pytest.raises(ValueError, match="variant"):
        run_svi(torch.randn(10), K, SIGMA, variant="nope")


def test_experiment_script_quick(tmp_path):
    """The experiment's main runs with --quick and writes the PNG and results.md."""
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("vi_mixture_exp", REPO / "experiments/vi_mixture.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--quick", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "results.md").read_text()
    for name in ("| CAVI |", "| SVI-local |", "| SVI-enum |", "| NUTS |"):
        assert name in text
    png = tmp_path / "vi_mixture.png"
    assert png.stat().st_size > 10_000


def test_cli_vi_mixture(tmp_path):
    """``pyro-meta vi mixture --quick`` writes the figure and the results with the command that repeats it."""
    from pyro_meta.cli import main as cli

    out = tmp_path / "cli"
    assert cli(["vi", "mixture", "--quick", "--out", str(out)]) == 0
    text = (out / "results.md").read_text()
    assert (out / "vi_mixture.png").stat().st_size > 10_000
    assert "Command: `pyro-meta vi mixture --n 100 --K 3" in text and "| NUTS |" in text
