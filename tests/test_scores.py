"""PACOH's PIT calibration error and the CRPS against known answers: closed forms worked out by hand, and
the ``properscoring`` package (the ``test`` extra) for the CRPS; its tests skip without it."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_close

from pyro_meta import metrics as M
from pyro_meta.compare import _table
from pyro_meta.evaluate import Prediction, predictive_crps, predictive_pit, regression_metrics
from pyro_meta.run import format_metrics_table
from pyro_meta.tasks import TaskBatch

STD_NORMAL = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0)
PIT_LEVELS = torch.linspace(0.05, 0.95, 20, dtype=torch.float64)


def _properscoring():
    return pytest.importorskip("properscoring", reason="properscoring (the test extra: pip install -e .[test]) "
                                                       "is the CRPS reference")


def _prediction(loc: torch.Tensor, scale: torch.Tensor, y: torch.Tensor,
                log_weights: torch.Tensor | None = None) -> Prediction:
    """A Gaussian predictive mixture ``loc, scale [S, T, Q, 1]`` scored on ``y [T, Q, 1]``."""
    log_lik = torch.distributions.Normal(loc, scale).log_prob(y).sum(-1)  # S T Q
    return Prediction({}, (), loc, scale, log_lik, loc, gaussian=True, log_weights=log_weights)


def _samples(draws: torch.Tensor, y: torch.Tensor) -> Prediction:
    """A non-Gaussian predictive known only by its draws ``[S, T, Q, 1]`` (log_lik is a placeholder)."""
    return Prediction({}, (), draws, None, torch.zeros(draws.shape[:3], dtype=draws.dtype), draws, gaussian=False)


def _batch(y: torch.Tensor) -> TaskBatch:
    t, q = y.shape[:2]
    return TaskBatch(torch.zeros(t, 1, 1), torch.zeros(t, 1, 1), torch.zeros(t, q, 1), y.float())


def _narrow_gaps(s: float) -> torch.Tensor:
    """``[20]`` the gap ``P(PIT <= q) - q`` of a predictive ``N(0, s^2)`` on data ``N(0, 1)``: ``PIT <= q`` when
    ``y <= s z_q``, which has probability ``Phi(s z_q)``."""
    return STD_NORMAL.cdf(s * STD_NORMAL.icdf(PIT_LEVELS)) - PIT_LEVELS


# ----------------------------------------------------------------------------- calibration error
def test_pit_calibration_error_hand_case():
    """Levels 0.25 and 0.75 on PIT values 0.1, 0.25, 0.5, 0.9: 2/4 and 3/4 are <= (a tie counts), gaps 0.25, 0."""
    out = M.pit_calibration_error(torch.tensor([[0.1, 0.25], [0.5, 0.9]]), (0.25, 0.75))
    assert out == {"mae": 0.125, "rmse": pytest.approx(math.sqrt(0.25**2 / 2), abs=1e-15), "levels": 2, "n": 4}
    assert len(M.PIT_LEVELS) == 20 and M.PIT_LEVELS[0] == 0.05 and M.PIT_LEVELS[-1] == pytest.approx(0.95)
    assert_close(M.PIT_LEVELS, PIT_LEVELS, rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="at least one"):
        M.pit_calibration_error(torch.tensor([]))


def test_a_perfectly_calibrated_predictive_has_no_calibration_error():
    """Data at the exact quantiles of N(0, 1), predictive N(0, 1): PIT = (i + 1/2)/n, gaps at most 1/(2n)
    (2/n allowed: the batch holds y in float32)."""
    n = 10_000
    y = STD_NORMAL.icdf((torch.arange(n, dtype=torch.float64) + 0.5) / n).view(100, 100, 1)  # T=100 Q=100
    loc = torch.zeros(2, 100, 100, 1, dtype=torch.float64)
    cal = regression_metrics(_prediction(loc, torch.ones_like(loc), y), _batch(y))["calibration_error"]
    assert cal["mae"] <= 2.0 / n and cal["rmse"] <= 2.0 / n
    assert (cal["levels"], cal["n"], cal["tasks"]) == (20, n, 100)


@pytest.mark.parametrize("gaussian", [True, False])
def test_a_twice_too_narrow_predictive_has_its_closed_form_calibration_error(gaussian):
    """y ~ N(0, 1) (20,000 random points in 200 tasks) under a predictive N(0, 0.5^2): at each level the
    frequency of PIT <= q is Phi(0.5 z_q) within binomial error; the MAE and RMSE are those of the
    closed-form gaps. Gaussian: the exact mixture CDF; else the empirical CDF of 1,000 draws per point."""
    g = torch.Generator().manual_seed(0)
    t, q, s = 200, 100, 0.5
    y = torch.randn(t, q, 1, generator=g, dtype=torch.float64)
    if gaussian:
        loc = torch.zeros(3, t, q, 1, dtype=torch.float64)
        pred = _prediction(loc, torch.full_like(loc, s), y)
    else:
        pred = _samples(s * torch.randn(1000, t, q, 1, generator=g, dtype=torch.float64), y)
    gaps = _narrow_gaps(s)
    expected_freq = gaps + PIT_LEVELS
    sd = (expected_freq * (1 - expected_freq) / (t * q)).sqrt()  # binomial sd of a pooled frequency
    # the empirical CDF of 1,000 draws adds its own error to each PIT (sd <= 0.016); a little more room
    tol = 4 * sd + (0 if gaussian else 0.004)
    pit = predictive_pit(pred, y)
    freq = (pit.flatten()[None] <= PIT_LEVELS[:, None]).double().mean(-1)
    assert ((freq - expected_freq).abs() <= tol).all(), (freq - expected_freq).abs().max()
    # through regression_metrics for the Gaussian; the draws' empirical quantiles there would be slow
    cal = regression_metrics(pred, _batch(y))["calibration_error"] if gaussian else M.pit_calibration_error(pit)
    assert_close(cal["mae"], float(gaps.abs().mean()), rtol=0, atol=float(tol.max()))
    assert_close(cal["rmse"], float(gaps.pow(2).mean().sqrt()), rtol=0, atol=float(tol.max()))
    assert cal["mae"] > 0.1  # far from the calibrated ~0: the check can fail


def test_the_calibration_error_uses_the_mixture_weights():
    """Data from 0.25 N(-2, 1) + 0.75 N(2, 1): the predictive with those weights (``log_weights``) is
    calibrated; the same components at equal weights are not."""
    g = torch.Generator().manual_seed(1)
    t, q = 100, 100
    side = torch.where(torch.rand(t, q, 1, generator=g) < 0.25, -2.0, 2.0).double()
    y = side + torch.randn(t, q, 1, generator=g, dtype=torch.float64)
    loc = torch.tensor([-2.0, 2.0], dtype=torch.float64).view(2, 1, 1, 1).expand(2, t, q, 1)
    log_w = torch.tensor([0.25, 0.75], dtype=torch.float64).log().view(2, 1, 1).expand(2, t, 1)  # S T 1
    weighted = regression_metrics(_prediction(loc, torch.ones_like(loc), y, log_w), _batch(y))
    equal = regression_metrics(_prediction(loc, torch.ones_like(loc), y), _batch(y))
    assert weighted["calibration_error"]["mae"] < 0.01
    assert equal["calibration_error"]["mae"] > 0.05
    assert weighted["crps"]["mean"] < equal["crps"]["mean"]  # the right weights score better


# ----------------------------------------------------------------------------- CRPS
def test_crps_of_a_standard_normal_by_hand():
    """CRPS(N(0, 1), 0) = 2 phi(0) - 1/sqrt(pi) = sqrt(2/pi) - 1/sqrt(pi); far out it tends to |y| - E|X-X'|/2."""
    out = M.gaussian_mixture_crps(torch.tensor([0.0, 50.0], dtype=torch.float64),
                                  torch.zeros(1, 2, dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64))
    assert_close(out, [math.sqrt(2 / math.pi) - 1 / math.sqrt(math.pi), 50.0 - 1 / math.sqrt(math.pi)],
                 rtol=1e-12, atol=0)


def test_crps_of_a_single_gaussian_matches_properscoring():
    ps = _properscoring()
    g = torch.Generator().manual_seed(2)
    y = 3 * torch.randn(4, 6, 1, generator=g, dtype=torch.float64)
    loc = torch.randn(1, 4, 6, 1, generator=g, dtype=torch.float64)
    scale = 0.1 + 2 * torch.rand(1, 4, 6, 1, generator=g, dtype=torch.float64)
    ref = ps.crps_gaussian(y.numpy(), loc[0].numpy(), scale[0].numpy())
    assert_close(M.gaussian_mixture_crps(y, loc, scale), torch.from_numpy(ref), rtol=1e-10, atol=1e-12)
    # S identical draws (a point estimate): the same single Gaussian
    assert_close(M.gaussian_mixture_crps(y, loc.expand(7, -1, -1, -1), scale.expand(7, -1, -1, -1)),
                 torch.from_numpy(ref), rtol=1e-10, atol=1e-12)


class _MixtureCDF:
    """The CDF of ``sum_k w_k N(m_k, s_k^2)`` one scalar at a time (properscoring's quadrature calls it so)."""

    def __init__(self, w, m, s):
        self.parts = list(zip(w, m, s))

    def cdf(self, x):
        return sum(w * 0.5 * (1 + math.erf((x - m) / (s * math.sqrt(2)))) for w, m, s in self.parts)


def test_crps_of_a_weighted_gaussian_mixture_matches_properscoring_quadrature():
    """Five components with unequal weights, at points in the bulk and far in a tail; in chunks too."""
    ps = _properscoring()
    g = torch.Generator().manual_seed(3)
    k = 5
    loc = 2 * torch.randn(k, 1, 1, 1, generator=g, dtype=torch.float64)
    scale = 0.2 + torch.rand(k, 1, 1, 1, generator=g, dtype=torch.float64)
    log_w = torch.log_softmax(2 * torch.randn(k, 1, 1, generator=g, dtype=torch.float64), 0)  # K T=1 1
    y = torch.tensor([-3.0, -0.7, 0.0, 1.3, 4.0, 9.0], dtype=torch.float64).view(1, 6, 1)  # T=1 Q=6
    cdf = _MixtureCDF(log_w.exp().flatten().tolist(), loc.flatten().tolist(), scale.flatten().tolist())
    ref = torch.tensor([float(ps.crps_quadrature(v, cdf, xmin=-25.0, xmax=25.0, tol=1e-6))
                        for v in y.flatten().tolist()], dtype=torch.float64).view(1, 6, 1)
    ours = M.gaussian_mixture_crps(y, loc.expand(k, 1, 6, 1), scale.expand(k, 1, 6, 1), log_w)
    assert_close(ours, ref, rtol=0, atol=1e-6)
    # equal weights would give another answer: the weights are used
    assert (M.gaussian_mixture_crps(y, loc, scale) - ref).abs().max() > 1e-2
    # chunks of 7 values (a pair block of 1-2 points): the same sums
    assert_close(M.gaussian_mixture_crps(y, loc, scale, log_w, chunk_values=7), ours, rtol=0, atol=1e-13)


def test_crps_of_many_draws_chunks_and_precision():
    """300 draws (45,150 pairs) at 100 points: chunks of 200,000 values equal one chunk of everything;
    float32 inputs agree with float64 to single precision; the closed form matches the energy form over
    200,000 draws of the same mixture."""
    g = torch.Generator().manual_seed(4)
    s, t, q = 300, 4, 25
    loc = torch.randn(s, t, q, 1, generator=g, dtype=torch.float64)
    scale = 0.2 + torch.rand(s, t, q, 1, generator=g, dtype=torch.float64)
    y = torch.randn(t, q, 1, generator=g, dtype=torch.float64)
    full = M.gaussian_mixture_crps(y, loc, scale, chunk_values=2**40)
    assert_close(M.gaussian_mixture_crps(y, loc, scale, chunk_values=200_000), full, rtol=1e-12, atol=0)
    single = M.gaussian_mixture_crps(y.float(), loc.float(), scale.float())
    assert single.dtype == torch.float64
    assert_close(single, full, rtol=0, atol=1e-5)
    # one point's mixture, by 200,000 draws from it
    n = 200_000
    pick = torch.randint(0, s, (n,), generator=g)
    draws = loc[pick, 0, 0, 0] + scale[pick, 0, 0, 0] * torch.randn(n, generator=g, dtype=torch.float64)
    assert_close(M.sample_crps(y[0, 0, 0], draws), full[0, 0, 0], rtol=0, atol=5e-3)


def test_crps_of_an_ensemble_matches_properscoring():
    """The energy form equals properscoring's ensemble CRPS, with equal and with unequal weights."""
    ps = _properscoring()
    import numpy as np

    g = torch.Generator().manual_seed(5)
    s, t, q = 40, 3, 8
    draws = torch.randn(s, t, q, 1, generator=g, dtype=torch.float64)
    draws[5] = draws[6]  # ties are fine
    y = torch.randn(t, q, 1, generator=g, dtype=torch.float64)
    ref = ps.crps_ensemble(y.numpy(), np.moveaxis(draws.numpy(), 0, -1))
    assert_close(M.sample_crps(y, draws), torch.from_numpy(ref), rtol=1e-12, atol=1e-14)
    w = torch.softmax(torch.randn(s, t, 1, generator=g, dtype=torch.float64), 0)  # S T 1
    ref_w = ps.crps_ensemble(y.numpy(), np.moveaxis(draws.numpy(), 0, -1),
                             weights=np.broadcast_to(np.moveaxis(w.numpy(), 0, -1)[:, None], (t, q, 1, s)))
    assert_close(M.sample_crps(y, draws, w.log()), torch.from_numpy(ref_w), rtol=1e-12, atol=1e-14)


def test_regression_metrics_crps_is_the_per_task_mean():
    """``crps`` is mean_ci over tasks of each task's mean over points, for a Gaussian mixture and for draws."""
    g = torch.Generator().manual_seed(6)
    s, t, q = 5, 6, 20
    loc = torch.randn(s, t, q, 1, generator=g, dtype=torch.float64)
    scale = 0.5 + torch.rand(s, t, q, 1, generator=g, dtype=torch.float64)
    y = torch.randn(t, q, 1, generator=g, dtype=torch.float64)
    for pred, per_point in ((_prediction(loc, scale, y), M.gaussian_mixture_crps(y, loc, scale)),
                            (_samples(loc, y), M.sample_crps(y, loc))):
        m = regression_metrics(pred, _batch(y))
        assert {"crps", "calibration_error"} <= set(m)
        per_task = per_point.flatten(1).mean(-1)
        assert_close(predictive_crps(pred, y), per_task, rtol=1e-12, atol=0)
        assert m["crps"] == M.mean_ci(predictive_crps(pred, y.float().double()))
        assert m["crps"]["n"] == t and m["crps"]["mean"] > 0


# ----------------------------------------------------------------------------- the tables
_METRICS = {"mse": {"mean": 0.5, "ci95": 0.1, "n": 4}, "nll": {"mean": 1.2, "ci95": 0.2, "n": 4},
            "coverage50": {"mean": 0.4, "ci95": 0.05, "n": 4}, "coverage90": {"mean": 0.8, "ci95": 0.05, "n": 4},
            "crps": {"mean": 0.321, "ci95": 0.012, "n": 4},
            "calibration_error": {"mae": 0.0456, "rmse": 0.0789, "levels": 20, "n": 400, "tasks": 4},
            "heldout_lpd": {"per_point": -1.1, "per_point_se": 0.1},
            "calibration": {"gap": 0.05}}


def test_the_metrics_table_shows_crps_and_the_calibration_error():
    text = format_metrics_table([{"method": "maml", "shots": 5, "metrics": _METRICS}])
    head, _, row = text.splitlines()
    assert "crps" in head and "calib err mae/rmse" in head
    assert "0.321 +- 0.012" in row and "0.046/0.079" in row
    # an eval.json from before these metrics: blank cells, no error
    old = {k: v for k, v in _METRICS.items() if k not in ("crps", "calibration_error")}
    assert "0.321" not in format_metrics_table([{"method": "maml", "shots": 5, "metrics": old}])


def test_the_scoreboard_table_shows_crps_and_the_calibration_error():
    row = {"method": "maml", "shots": 5, "steps": 10, "train_seconds": 1.0, "tasks_per_second": 10.0,
           "metrics": {**_METRICS, "heldout_lpd_per_point": {"mean": -1.1, "ci95": 0.2}}}
    head, _, line = _table([row])
    cells = dict(zip([c.strip() for c in head.strip("|").split("|")], [c.strip() for c in line.strip("|").split("|")]))
    assert cells["CRPS"] == "0.321 ± 0.012" and cells["calib. error MAE/RMSE"] == "0.046 / 0.079"
    old = {**row, "metrics": {**row["metrics"], "crps": None, "calibration_error": None}}
    assert "| n/a | n/a |" in _table([old])[2]


def test_past_the_exact_cap_the_crps_of_many_draws_is_their_energy_form():
    """A 2,000-draw Gaussian predictive (over CRPS_EXACT_MAX): the evaluator's CRPS is the energy form of the
    draws (linear-log cost, not 2,000^2 / 2 pairs per point) and within 0.01 of the closed form."""
    from pyro_meta.evaluate import CRPS_EXACT_MAX, Prediction, predictive_crps

    g = torch.Generator().manual_seed(7)
    s, t, q = 2000, 2, 5
    assert s > CRPS_EXACT_MAX
    loc = torch.randn(s, t, q, 1, generator=g, dtype=torch.float64)
    scale = torch.full_like(loc, 0.5)
    draws = loc + scale * torch.randn(s, t, q, 1, generator=g, dtype=torch.float64)
    y = torch.randn(t, q, 1, generator=g, dtype=torch.float64)
    pred = Prediction({}, (), loc, scale, None, draws, True)
    exact = M.gaussian_mixture_crps(y, loc, scale).flatten(1).mean(-1)
    assert_close(predictive_crps(pred, y), exact, atol=0.01, rtol=0)
    assert_close(predictive_crps(pred, y), M.sample_crps(y, draws).flatten(1).mean(-1), rtol=1e-12)


def test_diverged_and_absurd_tasks_are_counted_named_and_left_out():
    """Issue 28: a task whose prediction is non-finite (task 1) or finite but absurd (task 3: a mean of 1e6
    where the support targets stay within 2) is counted and named in the metrics and left out of the means,
    which are over the other tasks."""
    from pyro_meta import TaskBatch
    from pyro_meta.evaluate import Prediction, regression_metrics

    g = torch.Generator().manual_seed(0)
    t, q = 5, 8
    y = torch.randn(t, q, 1, generator=g, dtype=torch.float64)
    mean = torch.zeros(2, t, q, 1, dtype=torch.float64)
    mean[:, 1] = float("nan")
    mean[1, 3, 4] = 1e6
    std = torch.ones_like(mean)
    log_lik = torch.distributions.Normal(mean, std, validate_args=False).log_prob(y).sum(-1)
    pred = Prediction({}, (), mean, std, log_lik, mean.clone(), gaussian=True)
    support = torch.clamp(torch.randn(t, 3, 1, generator=g, dtype=torch.float64), -2, 2)
    m = regression_metrics(pred, TaskBatch(torch.zeros(t, 3, 1), support, torch.zeros(t, q, 1), y))
    assert m["nonfinite_tasks"] == {"count": 1, "of": 5, "tasks": [1]}
    assert m["absurd_tasks"]["count"] == 1 and m["absurd_tasks"]["tasks"] == [3] and "100" in m["absurd_tasks"]["rule"]
    assert m["mse"]["n"] == 3
    keep = [0, 2, 4]
    assert abs(m["mse"]["mean"] - float((y[keep] ** 2).mean())) < 1e-9
