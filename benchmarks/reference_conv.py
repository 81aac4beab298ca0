"""Plain-PyTorch references of the library's Omniglot meta-training losses (no Pyro), for
``bench_omniglot.py``.

Each loss computes the *same estimator* as ``MetaLearner.loss`` of the built-in method, written
directly with tensors, so the benchmark can separate the cost of the estimator from the cost of
expressing it as a Pyro program:

- :func:`versa_loss`: VERSA's ML-PIP with local reparameterization (Gordon et al., ICLR 2019). A
  shared conv4 ``theta`` maps support and query images to features (batch-norm statistics per task
  and per set); each class's support features are mean-pooled; an ELU MLP maps them to a Gaussian
  over the class's linear classifier column ``(w, b)``: mean and log-variance heads, log-variance
  clamped to ``[-20, 10]``. Each query logit ``a = h . w + b`` is Gaussian with mean
  ``h . mu_w + mu_b`` and variance ``h^2 . sigma_w^2 + sigma_b^2``; ``L`` draws per query point::

      loss = -mean_{t, q} log( (1/L) sum_l softmax(a_l)[y_tq] )

- :func:`maml_loss`: second-order MAML. K SGD steps on each task's mean support cross-entropy,
  from ``theta``, with ``create_graph=True``; the loss is the mean over tasks of the mean query
  cross-entropy.
- :class:`CeilingConv4`: the machine's ceiling for a step on the same images: one conv4 with a
  linear head trained by plain cross-entropy on every support and query image of the meta-batch
  (no inner loop, no amortizer; batch-norm statistics per task), one backward.

The network is this file's own functional conv4 (:class:`RefConv4`), independent of
``pyro_meta.nn``; it reads the same flat parameter layout (per block ``conv{k}.w [F, Cin, 3, 3]``,
``conv{k}.b [F]``, ``bn{k}.g [F]``, ``bn{k}.b [F]``, then ``head.w [out, feat]``, ``head.b [out]``)
so that both paths can start from identical parameters.

Random draws (VERSA): the library traces its guide first, which draws one ``psi ~ q`` (unused by
the local-reparameterization estimator), then draws ``eps [L, T, Q, C]``. With ``align_rng=True``
the reference discards a draw of the same shape first, so under the same ``torch.manual_seed``
both paths use the same ``eps`` (the self-check). The timed path sets ``align_rng=False``: the
unused draw is work the plain estimator does not need.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The clamp of VERSA's log-variances (the value of pyro_meta/guides/versa.py, written out again)
LOGVAR_MIN, LOGVAR_MAX = -20.0, 10.0


class RefConv4:
    """A functional conv4 over tasks: ``net(params, x [T, N, Cin, H, W], per_task) -> [T, N, out]``.

    ``params`` is a dict ``name -> tensor`` from :meth:`unflatten`: shared (``[*shape]``, one net for
    every task) or, with ``per_task=True``, ``[T, *shape]`` (MAML's adapted weights).

    Activations are kept as ``[N, T*C, H, W]`` (image-major, task-minor): a shared conv views them as
    ``[N*T, C, H, W]`` (same memory) for one dense ``conv2d``; per-task convs are one grouped
    ``conv2d`` (a group per task); per-task batch norm is one training-mode ``batch_norm`` over the
    ``T*C`` channels (statistics over the ``N`` images and the pixels of one task). ``blocks`` x
    [3x3 conv, pad 1 -> batch norm -> ReLU -> 2x2 max-pool] (``"maxpool"``) or [3x3 conv stride 2,
    pad 1 -> batch norm -> ReLU] then a spatial mean (``"stride"``); then an optional linear head.

    :param chunk_elements: on CPU, the tasks go through in groups whose first activation has at
        most this many entries (whole tasks, so the per-task statistics are unchanged; None: all
        at once). Smaller activations stay in the CPU's caches; :func:`conv_of` copies the
        library net's setting, so both paths schedule the same work.
    """

    def __init__(self, out_dim: int | None, in_channels: int = 1, image_size: int = 28,
                 filters: int = 64, blocks: int = 4, downsample: str = "maxpool",
                 batch_norm: str = "task", bn_eps: float = 1e-5, chunk_elements: int | None = None):
        if downsample not in ("maxpool", "stride") or batch_norm not in ("task", "none"):
            raise ValueError(f"unknown downsample {downsample!r} or batch_norm {batch_norm!r}")
        self.out_dim, self.cin, self.size = out_dim, in_channels, image_size
        self.filters, self.blocks, self.downsample = filters, blocks, downsample
        self.bn, self.eps, self.chunk_elements = batch_norm == "task", bn_eps, chunk_elements
        side = image_size
        for _ in range(blocks):
            side = side // 2 if downsample == "maxpool" else (side + 1) // 2
        self.feature_dim = filters * (side * side if downsample == "maxpool" else 1)
        self.layout: list[tuple[str, tuple[int, ...]]] = []
        c = in_channels
        for k in range(blocks):
            self.layout += [(f"conv{k}.w", (filters, c, 3, 3)), (f"conv{k}.b", (filters,))]
            if self.bn:
                self.layout += [(f"bn{k}.g", (filters,)), (f"bn{k}.b", (filters,))]
            c = filters
        if out_dim is not None:
            self.layout += [("head.w", (out_dim, self.feature_dim)), ("head.b", (out_dim,))]
        self.num_params = sum(math.prod(s) for _, s in self.layout)

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """``flat [*B, D]`` -> ``{name: [*B, *shape]}`` (views)."""
        out, i = {}, 0
        lead = flat.shape[:-1]
        for name, shape in self.layout:
            n = math.prod(shape)
            out[name] = flat[..., i:i + n].view(*lead, *shape)
            i += n
        return out

    def init(self, generator: torch.Generator) -> Tensor:
        """``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` for convs and head, ``gamma = 1``, ``beta = 0``."""
        parts = []
        for name, shape in self.layout:
            if name.startswith("bn"):
                parts.append((torch.ones if name.endswith(".g") else torch.zeros)(math.prod(shape)))
                continue
            fan_in = math.prod(dict(self.layout)[name.split(".")[0] + ".w"][1:])
            parts.append((torch.rand(math.prod(shape), generator=generator) * 2 - 1) / math.sqrt(fan_in))
        return torch.cat(parts)

    def __call__(self, p: dict[str, Tensor], x: Tensor, per_task: bool = False) -> Tensor:
        t, n = x.shape[0], x.shape[1]
        group = t
        if self.chunk_elements is not None and x.device.type == "cpu":
            side = self.size if self.downsample == "maxpool" else (self.size + 1) // 2  # first conv output
            group = max(1, self.chunk_elements // (n * self.filters * side * side))
        if group >= t:
            return self._tasks(p, x, per_task)
        return torch.cat([self._tasks({k: v[a:a + group] for k, v in p.items()} if per_task else p,
                                      x[a:a + group], per_task) for a in range(0, t, group)])

    def _tasks(self, p: dict[str, Tensor], x: Tensor, per_task: bool) -> Tensor:
        t, n = x.shape[0], x.shape[1]
        f = self.filters
        h = x.transpose(0, 1).reshape(n, t * self.cin, self.size, self.size)  # N T*Cin H W
        stride = 2 if self.downsample == "stride" else 1
        for k in range(self.blocks):
            w, b = p[f"conv{k}.w"], p[f"conv{k}.b"]
            if per_task:
                h = F.conv2d(h, w.reshape(t * f, *w.shape[2:]), b.reshape(t * f), stride=stride,
                             padding=1, groups=t)  # N T*F H' W'
            else:
                side = h.shape[-1]
                h = F.conv2d(h.reshape(n * t, -1, side, side), w, b, stride=stride, padding=1)
                h = h.view(n, t * f, *h.shape[-2:])  # N T*F H' W'
            if self.bn:
                g, beta = p[f"bn{k}.g"], p[f"bn{k}.b"]
                if not per_task:
                    g, beta = g.repeat(t), beta.repeat(t)
                h = F.batch_norm(h, None, None, g.reshape(t * f), beta.reshape(t * f), training=True,
                                 eps=self.eps)
            if self.downsample == "maxpool":
                h = F.max_pool2d(h, 2)  # before the ReLU: the same values, a quarter of the work
            h = F.relu(h)
        if self.downsample == "stride":
            h = h.mean((-2, -1))  # N T*F
        feats = h.reshape(n, t, self.feature_dim).transpose(0, 1)  # T N feat
        if self.out_dim is None:
            return feats
        if per_task:
            return torch.baddbmm(p["head.b"].unsqueeze(1), feats, p["head.w"].transpose(1, 2))
        return F.linear(feats, p["head.w"], p["head.b"])


def conv_of(net) -> RefConv4:
    """A :class:`RefConv4` with the settings of a library ``Conv4`` (reads its settings only)."""
    if getattr(net, "describe", lambda: {})().get("type") != "conv4":
        raise ValueError(f"expected the library's Conv4, got {net!r}")
    return RefConv4(net.out_dim, net.in_channels, net.image_size, net.filters, net.blocks,
                    net.downsample, net.batch_norm, net.bn_eps, getattr(net, "chunk_elements", None))


# ----------------------------------------------------------------------------------------- VERSA
def versa_loss(net: RefConv4, theta: Tensor, trunk: list[tuple[Tensor, Tensor]], head_w: Tensor,
               head_b: Tensor, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor, ways: int,
               num_samples: int, align_rng: bool = False) -> Tensor:
    """VERSA's ML-PIP loss with local reparameterization (module docstring).

    :param trunk: the amortizer's ELU layers ``[(weight [H', H], bias [H'])]``.
    :param head_w, head_b: the four heads fused, rows ``[w mean (F); b mean (1); w logvar (F);
        b logvar (1)]``: ``[2F+2, H]``, ``[2F+2]``.
    :param xs, ys: support images ``[T, S, 1, H, W]`` and labels ``[T, S]``; ``xq, yq`` the query.
    """
    p = net.unflatten(theta)
    fdim = net.feature_dim
    hs = net(p, xs)  # T S F
    onehot = F.one_hot(ys, ways).to(hs.dtype)  # T S C
    counts = onehot.sum(1).clamp(min=1.0).unsqueeze(-1)  # T C 1
    z = torch.bmm(onehot.transpose(1, 2), hs) / counts  # T C F
    for w, b in trunk:
        z = F.elu(F.linear(z, w, b))
    out = F.linear(z, head_w, head_b)  # T C 2F+2
    loc = out[..., :fdim + 1]  # T C F+1
    var = torch.exp(out[..., fdim + 1:].clamp(LOGVAR_MIN, LOGVAR_MAX))  # T C F+1
    if align_rng:
        torch.randn(loc.shape, dtype=loc.dtype, device=loc.device)  # the library guide's psi draw
    hq = net(p, xq)  # T Q F
    mean = torch.baddbmm(loc[..., fdim].unsqueeze(1), hq, loc[..., :fdim].transpose(1, 2))  # T Q C
    v = torch.baddbmm(var[..., fdim].unsqueeze(1), hq * hq, var[..., :fdim].transpose(1, 2))  # T Q C
    eps = torch.randn((num_samples,) + mean.shape, dtype=mean.dtype, device=mean.device)  # L T Q C
    logits = mean + v.sqrt() * eps
    log_lik = torch.log_softmax(logits, -1).gather(-1, yq.expand(logits.shape[:-1]).unsqueeze(-1))
    lme = torch.logsumexp(log_lik.squeeze(-1), 0) - math.log(num_samples)  # T Q
    return -lme.mean()


class ReferenceVERSA(nn.Module):
    """Meta-parameters of :func:`versa_loss` (the feature extractor ``theta`` and the amortizer, its
    four heads fused into one matrix); ``loss(batch)`` like a MetaLearner."""

    def __init__(self, net: RefConv4, theta: Tensor, trunk: list[tuple[Tensor, Tensor]],
                 heads: list[tuple[Tensor, Tensor]], num_samples: int, align_rng: bool = False):
        super().__init__()
        self.net, self.num_samples, self.align_rng = net, num_samples, align_rng
        self.theta = nn.Parameter(theta.detach().clone())
        self.trunk_w = nn.ParameterList(nn.Parameter(w.detach().clone()) for w, _ in trunk)
        self.trunk_b = nn.ParameterList(nn.Parameter(b.detach().clone()) for _, b in trunk)
        # heads: (w_mean, b_mean, w_logvar, b_logvar), each (weight, bias)
        self.head_w = nn.Parameter(torch.cat([w for w, _ in heads]).detach().clone())
        self.head_b = nn.Parameter(torch.cat([b for _, b in heads]).detach().clone())

    def loss(self, batch) -> Tensor:
        classes = batch.info.get("classes")
        ways = int(classes.shape[1]) if classes is not None else int(batch.y_support.max()) + 1
        return versa_loss(self.net, self.theta, list(zip(self.trunk_w, self.trunk_b)), self.head_w,
                          self.head_b, batch.x_support, batch.y_support, batch.x_query,
                          batch.y_query, ways, self.num_samples, self.align_rng)

    def as_library(self, values: dict[str, Tensor]) -> dict[str, Tensor]:
        """This module's ``{name: tensor}`` (parameters or their gradients) under the library's
        parameter names (``model.theta``, ``guide.trunk.{i}.weight``, ``guide.w_mean.bias``, ...)."""
        f = self.net.feature_dim
        out = {"model.theta": values["theta"]}
        for i in range(len(self.trunk_w)):
            out[f"guide.trunk.{i}.weight"] = values[f"trunk_w.{i}"]
            out[f"guide.trunk.{i}.bias"] = values[f"trunk_b.{i}"]
        rows = {"w_mean": (0, f), "b_mean": (f, f + 1), "w_logvar": (f + 1, 2 * f + 1),
                "b_logvar": (2 * f + 1, 2 * f + 2)}
        for head, (a, b) in rows.items():
            out[f"guide.{head}.weight"] = values["head_w"][a:b]
            out[f"guide.{head}.bias"] = values["head_b"][a:b]
        return out


# ----------------------------------------------------------------------------------------- MAML
def maml_loss(net: RefConv4, theta: Tensor, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor,
              inner_steps: int, inner_lr: float, first_order: bool = False) -> Tensor:
    """Second-order MAML (module docstring). The per-task weights are one tensor per layer
    ``[T, *shape]`` (not one flat vector), so the inner gradients need no slicing of a flat
    ``[T, D]`` tensor; ``theta [D]`` is the flat initialization."""
    t, s = xs.shape[0], xs.shape[1]
    base = net.unflatten(theta)
    names = list(base)
    fast = [base[k].expand(t, *base[k].shape) for k in names]
    for _ in range(inner_steps):
        logits = net(dict(zip(names, fast)), xs, per_task=True)  # T S C
        # the sum over tasks of each task's mean: one grad gives every task its own gradient
        inner = F.cross_entropy(logits.flatten(0, 1), ys.flatten(), reduction="sum") / s
        grads = torch.autograd.grad(inner, fast, create_graph=not first_order)
        fast = [w - inner_lr * g for w, g in zip(fast, grads)]
    logits = net(dict(zip(names, fast)), xq, per_task=True)  # T Q C
    return F.cross_entropy(logits.flatten(0, 1), yq.flatten())  # = mean over tasks (equal Q)


class ReferenceMAML(nn.Module):
    """Meta-parameters and settings of :func:`maml_loss`; ``loss(batch)`` like a MetaLearner."""

    def __init__(self, net: RefConv4, theta: Tensor, inner_steps: int, inner_lr: float,
                 first_order: bool = False):
        super().__init__()
        self.net, self.inner_steps, self.inner_lr, self.first_order = net, inner_steps, inner_lr, first_order
        self.theta = nn.Parameter(theta.detach().clone())

    def loss(self, batch) -> Tensor:
        return maml_loss(self.net, self.theta, batch.x_support, batch.y_support, batch.x_query,
                         batch.y_query, self.inner_steps, self.inner_lr, self.first_order)

    def as_library(self, values: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"guide.theta": values["theta"]}


# --------------------------------------------------------------------------------------- ceiling
class CeilingConv4(nn.Module):
    """The ceiling: ONE conv4 (the method's variant, shared weights) + linear head, cross-entropy
    over every image of a step, one forward and one backward. Batch-norm statistics per task (over
    its support and query images together), so the tasks can go through the CPU in the same
    chunks as the methods' nets. ``loss((x [T, S+Q, Cin, H, W], y [T, S+Q]))``;
    :func:`ceiling_inputs` prepares the pair from a TaskBatch outside the timed region.

    :param chunk_elements: as :class:`RefConv4` (the benchmark passes the library net's setting).
    """

    def __init__(self, ways: int, filters: int = 64, downsample: str = "maxpool", batch_norm: str = "task",
                 in_channels: int = 1, image_size: int = 28, blocks: int = 4, seed: int = 0,
                 chunk_elements: int | None = None):
        super().__init__()
        self.net = RefConv4(ways, in_channels, image_size, filters, blocks, downsample, batch_norm,
                            chunk_elements=chunk_elements)
        self.params = nn.Parameter(self.net.init(torch.Generator().manual_seed(seed)))

    def loss(self, images_labels: tuple[Tensor, Tensor]) -> Tensor:
        x, y = images_labels
        logits = self.net(self.net.unflatten(self.params), x)  # T S+Q ways
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())


def ceiling_inputs(batch) -> tuple[Tensor, Tensor]:
    """Each task's support and query images together, ``([T, S+Q, Cin, H, W], [T, S+Q])``."""
    return (torch.cat([batch.x_support, batch.x_query], 1).contiguous(),
            torch.cat([batch.y_support, batch.y_query], 1).contiguous())


# ------------------------------------------------------------------------------------ builders
def reference_for(learner, align_rng: bool = False) -> nn.Module:
    """A reference with the same settings and (copied) parameter values as a VERSA or MAML learner
    on a conv4. Reads only settings and parameter values; the computation is this file's own."""
    model, guide = learner.model, learner.guide
    net = conv_of(model.net)
    if learner.name == "versa":
        obj = learner.objective
        if type(obj).__name__ != "MLPIP" or not obj.local_reparam:
            raise ValueError("the VERSA reference is ML-PIP with local reparameterization")
        trunk = [(layer.weight, layer.bias) for layer in guide.trunk]
        heads = [(m.weight, m.bias) for m in (guide.w_mean, guide.b_mean, guide.w_logvar, guide.b_logvar)]
        if any(type(layer) is not nn.Linear for layer in guide.trunk):
            raise ValueError("the VERSA reference expects nn.Linear amortizer layers")
        return ReferenceVERSA(net, model.theta, trunk, heads, obj.num_samples, align_rng).to(model.theta)
    if learner.name == "maml":
        if type(model.likelihood).__name__ != "Categorical" or model.score != "query" or not model.mean_over_points:
            raise ValueError("the MAML reference is the mean query cross-entropy (Categorical, query scored)")
        return ReferenceMAML(net, guide.theta, guide.inner_steps, guide.inner_lr,
                             guide.first_order).to(guide.theta)
    raise ValueError(f"no reference for method {learner.name!r} (known: versa, maml)")
