"""LeanTrace_ELBO gives Trace_ELBO's estimate and gradient (float64, same draws), for every built-in
method that uses it and for the cases its short path does not take; PointNormal, LogScaleNormal and
PrecisionNormal are the Normal laws they stand for, in value and gradient; the plates the models reuse
are reused."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import assert_close
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from pyro_meta.config import RunConfig
from pyro_meta.distributions import LogScaleNormal, PointMass, PrecisionNormal
from pyro_meta.infer import LeanTrace_ELBO, LeanTraceMeanField_ELBO
from pyro_meta.likelihoods import Gaussian, PointNormal
from pyro_meta.methods import build_learner
from pyro_meta.models.base import full_plate, tasks_plate
from pyro_meta.tasks import Sinusoid

SINUSOID_CASES = {
    "maml": {"inner_steps": 2},
    "maml-learned-noise": {"method": "maml", "inner_steps": 2, "learn_noise": True, "noise_std": 0.5},
    "abml-paper": {"method": "abml", "inner_steps": 2, "objective": "paper", "learn_noise": True},
    "abml-joint-2-inner-samples": {"method": "abml", "inner_steps": 2, "objective": "joint", "inner_samples": 2},
    "amortized-mc-4-samples": {"method": "amortized", "kl_estimator": "mc", "train_samples": 4},
    "platipus-mc": {"method": "platipus", "kl_estimator": "mc"},
}


def _loss_and_grads(objective, learner, batch, seed: int):
    pyro.set_rng_seed(seed)
    learner.zero_grad(set_to_none=True)
    with poutine.scale(scale=1.0 / batch.num_tasks):
        loss = objective.differentiable_loss(learner.model, learner.guide, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in learner.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _compare(lean, plain, learner, batch, seed: int = 3) -> None:
    loss_a, grads_a = _loss_and_grads(lean, learner, batch, seed)
    loss_b, grads_b = _loss_and_grads(plain, learner, batch, seed)
    assert_close(loss_a, loss_b, rtol=1e-12, atol=1e-12, msg="loss")
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        assert_close(grads_a[name], grads_b[name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("case", sorted(SINUSOID_CASES))
def test_built_in_methods_get_trace_elbos_loss_and_gradient(case):
    settings = {"method": case, **SINUSOID_CASES[case]}
    torch.set_default_dtype(torch.float64)
    learner = build_learner(RunConfig(meta_batch=3, shots=4, **settings)).double()
    lean = learner.objective
    assert isinstance(lean, LeanTrace_ELBO), type(lean)
    plain = Trace_ELBO(num_particles=lean.num_particles, vectorize_particles=lean.vectorize_particles,
                       max_plate_nesting=lean.max_plate_nesting)
    batch = Sinusoid().sample(3, 4, 4, torch.Generator().manual_seed(1)).to("cpu", torch.float64)
    with pyro.validation_enabled(False):  # the short path runs only with validation off
        _compare(lean, plain, learner, batch)


ANALYTIC_CASES = {
    "platipus": {"method": "platipus"},
    "amortized": {"method": "amortized", "kl_estimator": "analytic"},
    "amortized-4-samples": {"method": "amortized", "kl_estimator": "analytic", "train_samples": 4},
}


@pytest.mark.parametrize("case", sorted(ANALYTIC_CASES))
def test_closed_form_kl_objectives_get_trace_mean_field_elbos_loss_and_gradient(case):
    torch.set_default_dtype(torch.float64)
    learner = build_learner(RunConfig(meta_batch=3, shots=4, **ANALYTIC_CASES[case])).double()
    lean = learner.objective
    assert isinstance(lean, LeanTraceMeanField_ELBO), type(lean)
    plain = TraceMeanField_ELBO(num_particles=lean.num_particles, vectorize_particles=lean.vectorize_particles,
                                max_plate_nesting=lean.max_plate_nesting)
    batch = Sinusoid().sample(3, 4, 4, torch.Generator().manual_seed(1)).to("cpu", torch.float64)
    with pyro.validation_enabled(False):
        _compare(lean, plain, learner, batch)


def _mean_field_model(data, *_):
    with full_plate("mf_data", data.shape[0], -1):
        loc = pyro.sample("loc", dist.Normal(torch.zeros(data.shape[0]), 1.0))  # Normal-Normal: closed form
        with poutine.mask(mask=data > -1.0):
            pyro.sample("x", dist.Normal(loc, 1.0), obs=data)
    with poutine.scale(scale=0.5):
        pyro.sample("heavy", dist.StudentT(3.0, torch.zeros(()), 1.0))  # no closed form against a Normal


def _mean_field_guide(data, q_loc, q_scale):
    with full_plate("mf_data", data.shape[0], -1):
        pyro.sample("loc", dist.Normal(q_loc, q_scale))
    with poutine.scale(scale=0.5):
        pyro.sample("heavy", dist.Normal(q_loc.sum(), q_scale.sum()))
    pyro.sample("aux", dist.Normal(q_loc.mean(), 1.0), infer={"is_auxiliary": True})  # a guide-only site


def test_lean_mean_field_takes_the_closed_form_where_there_is_one_and_log_densities_elsewhere():
    data = torch.tensor([0.3, -2.0, 1.1], dtype=torch.float64)
    results = []
    for objective in (LeanTraceMeanField_ELBO(), TraceMeanField_ELBO()):
        q_loc = torch.tensor([0.1, 0.2, -0.3], dtype=torch.float64, requires_grad=True)
        q_scale = torch.tensor([0.5, 0.7, 0.9], dtype=torch.float64, requires_grad=True)
        pyro.set_rng_seed(0)
        with pyro.validation_enabled(False):
            loss = objective.differentiable_loss(_mean_field_model, _mean_field_guide, data, q_loc, q_scale)
        loss.backward()
        results.append((loss.detach(), q_loc.grad, q_scale.grad))
    for a, b in zip(*results):
        assert_close(a, b, rtol=1e-12, atol=1e-12)


def _toy_model(data):
    loc = pyro.sample("loc", dist.Normal(torch.zeros(()), 1.0))
    with full_plate("toy_data", data.shape[0], -1):
        with poutine.mask(mask=data > -1.0):  # a tensor mask: some points drop out
            pyro.sample("x", dist.Normal(loc, 1.0), obs=data)
    with poutine.scale(scale=0.5):
        pyro.sample("extra", dist.Normal(loc, 2.0))


def _toy_guide(data, q_loc, q_scale):
    pyro.sample("loc", dist.Normal(q_loc, q_scale))
    pyro.sample("extra", dist.Delta(q_loc * 2.0, log_density=torch.log(q_scale)))


@pytest.mark.parametrize("particles,vectorize", [(1, False), (3, False), (4, True)])
def test_scales_masks_particles_and_delta_sites(particles, vectorize):
    torch.set_default_dtype(torch.float64)
    data = torch.tensor([0.3, -2.0, 1.5, 0.7])
    q_loc, q_scale = torch.tensor(0.2, requires_grad=True), torch.tensor(0.8, requires_grad=True)
    out = []
    for cls in (LeanTrace_ELBO, Trace_ELBO):
        elbo = cls(num_particles=particles, vectorize_particles=vectorize, max_plate_nesting=1)
        pyro.set_rng_seed(5)
        with pyro.validation_enabled(False):
            loss = elbo.differentiable_loss(_toy_model, lambda d: _toy_guide(d, q_loc, q_scale), data)
        out.append((loss.detach(), *torch.autograd.grad(loss, (q_loc, q_scale))))
    for a, b in zip(*out):
        assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_a_guide_without_rsample_falls_back_to_trace_elbos_surrogate():
    """A Bernoulli guide site needs the score-function term; the lean path hands those runs to Trace_ELBO's
    estimator, with the same draws (the first run's traces are reused, not redrawn)."""
    torch.set_default_dtype(torch.float64)
    p = torch.tensor(0.3, requires_grad=True)
    loc = torch.tensor(0.5, requires_grad=True)

    def model():
        z = pyro.sample("z", dist.Bernoulli(torch.tensor(0.5)))
        w = pyro.sample("w", dist.Normal(torch.tensor(0.0), 1.0))
        pyro.sample("y", dist.Normal(w + z, 1.0), obs=torch.tensor(1.2))

    def guide():
        pyro.sample("w", dist.Normal(loc, 0.7))
        pyro.sample("z", dist.Bernoulli(p))

    out = []
    for cls in (LeanTrace_ELBO, Trace_ELBO):
        pyro.set_rng_seed(7)
        with pyro.validation_enabled(False):
            loss = cls(num_particles=3).differentiable_loss(model, guide)
        out.append((loss.detach(), *torch.autograd.grad(loss, (p, loc))))
    for a, b in zip(*out):
        assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert float(out[0][1]) != 0.0  # the score-function gradient reached p


def test_independent_sites_with_and_without_a_mask_match_trace_elbo():
    """An Independent site is summed through its base law when nothing is masked, and through its own
    log_prob under a tensor mask (which drops whole events) or a tensor scale (which weights them)."""
    torch.set_default_dtype(torch.float64)
    loc = torch.tensor([0.2, -0.4, 0.9], requires_grad=True)
    data = torch.tensor([[0.1, 0.5, -1.0], [2.0, -0.3, 0.4]])

    def model():
        w = pyro.sample("w", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        with full_plate("rows", 2, -1), poutine.mask(mask=torch.tensor([True, False])):
            pyro.sample("y", dist.Normal(w, 0.5).to_event(1), obs=data)
        with full_plate("rows_all", 2, -1):
            pyro.sample("y_all", dist.Laplace(w, 0.5).to_event(1), obs=data)
        with full_plate("rows_scaled", 2, -1), poutine.scale(scale=torch.tensor([0.5, 2.0])):
            pyro.sample("y_scaled", dist.Normal(w, 0.7).to_event(1), obs=data)  # a tensor scale per row

    def guide():
        pyro.sample("w", dist.Normal(loc, 0.3).to_event(1))

    out = []
    for cls in (LeanTrace_ELBO, Trace_ELBO):
        pyro.set_rng_seed(2)
        with pyro.validation_enabled(False):
            loss = cls().differentiable_loss(model, guide)
        out.append((loss.detach(), *torch.autograd.grad(loss, (loc,))))
    for a, b in zip(*out):
        assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_with_validation_on_it_is_trace_elbo(monkeypatch):
    calls = []
    original = Trace_ELBO.differentiable_loss
    monkeypatch.setattr(Trace_ELBO, "differentiable_loss",
                        lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    data = torch.tensor([0.1, 0.2])
    guide = lambda d: _toy_guide(d, torch.tensor(0.0), torch.tensor(1.0))  # noqa: E731
    with pyro.validation_enabled(True):
        LeanTrace_ELBO().differentiable_loss(_toy_model, guide, data)
    assert calls == [1]
    with pyro.validation_enabled(False):
        LeanTrace_ELBO().differentiable_loss(_toy_model, guide, data)
    assert calls == [1]


@pytest.mark.parametrize("learned", [False, True])
def test_point_normal_is_the_independent_normal(learned):
    torch.set_default_dtype(torch.float64)
    lik = Gaussian(0.6, learn_noise=learned).double()
    f = torch.randn(2, 3, 4, 2)
    y = torch.randn(3, 4, 2)
    d = lik(f)
    ref = dist.Normal(f, lik.noise_std.to(f.dtype)).to_event(1)
    assert isinstance(d, PointNormal) and isinstance(d, torch.distributions.Normal)
    assert (d.batch_shape, d.event_shape) == (ref.batch_shape, ref.event_shape) == ((2, 3, 4), (2,))
    assert_close(d.log_prob(y), ref.log_prob(y), rtol=1e-12)
    assert_close(d.entropy(), ref.entropy(), rtol=1e-12)
    assert_close(d.mean, ref.mean)
    assert_close(d.stddev, ref.stddev)
    assert_close(d.scale, ref.base_dist.scale)
    assert d.expand((2, 3, 4)) is d
    wide = d.expand((5, 2, 3, 4))
    assert wide.batch_shape == (5, 2, 3, 4) and wide.log_prob(y).shape == (5, 2, 3, 4)
    assert d.sample((7,)).shape == (7, 2, 3, 4, 2) and d.rsample().shape == f.shape
    # the likelihood's inner-loop loss is the same density
    assert_close(lik.point_loss(f, y), -ref.log_prob(y), rtol=1e-12)


def test_plates_are_built_once_per_name_size_and_dim():
    assert tasks_plate(5) is tasks_plate(5) is full_plate("tasks", 5, -2)
    assert tasks_plate(5) is not tasks_plate(6)
    assert full_plate("a_points", 3, -1) is not full_plate("b_points", 3, -1)
    with tasks_plate(4):
        with full_plate("x_points", 2, -1):
            v = pyro.sample("v", dist.Normal(0.0, 1.0))
    assert v.shape == (4, 2)
    with tasks_plate(4):  # reused, same result
        assert pyro.sample("v", dist.Normal(torch.zeros(1, 1), 1.0)).shape == (4, 1)


def _grads(fn, *params):
    return torch.autograd.grad(fn(), params)


def test_log_scale_normal_is_the_normal_in_value_and_gradient_at_its_own_draws():
    torch.set_default_dtype(torch.float64)
    loc = torch.randn(3, 1, 4, requires_grad=True)
    log_scale = (0.3 * torch.randn(3, 1, 4)).requires_grad_()
    q = LogScaleNormal(loc, log_scale)
    ref = dist.Normal(loc, torch.exp(log_scale))
    assert isinstance(q, dist.Normal) and q.batch_shape == ref.batch_shape
    assert_close(q.scale, ref.scale)
    assert_close(q.entropy(), ref.entropy(), rtol=1e-12)
    pyro.set_rng_seed(2)
    v = q.rsample((2,))  # the shortcut: log q from the kept eps
    pyro.set_rng_seed(2)
    v_ref = ref.rsample((2,))
    assert_close(v, v_ref, rtol=1e-12)
    a = _grads(lambda: (q.log_prob(v) * torch.arange(1.0, 25.0).view(2, 3, 1, 4)).sum() + v.sum(), loc, log_scale)
    b = _grads(lambda: (ref.log_prob(v_ref) * torch.arange(1.0, 25.0).view(2, 3, 1, 4)).sum() + v_ref.sum(), loc, log_scale)
    for x, y in zip(a, b):
        assert_close(x, y, rtol=1e-10, atol=1e-12)
    other = torch.randn(3, 1, 4)  # any other value: Normal's formula
    assert_close(q.log_prob(other), ref.log_prob(other), rtol=1e-12)
    assert q.expand((3, 1, 4)) is q and q.expand((2, 3, 1, 4)).log_prob(other).shape == (2, 3, 1, 4)


def test_precision_normal_is_the_normal_and_broadcasts_lazily():
    torch.set_default_dtype(torch.float64)
    loc = torch.randn(4, requires_grad=True)
    prec = torch.rand(4).add(0.5).requires_grad_()
    p = PrecisionNormal(loc, prec)
    ref = dist.Normal(loc, prec.rsqrt())
    value = torch.randn(3, 1, 4)
    assert_close(p.log_prob(value), ref.log_prob(value), rtol=1e-12)
    for x, y in zip(_grads(lambda: p.log_prob(value).sum(), loc, prec),
                    _grads(lambda: ref.log_prob(value).sum(), loc, prec)):
        assert_close(x, y, rtol=1e-10, atol=1e-12)
    wide = p.expand((3, 1, 4))
    assert wide.batch_shape == (3, 1, 4) and wide._loc.shape == (4,)  # parameters not expanded
    assert_close(wide.log_prob(torch.zeros(4)), ref.expand((3, 1, 4)).log_prob(torch.zeros(4)), rtol=1e-12)
    assert_close(wide.loc, ref.expand((3, 1, 4)).loc)
    assert wide.scale.shape == (3, 1, 4)
    assert_close(p.entropy(), ref.entropy(), rtol=1e-12)
    assert wide.rsample((2,)).shape == (2, 3, 1, 4) and wide.sample().shape == (3, 1, 4)
    # TraceMeanField_ELBO's closed-form KL sees a Normal
    kl = torch.distributions.kl_divergence(LogScaleNormal(loc, torch.zeros(4)).to_event(1), p.to_event(1))
    assert_close(kl, torch.distributions.kl_divergence(dist.Normal(loc, 1.0).to_event(1), ref.to_event(1)),
                 rtol=1e-12)


def test_a_reused_plate_leaves_the_same_trace_every_time():
    def model():
        with full_plate("fresh_plate_for_this_test", 3, -1):
            pyro.sample("v", dist.Normal(torch.zeros(3), 1.0))

    first, second = ({n for n, s in poutine.trace(model).get_trace().nodes.items() if s["type"] == "sample"}
                     for _ in range(2))
    assert first == second == {"v"}  # no subsample site, not even in the trace that built the plate


def test_point_mass_is_a_delta_with_zero_log_density():
    torch.set_default_dtype(torch.float64)
    v = torch.randn(3, 1, 4, requires_grad=True)
    p, ref = PointMass(v, event_dim=1), dist.Delta(v, event_dim=1)
    assert isinstance(p, dist.Delta) and (p.batch_shape, p.event_shape) == (ref.batch_shape, ref.event_shape)
    assert p.expand((3, 1)) is p and p.rsample() is v
    assert_close(p.log_prob(v), ref.log_prob(v))
    other = v.detach() + 1.0
    assert torch.equal(p.log_prob(other), ref.log_prob(other))  # -inf off the point
    wide = p.expand((2, 3, 1))
    assert wide.batch_shape == (2, 3, 1) and wide.rsample().shape == (2, 3, 1, 4)
    assert p.rsample((5,)).shape == (5, 3, 1, 4) and torch.equal(p.mean, v)
    # an unobserved point mass adds nothing to the lean ELBO, as Delta's log density 0 does to Trace_ELBO's
    q_loc = torch.tensor(0.3, requires_grad=True)

    def guide(data):
        pyro.sample("loc", PointMass(q_loc))
        pyro.sample("extra", dist.Normal(q_loc, 1.0))

    out = []
    for cls in (LeanTrace_ELBO, Trace_ELBO):
        pyro.set_rng_seed(1)
        with pyro.validation_enabled(False):
            loss = cls().differentiable_loss(_toy_model, guide, torch.tensor([0.5, 1.0]))
        out.append((loss.detach(), *torch.autograd.grad(loss, (q_loc,))))
    for a, b in zip(*out):
        assert_close(a, b, rtol=1e-12, atol=1e-12)
