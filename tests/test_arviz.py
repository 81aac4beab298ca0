"""ArviZ export: groups, dims, coords and shapes; a netCDF round trip; ArviZ's own tools on it."""

from __future__ import annotations

import warnings

import arviz as az
import numpy as np
import pytest
import torch
from conftest import assert_close

from pyro_meta.arviz import to_inference_data
from pyro_meta.evaluate import predict
from pyro_meta.methods import build_learner, resolve
from pyro_meta.run import benchmark_of
from pyro_meta.train import fit

NUM_TASKS, NUM_QUERY, NUM_SAMPLES, SHOTS = 3, 10, 6, 5
HIDDEN = 8
D = HIDDEN * 1 + HIDDEN + 1 * HIDDEN + 1  # w0 [8,1], b0 [8], w1 [1,8], b1 [1]

# The network's parameter names, written out by hand in the flat layout (w0, b0, w1, b1).
WEIGHT_NAMES = ([f"w0[{i},0]" for i in range(HIDDEN)] + [f"b0[{i}]" for i in range(HIDDEN)]
                + [f"w1[0,{j}]" for j in range(HIDDEN)] + ["b1[0]"])


@pytest.fixture(scope="module", params=["maml", "abml"])
def setup(request):
    from pyro_meta.config import RunConfig

    cfg = resolve(RunConfig(method=request.param, hidden=[HIDDEN], meta_batch=2, num_test_tasks=NUM_TASKS,
                            num_val_tasks=2, eval_queries=NUM_QUERY, shots=SHOTS))
    torch.manual_seed(0)
    learner = build_learner(cfg)
    bm = benchmark_of(cfg)
    fit(learner, bm.train, 5, progress=False)  # a few steps, so the export is of a trained learner
    batch = bm.test
    idata = to_inference_data(learner, batch, num_samples=NUM_SAMPLES, seed=0)
    return request.param, learner, batch, idata


def test_groups(setup):
    method, _, _, idata = setup
    # log_likelihood: the support points the posterior conditioned on (ABML's model observes them; MAML's
    # scores the query set only); the query points' log-likelihoods are a held-out group of their own
    support = {"log_likelihood"} if method == "abml" else set()
    assert set(idata.groups()) == support | {"posterior", "posterior_predictive", "heldout_log_likelihood", "observed_data",
                                   "constant_data"}
    assert idata.attrs["learner"] == method


def test_posterior_dims_coords_and_shapes(setup):
    method, _, _, idata = setup
    post = idata.posterior
    expected_vars = {"phi"} if method == "maml" else {"phi", "prior_loc", "prior_precision"}
    assert set(post.data_vars) == expected_vars
    assert post["phi"].dims == ("chain", "draw", "task", "phi_dim")
    assert post["phi"].shape == (1, NUM_SAMPLES, NUM_TASKS, D)
    assert list(post["phi_dim"].values) == WEIGHT_NAMES
    assert list(post["task"].values) == list(range(NUM_TASKS))
    if method == "abml":
        for site in ("prior_loc", "prior_precision"):
            assert post[site].dims == ("chain", "draw", f"{site}_dim")
            assert post[site].shape == (1, NUM_SAMPLES, D)
            assert list(post[f"{site}_dim"].values) == WEIGHT_NAMES
        assert bool((post["prior_precision"] > 0).all())


def test_posterior_draws(setup):
    method, learner, _, idata = setup
    phi = idata.posterior["phi"].values[0]  # draw task D
    if method == "maml":
        # a Delta guide: every draw is the same adapted point
        assert np.array_equal(phi, np.broadcast_to(phi[:1], phi.shape))
    else:
        # a Gaussian guide: draws differ; the global sites are MAP point estimates
        assert not np.allclose(phi[0], phi[1])
        loc = idata.posterior["prior_loc"].values[0]
        assert_close(loc, learner.guide.loc.detach().expand(NUM_SAMPLES, D), rtol=0, atol=0)


def test_data_groups(setup):
    method, _, batch, idata = setup
    for group in (idata.posterior_predictive, idata.heldout_log_likelihood):
        assert group["y_query"].dims == ("chain", "draw", "task", "query")
        assert group["y_query"].shape == (1, NUM_SAMPLES, NUM_TASKS, NUM_QUERY)
    if method == "abml":
        assert idata.log_likelihood["y_support"].dims == ("chain", "draw", "task", "support")
        assert idata.log_likelihood["y_support"].shape == (1, NUM_SAMPLES, NUM_TASKS, SHOTS)
    obs = idata.observed_data["y_query"]
    assert obs.dims == ("task", "query")
    assert_close(obs.values, batch.y_query[..., 0], rtol=0, atol=0)
    const = idata.constant_data
    assert const["x_query"].dims == ("task", "query")
    assert const["x_support"].dims == ("task", "support")
    assert const["y_support"].dims == ("task", "support")
    assert_close(const["x_query"].values, batch.x_query[..., 0], rtol=0, atol=0)
    assert_close(const["x_support"].values, batch.x_support[..., 0], rtol=0, atol=0)
    assert_close(const["y_support"].values, batch.y_support[..., 0], rtol=0, atol=0)
    assert const["x_support"].shape == (NUM_TASKS, SHOTS)


def test_log_likelihood_equals_the_evaluators(setup):
    _, learner, batch, idata = setup
    pred = predict(learner, batch, NUM_SAMPLES, seed=0)
    assert_close(idata.heldout_log_likelihood["y_query"].values[0], pred.log_lik, rtol=0, atol=0)
    if pred.support_log_lik is not None:
        assert_close(idata.log_likelihood["y_support"].values[0], pred.support_log_lik, rtol=0, atol=0)
    assert_close(idata.posterior["phi"].values[0], pred.latents["phi"], rtol=0, atol=0)


def test_log_likelihood_is_per_point_log_density_of_the_draws(setup):
    """Independent of the evaluator: log N(y_tq | net(phi_s, x_tq), sigma) for each exported draw,
    unscaled (MAML's model averages over points in training; the export must not)."""
    _, learner, batch, idata = setup
    phi = torch.as_tensor(idata.posterior["phi"].values[0], dtype=torch.float32)  # S T D
    f = learner.model.net(phi, batch.x_query)  # S T Q 1
    sigma = learner.model.likelihood.noise_std.detach()
    expected = torch.distributions.Normal(f, sigma).log_prob(batch.y_query)[..., 0]
    assert_close(idata.heldout_log_likelihood["y_query"].values[0], expected, rtol=1e-5, atol=1e-5)


def test_netcdf_round_trip_summary_and_loo(setup, tmp_path):
    method, _, _, idata = setup
    path = tmp_path / f"{method}.nc"
    idata.to_netcdf(str(path))
    back = az.from_netcdf(str(path))
    assert set(back.groups()) == set(idata.groups())
    for group in idata.groups():
        for name, var in getattr(idata, group).data_vars.items():
            got = getattr(back, group)[name]
            assert got.dims == var.dims, (group, name)
            np.testing.assert_array_equal(got.values, var.values)
    assert list(back.posterior["phi_dim"].values) == WEIGHT_NAMES
    assert back.attrs["learner"] == method

    summary = az.summary(back, kind="stats")
    assert list(summary.columns) == ["mean", "sd", "hdi_3%", "hdi_97%"]
    n_vars = NUM_TASKS * D + (2 * D if method == "abml" else 0)
    assert len(summary) == n_vars
    assert "phi[0, w0[0,0]]" in summary.index
    assert_close(summary.loc["phi[1, b1[0]]", "mean"], float(back.posterior["phi"].values[0, :, 1, -1].mean()),
                 rtol=0, atol=1e-3)  # az.summary rounds to 3 decimals

    if method == "maml":  # its model conditions on no observation: nothing for PSIS-LOO to leave out
        assert "log_likelihood" not in back.groups()
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a few draws give high Pareto k; the numbers are not checked
        loo = az.loo(back)
    assert loo.n_data_points == NUM_TASKS * SHOTS  # over the support points, never the held-out query
    assert np.isfinite(loo.elpd_loo)


def test_reusing_a_prediction(setup):
    _, learner, batch, idata = setup
    pred = predict(learner, batch, NUM_SAMPLES, seed=0)
    again = to_inference_data(learner, batch, prediction=pred)
    for group in idata.groups():
        for name, var in getattr(idata, group).data_vars.items():
            np.testing.assert_array_equal(getattr(again, group)[name].values, var.values)


def test_needs_query_labels(setup):
    _, learner, batch, _ = setup
    with pytest.raises(ValueError, match="needs query labels"):
        to_inference_data(learner, batch.without_query_labels(), num_samples=2)
