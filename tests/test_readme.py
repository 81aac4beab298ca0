"""The README's own-model example runs as written and gives a finite, evaluated posterior."""

from __future__ import annotations

import re

import arviz as az
from conftest import REPO


def _example() -> str:
    text = (REPO / "README.md").read_text()
    marker = text.index("<!-- own-model-example")
    block = re.search(r"```python\n(.*?)```", text[marker:], re.S)
    assert block, "the README's own-model example block is missing"
    return block.group(1)


def test_readme_own_model_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope: dict = {"__name__": "readme_example"}
    exec(compile(_example(), "README.md", "exec"), scope)  # noqa: S102 - the README's own code
    metrics = scope["metrics"]
    for key in ("mse", "nll", "coverage50", "coverage90"):
        assert metrics[key]["n"] == 100
        assert metrics[key]["mean"] == metrics[key]["mean"]  # finite, not NaN
    assert (tmp_path / "runs/amortized-vi/checkpoint.pt").exists()
    idata = az.from_netcdf(str(tmp_path / "runs/amortized-vi/posterior.nc"))
    assert idata.posterior["phi"].sizes["task"] == 5
    assert set(idata.groups()) >= {"posterior", "posterior_predictive", "log_likelihood", "observed_data"}
