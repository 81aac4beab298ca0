"""The README's own-model example runs as written and gives a finite, evaluated posterior."""

from __future__ import annotations

import re

import arviz as az
from conftest import REPO


def _example(name: str = "own-model-example") -> str:
    text = (REPO / "README.md").read_text()
    marker = text.index(f"<!-- {name}")
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


def test_readme_task_family_example_runs(tmp_path, monkeypatch, capsys):
    from pyro_meta.tasks import unregister_benchmark

    monkeypatch.chdir(tmp_path)
    scope: dict = {"__name__": "readme_task_family"}
    try:
        exec(compile(_example("task-family-example"), "README.md", "exec"), scope)  # noqa: S102
    finally:
        unregister_benchmark("cubic")
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "torch.Size([10, 5, 1])"
    assert float(out[-1]) == float(out[-1])  # a finite held-out lpd per point
    run = tmp_path / "runs/cubic-abml"
    for name in ("eval.json", "posterior.nc", "config.json", "plots/predictive.png"):
        assert (run / name).exists(), name
