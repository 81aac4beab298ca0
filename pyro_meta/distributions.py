"""Normal laws in the parameterizations the built-in models and guides already hold, so that a
meta-training step's sample sites cost no more tensor operations than the plain-PyTorch estimator.

Both are :class:`pyro.distributions.Normal` subclasses (``loc``, ``scale``, ``mean``, ``stddev``,
``entropy``, sampling and the closed-form Normal-Normal KL of ``TraceMeanField_ELBO`` work as there) and
elementwise, like ``Normal`` (wrap them in ``.to_event(1)`` for a vector site). What differs:

- :class:`LogScaleNormal` ``N(loc, exp(log_scale)^2)``: the std's logarithm is what a guide learns
  (ABML's ``s``); ``log q`` then needs no ``log(exp(.))``, and at the value its own ``rsample`` drew,
  ``log q = -eps^2 / 2 - log_scale - log(2 pi) / 2`` with the standard-normal draw ``eps`` it kept: the same
  value as Normal's formula, and the same gradient (with ``v = loc + e^s eps``, the density's own dependence
  on ``loc`` and ``s`` through ``v`` cancels that of ``(v - loc) / e^s`` exactly).
- :class:`PrecisionNormal` ``N(loc, precision^{-1/2})``: a prior kept as a precision (ABML's ``tau``);
  ``log p = log(tau) / 2 - tau (v - loc)^2 / 2 - log(2 pi) / 2`` needs no root, square or division, and the
  parameters stay in their own (un-broadcast) shape: a ``[D]`` prior expanded over a ``[T, 1]`` tasks plate
  does the ``[D]``-sized work once and only the ``[T, 1, D]`` difference per task.

And :class:`PointMass`, a :class:`~pyro.distributions.Delta` (a point estimate: MAML's weights, ABML's
prior) whose density is 0 at its point, built without allocating a ``log_density`` tensor, and whose
draw is its point itself.

Pyro's plates call ``expand`` on every site's distribution; here an ``expand`` to the shape a
distribution already has returns it unchanged.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from torch import Tensor
from torch.distributions import Distribution
from torch.distributions.utils import _standard_normal

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _batch_shape(*params: Tensor) -> torch.Size:
    shape = params[0].shape
    return shape if all(p.shape == shape for p in params[1:]) else torch.broadcast_shapes(*(p.shape for p in params))


class LogScaleNormal(dist.Normal):
    """``N(loc, exp(log_scale)^2)`` elementwise. :param loc: the mean; :param log_scale: the log std (any
    clamping is the caller's), broadcastable with ``loc``."""

    def __init__(self, loc: Tensor, log_scale: Tensor):
        self._loc, self.log_scale = loc, log_scale
        self._drawn: tuple[Tensor, Tensor] | None = None  # (value, eps) of the last rsample
        Distribution.__init__(self, _batch_shape(loc, log_scale), validate_args=False)

    @property
    def loc(self) -> Tensor:  # type: ignore[override]
        return self._loc.expand(self.batch_shape)

    @property
    def scale(self) -> Tensor:  # type: ignore[override]
        return torch.exp(self.log_scale).expand(self.batch_shape)

    def expand(self, batch_shape, _instance=None) -> LogScaleNormal:  # type: ignore[override]
        batch_shape = torch.Size(batch_shape)
        if batch_shape == self.batch_shape:
            return self
        return LogScaleNormal(self._loc.expand(batch_shape), self.log_scale.expand(batch_shape))

    def rsample(self, sample_shape=torch.Size()) -> Tensor:  # noqa: B008 - torch's signature
        shape = self._extended_shape(sample_shape)
        eps = _standard_normal(shape, dtype=self._loc.dtype, device=self._loc.device)
        value = self._loc + eps * torch.exp(self.log_scale)
        self._drawn = (value, eps)
        return value

    def log_prob(self, value: Tensor) -> Tensor:
        if self._drawn is not None and value is self._drawn[0]:
            eps = self._drawn[1]
        else:
            eps = (value - self._loc) * torch.exp(-self.log_scale)
        return -0.5 * (eps * eps) - (self.log_scale + HALF_LOG_2PI)

    def entropy(self) -> Tensor:
        return (self.log_scale + (0.5 + HALF_LOG_2PI)).expand(self.batch_shape)


class PrecisionNormal(dist.Normal):
    """``N(loc, precision^{-1/2})`` elementwise. :param loc: the mean; :param precision: positive, broadcastable
    with ``loc``; :param log_precision: ``log(precision)`` when the caller has it (else computed here)."""

    def __init__(self, loc: Tensor, precision: Tensor, log_precision: Tensor | None = None,
                 batch_shape: torch.Size | None = None):
        self._loc, self.precision = loc, precision
        self.log_precision = torch.log(precision) if log_precision is None else log_precision
        shape = _batch_shape(loc, precision) if batch_shape is None else torch.Size(batch_shape)
        Distribution.__init__(self, shape, validate_args=False)

    @property
    def loc(self) -> Tensor:  # type: ignore[override]
        return self._loc.expand(self.batch_shape)

    @property
    def scale(self) -> Tensor:  # type: ignore[override]
        return self.precision.rsqrt().expand(self.batch_shape)

    def expand(self, batch_shape, _instance=None) -> PrecisionNormal:  # type: ignore[override]
        batch_shape = torch.Size(batch_shape)
        if batch_shape == self.batch_shape:
            return self
        # the parameters keep their own shape; log_prob and rsample broadcast them
        return PrecisionNormal(self._loc, self.precision, self.log_precision, batch_shape)

    def rsample(self, sample_shape=torch.Size()) -> Tensor:  # noqa: B008 - torch's signature
        shape = self._extended_shape(sample_shape)
        eps = _standard_normal(shape, dtype=self._loc.dtype, device=self._loc.device)
        return self._loc + eps * self.precision.rsqrt()

    def log_prob(self, value: Tensor) -> Tensor:
        d = value - self._loc
        log_p = (0.5 * self.log_precision - HALF_LOG_2PI) - (0.5 * self.precision) * (d * d)
        if log_p.shape != self.batch_shape:  # a value smaller than the batch: one density per batch entry
            log_p = log_p.expand(torch.broadcast_shapes(log_p.shape, self.batch_shape))
        return log_p

    def entropy(self) -> Tensor:
        return ((0.5 + HALF_LOG_2PI) - 0.5 * self.log_precision).expand(self.batch_shape)


class PointMass(dist.Delta):
    """``Delta(v, event_dim)`` with ``log_density = 0``: the log density is 0 at ``v`` (``-inf`` elsewhere,
    as for Delta). :param v: the point; :param event_dim: dims of ``v`` that form one event."""

    def __init__(self, v: Tensor, event_dim: int = 0):
        if event_dim > v.dim():
            raise ValueError(f"event_dim {event_dim} exceeds the point's {v.dim()} dims")
        batch_dim = v.dim() - event_dim
        self.v = v
        Distribution.__init__(self, v.shape[:batch_dim], v.shape[batch_dim:], validate_args=False)

    @property
    def log_density(self) -> Tensor:  # type: ignore[override]
        return self.v.new_zeros(()).expand(self.batch_shape)

    def expand(self, batch_shape, _instance=None) -> PointMass:  # type: ignore[override]
        batch_shape = torch.Size(batch_shape)
        if batch_shape == self.batch_shape:
            return self
        return PointMass(self.v.expand(batch_shape + self.event_shape), len(self.event_shape))

    def rsample(self, sample_shape=torch.Size()) -> Tensor:  # noqa: B008 - torch's signature
        return self.v if not sample_shape else self.v.expand(torch.Size(sample_shape) + self.v.shape)
