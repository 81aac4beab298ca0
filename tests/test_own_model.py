"""A user's own meta-model: each silent mistake of the issue is now a clear error at step 1, the
evaluator never hands the guide the query labels, and the held-out log predictive density matches an
exact computation on a conjugate linear-Gaussian meta-model."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import assert_close
from torch import nn

from pyro_meta import MetaLearner, TaskBatch
from pyro_meta.checks import ModelCheckError, check_learner
from pyro_meta.evaluate import LeakError, evaluate, predict
from pyro_meta.likelihoods import Gaussian
from pyro_meta.models import observe, tasks_plate
from pyro_meta.train import fit

T, S, Q, D = 6, 4, 5, 2
NOISE, PRIOR_STD = 0.3, 1.0


def features(x: torch.Tensor) -> torch.Tensor:
    """``[..., N, 1]`` -> ``[..., N, 2]``: (1, x)."""
    return torch.cat([torch.ones_like(x), x], -1)


def linear_tasks(num_tasks: int, shots: int, queries: int, generator: torch.Generator) -> TaskBatch:
    """y = phi . (1, x) + N(0, NOISE^2), phi ~ N((0.5, -1), PRIOR_STD^2 I)."""
    phi = torch.tensor([0.5, -1.0]) + PRIOR_STD * torch.randn(num_tasks, 1, D, generator=generator)
    x = 4 * torch.rand(num_tasks, shots + queries, 1, generator=generator) - 2
    y = (features(x) * phi).sum(-1, keepdim=True) + NOISE * torch.randn(num_tasks, shots + queries, 1,
                                                                          generator=generator)
    return TaskBatch(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:], {"phi": phi[:, 0]})


class LinearModel(nn.Module):
    """phi_t ~ N(mu, PRIOR_STD^2 I); y ~ N(phi_t . (1, x), NOISE^2) on support and query."""

    def __init__(self, query_site: str = "y_query", in_plate: bool = True):
        super().__init__()
        self.mu = nn.Parameter(torch.zeros(D))
        self.likelihood = Gaussian(NOISE)
        self.query_site, self.in_plate = query_site, in_plate

    def forward(self, batch: TaskBatch):
        prior = dist.Normal(self.mu, PRIOR_STD).to_event(1)
        if not self.in_plate:  # the mistake: a per-task site outside the plate
            phi = pyro.sample("phi", prior.expand([batch.num_tasks, 1]))
        with tasks_plate(batch.num_tasks):
            if self.in_plate:
                phi = pyro.sample("phi", prior)  # ..., T 1 D
            f_s = (features(batch.x_support) * phi).sum(-1, keepdim=True)  # ..., T S 1
            f_q = (features(batch.x_query) * phi).sum(-1, keepdim=True)
            observe("y_support", self.likelihood, f_s, batch.y_support)
            observe(self.query_site, self.likelihood, f_q, batch.y_query)


def exact_posterior(mu: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``N(m, C)`` of phi given ``(x, y)``: ``m [T, D]``, ``C [T, D, D]``."""
    X = features(x)  # T N D
    prec = torch.eye(D, dtype=x.dtype) / PRIOR_STD**2 + X.transpose(-1, -2) @ X / NOISE**2
    cov = torch.linalg.inv(prec)
    m = (cov @ (mu.to(x.dtype) / PRIOR_STD**2 + (X.transpose(-1, -2) @ y)[..., 0] / NOISE**2).unsqueeze(-1))[..., 0]
    return m, cov


class ExactGuide(nn.Module):
    """The exact conjugate posterior given the support set (or, with ``cheat``, given support and query
    whenever the batch carries query labels)."""

    def __init__(self, model: LinearModel, shape: str = "T1D", cheat: bool = False, read_query: bool = False):
        super().__init__()
        object.__setattr__(self, "model", model)
        self.shape, self.cheat, self.read_query = shape, cheat, read_query

    def forward(self, batch: TaskBatch):
        x, y = batch.x_support, batch.y_support
        if self.read_query:  # a guide that needs the answers: fails on a batch without them
            x, y = torch.cat([x, batch.x_query], 1), torch.cat([y, batch.y_query], 1)
        elif self.cheat and batch.y_query is not None:
            x, y = torch.cat([x, batch.x_query], 1), torch.cat([y, batch.y_query], 1)
        m, cov = exact_posterior(self.model.mu.detach(), x, y)
        if self.shape == "T1D":
            m, cov = m.unsqueeze(-2), cov.unsqueeze(-3)  # T 1 D, T 1 D D
        with tasks_plate(batch.num_tasks):
            pyro.sample("phi", dist.MultivariateNormal(m, covariance_matrix=cov))


def _batch(seed: int = 0, num_tasks: int = T, queries: int = Q) -> TaskBatch:
    return linear_tasks(num_tasks, S, queries, torch.Generator().manual_seed(seed))


def test_the_right_wiring_passes_the_check():
    model = LinearModel()
    check_learner(MetaLearner(model, ExactGuide(model)), _batch())


def test_guide_site_of_shape_T_D_is_an_error_at_step_1():
    model = LinearModel()
    learner = MetaLearner(model, ExactGuide(model, shape="TD"))
    with pytest.raises(ModelCheckError) as e:
        fit(learner, [_batch()], steps=3, progress=False)
    msg = str(e.value)
    assert "'phi'" in msg and f"[{T}, 1, {D}]" in msg and f"[{T}, {T}, {D}]" in msg
    assert "unsqueeze(-2)" in msg


def test_without_the_check_the_same_mistake_trains_silently():
    """What the check prevents: the wrong guide gives a finite, plausible-looking loss (here the
    [T, T, D] draws broadcast against T support points)."""
    model = LinearModel()
    batch = linear_tasks(T, T, T, torch.Generator().manual_seed(0))
    with pyro.validation_enabled(False):
        wrong = fit(MetaLearner(model, ExactGuide(model, shape="TD")), [batch], steps=1, progress=False,
                    check_first_step=False, log_every=1)
        right = fit(MetaLearner(model, ExactGuide(model)), [batch], steps=1, progress=False, log_every=1)
    assert math.isfinite(wrong.last_loss) and wrong.last_loss > 1.5 * right.last_loss
    with pytest.raises(ModelCheckError, match="shapes disagree at site 'phi'"):
        fit(MetaLearner(model, ExactGuide(model, shape="TD")), [batch], steps=1, progress=False)


def test_query_site_under_another_name_is_an_error_at_step_1():
    model = LinearModel(query_site="y_q")
    with pytest.raises(ModelCheckError, match=r"no site named 'y_query'.*'y_q'"):
        fit(MetaLearner(model, ExactGuide(model)), [_batch()], steps=2, progress=False)


def test_per_task_site_outside_the_tasks_plate_is_an_error_at_step_1():
    model = LinearModel(in_plate=False)

    class Guide(nn.Module):
        def forward(self, batch):
            loc = model.mu.detach().expand(batch.num_tasks, 1, D)
            pyro.sample("phi", dist.Normal(loc, 0.1).to_event(1))  # outside the plate too

    with pytest.raises(ModelCheckError, match=r"'phi'.*not inside tasks_plate"):
        fit(MetaLearner(model, Guide()), [_batch()], steps=2, progress=False)


def test_guide_that_needs_query_labels_is_an_error_at_step_1():
    model = LinearModel()
    with pytest.raises(ModelCheckError, match="without query labels.*predictive_guide"):
        fit(MetaLearner(model, ExactGuide(model, read_query=True)), [_batch()], steps=2, progress=False)


def test_a_declared_predictive_guide_lets_such_a_method_train_and_evaluate():
    model = LinearModel()
    learner = MetaLearner(model, ExactGuide(model, read_query=True), predictive_guide=ExactGuide(model))
    fit(learner, [_batch()], steps=2, progress=False)
    metrics, _ = evaluate(learner, _batch(1), num_samples=10)
    assert metrics["mse"]["n"] == T


def test_evaluation_never_hands_the_guide_the_query_labels():
    """A guide that uses the query labels whenever they are there scores exactly like an honest one."""
    model = LinearModel()
    batch = _batch(3, num_tasks=20)
    honest, _ = evaluate(MetaLearner(model, ExactGuide(model)), batch, num_samples=50, seed=0)
    cheat, _ = evaluate(MetaLearner(model, ExactGuide(model, cheat=True)), batch, num_samples=50, seed=0)
    for key in ("mse", "nll", "coverage50", "coverage90"):
        assert cheat[key]["mean"] == honest[key]["mean"], key
    assert cheat["heldout_lpd"]["total"] == honest["heldout_lpd"]["total"]
    # and the cheat would have mattered: given the query labels, its MSE is far lower
    seen = ExactGuide(model, cheat=True)
    with torch.no_grad():
        tr = pyro.poutine.trace(seen).get_trace(batch)
    phi = tr.nodes["phi"]["value"]  # T 1 D
    mse_seen = float((((features(batch.x_query) * phi).sum(-1, keepdim=True) - batch.y_query) ** 2).mean())
    assert mse_seen < 0.8 * honest["mse"]["mean"]


def test_a_guide_that_reads_query_labels_fails_evaluation_loudly():
    model = LinearModel()
    with pytest.raises(LeakError, match="without query labels"):
        evaluate(MetaLearner(model, ExactGuide(model, read_query=True)), _batch(), num_samples=5)


def test_arviz_export_and_plots_are_blind_too():
    from pyro_meta.arviz import to_inference_data

    model = LinearModel()
    batch = _batch(4)
    a = to_inference_data(MetaLearner(model, ExactGuide(model)), batch, num_samples=20)
    b = to_inference_data(MetaLearner(model, ExactGuide(model, cheat=True)), batch, num_samples=20)
    assert (a.posterior["phi"].values == b.posterior["phi"].values).all()


def _exact_heldout(batch: TaskBatch, mu: torch.Tensor) -> tuple[float, float]:
    """(joint, pointwise) exact log p(y_query | support), summed over tasks."""
    b = batch.to(dtype=torch.float64)
    m, cov = exact_posterior(mu.double(), b.x_support, b.y_support)
    Xq = features(b.x_query)  # T Q D
    mean = (Xq @ m.unsqueeze(-1))[..., 0]  # T Q
    c = Xq @ cov @ Xq.transpose(-1, -2) + NOISE**2 * torch.eye(b.num_query, dtype=torch.float64)  # T Q Q
    joint = dist.MultivariateNormal(mean, covariance_matrix=c).log_prob(b.y_query[..., 0]).sum()
    var = torch.diagonal(c, dim1=-2, dim2=-1)
    pointwise = dist.Normal(mean, var.sqrt()).log_prob(b.y_query[..., 0]).sum()
    return float(joint), float(pointwise)


def test_heldout_lpd_matches_the_exact_conjugate_value():
    torch.set_default_dtype(torch.float64)
    model = LinearModel().double()
    with torch.no_grad():
        model.mu.copy_(torch.tensor([0.5, -1.0]))
    batch = linear_tasks(8, S, 3, torch.Generator().manual_seed(11)).to(dtype=torch.float64)
    learner = MetaLearner(model, ExactGuide(model))
    metrics, _ = evaluate(learner, batch, num_samples=20_000, seed=0)
    h = metrics["heldout_lpd"]
    joint, pointwise = _exact_heldout(batch, model.mu.detach())
    assert abs(h["total"] - joint) < 5 * h["mc_se"] + 0.02, (h, joint)
    assert_close(h["pointwise_total"], pointwise, atol=0.05)
    assert_close(h["per_point"], h["total"] / (8 * 3), rtol=1e-12)
    assert h["se"] > 0 and h["min_ess"] > 100
    # the mean NLL the evaluator reports is the pointwise density per point, negated
    assert_close(metrics["nll"]["mean"], -pointwise / (8 * 3), atol=0.01)


def test_heldout_lpd_of_a_point_estimate_is_its_likelihood():
    from pyro_meta.metrics import heldout_lpd

    ll = torch.randn(1, 4, 3)
    h = heldout_lpd(ll.expand(7, 4, 3))
    assert_close(h["total"], float(ll.sum()), rtol=1e-12)
    assert_close(h["pointwise_total"], float(ll.sum()), rtol=1e-12)
    assert h["mc_se"] < 1e-6


def test_support_log_likelihood_is_exported_for_loo_and_the_query_separately():
    from pyro_meta.arviz import HELDOUT_GROUP, to_inference_data

    model = LinearModel()
    batch = _batch(5)
    idata = to_inference_data(MetaLearner(model, ExactGuide(model)), batch, num_samples=30)
    assert list(idata.log_likelihood.data_vars) == ["y_support"]
    assert idata.log_likelihood["y_support"].sizes["support"] == S
    assert idata[HELDOUT_GROUP]["y_query"].sizes["query"] == Q
    pred = predict(MetaLearner(model, ExactGuide(model)), batch, 30)
    assert pred.support_log_lik.shape == (30, T, S)


def test_check_costs_one_step_not_one_per_step(monkeypatch):
    import pyro_meta.train as train_mod

    calls = []
    real = train_mod.check_learner
    monkeypatch.setattr(train_mod, "check_learner", lambda *a: calls.append(1) or real(*a))
    model = LinearModel()
    fit(MetaLearner(model, ExactGuide(model)), [_batch()], steps=5, progress=False)
    assert len(calls) == 1


@pytest.mark.parametrize("method", ["maml", "abml", "versa"])
def test_builtin_guides_do_not_read_query_labels(method):
    """The same seed and a batch whose query labels are replaced give the same guide draws and the same
    evaluation: no built-in method's guide reads y_query (checked here for each)."""
    from pyro_meta.config import RunConfig
    from pyro_meta.methods import build_learner, resolve

    if method == "versa":
        from test_versa import _batch as versa_batch
        from test_versa import _versa

        model, guide = _versa()
        learner, batch = MetaLearner(model, guide, name="versa"), versa_batch()
        poisoned = TaskBatch(batch.x_support, batch.y_support, batch.x_query, (batch.y_query + 1) % 4)
    else:
        learner = build_learner(resolve(RunConfig(method=method, hidden=[8])))
        batch = linear_tasks(5, 5, 7, torch.Generator().manual_seed(0))
        poisoned = TaskBatch(batch.x_support, batch.y_support, batch.x_query, batch.y_query + 100.0)
    traces = []
    for b in (batch, poisoned):
        pyro.set_rng_seed(0)
        with torch.no_grad():
            traces.append(pyro.poutine.trace(learner.guide).get_trace(b))
    for name, site in traces[0].nodes.items():
        if site["type"] == "sample":
            assert torch.equal(site["value"], traces[1].nodes[name]["value"]), name
    honest = predict(learner, batch, 5, seed=0)
    blind = predict(learner, poisoned, 5, seed=0)
    assert torch.equal(honest.mean, blind.mean)


def test_a_model_latent_without_a_guide_site_is_a_warning():
    from pyro_meta.checks import ModelCheckWarning

    class ExtraModel(LinearModel):
        def forward(self, batch):
            pyro.sample("noise_scale", dist.LogNormal(0.0, 1.0))  # never inferred by the guide
            return super().forward(batch)

    model = ExtraModel()
    with pytest.warns(ModelCheckWarning, match="'noise_scale'"):
        check_learner(MetaLearner(model, ExactGuide(model)), _batch())


def test_inspect_rebuilds_an_old_layout_posterior(tmp_path, capsys):
    from pyro_meta.config import RunConfig
    from pyro_meta.inspect import inspect_run
    from pyro_meta.run import train_run

    out, _ = train_run(RunConfig(method="abml", steps=2, meta_batch=2, num_test_tasks=3, num_val_tasks=1,
                                 hidden=[8], eval_samples=5), tmp_path / "r", progress=False)
    import arviz as az

    old = az.from_netcdf(str(out / "posterior.nc"))
    groups = {g: old[g].load() for g in old.groups()}
    for g in groups.values():
        g.close()
    groups["log_likelihood"] = groups.pop("heldout_log_likelihood")  # the old layout: query points there
    az.InferenceData(**groups).to_netcdf(str(out / "posterior.nc"))
    text = inspect_run(out)
    assert "older version" in capsys.readouterr().err
    assert "PSIS-LOO over the 15 support points" in text
