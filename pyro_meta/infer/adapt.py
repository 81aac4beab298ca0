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


def polyak_adapt(
    task_losses: Callable[[Tensor], tuple[Tensor, Tensor]],
    param: Tensor,
    steps: int,
    max_lr: float | Tensor,
    first_order: bool = False,
    c: float = 1.0,
) -> Tensor:
    """K steps of gradient descent with each task's own Polyak step size, capped (SPS_max: Loizou, Vaswani,
    Laradji & Lacoste-Julien, "Stochastic Polyak Step-size for SGD", AISTATS 2021):

        gamma_t = min(excess_t / (c * ||g_t||^2), max_lr),   w_t <- w_t - gamma_t * g_t

    with ``excess_t`` the task's loss above its lower bound and ``g_t`` its gradient. For a squared error
    ``excess = |r|^2 / 2`` the step is ``|r|^2 / (2 c |J^T r|^2) J^T r`` whatever the scale of the targets
    or of a Gaussian noise: a task whose gradient is large (a steep line) takes a step that much smaller,
    where a fixed step must be small enough for the steepest task. ``c = 1`` halves the linearized residual
    when ``J J^T`` is a multiple of the identity. :func:`sgd_adapt`'s loop with this step (``update``), so
    differentiable as it is (second order unless ``first_order``; the step size is a function of the
    parameters and is differentiated too; first order, it is a constant).

    :param task_losses: ``w -> (loss [..., T], excess [..., T])``, one value per task.
    :param param: the starting point ``[..., T, 1, D]``.
    :param max_lr: the cap (a float or a tensor broadcastable to ``[..., T, 1, 1]``).
    """
    if c <= 0:
        raise ValueError(f"c must be positive, got {c}")
    tiny = torch.finfo(param.dtype).tiny
    cap = torch.as_tensor(max_lr, dtype=param.dtype, device=param.device)
    excess: list[Tensor] = []  # the current step's, from the loss evaluation that gave its gradient

    def loss_fn(w: Tensor) -> Tensor:
        loss, exc = task_losses(w)
        excess[:] = [exc]
        return loss.sum()

    def update(cur: tuple[Tensor, ...], grads: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        (w,), (g,) = cur, grads
        exc = excess[0] if g.requires_grad else excess[0].detach()  # first order / no graph: a constant step
        sq = (g * g).sum(-1, keepdim=True)  # ..., T, 1, 1
        gamma = torch.minimum(exc.clamp(min=0)[..., None, None] / (c * sq + tiny), cap)
        return (w - gamma * g,)

    (out,) = sgd_adapt(loss_fn, (param,), steps, 0.0, first_order, update=update)
    return out
