"""A Gaussian process with meta-learned kernel hyperparameters: the generative model.

Every task ``t`` is a draw of one GP whose hyperparameters are shared by all tasks and learned by the
summed marginal likelihood of the training tasks (empirical Bayes across tasks, as in Deep Kernel
Transfer [1] without the network, or with it: ``kernel="deep"``)::

    f_t ~ GP(m, k_theta)                         m a learned constant (or MLP), k_theta a sum of kernels
    y_tn = f_t(x_tn) + eps,  eps ~ N(0, s^2)     s^2 learned

The model conditions on the support analytically. One Cholesky factor ``L`` of the joint covariance
of the support and query inputs, ``K + (s^2 + jitter) I = L L^T`` over ``[S + Q]`` points, gives
everything: its leading ``S x S`` block is the support's factor, ``L_qs`` maps whitened support
residuals to the query mean, and ``L_qq L_qq^T`` is the query's conditional covariance (noise
included). With ``a = L_ss^{-1} (y_s - m)``::

    log p(y_s)         = -|a|^2 / 2 - sum log diag L_ss - S/2 log 2 pi         factor "y_support_marginal"
    mu_q               = m + L_qs a,   var_q = rowsum(L_qq^2)                  per-point predictive
    y_query            ~ N(mu_q, var_q) per point                              site "y_query"
    log p(y_q | y_s)   = log N(y_q | mu_q, L_qq L_qq^T)                        the joint conditional

The evaluator reads per-point NLL and coverage from ``y_query``'s law, which must be the per-point
marginals. Training needs the joint: when the query labels are present the factor
``"y_query_joint"`` adds ``log p(y_q | y_s) - sum_q log N(y_q | mu_q, var_q)``, so the model's log
joint is exactly ``log p(y_s) + log p(y_q | y_s) = log p(y_s, y_q)``, the task's marginal likelihood.
There is no latent site: the guide is empty and ``Trace_ELBO`` is ``-sum_t log p(y_s, y_q)`` exactly.

Several outputs ``O`` are independent GPs with the same kernel (one factor, ``O`` right-hand sides).

Plates: ``tasks`` at ``dim=-2``, ``y_query_points`` at ``dim=-1``; the evaluator's ``samples`` plate
at ``dim=-3`` broadcasts over the deterministic predictive.

[1] Patacchiola, Turner, Crowley, O'Boyle, Storkey, Bayesian Meta-Learning for the Few-Shot Setting
    via Deep Kernels, NeurIPS 2020.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..tasks import TaskBatch
from .base import POINT_DIM, full_plate, mlp, tasks_plate

JITTER = 1e-5  # added to the noise variance on the diagonal: float32 Choleskys of 10 x 10 kernels need it
MIN_NOISE_VAR = 1e-4  # the learned noise variance's floor (a noiseless GP overfits the support)
LOG_2PI = math.log(2 * math.pi)
KERNEL_CHOICES = ("sum", "deep")
# initial periods of the periodic components: a spread over [2, 12] so one starts near a sine's 2 pi
# whatever the family (a single start settles on RBF + linear; see benchmarks/RESULTS_gp.md)
DEFAULT_PERIODS = (2.0, 4.5, 7.0, 9.5, 12.0)


def inv_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


def positive(value: float | Sequence[float]) -> nn.Parameter:
    """An unconstrained parameter whose softplus is ``value`` (a scalar or a vector)."""
    v = torch.as_tensor(value, dtype=torch.float32)
    return nn.Parameter(v + torch.log(-torch.expm1(-v)))


def value(raw: Tensor) -> float:
    """``softplus(raw)`` of a 0-dim parameter, as a number (for ``describe``)."""
    return float(F.softplus(raw.detach()))


class BatchedKernel(nn.Module):
    """``k(X, Z)`` over any leading dims: ``X [..., N, D]``, ``Z [..., M, D]`` -> ``[..., N, M]``.

    pyro.contrib.gp's kernels take one task's ``[N, D]``; these broadcast over tasks (and samples) with
    the same formulas, so a meta-batch's covariances come from one call."""

    def forward(self, X: Tensor, Z: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def describe(self) -> dict:
        raise NotImplementedError


class RBF(BatchedKernel):
    """``v exp(-|(x - z) / l|^2 / 2)``, one lengthscale per input feature (ARD)."""

    def __init__(self, input_dim: int, variance: float = 1.0, lengthscale: float = 1.0):
        super().__init__()
        self.raw_variance = positive(variance)
        self.raw_lengthscale = positive([lengthscale] * input_dim)

    def forward(self, X: Tensor, Z: Tensor) -> Tensor:
        ls = F.softplus(self.raw_lengthscale)  # D
        d = X.unsqueeze(-2) / ls - Z.unsqueeze(-3) / ls  # ..., N, M, D
        return F.softplus(self.raw_variance) * torch.exp(-0.5 * (d * d).sum(-1))

    def describe(self) -> dict:
        return {"type": "rbf", "variance": value(self.raw_variance),
                "lengthscale": F.softplus(self.raw_lengthscale.detach()).tolist()}


class Linear(BatchedKernel):
    """``v (b + x . z)``: a random line per task, slope variance ``v``, intercept variance ``v b``
    (pyro.contrib.gp's ``Polynomial`` of degree 1)."""

    def __init__(self, variance: float = 1.0, bias: float = 1.0):
        super().__init__()
        self.raw_variance, self.raw_bias = positive(variance), positive(bias)

    def forward(self, X: Tensor, Z: Tensor) -> Tensor:
        return F.softplus(self.raw_variance) * (F.softplus(self.raw_bias) + X @ Z.transpose(-1, -2))  # ..., N, M

    def describe(self) -> dict:
        return {"type": "linear", "variance": value(self.raw_variance),
                "bias": value(self.raw_bias)}


class Periodic(BatchedKernel):
    """``sum_k v_k exp(-2 sum_d sin^2(pi (x_d - z_d) / p_k) / l_k^2)``: a bank of ``K`` of MacKay's periodic
    kernels (each as in pyro.contrib.gp, one period and lengthscale shared by the features), computed from
    one broadcast of the differences instead of ``K`` modules (``benchmarks/RESULTS_gp.md``: the step's
    cost). Scalars give one component."""

    def __init__(self, variance: float | Sequence[float] = 1.0, lengthscale: float | Sequence[float] = 1.0,
                 period: float | Sequence[float] = 6.0):
        super().__init__()
        k = max(len(v) if isinstance(v, Sequence) else 1 for v in (variance, lengthscale, period))

        def vec(v: float | Sequence[float]) -> list[float]:
            return list(v) if isinstance(v, Sequence) else [float(v)] * k

        self.raw_variance, self.raw_lengthscale = positive(vec(variance)), positive(vec(lengthscale))
        self.raw_period = positive(vec(period))

    def forward(self, X: Tensor, Z: Tensor) -> Tensor:
        d = (X.unsqueeze(-2) - Z.unsqueeze(-3)).unsqueeze(-1)  # ..., N, M, D, 1
        s = torch.sin(math.pi * d / F.softplus(self.raw_period)) / F.softplus(self.raw_lengthscale)  # ..., D, K
        return (F.softplus(self.raw_variance) * torch.exp(-2 * (s * s).sum(-2))).sum(-1)  # ..., N, M

    def components(self) -> list[dict]:
        """Each component's ``variance``, ``lengthscale`` and ``period``."""
        v, ls, p = (F.softplus(r.detach()).reshape(-1).tolist()
                    for r in (self.raw_variance, self.raw_lengthscale, self.raw_period))
        k = max(len(v), len(ls), len(p))
        pick = lambda a, i: a[i] if len(a) > 1 else a[0]  # noqa: E731 - a 0-dim value serves every component
        return [{"variance": pick(v, i), "lengthscale": pick(ls, i), "period": pick(p, i)} for i in range(k)]

    def describe(self) -> dict:
        return {"type": "periodic", "components": self.components()}


class Cosine(BatchedKernel):
    """``sum_k v_k cos(2 pi w_k . (x - z))``: a bank of ``K`` cosine kernels (spectral components of zero
    bandwidth, Wilson & Adams's spectral mixture kernel in the limit), each the covariance of
    ``a sin(2 pi w.x) + b cos(2 pi w.x)`` with independent ``a, b ~ N(0, v)``: a random sinusoid of one
    frequency vector ``w_k = 1 / p_k`` (elementwise; the periods ``p_k [K, D]`` learned through a softplus,
    so the frequencies are positive: in several dimensions a direction such as ``(1, -1)`` is not covered).
    In one dimension it is pyro.contrib.gp's ``Cosine`` with lengthscale ``p / (2 pi)``.

    Unlike the periodic kernel it has no higher harmonics: on ``sinusoid_line`` it took the GP's test NLL
    from 0.969 (RBF + linear + periodic) to 0.888 (``benchmarks/RESULTS_gp.md``)."""

    def __init__(self, input_dim: int, periods: Sequence[float], variance: float | None = None):
        super().__init__()
        k = len(periods)
        self.raw_variance = positive([1.0 / k if variance is None else variance] * k)
        # each component's frequency vector starts along the diagonal, |w| = 1 / period
        self.raw_period = positive([[p * math.sqrt(input_dim)] * input_dim for p in periods])  # K D

    def forward(self, X: Tensor, Z: Tensor) -> Tensor:
        w = 2 * math.pi / F.softplus(self.raw_period)  # K D, angular frequencies
        d = X.unsqueeze(-2) - Z.unsqueeze(-3)  # ..., N, M, D
        return (F.softplus(self.raw_variance) * torch.cos(d @ w.T)).sum(-1)  # ..., N, M

    def components(self) -> list[dict]:
        """Each component's ``variance`` and ``period`` (per input feature; a one-element list in 1-D)."""
        v = F.softplus(self.raw_variance.detach()).tolist()
        p = F.softplus(self.raw_period.detach()).tolist()
        return [{"variance": v[i], "period": p[i]} for i in range(len(v))]

    def describe(self) -> dict:
        return {"type": "cosine", "components": self.components()}


class Sum(BatchedKernel):
    """The sum of its parts (a ``ModuleList``)."""

    def __init__(self, parts: Sequence[BatchedKernel]):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, X: Tensor, Z: Tensor) -> Tensor:
        out = self.parts[0](X, Z)
        for k in self.parts[1:]:
            out = out + k(X, Z)
        return out

    def describe(self) -> dict:
        return {"type": "sum", "parts": [k.describe() for k in self.parts]}


class DeepKernel(BatchedKernel):
    """``k(g(x), g(z))`` with ``g`` a feature MLP (ReLU between layers) shared by all tasks (DKT [1])."""

    def __init__(self, input_dim: int, hidden: Sequence[int], base: BatchedKernel | None = None):
        super().__init__()
        self.features = mlp([input_dim, *hidden])
        self.base = base if base is not None else RBF(hidden[-1])

    def forward(self, X: Tensor, Z: Tensor) -> Tensor:
        return self.base(self.features(X), self.features(Z))

    def describe(self) -> dict:
        return {"type": "deep", "features": [m.out_features for m in self.features if isinstance(m, nn.Linear)],
                "base": self.base.describe()}


def sum_kernel(input_dim: int, periods: Sequence[float] = DEFAULT_PERIODS) -> Sum:
    """RBF + linear + a bank of periodic components and a bank of cosine components, one of each per initial
    period (variances split among them)."""
    n = len(periods)
    return Sum([RBF(input_dim), Linear(), Periodic([1.0 / n] * n, [1.0] * n, list(periods)),
                Cosine(input_dim, periods)])


class ConstantMean(nn.Module):
    """``m(x) = c``, one learned constant shared by every task and output."""

    def __init__(self):
        super().__init__()
        self.constant = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        return self.constant.to(x.dtype)  # broadcasts against [..., N, O]

    def describe(self) -> dict:
        return {"type": "constant", "value": float(self.constant.detach())}


class MLPMean(nn.Module):
    """``m(x)``: an MLP of the inputs ``[..., N, D] -> [..., N, O]`` (ReLU between layers) shared by every
    task: the learned mean function of PACOH-GP (Rothfuss et al., ICML 2021), which lets the tasks' average
    shape (``sinusoid_line``'s ``0.81 cos x``) sit in the mean instead of the kernel."""

    def __init__(self, input_dim: int, hidden: Sequence[int], outputs: int = 1):
        super().__init__()
        self.net = mlp([input_dim, *hidden, outputs])

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def describe(self) -> dict:
        return {"type": "mlp", "widths": [m.out_features for m in self.net if isinstance(m, nn.Linear)]}


class GPModel(nn.Module):
    """Per task, a GP with the shared kernel, mean and noise: ``y_query`` per-point predictive given the
    support, plus the factors that make the log joint the task's marginal likelihood (module docstring).

    :param kernel: a :class:`BatchedKernel`.
    :param noise_var: the initial noise variance (``MIN_NOISE_VAR + softplus(raw)``).
    :param mean: the mean function, ``x [..., N, D] -> [..., N, O]`` or a broadcastable value;
        default :class:`ConstantMean`.
    """

    def __init__(self, kernel: BatchedKernel, noise_var: float = 0.1, mean: nn.Module | None = None):
        super().__init__()
        if not noise_var > MIN_NOISE_VAR:
            raise ValueError(f"noise_var must exceed {MIN_NOISE_VAR}, got {noise_var!r}")
        self.kernel = kernel
        self.raw_noise = positive(noise_var - MIN_NOISE_VAR)
        self.mean = mean if mean is not None else ConstantMean()

    @property
    def noise_var(self) -> Tensor:
        return MIN_NOISE_VAR + F.softplus(self.raw_noise)

    def factor(self, x_support: Tensor, x_query: Tensor) -> Tensor:
        """``L [..., S + Q, S + Q]``: the Cholesky factor of the joint covariance of support and query
        (noise and jitter on the diagonal); ``x_* [..., N, D]``."""
        x = torch.cat([x_support, x_query], dim=-2)  # ..., S+Q, D
        k = self.kernel(x, x)  # ..., N, N
        eye = torch.eye(k.shape[-1], dtype=k.dtype, device=k.device)
        return torch.linalg.cholesky(k + (self.noise_var + JITTER) * eye)

    def predict(self, batch: TaskBatch) -> dict[str, Tensor]:
        """The support's whitened residual and the query's per-point predictive.

        With the query labels present, one triangular solve of ``L`` against the stacked residuals
        ``[y_s - m; y_q - m]`` gives both the support's whitened residual (its first ``S`` rows: ``L`` is
        lower triangular) and the query's, ``b_q``, for the joint conditional.

        :return: ``mu [T, Q, O]``, ``var [T, Q, 1]`` (noise included), ``support_log_lik [T]``, the
            factor ``L [T, S + Q, S + Q]`` and, with query labels, ``b_q [T, Q, O]``."""
        s = batch.num_support
        L = self.factor(batch.x_support, batch.x_query)  # T N N
        m_q = self.mean(batch.x_query)
        r_s = batch.y_support - self.mean(batch.x_support)  # T S O
        out: dict[str, Tensor] = {"L": L}
        if batch.y_query is not None:
            b = torch.linalg.solve_triangular(L, torch.cat([r_s, batch.y_query - m_q], -2),
                                              upper=False)  # T N O
            a, out["b_q"] = b[..., :s, :], b[..., s:, :]
        else:
            a = torch.linalg.solve_triangular(L[..., :s, :s], r_s, upper=False)  # T S O
        mu = m_q + L[..., s:, :s] @ a  # T Q O
        var = (L[..., s:, s:] ** 2).sum(-1, keepdim=True)  # T Q 1
        o = a.shape[-1]
        half_logdet = torch.log(torch.diagonal(L[..., :s, :s], dim1=-2, dim2=-1)).sum(-1)  # T
        support_ll = -0.5 * (a * a).sum((-2, -1)) - o * half_logdet - 0.5 * o * s * LOG_2PI  # T
        return {**out, "mu": mu, "var": var, "support_log_lik": support_ll}

    def forward(self, batch: TaskBatch) -> Tensor:
        p = self.predict(batch)
        mu, var = p["mu"], p["var"]
        std = var.sqrt().expand_as(mu)  # T Q O
        with tasks_plate(batch.num_tasks):
            pyro.factor("y_support_marginal", p["support_log_lik"].unsqueeze(-1))  # T 1
            with full_plate("y_query_points", mu.shape[-2], POINT_DIM):
                y = pyro.sample("y_query", dist.Normal(mu, std).to_event(1), obs=batch.y_query)
            if batch.y_query is not None:
                pyro.factor("y_query_joint", self.joint_correction(p, batch.y_query).unsqueeze(-1))  # T 1
        return y

    @staticmethod
    def joint_correction(p: dict[str, Tensor], y_query: Tensor) -> Tensor:
        """``log N(y_q | mu, L_qq L_qq^T) - sum_q log N(y_q | mu_q, var_q)`` per task, ``[T]``: what the
        per-point factors of ``y_query`` miss of the joint conditional (the query points' correlation).
        ``L_qq^{-1} (y_q - mu)`` is ``predict``'s ``b_q`` (the query rows of one solve against ``L``; ``p`` from
        a batch with query labels)."""
        mu, var, L = p["mu"], p["var"], p["L"]
        q = mu.shape[-2]
        Lqq = L[..., -q:, -q:]  # T Q Q
        r = y_query - mu  # T Q O
        b = p["b_q"]  # T Q O
        o = r.shape[-1]
        joint = -0.5 * (b * b).sum((-2, -1)) - o * torch.log(torch.diagonal(Lqq, dim1=-2, dim2=-1)).sum(-1)
        marginal = -0.5 * (r * r / var).sum((-2, -1)) - 0.5 * o * torch.log(var).sum((-2, -1))
        return joint - marginal  # the 2 pi terms cancel

    def describe(self) -> dict:
        return {"kernel": self.kernel.describe(), "noise_var": float(self.noise_var.detach()),
                "mean": self.mean.describe()}
