"""The library as a good citizen of the Pyro/PyTorch ecosystem: importing it changes no Pyro setting,
prints no dependency warning, and a user's own ``pyro.param`` code and ``pyro.infer.SVGD`` run beside it
without a wrapper; a meta-model made of ``PyroModule`` s still keeps its parameters to itself."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from conftest import REPO
from pyro.nn import PyroModule, PyroParam
from pyro.optim import Adam
from test_own_model import NOISE, PRIOR_STD, D, _batch, features
from torch import nn

from pyro_meta import MetaLearner
from pyro_meta.evaluate import evaluate
from pyro_meta.infer import ScalarRBFKernel
from pyro_meta.likelihoods import Gaussian
from pyro_meta.models import observe, tasks_plate
from pyro_meta.train import fit

MODULES = ["pyro_meta", "pyro_meta.cli", "pyro_meta.run", "pyro_meta.plots", "pyro_meta.inspect", "pyro_meta.arviz",
           "pyro_meta.particles", "pyro_meta.vi.mixture", "pyro_meta.vi.vae", "pyro_meta.compare"]


def _python(code: str, cache: Path) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter with every warning shown and an empty user cache (ArviZ shows its
    refactor notice once a day, stamped in the user cache)."""
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    return subprocess.run([sys.executable, "-W", "default", "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=env)


def test_importing_the_library_changes_no_pyro_setting_and_warns_nothing(tmp_path):
    """In a fresh interpreter, with every warning shown (``-W default``): importing every public module
    leaves ``pyro.settings`` as it was and writes nothing to stderr (ArviZ's refactor notice is filtered
    where the library imports ArviZ; ``import arviz`` on its own still shows it)."""
    code = ("import pyro\nbefore = pyro.settings.get()\n"
            + "".join(f"import {m}\n" for m in MODULES)
            + "after = pyro.settings.get()\nassert before == after, (before, after)\n"
            "assert after['module_local_params'] is False\nprint('ok')\n")
    proc = _python(code, tmp_path / "a")
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
    assert proc.stderr == "", proc.stderr
    alone = _python("import arviz", tmp_path / "b")
    assert "ArviZ is undergoing a major refactor" in alone.stderr  # the filter is the library's, not global


def test_cli_commands_start_quietly(tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    for args in (["list"], ["--help"]):
        proc = subprocess.run([sys.executable, "-W", "default", "-m", "pyro_meta", *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120, env=env)
        assert proc.returncode == 0 and proc.stderr == "", (args, proc.stderr)


def test_a_users_pyro_param_and_svgd_work_beside_the_library():
    """No wrapper: ``pyro.param`` goes to Pyro's global store and ``pyro.infer.SVGD`` moves its particles."""
    assert pyro.settings.get("module_local_params") is False
    pyro.param("mine", torch.ones(2))
    assert "mine" in pyro.get_param_store()

    def model():
        pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))

    svgd = pyro.infer.SVGD(model, ScalarRBFKernel(), Adam({"lr": 0.1}), num_particles=8, max_plate_nesting=0,
                           mode="multivariate")
    svgd.step()  # the first step creates the particles, in Pyro's global store
    assert "svgd_particles" in pyro.get_param_store()
    before = svgd.get_named_particles()["z"].clone()
    for _ in range(5):
        svgd.step()
    assert not torch.equal(before, svgd.get_named_particles()["z"])


class PyroLinearModel(PyroModule):
    """The conjugate linear model of ``test_own_model`` with its prior mean a ``PyroParam``: what a user
    writes with Pyro's own module tools."""

    def __init__(self):
        super().__init__()
        self.mu = PyroParam(torch.zeros(D))

    def forward(self, batch):
        with tasks_plate(batch.num_tasks):
            phi = pyro.sample("phi", dist.Normal(self.mu, PRIOR_STD).to_event(1))  # ..., T 1 D
            lik = Gaussian(NOISE)
            observe("y_support", lik, (features(batch.x_support) * phi).sum(-1, keepdim=True), batch.y_support)
            observe("y_query", lik, (features(batch.x_query) * phi).sum(-1, keepdim=True), batch.y_query)


class PyroGuide(PyroModule):
    def __init__(self):
        super().__init__()
        self.loc = PyroParam(torch.zeros(D))
        self.scale = PyroParam(torch.ones(D), constraint=dist.constraints.positive)

    def forward(self, batch):
        with tasks_plate(batch.num_tasks):
            pyro.sample("phi", dist.Normal(self.loc.expand(batch.num_tasks, 1, D), self.scale).to_event(1))


def test_a_pyro_module_meta_model_keeps_its_parameters_local():
    """Built with Pyro's default (global) setting, trained by ``fit`` and evaluated: its ``PyroParam`` s are
    the learner's parameters and move; nothing reaches Pyro's global param store; two learners of the same
    class share nothing; the setting is off again afterwards."""
    assert pyro.settings.get("module_local_params") is False
    learners = [MetaLearner(PyroLinearModel(), PyroGuide()) for _ in range(2)]
    names = {n for n, _ in learners[0].named_parameters()}
    assert {"model.mu_unconstrained", "guide.loc_unconstrained",
            "guide.scale_unconstrained"} == names
    start = {n: p.detach().clone() for n, p in learners[1].named_parameters()}
    fit(learners[0], [_batch(s) for s in range(3)], steps=20, meta_lr=0.05, progress=False)
    moved = {n: (p.detach() - start[n]).abs().max().item() for n, p in learners[0].named_parameters()}
    assert min(moved.values()) > 1e-3, moved
    for n, p in learners[1].named_parameters():  # untouched: the first learner's training is its own
        assert torch.equal(p.detach(), start[n]), n
    assert list(pyro.get_param_store().keys()) == []
    metrics, _ = evaluate(learners[0], _batch(9), num_samples=4, seed=0)
    assert metrics["mse"]["mean"] == metrics["mse"]["mean"]  # finite, ran
    assert list(pyro.get_param_store().keys()) == [] and pyro.settings.get("module_local_params") is False
    assert isinstance(learners[0].model, nn.Module)
