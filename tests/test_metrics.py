"""Evaluation metrics against values worked out by hand (no scipy)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_close

from pyro_meta import metrics as M


def _mixture_cdf_by_hand(y: float, locs: list[float], scales: list[float]) -> float:
    """Equal-weight Gaussian mixture CDF with math.erf, one component at a time."""
    terms = [0.5 * (1.0 + math.erf((y - m) / (s * math.sqrt(2.0)))) for m, s in zip(locs, scales)]
    return sum(terms) / len(terms)


# ----------------------------------------------------------------------------- mean_ci
def test_mean_ci_known_values():
    out = M.mean_ci(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    # sample sd (n - 1) of 1..4 is sqrt(5/3); 95% half-width = 1.96 * sd / sqrt(4)
    sd = math.sqrt(5.0 / 3.0)
    assert out["n"] == 4
    assert_close(out["mean"], 2.5, rtol=0, atol=1e-12)
    assert_close(out["ci95"], 1.959963984540054 * sd / 2.0, rtol=1e-12)
    assert set(out) == {"mean", "ci95", "n"}


def test_mean_ci_flattens_and_uses_double_precision():
    # values whose float32 mean is inexact: the mean must be computed in float64
    v = torch.tensor([[0.1, 0.2], [0.3, 0.4]], dtype=torch.float64)
    out = M.mean_ci(v)
    assert out["n"] == 4
    assert_close(out["mean"], 0.25, rtol=1e-15)


def test_mean_ci_constant_values_have_zero_width():
    out = M.mean_ci(torch.full((7,), 3.25))
    assert out["mean"] == 3.25
    assert out["ci95"] == 0.0


def test_mean_ci_single_value_has_undefined_width():
    out = M.mean_ci(torch.tensor([2.0]))
    assert out["mean"] == 2.0 and out["n"] == 1
    assert math.isnan(out["ci95"])


def test_mean_ci_empty_is_an_error():
    with pytest.raises(ValueError, match="at least one value"):
        M.mean_ci(torch.tensor([]))


# ----------------------------------------------------------------------------- squared_error
def test_squared_error_per_task():
    pred = torch.tensor([[[0.0], [1.0]], [[2.0], [2.0]]])  # T=2 Q=2 O=1
    y = torch.tensor([[[1.0], [1.0]], [[0.0], [4.0]]])
    assert_close(M.squared_error(pred, y), [0.5, 4.0], rtol=0, atol=0)


# ----------------------------------------------------------------------------- mixture_nll
def test_mixture_nll_hand_computation():
    # S=2 posterior samples, T=2 tasks, Q=2 query points, densities chosen by hand
    p = torch.tensor([
        [[0.2, 0.1], [0.5, 0.05]],   # sample 0
        [[0.4, 0.3], [0.5, 0.15]],   # sample 1
    ], dtype=torch.float64)
    nll = M.mixture_nll(p.log())
    # task 0: mixture densities 0.3 and 0.2; task 1: 0.5 and 0.1
    expected = [-(math.log(0.3) + math.log(0.2)) / 2, -(math.log(0.5) + math.log(0.1)) / 2]
    assert nll.shape == (2,)
    assert_close(nll, expected, rtol=1e-12)


def test_mixture_nll_is_stable_for_very_small_likelihoods():
    # log-densities far below exp's range: a naive log(mean(exp)) would give inf
    log_lik = torch.tensor([[[-1000.0]], [[-1002.0]]], dtype=torch.float64)  # S=2 T=1 Q=1
    expected = -(-1000.0 + math.log((1 + math.exp(-2.0)) / 2))
    assert_close(M.mixture_nll(log_lik), [expected], rtol=1e-12)


def test_mixture_nll_single_sample_is_plain_nll():
    log_lik = torch.tensor([[[-1.0, -3.0], [-0.5, -0.5]]])  # S=1 T=2 Q=2
    assert_close(M.mixture_nll(log_lik), [2.0, 0.5], rtol=1e-7)


# ----------------------------------------------------------------------------- quantiles
@pytest.mark.parametrize("p", [0.001, 0.05, 0.25, 0.5, 0.75, 0.95, 0.999])
def test_gaussian_quantile_of_a_single_component(p):
    loc = torch.tensor([[0.0, -3.0, 12.5]], dtype=torch.float64)  # S=1, three independent cases
    scale = torch.tensor([[1.0, 0.2, 7.0]], dtype=torch.float64)
    z = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0).icdf(
        torch.tensor(p, dtype=torch.float64))
    q = M.gaussian_mixture_quantile(p, loc, scale)
    assert q.shape == (3,)
    assert_close(q, loc[0] + scale[0] * z, rtol=0, atol=1e-9)


def test_gaussian_quantile_float32_matches_to_single_precision():
    loc = torch.tensor([[1.5]])
    scale = torch.tensor([[0.3]])
    z = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(0.95)).item()
    q = M.gaussian_mixture_quantile(0.95, loc, scale)
    assert q.dtype == torch.float32
    assert_close(q, [1.5 + 0.3 * z], rtol=1e-5)


@pytest.mark.parametrize("p", [0.001, 0.05, 0.25, 0.5, 0.75, 0.95, 0.999])
def test_gaussian_mixture_quantile_inverts_the_cdf(p):
    # three very different components, broadcast over a [2] batch of cases
    locs = [[0.0, 4.0], [10.0, 4.0], [-3.0, 4.5]]
    scales = [[1.0, 0.01], [0.1, 2.0], [5.0, 0.5]]
    loc = torch.tensor(locs, dtype=torch.float64)  # S=3, batch 2
    scale = torch.tensor(scales, dtype=torch.float64)
    q = M.gaussian_mixture_quantile(p, loc, scale)
    assert q.shape == (2,)
    for j in range(2):
        cdf = _mixture_cdf_by_hand(float(q[j]), [r[j] for r in locs], [r[j] for r in scales])
        assert abs(cdf - p) < 1e-6, (j, p, float(q[j]), cdf)
    # the library's own cdf agrees with the hand one
    assert_close(M.gaussian_mixture_cdf(q, loc, scale), [p, p], rtol=0, atol=1e-6)


def test_gaussian_mixture_quantiles_are_ordered_and_symmetric():
    # a mixture symmetric about 2: N(0, 1) and N(4, 1); quantiles p and 1-p mirror around 2
    loc = torch.tensor([[0.0], [4.0]], dtype=torch.float64)
    scale = torch.ones(2, 1, dtype=torch.float64)
    lo = M.gaussian_mixture_quantile(0.05, loc, scale)
    mid = M.gaussian_mixture_quantile(0.5, loc, scale)
    hi = M.gaussian_mixture_quantile(0.95, loc, scale)
    assert float(lo) < float(mid) < float(hi)
    assert_close(mid, [2.0], rtol=0, atol=1e-9)
    assert_close(lo + hi, [4.0], rtol=0, atol=1e-9)


@pytest.mark.parametrize("p", [0.0, 1.0, -0.1, 1.5])
def test_gaussian_mixture_quantile_rejects_p_outside_open_interval(p):
    with pytest.raises(ValueError, match=r"p must be in \(0, 1\)"):
        M.gaussian_mixture_quantile(p, torch.zeros(1, 1), torch.ones(1, 1))


# ----------------------------------------------------------------------------- coverage
def test_interval_coverage_hand_case():
    y = torch.tensor([
        [[0.0], [1.0], [2.0], [3.0]],    # task 0
        [[-1.0], [0.5], [5.0], [1.0]],   # task 1
    ])
    lower = torch.tensor([
        [[-1.0], [1.0], [2.5], [0.0]],
        [[-2.0], [0.0], [0.0], [0.0]],
    ])
    upper = torch.tensor([
        [[1.0], [2.0], [3.0], [2.9]],
        [[0.0], [1.0], [4.0], [1.0]],
    ])
    # task 0: inside, on the lower edge (inclusive), below, above -> 2/4
    # task 1: inside, inside, above, on the upper edge (inclusive) -> 3/4
    cov = M.interval_coverage(y, lower, upper)
    assert cov.dtype == torch.float64
    assert_close(cov, [0.5, 0.75], rtol=0, atol=0)


def test_interval_coverage_broadcasts_multi_output():
    y = torch.zeros(1, 2, 2)  # T=1 Q=2 O=2
    lower = torch.tensor([[[-1.0, 1.0], [-1.0, -1.0]]])
    upper = torch.tensor([[[1.0, 2.0], [1.0, 1.0]]])
    assert_close(M.interval_coverage(y, lower, upper), [0.75], rtol=0, atol=0)


# ----------------------------------------------------------------------------- classification
def test_accuracy_and_brier_by_hand():
    probs = torch.tensor([[[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]],
                          [[0.5, 0.5, 0.0], [0.2, 0.2, 0.6]]], dtype=torch.float64)
    y = torch.tensor([[0, 1], [1, 2]])
    # task 0: argmax 0 (right), 2 (wrong); task 1: argmax 0 (tie -> first index, wrong), 2 (right)
    assert_close(M.accuracy(probs, y), [0.5, 0.5], rtol=0, atol=0)
    b0 = ((0.3**2 + 0.2**2 + 0.1**2) + (0.1**2 + 0.7**2 + 0.6**2)) / 2
    b1 = ((0.5**2 + 0.5**2 + 0.0) + (0.2**2 + 0.2**2 + 0.4**2)) / 2
    assert_close(M.brier(probs, y), [b0, b1], rtol=1e-12)


def test_ece_mce_hand_made_case():
    # four predictions, 2 classes; confidences 0.55, 0.65 (bin (0.533, 0.6] and (0.6, 0.667]),
    # and two at 0.95 (bin (0.933, 1]); 15 equal-width bins
    probs = torch.tensor([[0.55, 0.45], [0.35, 0.65], [0.95, 0.05], [0.05, 0.95]], dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 0])  # right, wrong, right, wrong
    bins = M.calibration_bins(probs, y, num_bins=15)
    full = bins["count"] > 0
    assert bins["count"].sum() == 4 and int(full.sum()) == 3
    assert_close(bins["count"][full], [1, 1, 2], rtol=0)
    assert_close(bins["confidence"][full], [0.55, 0.65, 0.95], rtol=1e-12)
    assert_close(bins["accuracy"][full], [1.0, 0.0, 0.5], rtol=0)
    err = M.calibration_errors(bins)
    # ECE = 1/4 |1 - .55| + 1/4 |0 - .65| + 2/4 |.5 - .95| = .1125 + .1625 + .225
    assert_close(err["ece"], 0.5, rtol=1e-12)
    assert_close(err["mce"], 0.65, rtol=1e-12)


def test_perfectly_calibrated_predictions_have_zero_ece():
    # in each bin the accuracy equals the confidence exactly: 0.75 confidence, 3 of 4 right
    probs = torch.tensor([[0.75, 0.25]] * 4 + [[0.0, 1.0]] * 3, dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    err = M.calibration_errors(M.calibration_bins(probs, y))
    assert_close(err["ece"], 0.0, atol=1e-15)
    assert_close(err["mce"], 0.0, atol=1e-15)


def test_bin_edges_are_right_closed():
    # a confidence of exactly 2/3 (10/15) belongs to bin 9, (9/15, 10/15]; 1.0 to the last bin
    probs = torch.tensor([[2 / 3, 1 / 3], [1.0, 0.0]], dtype=torch.float64)
    bins = M.calibration_bins(probs, torch.tensor([0, 0]), num_bins=15)
    assert bins["count"][9] == 1 and bins["count"][14] == 1 and bins["count"].sum() == 2


def test_classification_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="int64"):
        M.accuracy(torch.rand(2, 3, 4), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="matching leading dims"):
        M.brier(torch.rand(2, 3, 4), torch.zeros(2, 4, dtype=torch.int64))
