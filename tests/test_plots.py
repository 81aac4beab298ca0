"""Readable plots: labelled ticks and a title on the training curve, no empty panels for a point
estimate in the posterior picture, nothing clipped in the posterior predictive check."""

from __future__ import annotations

import json
import math
import warnings

import arviz as az
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from pyro_meta import plots
from pyro_meta.arviz import to_inference_data
from pyro_meta.config import RunConfig
from pyro_meta.methods import build_learner, resolve
from pyro_meta.run import benchmark_of

HIDDEN = 8
NUM_DRAWS = 6


def _rows(losses) -> list[dict]:
    return [{"step": 50 * (i + 1), "loss": loss, "grad_norm": 0.5, "skipped": int(loss is None),
             "seconds": 1.0} for i, loss in enumerate(losses)]


def _shown_ticklabels(ax, axis: str = "y", draw: bool = True) -> list:
    """The non-empty major tick labels inside the view interval (those drawn), after a draw."""
    if draw:
        ax.figure.canvas.draw()
    i = "xy".index(axis)
    lo, hi = sorted(ax.get_xlim() if axis == "x" else ax.get_ylim())
    labels = ax.get_xticklabels() if axis == "x" else ax.get_yticklabels()
    return [t for t in labels if t.get_visible() and t.get_text().strip() and lo <= t.get_position()[i] <= hi]


def _labelled_yticks(ax) -> list[str]:
    return [t.get_text() for t in _shown_ticklabels(ax, "y")]


def _inside(inner, outer, tol: float = 0.5) -> bool:
    return (inner.x0 >= outer.x0 - tol and inner.y0 >= outer.y0 - tol and inner.x1 <= outer.x1 + tol
            and inner.y1 <= outer.y1 + tol)


def _draws_something(ax, draw: bool = True) -> bool:
    """Whether ``ax`` shows anything a reader can see inside it: a line longer than a pixel (or a
    marker) inside the axes, a patch of nonzero size overlapping it, or non-empty text within it.
    (ArviZ's panels for a point estimate hold only zero-length lines and texts far off the axes.)"""
    if draw:
        ax.figure.canvas.draw()
    box = ax.get_window_extent()
    for line in ax.lines:
        xy = np.asarray(line.get_xydata(), dtype=float)
        xy = xy[np.isfinite(xy).all(1)]
        if not (line.get_visible() and xy.size):
            continue
        pts = line.get_transform().transform(xy)
        pts = pts[(pts[:, 0] >= box.x0 - 1) & (pts[:, 0] <= box.x1 + 1)
                  & (pts[:, 1] >= box.y0 - 1) & (pts[:, 1] <= box.y1 + 1)]
        if len(pts) and (line.get_marker() not in (None, "None", "", " ")
                         or np.ptp(pts, axis=0).max() > 1):
            return True
    for patch in ax.patches:
        ext = patch.get_window_extent()
        if patch.get_visible() and ext.width > 0.5 and ext.height > 0.5 and ext.overlaps(box):
            return True
    return any(t.get_visible() and t.get_text().strip() and _inside(t.get_window_extent(), box)
               for t in ax.texts)


# --- training curve --------------------------------------------------------------------------------

NARROW = [0.9 + 0.4 * ((7 * i) % 11) / 10 for i in range(60)]  # 0.9 .. 1.3
ABOVE_ONE = [2 + 7 * ((7 * i) % 11) / 10 for i in range(60)]  # 2 .. 9: no symlog tick in view
WIDE = [1e3 * math.exp(-i / 8) + 0.05 for i in range(60)]  # 4+ decades
MID = [30 * math.exp(-i / 12) + 0.2 for i in range(60)]  # about 1.9 decades
SIGNED = [500 * math.exp(-i / 5) - 3 for i in range(60)]  # large positive down to negative


@pytest.mark.parametrize("losses, scale", [(NARROW, "linear"), (ABOVE_ONE, "linear"), (WIDE, "log"),
                                           (MID, "log"), (SIGNED, "symlog"), (NARROW[:5], "linear")],
                         ids=["narrow", "above-one", "wide", "mid", "signed", "few"])
def test_training_curve_has_labelled_y_ticks_and_a_title(losses, scale):
    fig = plots._training_curve_figure(_rows(losses))
    ax = fig.axes[0]
    try:
        assert ax.get_yscale() == scale
        labels = _labelled_yticks(ax)
        assert len(labels) >= 3, labels  # more than the two ends of the data
        assert ax.get_title() == "meta-training loss"
        assert ax.get_xlabel() and ax.get_ylabel()
    finally:
        plt.close(fig)


def test_training_curve_title_and_running_mean():
    fig = plots._training_curve_figure(_rows(NARROW), title="sinusoid / abml")
    try:
        ax = fig.axes[0]
        assert ax.get_title() == "sinusoid / abml"
        assert any("running mean" in str(line.get_label()) for line in ax.lines)
    finally:
        plt.close(fig)


def test_training_curve_handles_skipped_steps(tmp_path):
    losses = list(NARROW)
    losses[3] = losses[10] = None
    losses[20] = float("nan")
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps(r) for r in _rows(losses)) + "\n")
    out = plots.plot_training_curve(metrics, tmp_path / "plots" / "training_loss.png", title="t")
    assert out is not None and out.stat().st_size > 0
    fig = plots._training_curve_figure(_rows(losses))
    try:
        assert len(_labelled_yticks(fig.axes[0])) >= 3
    finally:
        plt.close(fig)
    fig = plots._training_curve_figure(_rows([None, None]))  # every step skipped
    try:
        assert fig.axes[0].get_title() and len(_labelled_yticks(fig.axes[0])) >= 3
    finally:
        plt.close(fig)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert plots.plot_training_curve(empty, tmp_path / "none.png") is None


# --- posterior weights -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def idatas():
    """Exports of untrained sinusoid learners: MAML (a Delta guide: all draws equal) and ABML."""
    out = {}
    for method in ("maml", "abml"):
        cfg = resolve(RunConfig(method=method, hidden=[HIDDEN], meta_batch=2, num_test_tasks=2,
                                num_val_tasks=2, eval_queries=10, shots=5))
        torch.manual_seed(0)
        learner = build_learner(cfg)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # arviz: "default dims ... added"
            out[method] = to_inference_data(learner, benchmark_of(cfg).test, num_samples=NUM_DRAWS,
                                            seed=0)
    return out


def _sel(idata, n: int = 8) -> dict:
    return {"task": 0, "phi_dim": list(idata.posterior["phi_dim"].values[:n])}


def test_point_estimate_posterior_has_no_empty_panel(idatas, tmp_path):
    idata = idatas["maml"]
    vals = idata.posterior["phi"].values
    assert (vals == vals[:, :1]).all()  # the premise: a Delta guide, every draw the same
    fig = plots._posterior_weights_figure(idata, "phi", _sel(idata))
    try:
        visible = [ax for ax in fig.axes if ax.get_visible()]
        assert visible and all(_draws_something(ax) for ax in visible)
        text = " ".join([fig.axes[0].get_title()] + [t.get_text() for t in fig.axes[0].get_yticklabels()])
        assert "point estimate" in text and "w0[0,0]" in text
    finally:
        plt.close(fig)
    single = idatas["abml"].sel(draw=[0])  # one draw is a point estimate too
    fig = plots._posterior_weights_figure(single, "phi", _sel(single))
    try:
        assert all(_draws_something(ax) for ax in fig.axes if ax.get_visible())
        assert "single draw" in fig.axes[0].get_title()
    finally:
        plt.close(fig)
    out = plots.plot_posterior_weights(idata, "phi", _sel(idata), tmp_path / "posterior.png")
    assert out is not None and out.stat().st_size > 0


def test_spread_posterior_has_one_panel_per_weight(idatas, tmp_path):
    idata = idatas["abml"]
    n = 6
    fig = plots._posterior_weights_figure(idata, "phi", _sel(idata, n), title="phi on task 0")
    try:
        visible = [ax for ax in fig.axes if ax.get_visible()]
        assert len(visible) == n
        fig.canvas.draw()
        assert all(_draws_something(ax, draw=False) for ax in visible)
        assert [ax.get_title().splitlines()[0] for ax in visible] == _sel(idata, n)["phi_dim"]
        assert fig._suptitle is not None and "phi on task 0" in fig._suptitle.get_text()
        boxes = [ax.title.get_window_extent() for ax in visible]  # titles and tick labels: apart
        boxes += [t.get_window_extent() for ax in visible for t in _shown_ticklabels(ax, "x", False)]
        for i, a in enumerate(boxes):
            assert not any(a.overlaps(b) for b in boxes[i + 1:])
    finally:
        plt.close(fig)
    assert plots.plot_posterior_weights(idata, "phi", _sel(idata), tmp_path / "p.png").exists()
    assert plots.plot_posterior_weights(idata, "nope", {}, tmp_path / "q.png") is None


def test_mixed_and_per_class_posteriors():
    """A weight without spread among spread ones gets a marked panel; VERSA's per-class ``psi``
    (task, class, psi_dim) is selected by class."""
    rng = np.random.default_rng(0)
    psi = rng.normal(size=(1, 20, 2, 3, 4))
    psi[..., 1] = 0.5  # one weight fixed
    idata = az.from_dict(posterior={"psi": psi}, dims={"psi": ["task", "class", "psi_dim"]},
                         coords={"psi_dim": ["w[0]", "w[1]", "w[2]", "b"]})
    fig = plots._posterior_weights_figure(idata, "psi", {"task": 0, "class": 1, "psi_dim": ["w[0]", "w[1]", "b"]})
    try:
        visible = [ax for ax in fig.axes if ax.get_visible()]
        assert len(visible) == 3 and all(_draws_something(ax) for ax in visible)
        assert any("point estimate" in t.get_text() for t in visible[1].texts)
        assert "class 1" in fig._suptitle.get_text()
    finally:
        plt.close(fig)


# --- posterior predictive check --------------------------------------------------------------------

def _check_ppc(idata, tmp_path, num_pp_samples: int = 50) -> None:
    fig = plots._ppc_figure(idata, num_pp_samples)
    try:
        fig.canvas.draw()
        ax = fig.axes[0]
        assert ax.get_xlabel()
        assert _inside(ax.xaxis.label.get_window_extent(), fig.bbox)
        assert _inside(ax.title.get_window_extent(), fig.bbox)
        assert "posterior predictive" in ax.get_title() and "query" in ax.get_title()
        assert _draws_something(ax)
    finally:
        plt.close(fig)
    out = plots.plot_ppc(idata, tmp_path / "ppc.png", num_pp_samples=num_pp_samples)
    assert out.exists() and out.stat().st_size > 0


def test_ppc_regression(idatas, tmp_path):
    _check_ppc(idatas["abml"], tmp_path)


def test_ppc_single_draw(idatas, tmp_path):
    _check_ppc(idatas["maml"].sel(draw=[0]), tmp_path, num_pp_samples=1)


def test_ppc_classification(tmp_path):
    rng = np.random.default_rng(0)
    obs = np.tile(np.repeat(np.arange(5), 3), (2, 1))  # 2 tasks, 5 classes x 3 queries
    pp = rng.integers(0, 5, size=(1, 7, *obs.shape))
    idata = az.from_dict(posterior_predictive={"y_query": pp}, observed_data={"y_query": obs},
                         dims={"y_query": ["task", "query"]})
    _check_ppc(idata, tmp_path, num_pp_samples=4)
