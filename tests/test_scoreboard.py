"""The scoreboard: the regression calibration curve against known answers, training to a time budget,
and ``pyro-meta compare`` / ``experiments/scoreboard.py`` end to end with tiny settings."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import REPO, assert_close
from test_cli import assert_png, pyro_meta
from test_experiments import _run

from pyro_meta import metrics as M
from pyro_meta.compare import run_scoreboard
from pyro_meta.config import RunConfig
from pyro_meta.evaluate import (
    Prediction,
    interval_coverages,
    predictive_calibration,
    predictive_quantile,
    regression_metrics,
)
from pyro_meta.run import _run_one, finished_report, train_run
from pyro_meta.tasks import TaskBatch
from pyro_meta.train import fit, load_checkpoint

LEVELS = torch.tensor(M.CALIBRATION_LEVELS, dtype=torch.float64)
STD_NORMAL = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0)


def _gaussian_prediction(loc: torch.Tensor, scale: torch.Tensor, y: torch.Tensor) -> Prediction:
    """A Gaussian predictive mixture ``loc, scale [S, T, Q, 1]`` scored on ``y [T, Q, 1]``."""
    log_lik = torch.distributions.Normal(loc, scale).log_prob(y).sum(-1)  # S T Q
    return Prediction({}, (), loc, scale, log_lik, loc, gaussian=True)


# ----------------------------------------------------------------------------- calibration curve
def test_calibration_levels():
    assert len(M.CALIBRATION_LEVELS) == 19
    assert_close(M.CALIBRATION_LEVELS, [0.05 * k for k in range(1, 20)], rtol=0, atol=1e-12)


def test_a_predictive_with_the_datas_distribution_is_calibrated():
    """A two-component mixture (+-2, sd 1) scoring draws of that very mixture: observed coverage is
    the nominal one within Monte Carlo error at every level."""
    g = torch.Generator().manual_seed(0)
    t, q = 200, 100
    side = torch.randint(0, 2, (t, q, 1), generator=g) * 4.0 - 2.0
    y = (side + torch.randn(t, q, 1, generator=g)).double()
    loc = torch.tensor([-2.0, 2.0], dtype=torch.float64).view(2, 1, 1, 1).expand(2, t, q, 1)
    pred = _gaussian_prediction(loc, torch.ones_like(loc), y)
    cal = predictive_calibration(pred, y)
    assert cal["levels"] == list(M.CALIBRATION_LEVELS) and cal["n"] == t
    mc_sd = (LEVELS * (1 - LEVELS) / (t * q)).sqrt()  # binomial sd of a pooled fraction
    assert ((torch.tensor(cal["observed"]) - LEVELS).abs() <= 4 * mc_sd).all(), cal["observed"]
    assert cal["gap"] < 0.01
    # the moment-matched single Gaussian N(0, 5) is not calibrated on the same data
    wide = _gaussian_prediction(torch.zeros(1, t, q, 1, dtype=torch.float64),
                                torch.full((1, t, q, 1), math.sqrt(5.0), dtype=torch.float64), y)
    assert predictive_calibration(wide, y)["gap"] > 0.03


def test_an_overconfident_gaussian_has_its_closed_form_gap():
    """y ~ N(0, 1) (exact quantiles of it, so no Monte Carlo error) and a predictive N(0, s^2), s = 0.5:
    the central interval at level a is +-s z_{(1+a)/2}, which holds 2 Phi(s z_{(1+a)/2}) - 1 of y."""
    n, s = 20_000, 0.5
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    y = STD_NORMAL.icdf(u).view(1, n, 1)  # T=1 task of n points
    expected = 2 * STD_NORMAL.cdf(s * STD_NORMAL.icdf((1 + LEVELS) / 2)) - 1
    loc = torch.zeros(1, 1, n, 1, dtype=torch.float64)
    cal = predictive_calibration(_gaussian_prediction(loc, torch.full_like(loc, s), y), y)
    assert_close(cal["observed"], expected, rtol=0, atol=2.0 / n)
    assert_close(cal["gap"], float((expected - LEVELS).abs().mean()), rtol=0, atol=2.0 / n)
    assert_close(cal["max_gap"], float((expected - LEVELS).abs().max()), rtol=0, atol=2.0 / n)
    assert all(o < a for o, a in zip(cal["observed"], cal["levels"]))  # over-confident: below the diagonal


def test_calibration_curve_averages_tasks_and_checks_shapes():
    cov = torch.tensor([[0.0, 1.0], [0.5, 0.5]], dtype=torch.float64)  # L=2 levels, T=2 tasks
    cal = M.calibration_curve(cov, (0.25, 0.75))
    assert cal["observed"] == [0.5, 0.5] and cal["n"] == 2
    assert_close(cal["gap"], 0.25, rtol=0, atol=1e-12)
    assert_close(cal["max_gap"], 0.25, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="expected coverage"):
        M.calibration_curve(cov, (0.5,))
    # inside the central interval at level a when |2u - 1| <= a
    pit = torch.tensor([[[0.5], [0.75]]])  # T=1 Q=2: |2u - 1| = 0 and 0.5
    assert_close(M.pit_coverage(pit, (0.4, 0.5)), [[0.5], [1.0]], rtol=0, atol=0)


def test_the_cdf_shortcut_equals_the_bisected_quantiles():
    """For a Gaussian mixture the coverage from the CDF at y (``|2 F(y) - 1| <= a``) is the coverage
    between the mixture's bisected quantiles (:func:`predictive_quantile`), at every level."""
    g = torch.Generator().manual_seed(2)
    s, t, q = 6, 8, 50
    loc = torch.randn(s, t, 1, 1, generator=g).expand(s, t, q, 1).double()
    scale = (0.3 + torch.rand(s, t, 1, 1, generator=g)).expand(s, t, q, 1).double()
    y = torch.randn(t, q, 1, generator=g).double()
    pred = _gaussian_prediction(loc, scale, y)
    bisected = torch.stack([M.interval_coverage(y, predictive_quantile(pred, (1 - a) / 2),
                                                predictive_quantile(pred, (1 + a) / 2)) for a in M.CALIBRATION_LEVELS])
    assert_close(interval_coverages(pred, y), bisected, rtol=0, atol=0)


@pytest.mark.parametrize("gaussian", [True, False])
def test_regression_metrics_adds_the_curve_and_keeps_its_keys(gaussian):
    """The curve at 0.5 and 0.9 is the coverage50/90 of the same metrics (the same exact mixture
    quantiles), for a Gaussian mixture and for the empirical quantiles of non-Gaussian draws."""
    g = torch.Generator().manual_seed(1)
    s, t, q = 6, 8, 50
    loc = torch.randn(s, t, 1, 1, generator=g).expand(s, t, q, 1).double()
    scale = torch.full_like(loc, 0.7)
    y = torch.randn(t, q, 1, generator=g).double()
    pred = _gaussian_prediction(loc, scale, y)
    if not gaussian:
        draws = torch.randn(200, t, q, 1, generator=g).double() * 1.3
        pred = Prediction({}, (), draws, None, pred.log_lik, draws, gaussian=False)
    batch = TaskBatch(torch.zeros(t, 1, 1), torch.zeros(t, 1, 1), torch.zeros(t, q, 1), y.float())
    m = regression_metrics(pred, batch)
    assert set(m) == {"mse", "nll", "coverage50", "coverage90", "crps", "calibration_error", "heldout_lpd",
                      "calibration", "nonfinite_tasks", "absurd_tasks"}
    cal = m["calibration"]
    assert set(cal) == {"levels", "observed", "ci95", "gap", "max_gap", "n"} and len(cal["observed"]) == 19
    assert_close(cal["observed"][cal["levels"].index(0.5)], m["coverage50"]["mean"], rtol=0, atol=1e-9)
    assert_close(cal["observed"][cal["levels"].index(0.9)], m["coverage90"]["mean"], rtol=0, atol=1e-9)
    assert all(a <= b for a, b in zip(cal["observed"], cal["observed"][1:]))  # nested intervals


# ----------------------------------------------------------------------------- time budget
TINY = {"method": "maml", "meta_batch": 2, "hidden": [8], "num_test_tasks": 4, "num_val_tasks": 2,
        "eval_queries": 10, "log_every": 1, "checkpoint_every": 1000}


def _log(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_fit_refuses_a_bad_time_budget():
    batch = TaskBatch(torch.zeros(1, 1, 1), torch.zeros(1, 1, 1), torch.zeros(1, 1, 1), torch.zeros(1, 1, 1))
    for bad in (0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="max_seconds"):
            fit(None, batch, 5, max_seconds=bad)  # checked before the learner is touched


def test_a_time_budget_stops_a_run_that_resumes_and_finishes(tmp_path):
    """Interrupted at step 2, resumed with a budget of 0.6 s: it stops after the first step past the
    budget (its earlier time counted), finishes at that step with the parameters of a run trained for
    exactly those steps, and a scoreboard worker started again takes it as finished."""
    run, budget = tmp_path / "run", 0.6
    _, first = train_run(RunConfig(steps=100_000, **TINY), run, progress=False, stop_after=2)
    assert first.step == 2 and not first.out_of_time and finished_report(run) is None
    _, res = train_run(RunConfig(), run, resume=True, progress=False, max_seconds=budget,
                       overrides={"steps": 100_000})
    assert res.out_of_time and 2 < res.step < 100_000
    ckpt = load_checkpoint(run / "checkpoint.pt")
    assert ckpt["step"] == res.step and ckpt["seconds"] >= budget
    log = _log(run)
    steps = [r for r in log if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, res.step + 1))
    # the step before the last one was within the budget (metrics.jsonl rounds seconds to 1 ms, so a time
    # just under the budget can be logged as equal to it: CI saw 0.6 for a 0.6 s budget)
    assert steps[-2]["seconds"] <= budget
    event = log[-1]
    assert event["event"] == "time_budget" and event["step"] == res.step and event["steps_asked"] == 100_000
    assert json.loads((run / "config.json").read_text())["steps"] == res.step
    report = finished_report(run)
    assert report is not None and report["step"] == res.step and report["finished"]
    assert (run / "plots" / "predictive.png").is_file()
    # the same steps without a budget: the same parameters
    _, ref = train_run(RunConfig(steps=res.step, **TINY), tmp_path / "ref", progress=False)
    ref_ckpt = load_checkpoint(tmp_path / "ref" / "checkpoint.pt")
    for k, v in ckpt["learner"].items():
        assert torch.equal(v, ref_ckpt["learner"][k]), k
    # a worker with a budget finds it finished: nothing retrained
    before = (run / "checkpoint.pt").read_bytes()
    again = _run_one({**TINY, "steps": 100_000}, str(run), max_seconds=budget)
    assert again == report and (run / "checkpoint.pt").read_bytes() == before


# ----------------------------------------------------------------------------- end to end
def _rows(board):
    return {(r["method"], r["shots"], r["mode"]): r for r in board["rows"]}


def test_compare_cli_tiny(tmp_path):
    """`pyro-meta compare` on one cell (2-shot sinusoid_line; one cell keeps the default suite short), both
    modes, with the reference rows and the recalibrated columns."""
    out = tmp_path / "board"
    r = pyro_meta("compare", "--methods", "maml", "abml", "--benchmarks", "sinusoid_line", "--shots", 2,
                  "--steps", 3, "--test-tasks", 5, "--set", json.dumps({"num_val_tasks": 5}), "--out", out,
                  "--no-progress", cwd=tmp_path)
    text = (out / "scoreboard.md").read_text()
    assert text.strip() == r.stdout.strip()
    assert "Command: `pyro-meta compare --methods maml abml --benchmarks sinusoid_line --shots 2 --steps 3" in text
    assert "Machine: " in text and "torch " in text
    assert "## sinusoid_line, equal iterations (3 steps)" in text and "## sinusoid_line, equal wall time" in text
    assert "| cov90 | CRPS | calib. error MAE/RMSE | calibration gap | recal. width: NLL, cov50/90 |" in text
    for method in ("maml", "abml"):
        for k in (2,):
            assert sum(line.startswith(f"| {method} | {k} |") for line in text.splitlines()) == 2  # both modes
    board = json.loads((out / "scoreboard.json").read_text())
    rows = _rows(board)
    # the reference rows: evaluated once per cell, shown in both tables, the oracle far ahead of the prior
    ref = {key: rows.pop(key) for key in list(rows) if key[2] == "reference"}
    assert set(ref) == {(m, k, "reference") for m in ("prior", "oracle") for k in (2,)}
    for k in (2,):
        assert ref[("oracle", k, "reference")]["metrics"]["nll"]["mean"] < ref[("prior", k, "reference")]["metrics"][
            "nll"]["mean"]
        assert ref[("prior", k, "reference")]["steps"] == 0
        for m in ("prior", "oracle"):
            assert sum(line.startswith(f"| {m} (reference) | {k} | 0 |") for line in text.splitlines()) == 2
    assert set(rows) == {(m, k, mode) for m in ("maml", "abml") for k in (2,) for mode in ("iterations", "wall")}
    budgets = {b["shots"]: b["seconds"] for b in board["wall_budgets"]}
    for (_, k, mode), row in rows.items():
        assert "error" not in row, row
        assert row["metrics"]["calibration"]["n"] == 5 and 0 <= row["metrics"]["calibration"]["gap"] <= 1
        assert row["metrics"]["crps"]["n"] == 5 and row["metrics"]["crps"]["mean"] > 0
        assert 0 <= row["metrics"]["calibration_error"]["mae"] <= row["metrics"]["calibration_error"]["rmse"] <= 1
        assert row["tasks_per_second"] > 0 and row["train_seconds"] > 0
        # raw and recalibrated side by side (maps fitted on the validation tasks)
        assert row["recalibrated"]["validation_tasks"] > 0 and row["recalibrated"]["scale"]["value"] > 0
        assert 0 <= row["recalibrated"]["isotonic"]["coverage90"]["mean"] <= 1
        if mode == "iterations":
            assert row["steps"] == 3
        else:  # stopped by its cell's budget, the median of the cell's equal-iteration times
            times = sorted(rows[(m, k, "iterations")]["train_seconds"] for m in ("maml", "abml"))
            assert budgets[k] == pytest.approx(sum(times) / 2, abs=0.006)
            assert row["max_seconds"] == budgets[k] and row["time_budget"]["step"] == row["steps"]
            assert row["train_seconds"] >= budgets[k]
    # identical task streams and test tasks: everything but the method is shared within a cell
    shared = ("seed", "meta_batch", "queries", "eval_queries", "num_test_tasks", "benchmark", "shots")
    for k in (2,):
        cfgs = [json.loads((out / "runs" / r["run"] / "config.json").read_text())
                for (_, shots, _), r in rows.items() if shots == k]
        assert len({tuple(c[f] for f in shared) for c in cfgs}) == 1
        assert all(c["threads"] == 1 for c in cfgs)
    assert board["figures"] == {"calibration": "calibration.png", "ambiguous_tasks": "ambiguous_tasks.png"}
    assert_png(out / "calibration.png")
    assert_png(out / "ambiguous_tasks.png")


def test_scoreboard_script_tiny_and_restart(tmp_path):
    """experiments/scoreboard.py with a given wall-time budget; started again, it retrains nothing."""
    out = tmp_path / "sb"
    args = [REPO / "experiments/scoreboard.py", "--methods", "maml", "--benchmarks", "sinusoid", "--shots", 2,
            "--steps", 2, "--mode", "both", "--wall-seconds", 0.5, "--test-tasks", 4,
            "--set", json.dumps({"hidden": [8], "eval_queries": 10}), "--out", out, "--no-progress", "--no-references"]
    r = _run(args, tmp_path)
    text = (out / "scoreboard.md").read_text()
    assert text.strip() == r.stdout.strip()
    assert "Command: `python experiments/scoreboard.py --methods maml" in text and "--wall-seconds 0.5" in text
    assert "--no-references" in text and "(reference)" not in text.split("Columns:")[1].split("\n\n", 1)[1]
    assert "Time budget per run: 2-shot 0.5 s." in text
    rows = _rows(json.loads((out / "scoreboard.json").read_text()))
    assert set(rows) == {("maml", 2, "iterations"), ("maml", 2, "wall")}
    assert rows[("maml", 2, "iterations")]["steps"] == 2 and rows[("maml", 2, "wall")]["train_seconds"] >= 0.5
    ckpts = {p: p.read_bytes() for p in (out / "runs").rglob("checkpoint.pt")}
    assert len(ckpts) == 2
    # started again (here in-process, as the script calls it): the finished runs are read, not retrained
    board = run_scoreboard(out, methods=["maml"], benchmarks=["sinusoid"], shots=[2], steps=2, mode="both",
                           wall_seconds=0.5, num_test_tasks=4, settings={"hidden": [8], "eval_queries": 10},
                           progress=False, references=False)
    assert _rows(board) == rows
    assert all(p.read_bytes() == b for p, b in ckpts.items())


def test_row_variants_bmaml_and_bfa(tmp_path):
    """The bfa row is BMAML with its BFA objective, in a folder of its own; both rows are on the board and
    the default rows include them."""
    from pyro_meta.compare import row_methods

    rows = row_methods()
    assert rows[rows.index("bmaml") + 1] == "bfa"
    out = tmp_path / "board"
    board = run_scoreboard(out, methods=["bmaml", "bfa"], benchmarks=["sinusoid"], shots=[2], steps=2,
                           mode="iterations", workers=1, num_test_tasks=4,
                           settings={"hidden": [8], "eval_queries": 10, "particles": 2}, progress=False)
    rows = _rows(board)
    # sinusoid's reference rows: the prior, and an oracle that does not exist (noiseless targets: a point mass)
    assert set(rows) == {("bmaml", 2, "iterations"), ("bfa", 2, "iterations"), ("prior", 2, "reference"),
                         ("oracle", 2, "reference")}
    assert "point mass" in rows[("oracle", 2, "reference")]["unavailable"]
    assert math.isfinite(rows[("prior", 2, "reference")]["metrics"]["nll"]["mean"])
    del rows[("prior", 2, "reference")], rows[("oracle", 2, "reference")]
    objectives = {r: json.loads((out / "runs" / rows[(r, 2, "iterations")]["run"] / "config.json").read_text())
                  ["objective"] for r in ("bmaml", "bfa")}
    assert objectives == {"bmaml": "chaser", "bfa": "bfa"}
    text = (out / "scoreboard.md").read_text()
    assert "| bfa | 2 |" in text and "| oracle (reference) | 2 | none: noiseless targets" in text
