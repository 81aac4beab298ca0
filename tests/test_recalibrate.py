"""Recalibration on validation tasks (issue 28): the width scale and the isotonic PIT map restore a
predictive known to be twice too narrow; temperature scaling undoes logits twice too sharp; a finished
run fits its maps on the validation tasks alone and reports raw and recalibrated metrics side by side."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import torch

from pyro_meta import TaskBatch
from pyro_meta.config import RunConfig
from pyro_meta.evaluate import Prediction, regression_metrics
from pyro_meta.recalibrate import RECALIBRATION, fit_recalibration, recalibrated_metrics


def narrow_gaussian(t: int, q: int, seed: int, s: int = 3) -> tuple[Prediction, TaskBatch]:
    """Tasks y ~ N(mu_t, 1) and a predictive of S equal Normal(mu_t, 0.5) draws: twice too narrow."""
    g = torch.Generator().manual_seed(seed)
    mu = 3 * torch.randn(t, 1, 1, generator=g, dtype=torch.float64)
    y = mu + torch.randn(t, q, 1, generator=g, dtype=torch.float64)
    mean = mu.expand(t, q, 1).expand(s, t, q, 1)
    std = torch.full_like(mean, 0.5)
    pred = Prediction(latents={}, per_task=(), mean=mean, stddev=std,
                      log_lik=torch.distributions.Normal(mean, std).log_prob(y).sum(-1), y_draws=mean.clone(),
                      gaussian=True)
    x = torch.zeros(t, q, 1, dtype=torch.float64)
    return pred, TaskBatch(x[:, :1], y[:, :1], x, y)


def test_a_predictive_twice_too_narrow_is_widened_by_two():
    val_pred, val = narrow_gaussian(300, 40, seed=0)
    recal = fit_recalibration(val_pred, val)
    assert abs(recal["scale"] - 2.0) < 0.05, recal["scale"]
    assert recal["fitted_on"] == {"set": "validation", "tasks": 300, "left_out_nonfinite": 0, "points": 12000}
    test_pred, test = narrow_gaussian(300, 40, seed=1)
    raw = regression_metrics(test_pred, test)
    out = recalibrated_metrics(test_pred, test, recal)
    assert raw["coverage90"]["mean"] < 0.7  # P(|z| < 1.645 / 2) = 0.59
    for name in ("scale", "isotonic"):
        m = out[name]
        assert abs(m["coverage50"]["mean"] - 0.5) < 0.02 and abs(m["coverage90"]["mean"] - 0.9) < 0.02, (name, m)
        assert m["calibration_error"]["mae"] < 0.02 < raw["calibration_error"]["mae"]
        assert m["nll"]["mean"] < raw["nll"]["mean"] - 0.3
    # the exact NLL of the widened predictive: N(mu, 1)
    exact = -torch.distributions.Normal(0.0, 1.0).log_prob(test.y_query - test_pred.mean[0]).mean()
    assert abs(out["scale"]["nll"]["mean"] - float(exact)) < 0.01
    assert out["scale"]["mse"]["mean"] == raw["mse"]["mean"]  # the mean is kept


def test_temperature_undoes_logits_twice_too_sharp():
    g = torch.Generator().manual_seed(0)

    def tasks(seed: int) -> tuple[Prediction, TaskBatch]:
        g.manual_seed(seed)
        logits = torch.randn(200, 30, 5, generator=g, dtype=torch.float64)
        y = torch.distributions.Categorical(logits=logits).sample()
        sharp = torch.softmax(2 * logits, -1)
        lp = sharp.log().gather(-1, y.unsqueeze(-1))[..., 0]
        pred = Prediction(latents={}, per_task=(), mean=sharp.unsqueeze(0), stddev=None, log_lik=lp.unsqueeze(0),
                          y_draws=y.unsqueeze(0), gaussian=False)
        x = torch.zeros(200, 30, 1)
        return pred, TaskBatch(x[:, :5], y[:, :5], x, y)

    recal = fit_recalibration(*tasks(1))
    assert recal["kind"] == "classification" and abs(recal["temperature"] - 2.0) < 0.15, recal
    pred, test = tasks(2)
    out = recalibrated_metrics(pred, test, recal)["temperature"]
    assert out["ece"]["value"] < 0.03
    assert out["nll"]["mean"] < float(-pred.log_lik.mean()) - 0.1


def test_a_finished_run_recalibrates_on_validation_tasks_only(tmp_path, monkeypatch, capsys):
    """The maps are fitted on the benchmark's validation tasks (the only batch the fit sees), stored in the
    run directory, and eval.json reports the recalibrated metrics beside the raw ones. A 3-step MAML is
    worse than the prior predictive: eval.json and a warning line say so, with the prior row's NLL computed
    on the same test tasks."""
    import pyro_meta.recalibrate as R
    from pyro_meta.run import benchmark_of, train_run

    seen = []
    real = R.fit_recalibration

    def spy(pred, batch):  # noqa: ANN001, ANN202
        seen.append(batch)
        return real(pred, batch)

    monkeypatch.setattr(R, "fit_recalibration", spy)
    cfg = RunConfig(benchmark="sinusoid_line", method="maml", steps=3, meta_batch=2, hidden=[8],
                    num_test_tasks=5, num_val_tasks=7, eval_queries=9, threads=1)
    out = tmp_path / "run"
    train_run(cfg, out, progress=False)
    bm = benchmark_of(cfg)
    assert len(seen) == 1 and torch.equal(seen[0].y_query.cpu(), bm.val.y_query)
    assert not torch.equal(seen[0].x_query.cpu()[:5], bm.test.x_query)
    recal = json.loads((out / RECALIBRATION).read_text())
    assert recal["fitted_on"]["tasks"] == 7 and recal["scale"] > 0
    ev = json.loads((out / "eval.json").read_text())
    for name in ("scale", "isotonic"):
        assert math.isfinite(ev["recalibrated"][name]["coverage90"]["mean"])
    assert ev["recalibrated"]["fitted_on"]["set"] == "validation"
    vp = ev["versus_prior"]
    assert vp["tasks"] == 5 and vp["worse"] is True and vp["method_nll"] > vp["prior_nll"] > 1.5
    assert "worse than knowing nothing" in capsys.readouterr().err
    # the ArviZ export and inspect apply the maps and say so
    from pyro_meta._arviz import az
    from pyro_meta.inspect import recalibration_summary

    idata = az.from_netcdf(str(out / "posterior.nc"))
    assert "validation tasks" in idata.attrs["recalibration"]
    assert json.loads(idata.attrs["recalibration_json"])["scale"] == recal["scale"]
    raw = idata.posterior_predictive["y_query"].values
    wide = idata.posterior_predictive["y_query_recalibrated"].values
    assert wide.shape == raw.shape and bool(np.isfinite(wide).all())  # the map's values: rescale's test above
    text = recalibration_summary(out)
    assert text.startswith("recalibration: width factor") and "isotonic" in text and "raw" in text


def test_a_diverged_test_task_is_left_out_of_the_recalibrated_metrics_too():
    """A test task with non-finite draws (a diverged adaptation) is no error under the width map: it is
    left out and counted, as in the raw metrics."""
    val_pred, val = narrow_gaussian(100, 20, seed=0)
    recal = fit_recalibration(val_pred, val)
    pred, test = narrow_gaussian(10, 20, seed=1)
    mean = pred.mean.clone()
    mean[:, 3] = float("nan")
    pred = replace(pred, mean=mean, log_lik=pred.log_lik.clone().index_fill_(1, torch.tensor([3]), float("nan")))
    out = recalibrated_metrics(pred, test, recal)
    assert out["scale"]["nonfinite_tasks"]["count"] == 1 and out["scale"]["mse"]["n"] == 9
    assert out["isotonic"]["nonfinite_tasks"]["count"] == 1


def test_recalibrated_quantiles_of_a_predictive_twice_too_narrow_are_the_true_ones():
    """The isotonic map's inverse level and the quantiles it gives: on N(mu, 0.5) draws of N(mu, 1) data the
    recalibrated 5% / 95% quantiles are mu -+ 1.645 (the true ones), and R(R^-1(q)) = q."""
    from pyro_meta.recalibrate import _apply_map, describe, isotonic_level, recalibrated_quantile

    val_pred, val = narrow_gaussian(400, 50, seed=0)
    recal = fit_recalibration(val_pred, val)
    for q in (0.05, 0.3, 0.5, 0.95):
        level = isotonic_level(recal["isotonic"], q)
        assert abs(float(_apply_map(recal["isotonic"], torch.tensor(level, dtype=torch.float64))[0]) - q) < 1e-9
    pred, _ = narrow_gaussian(3, 4, seed=1)
    mu = pred.mean[0]
    for how in ("isotonic", "scale"):
        hi = recalibrated_quantile(pred, 0.95, recal, how)
        lo = recalibrated_quantile(pred, 0.05, recal, how)
        assert torch.allclose(hi - mu, torch.full_like(mu, 1.645), atol=0.08), (how, hi - mu)
        assert torch.allclose(mu - lo, torch.full_like(mu, 1.645), atol=0.08), (how, mu - lo)
    text = describe(recal)
    assert "400 validation tasks" in text and "width factor 2" in text
