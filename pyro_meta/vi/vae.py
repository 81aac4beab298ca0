"""A variational autoencoder on dynamically binarized 28x28 Omniglot, as a Pyro model and guide.

The model (Kingma & Welling 2014; the architecture of Burda, Grosse & Salakhutdinov's one-stochastic-layer
VAE/IWAE): for each image n,

    z_n ~ N(0, I_50),    x_n | z_n ~ prod_pixels Bernoulli(sigmoid(decoder(z_n))),

decoder 50 -> 200 -> 200 -> 784 with tanh. The guide amortizes q(z_n | x_n) = N(mu(x_n), diag sigma(x_n)^2)
with an encoder 784 -> 200 -> 200 -> (mu, log sigma), tanh. One network maps any image to its posterior
approximation: the same idea that maps a support set to q(task weights) in VERSA and the amortized
method (see the README).

Training is :func:`pyro_meta.train.fit`, the trainer every meta-learner uses (progress, checkpoints,
exact resume, non-finite guard): :class:`VAE` has the ``loss(batch)`` it calls and :class:`ImageStream`
is a resumable source of binarized minibatches. Objectives: the ELBO (``Trace_ELBO``, k samples
averaged: Burda et al.'s "VAE, k") or the importance-weighted bound (``iwae``,
:class:`~pyro_meta.infer.iwae.ImportanceWeightedELBO`, Pyro's RenyiELBO at alpha = 0 made differentiable).
The test log-likelihood is the importance-weighted bound with k = 5000 (:func:`evaluate_bounds`).

Data (a documented deviation from Burda et al., whose 24,345 / 8,070 images come from a separate 28x28
release of Omniglot): the Vinyals split's 1,200 train+validation characters (24,000 drawings) train and
its 423 test characters (8,460 drawings, all but 4 characters from 12 alphabets never seen in training) test; each 105x105 drawing is
LANCZOS-resized to 28x28 grey levels p in [0, 1] (:func:`pyro_meta.tasks.omniglot.load_omniglot`).
Dynamic binarization: every training minibatch draws x ~ Bernoulli(p) afresh; the test set is binarized
once with a fixed seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import Tensor, nn

from ..checks import ModelCheckError
from ..infer.elbo import LeanTrace_ELBO
from ..infer.iwae import ImportanceWeightedELBO, bounds_from_log_weights
from ..tasks.stream import DeviceChunks, on_host

OBJECTIVES = ("elbo", "iwae")
PIXELS_SITE, LATENT_SITE = "x", "z"


# ----------------------------------------------------------------------------- data
@dataclass
class ImageBatch:
    """A minibatch of binary images, flattened: ``x`` float ``[B, D]`` of 0/1."""

    x: Tensor

    def __post_init__(self) -> None:
        if self.x.dim() != 2 or not self.x.is_floating_point():
            raise ValueError(f"ImageBatch.x must be a float [batch, pixels] tensor, got {self.x.dtype} "
                             f"{tuple(self.x.shape)}")

    @property
    def size(self) -> int:
        return self.x.shape[0]

    def to(self, device: Any) -> ImageBatch:
        return ImageBatch(self.x.to(device))

    def select(self, index: slice | Tensor) -> ImageBatch:
        """The images at ``index`` (a distributed run's share of a minibatch)."""
        return ImageBatch(self.x[index])


def _seeded(*parts: int) -> torch.Generator:
    seed = 0
    for p in parts:
        seed = (seed * 1_000_003 + int(p)) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


class ImageStream:
    """Endless seeded minibatches of dynamically binarized images: epoch after epoch, each a fresh
    permutation; every batch draws its pixels x ~ Bernoulli(p). Batch ``i`` depends only on ``(seed, i)``,
    so the position alone is the state a checkpoint saves (exact resume).

    :param probs: ``[N, D]`` grey levels in [0, 1] (or uint8 ``[N, ...]``, divided by 255).
    :param batch_size: images per minibatch; an epoch is ``N // batch_size`` batches (the remainder of
        each permutation is dropped).
    """

    def __init__(self, probs: Tensor, batch_size: int, seed: int = 0):
        probs = as_probs(probs)
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or not 1 <= batch_size <= len(probs):
            raise ValueError(f"batch_size must be an integer in 1..{len(probs)} (the images), got {batch_size!r}")
        self.probs, self.batch_size, self.seed = probs, batch_size, int(seed)
        self.batches_per_epoch = len(probs) // batch_size
        self.position = 0
        self._perm: tuple[int, Tensor] | None = None

    def __iter__(self) -> ImageStream:
        return self

    def _permutation(self, epoch: int) -> Tensor:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, torch.randperm(len(self.probs), generator=_seeded(self.seed, 1, epoch)))
        return self._perm[1]

    def to(self, device: Any) -> ImageStream | DeviceChunks:
        """Serve the minibatches on ``device``: still binarized on the host with the seeded CPU generators
        (the same batches on every device), copied many minibatches at a time
        (:class:`~pyro_meta.tasks.stream.DeviceChunks`, at most 16 MB per copy), not every step."""
        return self if on_host(device) else DeviceChunks(self, device)

    def _draw_host(self) -> tuple[Tensor]:
        epoch, j = divmod(self.position, self.batches_per_epoch)
        idx = self._permutation(epoch)[j * self.batch_size:(j + 1) * self.batch_size]
        x = torch.bernoulli(self.probs[idx], generator=_seeded(self.seed, 2, self.position))
        self.position += 1
        return (x,)

    @staticmethod
    def _build(draws: tuple[Tensor, ...]) -> ImageBatch:
        return ImageBatch(draws[0])

    def __next__(self) -> ImageBatch:
        return self._build(self._draw_host())

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "num_images": len(self.probs), "batch_size": self.batch_size,
                "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        for key in ("num_images", "batch_size", "seed"):
            if state.get(key) != mine[key]:
                raise ValueError(f"the checkpoint's image stream has {key}={state.get(key)!r}, this one "
                                 f"{mine[key]!r}")
        self.position = int(state["position"])


def as_probs(images: Tensor) -> Tensor:
    """uint8 images (ink 255; -> torch's default dtype) or floats in [0, 1] (dtype kept), any trailing shape
    -> ``[N, D]`` in [0, 1]."""
    if images.dtype == torch.uint8:
        images = images.to(torch.get_default_dtype()) / 255.0
    if not images.is_floating_point() or images.dim() < 2:
        raise ValueError(f"expected images [N, ...] as uint8 or floats in [0, 1], got {images.dtype} "
                         f"{tuple(images.shape)}")
    probs = images.reshape(len(images), -1)
    if probs.numel() and (probs.min() < 0 or probs.max() > 1):
        raise ValueError("image grey levels must lie in [0, 1]")
    return probs


def binarize_once(probs: Tensor, seed: int) -> Tensor:
    """The fixed stochastic binarization of an evaluation set."""
    return torch.bernoulli(as_probs(probs), generator=_seeded(seed, 3))


@dataclass
class OmniglotImages:
    """Omniglot drawings for density estimation: grey levels ``[N, S*S]`` and each image's alphabet."""

    train: Tensor
    test: Tensor
    test_alphabets: list[str]
    image_size: int


def omniglot_images(data_root: str | None = None, image_size: int = 28, progress: bool = True) -> OmniglotImages:
    """The Vinyals split's train+validation characters (train) and test characters (test), every drawing,
    no rotations; see the module docstring for how this differs from Burda et al.'s release."""
    from ..tasks.omniglot import load_omniglot, vinyals_split

    data = load_omniglot(data_root, image_size=image_size, progress=progress)
    parts = vinyals_split(data)
    train = data.images[torch.as_tensor(parts["trainval"])].flatten(0, 1)  # chars x 20 drawings
    test = data.images[torch.as_tensor(parts["test"])].flatten(0, 1)
    alphabets = [data.names[i].split("/")[0] for i in parts["test"] for _ in range(data.images.shape[1])]
    return OmniglotImages(as_probs(train), as_probs(test), alphabets, image_size)


# ----------------------------------------------------------------------------- model and guide
def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


class VAEModel(nn.Module):
    """p(z) p(x | z): ``z ~ N(0, I)``, pixels Bernoulli with logits ``decoder(z)``, in a plate over images."""

    def __init__(self, pixels: int, latent: int, hidden: list[int]):
        super().__init__()
        self.pixels, self.latent = pixels, latent
        self.decoder = _mlp([latent, *hidden, pixels])

    def forward(self, batch: ImageBatch) -> None:
        x = batch.x
        with pyro.plate("images", x.shape[0], dim=-1):
            prior = dist.Normal(x.new_zeros(self.latent), x.new_ones(self.latent)).to_event(1)
            z = pyro.sample(LATENT_SITE, prior)
            pyro.sample(PIXELS_SITE, dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)


class VAEGuide(nn.Module):
    """q(z | x) = N(mu(x), diag sigma(x)^2), one encoder for every image (amortized)."""

    def __init__(self, pixels: int, latent: int, hidden: list[int]):
        super().__init__()
        self.latent = latent
        self.encoder = _mlp([pixels, *hidden, 2 * latent])

    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(mu, sigma)`` of q(z | x), each ``[B, latent]``."""
        loc, log_scale = self.encoder(x).split(self.latent, dim=-1)
        return loc, log_scale.exp()

    def forward(self, batch: ImageBatch) -> None:
        loc, scale = self.posterior(batch.x)
        with pyro.plate("images", batch.x.shape[0], dim=-1):
            pyro.sample(LATENT_SITE, dist.Normal(loc, scale).to_event(1))


def make_objective(objective: str, k: int) -> Any:
    """``elbo``: Trace_ELBO (on its lean path, ``LeanTrace_ELBO``) averaged over k vectorized samples;
    ``iwae``: the k-sample importance-weighted bound."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k (samples per image) must be a positive integer, got {k!r}")
    if objective == "iwae":
        return ImportanceWeightedELBO(num_particles=k, max_plate_nesting=1)
    return LeanTrace_ELBO(num_particles=k, vectorize_particles=k > 1, max_plate_nesting=1)


class VAE(nn.Module):
    """A model, a guide and the objective that trains them, in the shape :func:`pyro_meta.train.fit` takes:
    ``loss(batch)`` is the negative bound per image (nats), averaged over the minibatch.

    :param pixels: image size, flattened (784).
    :param latent: latent dimensions (Burda et al.: 50).
    :param hidden: hidden widths of the encoder and (mirrored) decoder (Burda et al.: 200, 200).
    :param objective: ``"elbo"`` or ``"iwae"``; :param k: samples per image in training.
    :param output_bias: initial decoder output biases, e.g. the logits of the mean training image
        (:func:`mean_image_logits`; an option this library adds, so early steps do not spend themselves
        learning the average); ``None``: PyTorch's default initialization.
    """

    batch_type = ImageBatch

    def __init__(self, pixels: int = 784, latent: int = 50, hidden: list[int] | tuple[int, ...] = (200, 200),
                 objective: str = "elbo", k: int = 1, output_bias: Tensor | None = None):
        super().__init__()
        hidden = list(hidden)
        if not all(isinstance(v, int) and v > 0 for v in [pixels, latent, *hidden]):
            raise ValueError(f"pixels, latent and hidden widths must be positive integers, got {pixels}, {latent}, "
                             f"{hidden}")
        self.model = VAEModel(pixels, latent, hidden)
        self.guide = VAEGuide(pixels, latent, hidden)
        self.objective_name, self.k = objective, k
        self.objective = make_objective(objective, k)
        self.name = f"vae-{objective}-k{k}"
        self.progress_label = f"train {self.name}"
        if output_bias is not None:
            with torch.no_grad():
                self.model.decoder[-1].bias.copy_(output_bias)

    def loss(self, batch: ImageBatch) -> Tensor:
        """Mean over the minibatch of ``-ELBO`` or ``-L_k`` per image."""
        if not isinstance(batch, ImageBatch):
            raise TypeError(f"expected an ImageBatch, got {type(batch).__name__}")
        return self.objective.differentiable_loss(self.model, self.guide, batch) / batch.size

    forward = loss

    def check_batch(self, batch: ImageBatch) -> None:
        """The trainer's first-step check: the pixels are observed at ``"x"`` with the batch's shape, the
        guide's latent sites are the model's, and both run under Pyro's validation."""
        with pyro.validation_enabled(True):
            guide_tr = poutine.trace(self.guide).get_trace(batch)
            model_tr = poutine.trace(poutine.replay(self.model, trace=guide_tr)).get_trace(batch)
        obs = [n for n, s in model_tr.nodes.items() if s["type"] == "sample" and s["is_observed"]]
        if obs != [PIXELS_SITE]:
            raise ModelCheckError(f"the VAE model must observe the pixels at one site {PIXELS_SITE!r}, found {obs}")
        site = model_tr.nodes[PIXELS_SITE]
        if tuple(site["value"].shape) != tuple(batch.x.shape):
            raise ModelCheckError(f"site {PIXELS_SITE!r} holds {tuple(site['value'].shape)}, the batch "
                                  f"{tuple(batch.x.shape)}")
        latent_g = {n for n, s in guide_tr.nodes.items() if s["type"] == "sample"}
        latent_m = {n for n, s in model_tr.nodes.items() if s["type"] == "sample" and not s["is_observed"]}
        if latent_g != latent_m:
            raise ModelCheckError(f"guide sites {sorted(latent_g)} differ from the model's latent sites "
                                  f"{sorted(latent_m)}")

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """Pixel probabilities ``[..., pixels]`` for latent codes ``[..., latent]``."""
        return torch.sigmoid(self.model.decoder(z))

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Pixel probabilities decoded at the posterior mean of each image."""
        return self.decode(self.guide.posterior(x)[0])

    @torch.no_grad()
    def sample_prior(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        z = torch.randn(n, self.model.latent, generator=generator)
        return self.decode(z.to(next(self.parameters()).device))


def mean_image_logits(probs: Tensor, eps: float = 1e-3) -> Tensor:
    """``logit`` of the mean grey level of each pixel, clamped to [eps, 1 - eps]."""
    p = as_probs(probs).mean(0).clamp(eps, 1 - eps)
    return torch.log(p) - torch.log1p(-p)


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def log_weights(vae: VAE, x: Tensor, k: int, chunk: int = 500) -> Tensor:
    """``[k, N]`` log importance weights ``log p(x_n, z) - log q(z | x_n)``, z ~ q, drawn ``chunk`` at a time."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    out, left = [], k
    while left:
        n = min(chunk, left)
        iw = ImportanceWeightedELBO(num_particles=n, max_plate_nesting=1)
        out.append(iw.log_weights(vae.model, vae.guide, ImageBatch(x)))
        left -= n
    return torch.cat(out, 0)


@torch.no_grad()
def evaluate_bounds(vae: VAE, images: Tensor, k: int = 5000, ks: tuple[int, ...] = (1, 50, 5000),
                    batch_size: int = 20, chunk: int = 500, seed: int = 0, progress: bool = False) -> dict[str, Any]:
    """The mean over ``images`` (binary, ``[N, D]``) of unbiased estimates of ``E[L_j]`` for each j in ``ks``
    (each must divide ``k``), all from one set of ``k`` importance samples per image: ``L_1`` is the ELBO,
    ``L_k`` the test log-likelihood bound of Burda et al. (k = 5000). Seeded; the RNG outside is left as
    it was.

    :returns: ``{"k": k, "num_images": N, "bounds": {j: mean}, "sem": {j: standard error over images},
        "per_image": {j: tensor [N]}}`` in nats.
    """
    from tqdm import tqdm

    ks = tuple(sorted(set(ks) | {k}))
    for j in ks:
        if k % j:
            raise ValueError(f"each of ks must divide k = {k}; {j} does not")
    was_training = vae.training
    vae.eval()
    dev = next(vae.parameters()).device
    per = {j: [] for j in ks}
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in tqdm(range(0, len(images), batch_size), desc=f"test bound, k={k}", disable=not progress,
                          unit="batch"):
            lw = log_weights(vae, images[start:start + batch_size].to(dev), k, chunk)
            for j, v in bounds_from_log_weights(lw, ks).items():
                per[j].append(v.cpu())
    vae.train(was_training)
    per_image = {j: torch.cat(v) for j, v in per.items()}
    n = len(images)
    return {"k": k, "num_images": n,
            "bounds": {j: float(v.double().mean()) for j, v in per_image.items()},
            "sem": {j: float(v.double().std() / math.sqrt(n)) if n > 1 else float("nan")
                    for j, v in per_image.items()},
            "per_image": per_image}


@torch.no_grad()
def posterior_means(vae: VAE, images: Tensor, chunk: int = 1000) -> Tensor:
    """``E_q[z | x]`` of every image, ``[N, latent]`` on the CPU."""
    dev = next(vae.parameters()).device
    return torch.cat([vae.guide.posterior(images[i:i + chunk].to(dev))[0].cpu() for i in range(0, len(images), chunk)])


@torch.no_grad()
def active_units(vae: VAE, images: Tensor, threshold: float = 1e-2, means: Tensor | None = None) -> tuple[int, Tensor]:
    """Burda et al.'s activity of each latent unit, ``Cov_x(E_q[z_u | x])``, over ``images`` (or their
    precomputed ``means``); a unit is active above ``threshold``. Returns ``(count, variances [latent])``."""
    mu = posterior_means(vae, images) if means is None else means
    var = mu.var(0)
    return int((var > threshold).sum()), var


# ----------------------------------------------------------------------------- plots
@torch.no_grad()
def plot_vae(vae: VAE, test: Tensor, alphabets: list[str], path: str | Path, image_size: int = 28,
             metrics: list[dict[str, Any]] | None = None, title: str = "", seed: int = 0) -> Path:
    """One figure: test characters over their reconstructions, samples from the prior, the test set's
    posterior means in their first two principal components (coloured by alphabet), each latent unit's
    activity, and (given ``metrics``) the training curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..plots import _running_mean, _save

    g = torch.Generator().manual_seed(seed)
    S = image_size
    pick = torch.randperm(len(test), generator=g)[:16]
    x = test[pick]
    rec = vae.reconstruct(x.to(next(vae.parameters()).device)).cpu()
    samples = vae.sample_prior(32, generator=g).cpu()

    def tile(imgs: Tensor, rows: int) -> np.ndarray:
        imgs = imgs.reshape(rows, -1, S, S)
        r, c = imgs.shape[:2]
        canvas = np.ones((r * (S + 2), c * (S + 2)))
        for i in range(r):
            for j in range(c):
                canvas[i * (S + 2) + 1:i * (S + 2) + 1 + S, j * (S + 2) + 1:j * (S + 2) + 1 + S] = 1 - imgs[i, j].numpy()
        return canvas

    fig = plt.figure(figsize=(16, 10), layout="constrained")
    grid = fig.add_gridspec(2, 3, height_ratios=[0.85, 1.1], width_ratios=[1.3, 1.3, 1])
    ax = fig.add_subplot(grid[0, 0])
    ax.imshow(tile(torch.stack([x, rec]).reshape(2, 2, 8, -1).permute(1, 0, 2, 3).reshape(4, 8, -1), 4),
              cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title("test characters (rows 1, 3: binarized input)\nand reconstructions (rows 2, 4: p(x | z = mean q))",
                 fontsize=10)
    ax.axis("off")
    ax = fig.add_subplot(grid[0, 1])
    ax.imshow(tile(samples, 4), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title("samples from the prior: p(x | z), z ~ N(0, I)\n(pixel probabilities)", fontsize=10)
    ax.axis("off")
    ax = fig.add_subplot(grid[0, 2])
    if metrics:
        steps = [m["step"] for m in metrics if m.get("loss") is not None]
        loss = [m["loss"] for m in metrics if m.get("loss") is not None]
        ax.plot(steps, loss, lw=0.6, color="C0", alpha=0.35, label="one minibatch (every 100th step)")
        window = max(1, len(loss) // 30)
        if window > 1:
            ax.plot(steps, _running_mean(np.asarray(loss), window), lw=1.6, color="C0",
                    label=f"running mean of {window} logged values")
        lo, hi = np.percentile(loss, [1, 99]) if len(loss) > 4 else (min(loss), max(loss))
        ax.set_ylim(lo - 0.05 * (hi - lo + 1), hi + 0.05 * (hi - lo + 1))
        ax.set_xlabel("training step")
        ax.set_ylabel("training loss: -bound, nats per image")
        ax.legend(fontsize=8)
        ax.set_title(f"training objective ({vae.objective_name}, k = {vae.k})", fontsize=10)
        ax.grid(alpha=0.3)
    else:
        ax.axis("off")
    mu = posterior_means(vae, test)
    centred = mu - mu.mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    pcs = (centred @ v[:2].T).numpy()
    ax = fig.add_subplot(grid[1, :2])
    names = sorted(set(alphabets))
    cmap = plt.get_cmap("tab20")
    for i, name in enumerate(names):
        sel = np.array([a == name for a in alphabets])
        ax.scatter(pcs[sel, 0], pcs[sel, 1], s=3, alpha=0.5, color=cmap(i % 20), label=name.replace("_", " "))
    ax.set_xlabel("principal component 1 of the posterior means")
    ax.set_ylabel("principal component 2")
    ax.set_title(f"latent space: E_q[z | x] of {len(test):,} test drawings, projected to 2 of {mu.shape[1]} "
                 "dimensions, coloured by alphabet", fontsize=10)
    ax.legend(fontsize=7, markerscale=4, ncol=2, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    ax = fig.add_subplot(grid[1, 2])
    count, var = active_units(vae, test, means=mu)
    order = torch.sort(var, descending=True).values.clamp_min(1e-8).numpy()
    ax.bar(np.arange(len(order)), order, color=["C0" if v > 1e-2 else "C7" for v in order])
    ax.axhline(1e-2, color="k", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_xlabel("latent unit (sorted)")
    ax.set_ylabel("Cov_x(E_q[z_u | x])")
    ax.set_title(f"active units: {count} of {len(order)} above 0.01 (dashed)", fontsize=10)
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)
