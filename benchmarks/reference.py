"""Plain-PyTorch references of the library's meta-training losses (no Pyro), for the benchmarks.

Each function computes the *same estimator* as ``MetaLearner.loss`` of the built-in method, written
directly with tensors, so that the benchmark can separate the cost of the estimator from the cost
of expressing it as a Pyro program (traces, messengers, ``log_prob`` bookkeeping):

- :func:`maml_loss`: second-order MAML. K SGD steps on each task's mean squared support error,
  started at ``theta``; the loss is the query mean squared error, mean over tasks. The library's
  MAML loss uses a Gaussian of std ``1/sqrt(2)``, so it equals this plus ``log(pi)/2``
  (:data:`MAML_CONSTANT`).
- :func:`abml_loss`: ABML (Ravi & Beatson, 2019). Per task, the inner loop of
  ``pyro_meta/guides/abml.py`` (K SGD steps on the support ELBO per support point, closed-form KL,
  started at the prior) gives ``q(phi) = N(mu, exp(s))``; then with one reparameterized draw
  ``phi ~ q``::

      loss_t = -log N(y_s, y_q | f(phi), sigma) + kl_weight * [log q(phi) - log p(phi | mu_theta, tau_theta)]

  and ``loss = (sum_t loss_t - log N(mu_theta; 0, 1) - log Gamma(tau_theta; 1, rate 0.01)) / T``,
  the single-sample Monte Carlo KL that Pyro's ``Trace_ELBO`` uses. The random draws are made in
  the library's order and shapes (K draws ``[M, T, 1, D]`` in the inner loop, then one ``[T, 1, D]``),
  so under the same ``torch.manual_seed`` both paths see the same noise.
- :func:`loop_loss`: the *library* loss computed one task at a time in a Python loop (what the
  vectorized tasks plate is compared against).

The network is this file's own functional MLP (:class:`RefMLP`), independent of ``pyro_meta.nn``;
it reads the same flat parameter layout (per layer: weight ``[out, in]`` row-major, then bias) so
that both paths can start from identical parameters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MAML_CONSTANT = 0.5 * math.log(math.pi)  # -log N(y | f, 1/sqrt(2)) - (y - f)^2
LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)

# ABML constants, written out again here (the values of pyro_meta/models/abml.py, guides/abml.py)
HYPER_LOC_STD = 1.0
GAMMA_CONCENTRATION, GAMMA_RATE = 1.0, 0.01
LOG_STD_MIN, LOG_STD_MAX = -15.0, 5.0
PRECISION_FLOOR = 1e-6
LOG_PRECISION_MAX = 40.0

_ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh, "elu": F.elu}


class RefMLP:
    """A functional MLP over one leading batch dim: ``net(flat [B, D], x [B, N, in]) -> [B, N, out]``.

    :param sizes: layer widths, input first, e.g. ``(1, 40, 40, 1)``.
    :param activation: ``"relu"``, ``"tanh"`` or ``"elu"``.
    """

    def __init__(self, sizes: Sequence[int], activation: str = "relu"):
        self.sizes = tuple(int(s) for s in sizes)
        self.act = _ACTIVATIONS[activation]
        self.layers = []  # (w_start, w_end, b_end, out, in)
        start = 0
        for fan_in, fan_out in zip(self.sizes[:-1], self.sizes[1:]):
            w_end = start + fan_out * fan_in
            self.layers.append((start, w_end, w_end + fan_out, fan_out, fan_in))
            start = w_end + fan_out
        self.num_params = start

    def __call__(self, flat: Tensor, x: Tensor) -> Tensor:
        b_dim = flat.shape[0]
        h = x
        last = len(self.layers) - 1
        for i, (a, w_end, b_end, fan_out, fan_in) in enumerate(self.layers):
            w = flat[:, a:w_end].view(b_dim, fan_out, fan_in)  # B out in
            b = flat[:, w_end:b_end].unsqueeze(1)  # B 1 out
            h = torch.baddbmm(b, h, w.transpose(1, 2))  # B N out
            if i < last:
                h = self.act(h)
        return h


# ----------------------------------------------------------------------------------------- MAML
def maml_inner(net: RefMLP, theta: Tensor, xs: Tensor, ys: Tensor, inner_steps: int,
               inner_lr: float, first_order: bool = False) -> Tensor:
    """The adapted weights ``[T, D]``: K SGD steps on each task's mean squared support error.

    :param theta: the initialization ``[D]``; :param xs, ys: ``[T, S, 1]``.
    """
    phi = theta.expand(xs.shape[0], -1)  # T D
    for _ in range(inner_steps):
        # sum over tasks of each task's mean squared error: one grad gives every task's own gradient
        inner = (net(phi, xs) - ys).pow(2).sum(-1).mean(-1).sum()
        (g,) = torch.autograd.grad(inner, phi, create_graph=not first_order)
        phi = phi - inner_lr * g
    return phi


def maml_outer(net: RefMLP, phi: Tensor, xq: Tensor, yq: Tensor) -> Tensor:
    """Mean over tasks of the query mean squared error; ``phi [T, D]``, ``xq, yq [T, Q, 1]``."""
    return (net(phi, xq) - yq).pow(2).sum(-1).mean(-1).mean()


def maml_loss(net: RefMLP, theta: Tensor, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor,
              inner_steps: int, inner_lr: float, first_order: bool = False) -> Tensor:
    """Second-order MAML loss: mean over tasks of the query MSE after ``inner_steps`` SGD steps."""
    return maml_outer(net, maml_inner(net, theta, xs, ys, inner_steps, inner_lr, first_order), xq, yq)


# ----------------------------------------------------------------------------------------- ABML
def _gauss_nll(f: Tensor, y: Tensor, sigma: Tensor) -> Tensor:
    """``-log N(y | f, sigma)`` per element."""
    return 0.5 * ((y - f) / sigma).pow(2) + torch.log(sigma) + LOG_SQRT_2PI


def abml_prior(log_precision: Tensor, raw_noise: Tensor, min_noise: float = 1e-3) -> tuple[Tensor, Tensor]:
    """``(tau_theta [D], sigma [])`` from their unconstrained parameters."""
    prec = torch.exp(log_precision.clamp(max=LOG_PRECISION_MAX)) + PRECISION_FLOOR
    return prec, F.softplus(raw_noise) + min_noise


def abml_inner(net: RefMLP, loc: Tensor, prec: Tensor, sigma: Tensor, xs: Tensor, ys: Tensor,
               inner_steps: int, inner_lr: float, inner_samples: int = 1,
               kl_weight_inner: float = 1.0, first_order: bool = False) -> tuple[Tensor, Tensor]:
    """``(mu, s)`` of each task's ``q = N(mu, exp(s))``, ``[T, D]`` each: K SGD steps on the support
    ELBO per support point (``inner_samples`` draws, closed-form KL), started at the prior."""
    num_tasks, shots = xs.shape[0], xs.shape[1]
    d, m = loc.shape[-1], inner_samples
    log_prec = torch.log(prec)
    xs_m = xs.expand(m, *xs.shape).reshape(m * num_tasks, *xs.shape[1:])  # (M T) S 1
    ys_m = ys.expand(m, *ys.shape)  # M T S 1
    mu = loc.expand(num_tasks, d)  # T D
    s = (-0.5 * log_prec).expand(num_tasks, d)  # T D
    for _ in range(inner_steps):
        # drawn as [M, T, 1, D], the library's shape, so that the same seed gives the same noise
        eps = torch.randn((m, num_tasks, 1, d), dtype=loc.dtype, device=loc.device).view(m, num_tasks, d)
        phi = mu + torch.exp(s.clamp(LOG_STD_MIN, LOG_STD_MAX)) * eps  # M T D
        f = net(phi.reshape(m * num_tasks, d), xs_m).view(m, num_tasks, shots, -1)  # M T S O
        nll = _gauss_nll(f, ys_m, sigma).sum((-1, -2)).mean(0)  # T
        var = torch.exp(2 * s.clamp(LOG_STD_MIN, LOG_STD_MAX))
        kl = 0.5 * (prec * (var + (mu - loc).pow(2)) - 1.0 - log_prec - 2 * s).sum(-1)  # T
        inner = ((nll + kl_weight_inner * kl) / shots).sum()
        g_mu, g_s = torch.autograd.grad(inner, (mu, s), create_graph=not first_order)
        mu, s = mu - inner_lr * g_mu, s - inner_lr * g_s
    return mu, s


def abml_outer(net: RefMLP, mu: Tensor, s: Tensor, loc: Tensor, prec: Tensor, sigma: Tensor,
               xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor, kl_weight_outer: float = 1.0) -> Tensor:
    """The meta-batch loss given each task's ``q = N(mu, exp(s))`` (``[T, D]`` each): one
    reparameterized draw per task scored on support + query, single-sample KL, hyperprior once,
    all divided by T."""
    num_tasks, d = mu.shape
    eps = torch.randn((num_tasks, 1, d), dtype=mu.dtype, device=mu.device).view(num_tasks, d)
    log_std = s.clamp(LOG_STD_MIN, LOG_STD_MAX)
    phi = mu + torch.exp(log_std) * eps  # T D
    f = net(phi, torch.cat([xs, xq], 1))  # T (S+Q) O
    nll = _gauss_nll(f, torch.cat([ys, yq], 1), sigma).sum()
    # log q(phi) - log p(phi | loc, prec) at the drawn phi; (phi - mu) / std is eps exactly, and
    # the 2 pi constants of the two densities cancel
    log_q = (-0.5 * eps.pow(2) - log_std).sum()
    log_p = (0.5 * torch.log(prec) - 0.5 * prec * (phi - loc).pow(2)).sum()
    hyper = (0.5 * (loc / HYPER_LOC_STD).pow(2) + math.log(HYPER_LOC_STD) + LOG_SQRT_2PI).sum() - (
        GAMMA_CONCENTRATION * math.log(GAMMA_RATE) + (GAMMA_CONCENTRATION - 1) * torch.log(prec)
        - GAMMA_RATE * prec - math.lgamma(GAMMA_CONCENTRATION)).sum()
    return (nll + kl_weight_outer * (log_q - log_p) + hyper) / num_tasks


def abml_loss(net: RefMLP, loc: Tensor, log_precision: Tensor, raw_noise: Tensor,
              xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor, inner_steps: int, inner_lr: float,
              inner_samples: int = 1, kl_weight_inner: float = 1.0, kl_weight_outer: float = 1.0,
              min_noise: float = 1e-3, first_order: bool = False) -> Tensor:
    """ABML's meta-batch loss (see the module docstring).

    :param loc: prior mean ``mu_theta [D]``; :param log_precision: ``[D]``, the prior precision is
        ``exp(min(r, 40)) + 1e-6``; :param raw_noise: scalar, ``sigma = softplus(raw) + min_noise``.
    """
    prec, sigma = abml_prior(log_precision, raw_noise, min_noise)
    mu, s = abml_inner(net, loc, prec, sigma, xs, ys, inner_steps, inner_lr, inner_samples,
                       kl_weight_inner, first_order)
    return abml_outer(net, mu, s, loc, prec, sigma, xs, ys, xq, yq, kl_weight_outer)


# ------------------------------------------------------------------- references as nn.Modules
class ReferenceMAML(nn.Module):
    """Meta-parameters and settings of :func:`maml_loss`; ``loss(batch)`` like a MetaLearner."""

    def __init__(self, sizes: Sequence[int], activation: str, theta: Tensor, inner_steps: int,
                 inner_lr: float, first_order: bool = False):
        super().__init__()
        self.net = RefMLP(sizes, activation)
        self.theta = nn.Parameter(theta.detach().clone())
        self.inner_steps, self.inner_lr, self.first_order = inner_steps, inner_lr, first_order

    def loss(self, batch) -> Tensor:
        return maml_loss(self.net, self.theta, batch.x_support, batch.y_support, batch.x_query,
                         batch.y_query, self.inner_steps, self.inner_lr, self.first_order)


class ReferenceABML(nn.Module):
    """Meta-parameters and settings of :func:`abml_loss`; ``loss(batch)`` like a MetaLearner."""

    def __init__(self, sizes: Sequence[int], activation: str, loc: Tensor, log_precision: Tensor,
                 raw_noise: Tensor, inner_steps: int, inner_lr: float, inner_samples: int = 1,
                 kl_weight_inner: float = 1.0, kl_weight_outer: float = 1.0, min_noise: float = 1e-3,
                 first_order: bool = False):
        super().__init__()
        self.net = RefMLP(sizes, activation)
        self.loc = nn.Parameter(loc.detach().clone())
        self.log_precision = nn.Parameter(log_precision.detach().clone())
        self.raw_noise = nn.Parameter(raw_noise.detach().clone())
        self.inner_steps, self.inner_lr, self.inner_samples = inner_steps, inner_lr, inner_samples
        self.kl_weight_inner, self.kl_weight_outer = kl_weight_inner, kl_weight_outer
        self.min_noise, self.first_order = min_noise, first_order

    def loss(self, batch) -> Tensor:
        return abml_loss(self.net, self.loc, self.log_precision, self.raw_noise, batch.x_support,
                         batch.y_support, batch.x_query, batch.y_query, self.inner_steps,
                         self.inner_lr, self.inner_samples, self.kl_weight_inner,
                         self.kl_weight_outer, self.min_noise, self.first_order)


def reference_for(learner) -> nn.Module:
    """A reference with the same settings and (copied) parameter values as a built-in learner.

    Reads only settings and parameter values from the learner (``name`` ``"maml"`` or ``"abml"``,
    an MLP task network); the computation is this file's own.
    """
    net, guide = learner.model.net, learner.guide
    sizes, act = net.sizes, net.activation
    if learner.name == "maml":
        lik = learner.model.likelihood
        if lik.learn_noise or not math.isclose(float(lik.noise_std), 1 / math.sqrt(2), rel_tol=1e-6):
            raise ValueError("the MAML reference is the MSE loss: it needs noise_std=1/sqrt(2), fixed")
        return ReferenceMAML(sizes, act, guide.theta, guide.inner_steps, guide.inner_lr,
                             guide.first_order).to(guide.theta)
    if learner.name == "abml":
        lik = learner.model.likelihood
        if not lik.learn_noise:
            raise ValueError("the ABML reference expects a learned noise (the benchmark sets learn_noise=true)")
        return ReferenceABML(sizes, act, guide.loc, guide.log_precision, lik.raw_noise,
                             guide.inner_steps, guide.inner_lr, guide.inner_samples,
                             guide.kl_weight_inner, learner.model.kl_weight, lik.min_noise,
                             guide.first_order).to(guide.loc)
    raise ValueError(f"no reference for method {learner.name!r} (known: maml, abml)")


# ---------------------------------------------------------------------- the per-task loop
def split_tasks(batch) -> list:
    """``[batch.select([i]) for each task]``: the one-task batches of the per-task loop."""
    return [batch.select([i]) for i in range(batch.num_tasks)]


def loop_loss(learner, tasks) -> Tensor:
    """The library loss one task at a time: ``mean_i learner.loss(batch.select([i]))``.

    :param tasks: a TaskBatch, or its one-task batches from :func:`split_tasks` (the benchmark
        splits outside the timed region, so slicing is not counted against the loop).

    For ABML the hyperprior term is in every one-task loss with weight 1, so the mean counts it
    once, as the vectorized loss does; the Monte Carlo draws differ (per-task shapes).
    """
    if not isinstance(tasks, (list, tuple)):
        tasks = split_tasks(tasks)
    total = learner.loss(tasks[0])
    for task in tasks[1:]:
        total = total + learner.loss(task)
    return total / len(tasks)
