"""TaskBatch: the support and query sets of T tasks, batched along a leading task dimension."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch
from torch import Tensor


class TaskBatchError(ValueError):
    """A TaskBatch was given tensors of the wrong shape, dtype or content."""


def _describe(t: Tensor) -> str:
    return f"shape {tuple(t.shape)} dtype {t.dtype}"


@dataclass(frozen=True)
class TaskBatch:
    """Support and query sets of ``T`` tasks.

    Shapes (``S`` support points, ``Q`` query points, ``X`` the input shape):

    - ``x_support``: ``[T, S, *X]`` floating point
    - ``y_support``: ``[T, S, O]`` floating point (regression, ``O`` outputs) or ``[T, S]`` int64
      (classification labels)
    - ``x_query``: ``[T, Q, *X]``; ``y_query``: ``[T, Q, O]`` or ``[T, Q]``, like ``y_support``.
      ``y_query`` may be ``None`` when query labels are unknown (prediction only).
    - ``info``: optional per-task tensors ``[T, ...]`` that describe how the tasks were made
      (e.g. sinusoid amplitude and phase), used for plots, never by a learner.

    Every tensor is checked on construction; a mismatch raises :class:`TaskBatchError` naming
    what was expected and what came.
    """

    x_support: Tensor
    y_support: Tensor
    x_query: Tensor
    y_query: Tensor | None
    info: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "info" or (f.name == "y_query" and v is None):
                continue
            if not isinstance(v, Tensor):
                raise TaskBatchError(f"{f.name}: expected a torch.Tensor, got {type(v).__name__}")
        xs, ys, xq, yq = self.x_support, self.y_support, self.x_query, self.y_query
        for name, x in (("x_support", xs), ("x_query", xq)):
            if x.dim() < 3:
                raise TaskBatchError(
                    f"{name}: expected [T, N, *input_shape] with at least 3 dims, got {_describe(x)}"
                )
        if not xs.is_floating_point():
            raise TaskBatchError(f"x_support: expected a floating dtype, got {_describe(xs)}")
        if xq.shape[0] != xs.shape[0] or xq.shape[2:] != xs.shape[2:]:
            raise TaskBatchError(
                f"x_query: expected [T={xs.shape[0]}, Q, *{tuple(xs.shape[2:])}] to match x_support, "
                f"got {_describe(xq)}"
            )
        if xq.dtype != xs.dtype or xq.device != xs.device:
            raise TaskBatchError(
                f"x_query: expected dtype {xs.dtype} on {xs.device} like x_support, "
                f"got {xq.dtype} on {xq.device}"
            )
        self._check_labels("y_support", ys, xs)
        if yq is not None:
            self._check_labels("y_query", yq, xq)
            if yq.dtype != ys.dtype or yq.shape[2:] != ys.shape[2:]:
                raise TaskBatchError(
                    f"y_query: expected dtype {ys.dtype} and trailing shape {tuple(ys.shape[2:])} "
                    f"like y_support, got {_describe(yq)}"
                )
        for k, v in self.info.items():
            if not isinstance(v, Tensor) or v.dim() == 0 or v.shape[0] != xs.shape[0]:
                came = _describe(v) if isinstance(v, Tensor) else type(v).__name__
                raise TaskBatchError(f"info[{k!r}]: expected a tensor [T={xs.shape[0]}, ...], got {came}")
        if not getattr(self, "_trusted", False):
            self._check_values()

    def _check_values(self) -> None:
        """Checks that read the data (and so wait for a GPU): finite inputs and targets, labels in range."""
        xs, ys, xq, yq = self.x_support, self.y_support, self.x_query, self.y_query
        for name, t in (("x_support", xs), ("y_support", ys), ("x_query", xq), ("y_query", yq)):
            # a sum is NaN/inf when any entry is (or when it overflows): the full check only then, since
            # isfinite over a 20-way 15-query meta-batch (7.5M pixels) costs tens of ms per step
            if t is not None and t.is_floating_point() and not bool(torch.isfinite(t.sum())) \
                    and not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise TaskBatchError(f"{name}: contains {bad} NaN or inf value(s); data must be finite")
        if not ys.is_floating_point():
            self._check_classes(ys, yq)

    @classmethod
    def trusted(cls, x_support: Tensor, y_support: Tensor, x_query: Tensor, y_query: Tensor | None,
                info: dict[str, Tensor] | None = None) -> TaskBatch:
        """A batch from a source that guarantees its values (finite inputs, labels 0..C-1), such as the
        episode sampler's: shapes, dtypes and devices are checked, the values are not, so building it
        reads no data back from a GPU."""
        out = object.__new__(cls)
        object.__setattr__(out, "_trusted", True)
        for name, v in (("x_support", x_support), ("y_support", y_support), ("x_query", x_query),
                        ("y_query", y_query), ("info", {} if info is None else info)):
            object.__setattr__(out, name, v)
        out.__post_init__()
        return out

    def _check_classes(self, ys: Tensor, yq: Tensor | None) -> None:
        """Class labels are 0..C-1: none negative; none at or past ``C`` when the episode says how many
        classes it has (``info["classes"] [T, C]``). A label at or past a model's ``ways`` without that
        info is caught by ``fit``'s first-step check (Pyro's validation of the Categorical)."""
        for name, y in (("y_support", ys), ("y_query", yq)):
            if y is not None and y.numel() and int(y.min()) < 0:
                raise TaskBatchError(f"{name}: class labels must be 0..C-1, found {int(y.min())}")
        classes = self.info.get("classes")
        if isinstance(classes, Tensor) and classes.dim() == 2:
            c = classes.shape[1]
            for name, y in (("y_support", ys), ("y_query", yq)):
                if y is not None and y.numel() and int(y.max()) >= c:
                    raise TaskBatchError(f"{name}: label {int(y.max())} in a {c}-way batch (info['classes'] has "
                                         f"{c} columns); labels must be 0..{c - 1}")

    @staticmethod
    def _check_labels(name: str, y: Tensor, x: Tensor) -> None:
        if y.shape[:2] != x.shape[:2]:
            raise TaskBatchError(
                f"{name}: expected leading dims [T, N] = {tuple(x.shape[:2])} to match its inputs, "
                f"got {_describe(y)}"
            )
        if y.is_floating_point():
            if y.dim() != 3:
                raise TaskBatchError(
                    f"{name}: regression targets must be [T, N, outputs], got {_describe(y)}"
                )
        elif y.dtype == torch.int64:
            if y.dim() != 2:
                raise TaskBatchError(f"{name}: class labels must be [T, N] int64, got {_describe(y)}")
        else:
            raise TaskBatchError(
                f"{name}: expected float (regression) or int64 (class labels), got {_describe(y)}"
            )
        if y.device != x.device:
            raise TaskBatchError(f"{name}: on {y.device}, but its inputs are on {x.device}")

    # ------------------------------------------------------------------ views
    @property
    def num_tasks(self) -> int:
        return self.x_support.shape[0]

    @property
    def num_support(self) -> int:
        return self.x_support.shape[1]

    @property
    def num_query(self) -> int:
        return self.x_query.shape[1]

    @property
    def is_classification(self) -> bool:
        return not self.y_support.is_floating_point()

    def _derived(self, fn) -> TaskBatch:
        """``fn`` applied to every tensor, without re-running the checks: moving or selecting tasks
        keeps a checked batch valid, and the finiteness check would cost a pass over every pixel
        (and a device sync on a GPU) in every training step."""
        out = object.__new__(TaskBatch)
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "info":
                v = {k: fn(t) for k, t in v.items()}
            elif v is not None:
                v = fn(v)
            object.__setattr__(out, f.name, v)
        return out

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        """Move to ``device``; cast floating tensors to ``dtype`` (labels stay int64). A cast is
        checked again (float64 -> float32 can overflow); a move alone is not."""
        if dtype is None:
            return self._derived(lambda t: t.to(device=device))

        def mv(t: Tensor | None) -> Tensor | None:
            if t is None:
                return None
            if t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device=device)

        return TaskBatch(
            mv(self.x_support),
            mv(self.y_support),
            mv(self.x_query),
            mv(self.y_query),
            {k: mv(v) for k, v in self.info.items()},
        )

    def select(self, index: slice | Tensor | list[int]) -> TaskBatch:
        """The tasks at ``index`` (a slice, a list or a tensor of task indices)."""
        if isinstance(index, list):
            index = torch.as_tensor(index, dtype=torch.long)
        if not isinstance(index, slice) and (not isinstance(index, Tensor) or index.dim() != 1):
            raise TaskBatchError(f"select: expected a slice, a list or a 1-d tensor of task indices, got {index!r}")
        return self._derived(lambda t: t[index])

    def without_query_labels(self) -> TaskBatch:
        return replace(self, y_query=None)
