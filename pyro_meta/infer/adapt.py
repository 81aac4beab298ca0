"""The functional inner loop shared by every method that adapts by gradient (MAML, ABML, ...)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def sgd_adapt(
    loss_fn: Callable[..., Tensor],
    params: Sequence[Tensor],
    steps: int,
    lr: float | Sequence[float],
    first_order: bool = False,
    update: Callable[[tuple[Tensor, ...], tuple[Tensor, ...]], tuple[Tensor, ...]] | None = None,
) -> tuple[Tensor, ...]:
    """K steps of plain SGD, ``p <- p - lr * d loss / d p``, as a pure function.

    Tasks are batched: ``params`` are e.g. ``[T, 1, D]`` and ``loss_fn`` returns the *sum* of the
    per-task losses, so one ``autograd.grad`` gives every task's own gradient.

    Second order (the default): the steps are built with ``create_graph=True`` so a loss on the
    adapted parameters backpropagates through the whole loop to the initial ``params``.
    First order: each step's gradient is detached (gradients reach the initial ``params`` only
    through the identity path). Under ``torch.no_grad()`` (evaluation, ``Predictive``) the loop
    still runs, from detached leaves, and keeps no graph.

    :param loss_fn: ``loss_fn(*params) -> scalar``.
    :param params: the starting point, one tensor per parameter group.
    :param steps: ``K >= 0``.
    :param lr: one step size, or one per parameter group.
    :param first_order: drop second-order terms.
    :param update: ``update(params, grads) -> new params`` replaces the plain step (``lr`` is then
        unused), e.g. a preconditioned step whose scale depends on the current parameters.
    :returns: the adapted parameters, same shapes as ``params``.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    params = tuple(params)
    lrs = tuple(lr) if isinstance(lr, (list, tuple)) else (lr,) * len(params)
    if len(lrs) != len(params):
        raise ValueError(f"expected {len(params)} step sizes, got {len(lrs)}")
    outer_grad = torch.is_grad_enabled()
    create_graph = outer_grad and not first_order
    with torch.enable_grad():
        cur = tuple(p if (outer_grad and p.requires_grad) else p.detach().requires_grad_() for p in params)
        for _ in range(steps):
            loss = loss_fn(*cur)
            grads = torch.autograd.grad(loss, cur, create_graph=create_graph)
            if not create_graph:
                grads = tuple(g.detach() for g in grads)
            cur = update(cur, grads) if update is not None else tuple(p - a * g for p, g, a in zip(cur, grads, lrs))
            if not outer_grad:
                cur = tuple(p.detach().requires_grad_() for p in cur)
    if not outer_grad:
        cur = tuple(p.detach() for p in cur)
    return cur
