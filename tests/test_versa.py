"""VERSA: the per-class amortized guide, the ML-PIP objective against hand computations, the local
reparameterization against weight sampling, and the classification paths of the evaluator and export."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from conftest import assert_close

from pyro_meta.arviz import to_inference_data
from pyro_meta.evaluate import evaluate, predict
from pyro_meta.guides import VERSAGuide, class_means
from pyro_meta.infer import MLPIP
from pyro_meta.learner import MetaLearner
from pyro_meta.models import VERSAModel
from pyro_meta.nn import MLP, Conv4
from pyro_meta.tasks import TaskBatch

T, C, K, Q, IN = 3, 4, 2, 5, 6


def _batch(dtype=torch.float32, seed=0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(T, C * K, IN, generator=g, dtype=dtype)
    ys = torch.arange(C).repeat_interleave(K).expand(T, -1).contiguous()  # T C*K, class-major
    xq = torch.randn(T, C * Q, IN, generator=g, dtype=dtype)
    yq = torch.arange(C).repeat_interleave(Q).expand(T, -1).contiguous()
    return TaskBatch(xs, ys, xq, yq)


def _versa(dtype=torch.float32, features=None):
    torch.manual_seed(0)
    net = features or MLP([IN, 10, 8], "elu")
    model = VERSAModel(net, net.init(torch.Generator().manual_seed(0)))
    guide = VERSAGuide(model, [16, 16])
    return model.to(dtype), guide.to(dtype)


def test_class_means_by_hand():
    h = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [5.0, 4.0]]])  # 1 task, 3 points, F=2
    y = torch.tensor([[1, 0, 1]])
    assert_close(class_means(h, y, 2), [[[3.0, 2.0], [3.0, 2.0]]], rtol=0)
    y = torch.tensor([[0, 0, 1]])
    assert_close(class_means(h, y, 2), [[[2.0, 1.0], [5.0, 4.0]]], rtol=0)


@pytest.mark.parametrize("features", ["mlp", "conv4"])
def test_guide_is_invariant_to_the_order_of_the_support_set(features):
    net = Conv4(None, image_size=12, filters=4, blocks=2) if features == "conv4" else None
    model, guide = _versa(features=net)
    if features == "conv4":
        g = torch.Generator().manual_seed(1)
        batch = TaskBatch(torch.rand(T, C * K, 1, 12, 12, generator=g),
                          torch.arange(C).repeat_interleave(K).expand(T, -1).contiguous(),
                          torch.rand(T, C, 1, 12, 12, generator=g), torch.arange(C).expand(T, -1).contiguous())
    else:
        batch = _batch()
    loc, scale = guide.posterior(batch)
    assert loc.shape == scale.shape == (T, C, model.psi_dim)
    perm = torch.stack([torch.randperm(C * K, generator=torch.Generator().manual_seed(t)) for t in range(T)])
    shuffled = TaskBatch(torch.stack([batch.x_support[t, perm[t]] for t in range(T)]),
                         torch.stack([batch.y_support[t, perm[t]] for t in range(T)]),
                         batch.x_query, batch.y_query)
    assert not torch.equal(shuffled.y_support, batch.y_support)
    loc2, scale2 = guide.posterior(shuffled)
    assert_close(loc2, loc, rtol=1e-5, atol=1e-6)
    assert_close(scale2, scale, rtol=1e-5, atol=1e-6)


def test_guide_works_per_class():
    """Changing one class's support images changes only that class's q."""
    model, guide = _versa()
    batch = _batch()
    loc, _ = guide.posterior(batch)
    xs = batch.x_support.clone()
    xs[0, 2 * K:3 * K] += 1.0  # class 2 of task 0
    loc2, _ = guide.posterior(TaskBatch(xs, batch.y_support, batch.x_query, batch.y_query))
    changed = (loc2 - loc).abs().amax(-1) > 1e-6  # T C
    expected = torch.zeros(T, C, dtype=torch.bool)
    expected[0, 2] = True
    assert torch.equal(changed, expected)


def _hand_mlpip(model, guide, batch, eps):
    """The ML-PIP loss with explicit loops: mean over tasks of the mean over query points of
    log((1/L) sum_l softmax(a_l)[y]), a_l = mu + sqrt(var) * eps_l per logit."""
    loc, scale = guide.posterior(batch)
    h = model.features(batch.x_query)
    L = eps.shape[0]
    f = h.shape[-1]
    total = 0.0
    for t in range(batch.num_tasks):
        per_point = 0.0
        for q in range(batch.num_query):
            probs_y = 0.0
            for draw in range(L):
                logits = []
                for c in range(loc.shape[1]):
                    mean = sum(float(h[t, q, i] * loc[t, c, i]) for i in range(f)) + float(loc[t, c, f])
                    var = sum(float(h[t, q, i] ** 2 * scale[t, c, i] ** 2) for i in range(f)) + float(scale[t, c, f] ** 2)
                    logits.append(mean + math.sqrt(var) * float(eps[draw, t, q, c]))
                m = max(logits)
                z = sum(math.exp(a - m) for a in logits)
                probs_y += math.exp(logits[int(batch.y_query[t, q])] - m) / z
            per_point += math.log(probs_y / L)
        total += per_point / batch.num_query
    return -total / batch.num_tasks


def test_mlpip_local_reparam_equals_hand_computation():
    model, guide = _versa(torch.float64)
    batch = _batch(torch.float64)
    L = 4
    objective = MLPIP(num_samples=L, local_reparam=True)
    learner = MetaLearner(model, guide, objective)
    torch.manual_seed(123)
    loss = learner.loss(batch)
    torch.manual_seed(123)  # the loss traces the guide (one draw of psi), then draws the logit noise
    with torch.no_grad():
        guide(batch)
    eps = torch.randn(L, T, C * Q, C, dtype=torch.float64)
    with torch.no_grad():
        expected = _hand_mlpip(model, guide, batch, eps)
    assert_close(loss, expected, rtol=1e-10)


def test_mlpip_weight_samples_with_a_point_guide_is_the_log_likelihood():
    """With q's variance ~0 every sample gives the same psi = loc: the loss is the mean query NLL."""
    model, guide = _versa(torch.float64)
    with torch.no_grad():
        guide.w_logvar.bias.fill_(-60.0)  # clamped at LOGVAR_MIN: std e^-10
        guide.b_logvar.bias.fill_(-60.0)
        for head in (guide.w_logvar, guide.b_logvar):
            head.weight.zero_()
    batch = _batch(torch.float64)
    for local in (True, False):
        loss = MetaLearner(model, guide, MLPIP(8, local_reparam=local)).loss(batch)
        loc, _ = guide.posterior(batch)
        logits = model.logits(model.features(batch.x_query), loc)  # T Q C
        nll = -torch.log_softmax(logits, -1).gather(-1, batch.y_query.unsqueeze(-1)).squeeze(-1)
        assert_close(loss, nll.mean(), rtol=1e-4)  # the std e^-10 leaves ~1e-6 of noise


def test_local_reparam_moments_match_weight_sampling():
    model, guide = _versa(torch.float64)
    batch = _batch(torch.float64)
    with torch.no_grad():
        loc, scale = guide.posterior(batch)
        mean, var = model.logit_moments(batch, loc, scale)
        psi = loc + scale * torch.randn((200_000,) + loc.shape, dtype=torch.float64)
        a = model.logits(model.features(batch.x_query), psi)  # N T Q C
    assert_close(a.mean(0), mean, rtol=0, atol=5 * float(var.sqrt().max()) / math.sqrt(200_000))
    assert_close(a.var(0), var, rtol=0.02)


def test_mlpip_gradients_reach_theta_and_the_amortizer():
    model, guide = _versa()
    loss = MetaLearner(model, guide, MLPIP(5)).loss(_batch())
    loss.backward()
    assert model.theta.grad is not None and model.theta.grad.abs().sum() > 0
    for p in guide.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()


def test_mlpip_rejects_bad_settings_and_input():
    with pytest.raises(ValueError, match="positive integer"):
        MLPIP(num_samples=0)
    model, guide = _versa()
    with pytest.raises(ValueError, match="query labels"):
        MLPIP().differentiable_loss(model, guide, _batch().without_query_labels())


def test_elbo_variant_runs_and_differs_from_mlpip_by_the_kl():
    """Trace_ELBO on the same model: -ELBO >= ML-PIP's loss in expectation is not guaranteed per sample,
    but the KL to N(0, I) makes the ELBO loss larger here by a clear margin."""
    model, guide = _versa()
    batch = _batch()
    elbo = MetaLearner(model, guide, pyro.infer.Trace_ELBO(num_particles=10, vectorize_particles=True,
                                                          max_plate_nesting=2)).loss(batch)
    mlpip = MetaLearner(model, guide, MLPIP(10)).loss(batch)
    assert torch.isfinite(elbo) and elbo > mlpip


def test_classification_evaluation_and_export():
    model, guide = _versa()
    learner = MetaLearner(model, guide, MLPIP(5), name="versa")
    batch = _batch()
    metrics, _ = evaluate(learner, batch, num_samples=7, seed=0)
    for k in ("accuracy", "nll", "brier"):
        assert metrics[k]["n"] == T and math.isfinite(metrics[k]["mean"])
    assert 0 <= metrics["ece"]["value"] <= metrics["mce"]["value"] <= 1
    assert sum(metrics["reliability"]["count"]) == T * C * Q
    pred = predict(learner, batch, 7, seed=0)
    assert pred.latents["psi"].shape == (7, T, C, model.psi_dim)
    # the predictive is the mean over draws of softmax(logits(psi_s))
    h = model.features(batch.x_query)
    probs = torch.softmax(model.logits(h, pred.latents["psi"]), -1).mean(0)
    assert_close(pred.mean.mean(0), probs, rtol=1e-5, atol=1e-6)
    idata = to_inference_data(learner, batch, prediction=pred)
    assert idata.posterior["psi"].dims == ("chain", "draw", "task", "class", "psi_dim")
    assert list(idata.posterior["psi_dim"].values[-2:]) == ["w[7]", "b"]
    assert idata.posterior_predictive["y_query"].dims == ("chain", "draw", "task", "query")
    assert_close(idata.heldout_log_likelihood["y_query"].values[0], pred.log_lik, rtol=0, atol=0)
    assert "log_likelihood" not in idata.groups()  # VERSA's model observes no support point
    assert (idata.observed_data["y_query"].values == batch.y_query.numpy()).all()
