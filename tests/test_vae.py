"""The VAE on binarized Omniglot (issue 11, part 2): the importance-weighted bound against Pyro's RenyiELBO
and Trace_ELBO, its gradient by finite differences, the ordering ELBO <= L_5 <= L_50, the resumable image
stream, the trainer's guards on a non-meta-learner, a short run that learns, and the CLI."""

from __future__ import annotations

import json
import os

import pyro
import pytest
import torch
from conftest import REAL_OMNIGLOT, assert_close, central_differences
from pyro.infer import RenyiELBO, Trace_ELBO

from pyro_meta.checks import ModelCheckError
from pyro_meta.config import ConfigError
from pyro_meta.infer.iwae import ImportanceWeightedELBO, bounds_from_log_weights
from pyro_meta.train import NonFiniteError, fit
from pyro_meta.vi.vae import (
    VAE,
    ImageBatch,
    ImageStream,
    as_probs,
    binarize_once,
    evaluate_bounds,
    make_objective,
    mean_image_logits,
)

DATA = REAL_OMNIGLOT


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Omniglot's decoded-tensor cache in a temporary folder for this module."""
    old = os.environ.get("PYRO_META_CACHE")
    os.environ["PYRO_META_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        del os.environ["PYRO_META_CACHE"]
    else:
        os.environ["PYRO_META_CACHE"] = old


def _images(n: int = 64, d: int = 36, seed: int = 0) -> torch.Tensor:
    """Grey levels with structure (two blob patterns plus noise), [n, d] in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    base = torch.stack([torch.linspace(0, 1, d), torch.linspace(1, 0, d)])
    which = torch.randint(0, 2, (n,), generator=g)
    return (0.8 * base[which] + 0.2 * torch.rand(n, d, generator=g)).clamp(0, 1)


def _small_vae(objective: str = "elbo", k: int = 1, d: int = 36) -> VAE:
    torch.manual_seed(0)
    return VAE(pixels=d, latent=3, hidden=[8], objective=objective, k=k)


def test_iwae_value_is_pyros_renyi_elbo_at_alpha_zero():
    """Same seed, same vectorized draws: -L_k equals RenyiELBO(alpha=0).loss; k = 1 equals Trace_ELBO."""
    vae = _small_vae()
    batch = ImageBatch(binarize_once(_images(), seed=0))
    for k in (5, 50):
        pyro.set_rng_seed(3)
        ours = ImportanceWeightedELBO(num_particles=k).loss(vae.model, vae.guide, batch)
        pyro.set_rng_seed(3)
        theirs = RenyiELBO(alpha=0.0, num_particles=k, vectorize_particles=True,
                           max_plate_nesting=1).loss(vae.model, vae.guide, batch)
        assert_close(ours, theirs, rtol=1e-6, msg=f"k={k}")
    pyro.set_rng_seed(4)
    one = ImportanceWeightedELBO(num_particles=1).loss(vae.model, vae.guide, batch)
    pyro.set_rng_seed(4)
    elbo = Trace_ELBO().loss(vae.model, vae.guide, batch)
    assert_close(one, elbo, rtol=1e-6)


def test_iwae_gradient_matches_finite_differences_in_float64():
    """With the noise fixed by a seed the bound is a smooth function of every weight: its autograd
    gradient equals central differences (float64), for encoder and decoder weights."""
    torch.set_default_dtype(torch.float64)
    vae = _small_vae(objective="iwae", k=7)
    batch = ImageBatch(binarize_once(_images(), seed=0).double())

    def loss():
        pyro.set_rng_seed(11)
        return vae.loss(batch)

    vae.zero_grad()
    loss().backward()
    for param in (vae.guide.encoder[0].weight, vae.guide.encoder[-1].bias, vae.model.decoder[-1].weight):
        idx = [0, 5, param.numel() - 1]
        fd = central_differences(lambda: loss().detach(), param, idx)
        assert_close(param.grad.view(-1)[idx], fd, rtol=1e-5, atol=1e-8)


def test_bound_ordering_elbo_below_iwae5_below_iwae50():
    """E[ELBO] <= E[L_5] <= E[L_50]: on 64 images x 2,000 draws each, each step of the ordering holds by
    more than 5 standard errors of the paired per-image differences (not a coin flip)."""
    vae = _small_vae()
    x = binarize_once(_images(), seed=1)
    ev = evaluate_bounds(vae, x, k=2000, ks=(1, 5, 50), batch_size=16, chunk=500, seed=0)
    per = ev["per_image"]
    for lo, hi in ((1, 5), (5, 50)):
        diff = (per[hi] - per[lo]).double()
        se = diff.std() / len(diff) ** 0.5
        assert diff.mean() > 5 * se, f"L_{hi} - L_{lo}: mean {diff.mean():.4f}, s.e. {se:.4f}"
    # and the ELBO estimate is Pyro's Trace_ELBO's, within its Monte Carlo error
    pyro.set_rng_seed(5)
    pyro_elbo = -Trace_ELBO(num_particles=2000, vectorize_particles=True, max_plate_nesting=1).loss(
        vae.model, vae.guide, ImageBatch(x)) / len(x)
    assert abs(pyro_elbo - ev["bounds"][1]) < 0.05, (pyro_elbo, ev["bounds"][1])


def test_bounds_from_log_weights_groups():
    lw = torch.log(torch.tensor([[1.0], [3.0], [2.0], [6.0]]))
    b = bounds_from_log_weights(lw, (1, 2, 4))
    assert_close(b[1], lw.mean(0))
    assert_close(b[2], torch.log(torch.tensor([8.0])) / 2)  # groups (1, 3), (2, 6): mean of log 2 and log 4
    assert_close(b[4], torch.log(torch.tensor([3.0])))
    with pytest.raises(ValueError, match="does not divide"):
        bounds_from_log_weights(lw, (3,))


def test_image_stream_is_seeded_binary_and_resumes_from_its_position():
    probs = _images(50)
    s = ImageStream(probs, batch_size=8, seed=2)
    assert s.batches_per_epoch == 6
    first = [next(s).x for _ in range(14)]
    assert all(set(torch.unique(b).tolist()) <= {0.0, 1.0} for b in first)
    state = s.state_dict()
    after = [next(s).x for _ in range(3)]
    t = ImageStream(probs, batch_size=8, seed=2)
    t.load_state_dict(state)
    for a, b in zip(after, (next(t).x for _ in range(3))):
        assert torch.equal(a, b)
    again = ImageStream(probs, batch_size=8, seed=2)
    assert all(torch.equal(a, next(again).x) for a in first)
    other = ImageStream(probs, batch_size=8, seed=3)
    assert not torch.equal(first[0], next(other).x)
    with pytest.raises(ValueError, match="batch_size"):
        t.load_state_dict({**state, "batch_size": 4})
    with pytest.raises(ValueError, match="batch_size"):
        ImageStream(probs, batch_size=0)
    with pytest.raises(ValueError, match="\\[0, 1\\]"):
        as_probs(probs * 2)


def test_dynamic_binarization_has_the_grey_levels_as_mean():
    probs = _images(20)
    s = ImageStream(probs, batch_size=20, seed=0)
    draws = torch.stack([next(s).x for _ in range(400)])  # each epoch permutes: compare sorted by content
    assert_close(draws.mean((0, 1)), probs.mean(0), atol=0.02)


def test_fit_trains_a_vae_with_exact_resume(tmp_path):
    """The trainer every meta-learner uses: stopping at step 7 and resuming gives bit-identical weights to
    an uninterrupted run (model noise, minibatches and binarization all restored)."""
    probs = _images(64)

    def run(out, stop_after=None, resume=False):
        vae = _small_vae("iwae", 5)
        fit(vae, ImageStream(probs, 8, seed=0), 15, meta_lr=1e-2, out_dir=out, resume=resume, progress=False,
            stop_after=stop_after, run_config={"k": 5})
        return vae

    whole = run(tmp_path / "a")
    run(tmp_path / "b", stop_after=7)
    resumed = run(tmp_path / "b", resume=True)
    for p, q in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    lines = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 15


@pytest.mark.filterwarnings("ignore:Encountered NaN")
def test_fit_guards_apply_to_the_vae(tmp_path):
    """The non-finite guard stops a VAE whose loss is NaN; the first-step check names a miswired model."""
    vae = _small_vae()
    with torch.no_grad():
        vae.guide.encoder[0].weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="non-finite loss"):
        fit(vae, ImageStream(_images(), 8), 3, progress=False, check_first_step=False)

    vae = _small_vae()
    vae.model.forward = lambda batch: None  # observes nothing
    with pytest.raises(ModelCheckError, match="observe the pixels"):
        fit(vae, ImageStream(_images(), 8), 3, progress=False)
    with pytest.raises(TypeError, match="ImageBatch"):
        fit(_small_vae(), iter([object()]), 1, progress=False, check_first_step=False)


def test_objective_settings_are_checked():
    with pytest.raises(ValueError, match="objective"):
        make_objective("renyi", 5)
    with pytest.raises(ValueError, match="k"):
        make_objective("iwae", 0)
    with pytest.raises(ValueError, match="num_particles"):
        ImportanceWeightedELBO(num_particles=0)


@pytest.mark.real_data
def test_a_short_seeded_run_learns_omniglot(cache):
    """600 steps of 20 drawings (half an epoch) lift the test bound far above the untrained model's: the
    untrained decoder with PyTorch's initialization (about -545 nats, every pixel near 1/2) and, by a margin
    of many standard errors, the untrained one whose output bias is the mean image's logits (the start
    of training). Measured here: -189.3 at the start, -169.5 after the 600 steps."""
    from pyro_meta.vi.vae import omniglot_images

    data = omniglot_images(DATA, progress=False)
    assert data.train.shape == (24_000, 784) and data.test.shape == (8_460, 784)
    test = binarize_once(data.test[::85], seed=0)  # 100 drawings across the test alphabets
    torch.manual_seed(0)
    plain = evaluate_bounds(VAE(objective="elbo", k=1), test, k=50, ks=(1, 50), seed=0)["bounds"][50]
    torch.manual_seed(0)
    vae = VAE(objective="elbo", k=1, output_bias=mean_image_logits(data.train))
    start = evaluate_bounds(vae, test, k=50, ks=(1, 50), seed=0)
    fit(vae, ImageStream(data.train, 20, seed=0), 600, meta_lr=1e-3, progress=False)
    after = evaluate_bounds(vae, test, k=50, ks=(1, 50), seed=0)
    gain = after["per_image"][50] - start["per_image"][50]
    se = gain.std() / len(gain) ** 0.5
    assert after["bounds"][50] > plain + 300, (plain, after["bounds"][50])
    assert gain.mean() > 12 and gain.mean() > 10 * se, (start["bounds"][50], after["bounds"][50], float(se))


def test_cli_vi_vae_quick_run_resume_and_errors(tmp_path, cache, omniglot_root):
    """``pyro-meta vi vae --quick`` writes the run directory; ``--resume`` of the finished run re-evaluates
    with a new evaluation setting; a changed training setting on resume is refused (on the generated
    Omniglot)."""
    from pyro_meta.cli import main as cli

    out = tmp_path / "vae"
    args = ["vi", "vae", "--quick", "--objective", "iwae", "--k", "5", "--out", str(out), "--data-root", str(omniglot_root),
            "--no-progress"]
    assert cli(args) == 0
    for name in ("config.json", "checkpoint.pt", "metrics.jsonl", "eval.json", "results.md", "vae.png"):
        assert (out / name).is_file(), name
    ev = json.loads((out / "eval.json").read_text())
    assert ev["steps"] == 30 and ev["k"] == 5 and ev["eval_k"] == 50 and ev["num_test_images"] == 40
    assert ev["test_bounds"]["1"] <= ev["test_bounds"]["50"]
    assert "Command: `pyro-meta vi vae --out" in (out / "results.md").read_text()
    assert (out / "vae.png").stat().st_size > 20_000
    assert cli(["vi", "vae", "--out", str(out), "--resume", "--eval-k", "100", "--no-progress"]) == 0
    assert json.loads((out / "eval.json").read_text())["eval_k"] == 100
    assert cli(["vi", "vae", "--out", str(out), "--resume", "--k", "50", "--no-progress"]) == 2
    assert cli(["vi", "vae", "--out", str(out), "--quick", "--no-progress"]) == 2  # a run is there already
    with pytest.raises(ConfigError, match="k must be a positive integer"):
        from pyro_meta.vi.vae_experiment import DEFAULTS, check_config
        check_config({**DEFAULTS, "k": 0})


def test_bounds_approach_the_exact_log_likelihood_of_a_one_dimensional_latent():
    """A known answer: with one latent dimension, log p(x) = log ∫ N(z; 0, 1) p(x | z) dz by quadrature.
    Every bound lies below it (within Monte Carlo error) and L_5000 is within 0.02 nats of it; the ELBO
    is further below (the guide is an untrained Gaussian)."""
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(1)
    vae = VAE(pixels=6, latent=1, hidden=[4])
    x = binarize_once(_images(8, d=6, seed=2), seed=0).double()
    z = torch.linspace(-12, 12, 24_001).unsqueeze(-1)  # [G, 1]
    with torch.no_grad():
        logits = vae.model.decoder(z)  # [G, 6]
        log_lik = -torch.nn.functional.binary_cross_entropy_with_logits(
            logits[:, None, :].expand(-1, len(x), -1), x.expand(len(z), -1, -1), reduction="none").sum(-1)
        log_joint = log_lik + torch.distributions.Normal(0.0, 1.0).log_prob(z)  # [G, N]
        exact = torch.logsumexp(log_joint, 0) + torch.log(z[1, 0] - z[0, 0])
    ev = evaluate_bounds(vae, x, k=5000, ks=(1, 50, 5000), batch_size=8, seed=0)
    assert_close(ev["per_image"][5000], exact, atol=0.02)
    for j in (1, 50):
        assert (ev["per_image"][j] <= exact + 0.02).all()
    assert (exact - ev["per_image"][1]).mean() > (exact - ev["per_image"][50]).mean() > 0
