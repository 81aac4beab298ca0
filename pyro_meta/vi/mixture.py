"""The Bayesian mixture of unit-variance Gaussians [1], fitted three ways: CAVI, SVI, NUTS.

Model (1-D data, ``K`` components, prior scale ``sigma``)::

    mu_k ~ N(0, sigma^2)          k = 1..K
    c_i  ~ Categorical(1/K)       i = 1..n
    x_i  ~ N(mu_{c_i}, 1)

Mean-field family: ``q(mu_k) = N(m_k, s2_k)``, ``q(c_i) = Cat(phi_i)``. Its ELBO in closed form
(:func:`closed_form_elbo`; every expectation is under ``q``)::

    E[log p(mu_k)]     = -log(2 pi sigma^2) / 2 - (m_k^2 + s2_k) / (2 sigma^2)
    E[log p(c_i)]      = -log K
    E[log p(x_i|c,mu)] = sum_k phi_ik (-log(2 pi) / 2 - (x_i^2 - 2 x_i m_k + m_k^2 + s2_k) / 2)
    -E[log q(mu_k)]    = log(2 pi e s2_k) / 2
    -E[log q(c_i)]     = -sum_k phi_ik log phi_ik

CAVI ([1], section 3) maximizes it block by block:
``phi_ik ∝ exp(m_k x_i - (m_k^2 + s2_k) / 2)``, ``m_k = sum_i phi_ik x_i / (1/sigma^2 + sum_i phi_ik)``,
``s2_k = 1 / (1/sigma^2 + sum_i phi_ik)``; each update is that block's exact maximizer, so the ELBO never
decreases.

Label switching. The prior is exchangeable in the components, so the posterior is symmetric under their
K! permutations. Every method here starts from the same **quantile initialization**
(:func:`initial_q`: ``m_k`` = the ``(k + 1/2)/K`` quantile of ``x``, sorted), and every result is
reported with its components **sorted by their mean** (:func:`sort_components`; per draw for NUTS).
Sorting is a valid relabelling because sorting each draw maps the symmetric posterior onto the
region ``mu_1 < ... < mu_K``, which holds exactly one of the K! copies; when the components are
well separated (gaps of many posterior standard deviations, as :func:`simulate_mixture` makes them)
the copies do not overlap, so the sorted marginals equal those of one mode, which is what the
unimodal ``q(mu)`` approximates.

References:
    [1] D. M. Blei, A. Kucukelbir, J. D. McAuliffe, "Variational inference: a review for
        statisticians", JASA 2017 (section 3: the Bayesian mixture of Gaussians and its CAVI).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import MCMC, NUTS, TraceEnum_ELBO
from pyro.infer.autoguide.initialization import init_to_value
from pyro.ops.indexing import Vindex
from torch import nn

from .._arviz import az

DTYPE = torch.float64


@dataclass
class MixtureFit:
    """One method's answer, components sorted by mean.

    ``m``, ``s``: [K] posterior means and standard deviations of ``mu`` (q's for CAVI/SVI, the draws'
    for NUTS); ``phi``: [n, K] assignment probabilities (q(c) or, for NUTS, the posterior mean of
    p(c_i | mu, x_i)); ``elbo_trace``: the ELBO after each CAVI iteration (index 0: at the
    initialization) or ``-loss`` at each SVI step (empty for NUTS); ``elbo``: the mean-field ELBO
    (:func:`closed_form_elbo`) at the final q (NaN for NUTS and for the collapsed SVI, see
    :func:`run_svi`); ``mu_draws``: [S, K] NUTS draws (``None`` otherwise); ``info``: extras.
    """

    method: str
    m: torch.Tensor
    s: torch.Tensor
    phi: torch.Tensor
    elbo_trace: torch.Tensor
    elbo: float
    seconds: float
    mu_draws: torch.Tensor | None = None
    info: dict = field(default_factory=dict)


def _check_data(x: torch.Tensor, K: int, sigma: float) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.dim() != 1 or x.numel() < 2:
        raise ValueError(f"x must be a 1-D tensor of at least 2 points, got shape {tuple(x.shape)}")
    if not (isinstance(K, int) and K >= 1):
        raise ValueError(f"K must be a positive int, got {K!r}")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma!r}")
    return x.to(DTYPE)


def simulate_mixture(n: int = 500, K: int = 3, sigma: float = 5.0, seed: int = 0,
                     gap: float | None = 6.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw ``n`` points from the model, seeded.

    Well separated by default: with ``gap`` set, the true means are evenly spaced ``gap`` apart
    (``gap`` unit noise standard deviations; 6 makes a point nearer another mean than its own one
    in 0.13% of cases) and centred on 0 (for K=3: -6, 0, 6); with ``gap=None`` they are drawn from the
    prior N(0, sigma^2), as in the model. Assignments are uniform.

    :return: ``x`` [n] (float64), ``mu`` [K] true means (sorted), ``c`` [n] true assignments.
    """
    if n < 2 or K < 1:
        raise ValueError(f"need n >= 2 and K >= 1, got n={n}, K={K}")
    g = torch.Generator().manual_seed(seed)
    if gap is None:
        mu = (sigma * torch.randn(K, generator=g, dtype=DTYPE)).sort().values
    else:
        mu = gap * (torch.arange(K, dtype=DTYPE) - (K - 1) / 2)
    c = torch.randint(K, (n,), generator=g)
    x = mu[c] + torch.randn(n, generator=g, dtype=DTYPE)
    return x, mu, c


def mixture_model(x: torch.Tensor, K: int, sigma: float) -> None:
    """The Pyro model; ``c`` is marked for parallel enumeration (``max_plate_nesting=1``).

    Sites: ``mu`` [K] in plate ``components``, ``c`` [n] and observed ``x`` [n] in plate ``data``
    (both plates at dim -1, side by side). Under enumeration ``c`` is [K, 1] and ``x``'s log
    density [K, n]; without it (a plain trace, or ``c`` replayed from a guide) ``c`` is [n].
    """
    x = torch.as_tensor(x)
    zero = x.new_zeros(())
    with pyro.plate("components", K):
        mu = pyro.sample("mu", dist.Normal(zero, zero + sigma))  # K
    with pyro.plate("data", x.shape[-1]):
        c = pyro.sample("c", dist.Categorical(logits=x.new_zeros(K)), infer={"enumerate": "parallel"})
        # mu: ... K -> ... 1 K so that particle dims stay left of the data dim; loc: n, or K 1 (NUTS,
        # c enumerated), or K P 1 (P vectorized particles)
        loc = Vindex(mu.unsqueeze(-2))[..., c]
        pyro.sample("x", dist.Normal(loc, 1.0), obs=x)


def closed_form_elbo(x: torch.Tensor, K: int, sigma: float, m: torch.Tensor, s2: torch.Tensor,
                     phi: torch.Tensor) -> torch.Tensor:
    """The mean-field ELBO ``E_q[log p(x, c, mu) - log q(c, mu)]`` exactly (module docstring).

    :param x: [n] data; :param m: [K] and :param s2: [K] q(mu)'s means and variances;
    :param phi: [n, K] q(c)'s probabilities (rows sum to 1). Returns a float64 scalar.
    """
    x = _check_data(x, K, sigma)
    m, s2, phi = m.to(DTYPE), s2.to(DTYPE), phi.to(DTYPE)
    if m.shape != (K,) or s2.shape != (K,) or phi.shape != (x.numel(), K):
        raise ValueError(f"expected m, s2 [{K}] and phi [{x.numel()}, {K}], got {tuple(m.shape)}, "
                         f"{tuple(s2.shape)}, {tuple(phi.shape)}")
    log2pi = math.log(2 * math.pi)
    prior_mu = (-0.5 * (log2pi + 2 * math.log(sigma)) - (m**2 + s2) / (2 * sigma**2)).sum()
    prior_c = -x.numel() * math.log(K)
    sq = x[:, None] ** 2 - 2 * x[:, None] * m + m**2 + s2  # n K: E[(x_i - mu_k)^2]
    lik = (phi * (-0.5 * log2pi - 0.5 * sq)).sum()
    ent_mu = (0.5 * (log2pi + 1 + s2.log())).sum()
    ent_c = -torch.xlogy(phi, phi).sum()
    return prior_mu + prior_c + lik + ent_mu + ent_c


def _phi_update(x: torch.Tensor, m: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x[:, None] * m - 0.5 * (m**2 + s2), dim=-1)  # n K


def _mu_update(x: torch.Tensor, sigma: float, phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    prec = 1 / sigma**2 + phi.sum(0)  # K
    return (phi * x[:, None]).sum(0) / prec, 1 / prec


def initial_q(x: torch.Tensor, K: int, sigma: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The shared initialization: ``m_k`` = the ``(k + 1/2)/K`` quantile of ``x`` (sorted),
    ``s2_k = 1/(1/sigma^2 + n/K)`` (a component's variance with an equal share of the points),
    ``phi`` = CAVI's update given those. Returns ``m`` [K], ``s2`` [K], ``phi`` [n, K]."""
    x = _check_data(x, K, sigma)
    q = (torch.arange(K, dtype=DTYPE) + 0.5) / K
    m = torch.quantile(x, q)
    s2 = torch.full((K,), 1 / (1 / sigma**2 + x.numel() / K), dtype=DTYPE)
    return m, s2, _phi_update(x, m, s2)


def sort_components(m: torch.Tensor, s: torch.Tensor, phi: torch.Tensor):
    """Relabel so that ``m`` increases; ``phi``'s columns follow (module docstring)."""
    order = m.argsort()
    return m[order], s[order], phi[:, order]


def cavi(x: torch.Tensor, K: int, sigma: float, iters: int = 100, init=None) -> MixtureFit:
    """Coordinate-ascent VI [1] in float64: ``iters`` rounds of (phi update, then m/s2 update).

    :param init: ``(m, s2, phi)`` to start from (default :func:`initial_q`); the rounds begin with
        the phi update, so ``phi`` only enters the starting ELBO (``None``: CAVI's update from m, s2).
    :return: :class:`MixtureFit`; ``elbo_trace`` [iters + 1] holds the ELBO at the start and after
        every round.
    """
    x = _check_data(x, K, sigma)
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    t0 = time.perf_counter()
    if init is None:
        m, s2, phi = initial_q(x, K, sigma)
    else:
        m, s2 = init[0].to(DTYPE), init[1].to(DTYPE)
        phi = _phi_update(x, m, s2) if init[2] is None else init[2].to(DTYPE)
    trace = [closed_form_elbo(x, K, sigma, m, s2, phi)]
    for _ in range(iters):
        phi = _phi_update(x, m, s2)
        m, s2 = _mu_update(x, sigma, phi)
        trace.append(closed_form_elbo(x, K, sigma, m, s2, phi))
    m, s, phi = sort_components(m, s2.sqrt(), phi)
    return MixtureFit("CAVI", m, s, phi, torch.stack(trace), float(trace[-1]),
                      time.perf_counter() - t0)


class MixtureGuide(nn.Module):
    """Mean-field guide: ``q(mu_k) = N(loc_k, exp(log_scale_k)^2)`` and, with ``local=True``,
    ``q(c_i) = Cat(softmax(logits_i))`` marked for parallel enumeration in the guide.

    Its parameters are plain ``nn.Parameter``s, optimized with a torch optimizer (no param store).
    """

    def __init__(self, m0: torch.Tensor, s0: torch.Tensor, phi0: torch.Tensor | None = None):
        super().__init__()
        self.loc = nn.Parameter(m0.detach().to(DTYPE).clone())  # K
        self.log_scale = nn.Parameter(s0.detach().to(DTYPE).log())  # K
        self.logits = None if phi0 is None else nn.Parameter(phi0.detach().to(DTYPE).clamp_min(1e-12).log())

    def forward(self, x: torch.Tensor, K: int, sigma: float) -> None:
        with pyro.plate("components", K):
            pyro.sample("mu", dist.Normal(self.loc, self.log_scale.exp()))
        if self.logits is not None:
            with pyro.plate("data", x.shape[-1]):
                pyro.sample("c", dist.Categorical(logits=self.logits), infer={"enumerate": "parallel"})

    def phi(self) -> torch.Tensor:
        return torch.softmax(self.logits.detach(), -1)  # n K


def run_svi(x: torch.Tensor, K: int, sigma: float, variant: str = "local", steps: int = 2000,
            lr: float = 0.05, final_lr: float = 0.001, num_particles: int = 1, seed: int = 0,
            init=None) -> MixtureFit:
    """SVI with the mean-field guide :class:`MixtureGuide`, ``TraceEnum_ELBO(max_plate_nesting=1)``,
    Adam with the learning rate decayed geometrically from ``lr`` to ``final_lr``.

    ``variant="enum"`` (a): the guide covers ``mu`` only and the model's ``c`` is enumerated out,
    so the objective is ``E_q(mu)[log sum_c p(x, c, mu) - log q(mu)]``, the ELBO of the *collapsed*
    family; by Jensen it is >= the mean-field ELBO for the same q(mu), so its value is not comparable
    with CAVI's. What is comparable is q(mu): when the responsibilities are nearly 0/1 (well-separated
    components) the collapsed and mean-field optima of q(mu) nearly coincide.

    ``variant="local"`` (b): the guide also has ``q(c_i) = Cat(phi_i)`` with local logits; the
    objective is the mean-field ELBO itself, whose optimum CAVI finds. The guide's ``c`` is
    enumerated in parallel *in the guide*: ``TraceEnum_ELBO`` then takes the expectation over each
    ``q(c_i)`` exactly (a sum of K terms weighted by phi, differentiable in the logits), so only
    ``mu`` is sampled, by reparameterization. ``Trace_ELBO``/``TraceGraph_ELBO`` would instead
    sample ``c`` and need the score-function estimator for the logits' gradient, with far higher
    variance (``TraceGraph_ELBO``'s baselines reduce it but do not remove it).

    :return: :class:`MixtureFit`, ``elbo_trace`` [steps] = ``-loss`` per step (a one-draw estimate);
        ``elbo`` = :func:`closed_form_elbo` at the final q for (b), NaN for (a), whose ``info`` has
        ``"meanfield_elbo_phi_opt"``: the mean-field ELBO of its q(mu) with phi set by CAVI's update.
    """
    x = _check_data(x, K, sigma)
    if variant not in ("enum", "local"):
        raise ValueError(f"variant must be 'enum' or 'local', got {variant!r}")
    if steps < 1 or not 0 < final_lr <= lr:
        raise ValueError(f"need steps >= 1 and 0 < final_lr <= lr, got {steps}, {final_lr}, {lr}")
    t0 = time.perf_counter()
    m0, s20, phi0 = initial_q(x, K, sigma) if init is None else init
    guide = MixtureGuide(m0, s20.sqrt(), phi0 if variant == "local" else None)
    elbo = TraceEnum_ELBO(max_plate_nesting=1, num_particles=num_particles,
                          vectorize_particles=num_particles > 1)
    opt = torch.optim.Adam(guide.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=(final_lr / lr) ** (1 / steps))
    trace = torch.empty(steps, dtype=DTYPE)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for t in range(steps):
            opt.zero_grad()
            loss = elbo.differentiable_loss(mixture_model, guide, x, K, sigma)
            loss.backward()
            opt.step()
            sched.step()
            trace[t] = -loss.detach()
    m, s2 = guide.loc.detach(), guide.log_scale.detach().exp() ** 2
    info = {"variant": variant, "steps": steps, "lr": lr, "final_lr": final_lr}
    if variant == "local":
        phi = guide.phi()
        value = float(closed_form_elbo(x, K, sigma, m, s2, phi))
    else:
        phi = _phi_update(x, m, s2)
        value = float("nan")
        info["meanfield_elbo_phi_opt"] = float(closed_form_elbo(x, K, sigma, m, s2, phi))
    m, s, phi = sort_components(m, s2.sqrt(), phi)
    name = "SVI-local" if variant == "local" else "SVI-enum"
    return MixtureFit(name, m, s, phi, trace, value, time.perf_counter() - t0, info=info)


def assignment_probs(x: torch.Tensor, mu_draws: torch.Tensor) -> torch.Tensor:
    """``E[p(c_i = k | mu, x_i)]`` over draws ``mu_draws`` [S, K] (the closed-form conditional
    ``∝ exp(-(x_i - mu_k)^2 / 2)`` under the uniform prior on c). Returns [n, K]."""
    logits = -0.5 * (x[None, :, None] - mu_draws[:, None, :]) ** 2  # S n K
    return torch.softmax(logits, -1).mean(0)


def run_nuts(x: torch.Tensor, K: int, sigma: float, num_samples: int = 500, warmup_steps: int = 500,
             seed: int = 0, init=None) -> MixtureFit:
    """NUTS over ``mu`` with ``c`` enumerated out (``max_plate_nesting=1``): the gold standard.

    Starts at the shared initialization's ``m`` (:func:`initial_q`); every draw is sorted
    (module docstring). ``info["relabelled"]`` is the fraction of draws that sorting reordered
    (0 when the chain never switched labels).

    :return: :class:`MixtureFit` with ``mu_draws`` [num_samples, K] sorted.
    """
    x = _check_data(x, K, sigma)
    t0 = time.perf_counter()
    m0 = (initial_q(x, K, sigma) if init is None else init)[0]
    kernel = NUTS(mixture_model, max_plate_nesting=1, init_strategy=init_to_value(values={"mu": m0}))
    mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=warmup_steps, disable_progbar=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        mcmc.run(x, K, sigma)
    raw = mcmc.get_samples()["mu"].to(DTYPE)  # S K
    draws = raw.sort(-1).values
    relabelled = float((draws != raw).any(-1).to(DTYPE).mean())
    phi = assignment_probs(x, draws)
    return MixtureFit("NUTS", draws.mean(0), draws.std(0), phi, torch.empty(0, dtype=DTYPE),
                      float("nan"), time.perf_counter() - t0, mu_draws=draws,
                      info={"relabelled": relabelled, "num_samples": num_samples,
                            "warmup_steps": warmup_steps})


def to_inference_data(fit: MixtureFit, num_draws: int = 1000, seed: int = 0) -> az.InferenceData:
    """ArviZ posterior over ``mu`` (dims ``component``): NUTS's sorted draws, or ``num_draws``
    independent draws from q(mu) for CAVI/SVI; one chain either way (use ``az.summary(...,
    kind="stats")`` for q's draws: R-hat and ESS mean nothing there)."""
    if fit.mu_draws is not None:
        draws = fit.mu_draws
    else:
        g = torch.Generator().manual_seed(seed)
        draws = fit.m + fit.s * torch.randn(num_draws, fit.m.numel(), generator=g, dtype=DTYPE)
    K = draws.shape[-1]
    return az.from_dict(posterior={"mu": draws[None].numpy()},
                        coords={"component": np.arange(K)}, dims={"mu": ["component"]})


def _smooth(v: np.ndarray, w: int) -> np.ndarray:
    if v.size < 2 * w:
        return v
    c = np.cumsum(np.insert(v, 0, 0.0))
    return (c[w:] - c[:-w]) / w


def plot_comparison(x: torch.Tensor, fits: list[MixtureFit], path: str | Path, title: str = ""):
    """Three panels, saved as a PNG at ``path``: (1) ELBO traces minus CAVI's optimum (the dashed
    line at 0), CAVI rounds and SVI steps on one log-scaled x axis, a symlog y axis (linear within
    ±1 nat), SVI's noisy one-draw ``-loss`` faint with its running mean over it;
    (2) an ArviZ forest plot of ``mu_k - m_k(CAVI)`` for every method (the means sit
    several units apart and the intervals are ~0.1 wide, so centring is what makes them readable);
    (3) the posterior probability of each component against ``x`` for every point. Returns the
    figure."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    ref = next(f for f in fits if f.method == "CAVI")
    fig = plt.figure(figsize=(13, 9), constrained_layout=True)
    gs = fig.add_gridspec(2, 2)
    ax = fig.add_subplot(gs[0, 0])
    opt = ref.elbo
    low, high = -2.0, 0.5
    for f in fits:
        tr = f.elbo_trace.numpy() - opt
        if tr.size == 0:
            continue
        if f.method == "CAVI":
            ax.plot(np.arange(1, tr.size + 1), tr, "o-", ms=3, label="CAVI (round 0 = init)", zorder=3)
            low = min(low, tr.min())
        else:
            w = max(1, tr.size // 20)
            line, = ax.plot(np.arange(1, tr.size + 1), tr, alpha=0.15, lw=0.5)
            sm = _smooth(tr, w)
            lab = f"{f.method} -loss (running mean of {w})"
            if f.method == "SVI-enum":
                lab += ", collapsed bound"
            ax.plot(np.arange(w, w + sm.size), sm, color=line.get_color(), lw=1.5, label=lab)
            low, high = min(low, sm.min()), max(high, sm.max())
    ax.axhline(0.0, color="k", ls="--", lw=1, label=f"CAVI optimum ({opt:.3f})")
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_ylim(max(1.5 * low, -1e5), 2 * high)
    ax.set_xlabel("CAVI round / SVI step (+1)")
    ax.set_ylabel("ELBO - CAVI optimum (symlog: linear within ±1)")
    ax.set_title("ELBO traces")
    ax.legend(fontsize=8, loc="lower right")

    ax = fig.add_subplot(gs[0, 1])
    centred = []
    for f in fits:
        idata = to_inference_data(f)
        idata.posterior["mu"] = idata.posterior["mu"] - ref.m.numpy()
        centred.append(idata)
    az.plot_forest(centred, model_names=[f.method for f in fits], var_names=["mu"], combined=True,
                   hdi_prob=0.95, ax=ax)
    ax.axvline(0.0, color="k", lw=0.8)
    legend = ax.get_legend()
    if legend is not None:
        legend.set_bbox_to_anchor((1.0, 0.5))
        legend.set_loc("center left")
    ax.set_title("mu_k - m_k(CAVI): 95% HDI; CAVI m = " + ", ".join(f"{v:.2f}" for v in ref.m.tolist()))

    ax = fig.add_subplot(gs[1, :])
    xs = x.numpy()
    grid = torch.linspace(float(x.min()) - 0.5, float(x.max()) + 0.5, 600, dtype=DTYPE)
    K = ref.m.numel()
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for f in fits:
        if f.method == "SVI-local":  # local q(c_i): only defined at the data points
            xv, pv, style = xs, f.phi.numpy(), {"ls": "", "marker": "o", "ms": 3, "mfc": "none"}
        else:  # a function of x: CAVI's / SVI-enum's phi update, NUTS's conditional averaged
            pv = (assignment_probs(grid, f.mu_draws) if f.mu_draws is not None
                  else _phi_update(grid, f.m, f.s**2)).numpy()
            ls = {"CAVI": "-", "SVI-enum": ":", "NUTS": "--"}.get(f.method, "-.")
            xv, style = grid.numpy(), {"ls": ls, "lw": 2.5 if f.method == "CAVI" else 1.5}
        for k in range(K):
            ax.plot(xv, pv[:, k], color=colors[k % 10], alpha=0.8, label=f.method if k == 0 else None,
                    **style)
    ax.plot(xs, np.full_like(xs, -0.04), "|", color="0.4", ms=8)
    ax.set_xlabel("x (ticks: data)")
    ax.set_ylabel("P(c = k | x)")
    ax.set_title("posterior over assignments (colour = component): CAVI / SVI-enum: phi update at x; "
                 "SVI-local: its q(c_i) at the data; NUTS: E[p(c | mu, x)] over draws")
    ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig


def log_joint(x: torch.Tensor, K: int, sigma: float, mu: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``log p(x, c, mu)`` read from a trace of :func:`mixture_model` (no enumeration), for checks."""
    conditioned = poutine.condition(mixture_model, data={"mu": mu, "c": c})
    return poutine.trace(conditioned).get_trace(x, K, sigma).log_prob_sum()
