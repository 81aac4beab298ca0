"""Conv4: the 4-block convolutional few-shot network as a functional net batched over tasks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .mlp import FunctionalNet
from .spec import ParamSpec

DOWNSAMPLE_MODES: tuple[str, ...] = ("maxpool", "stride")
"""``"maxpool"``: 2x2 max-pool after each block; ``"stride"``: stride-2 convs + final spatial mean."""

BATCH_NORM_MODES: tuple[str, ...] = ("task", "support", "tasknorm", "instance", "none")
"""How each block normalizes (Conv4's docstring): ``"task"`` the statistics of the images passed together
(transductive: MAML's protocol, reads the query set); ``"support"`` the support set's statistics;
``"tasknorm"`` TaskNorm-I (support statistics blended with each image's own); ``"instance"`` each image's
own; ``"none"`` no normalization."""

TRANSDUCTIVE_MODES: tuple[str, ...] = ("task",)
"""Modes in which a query image's output depends on the other query images passed with it."""

CONTEXT_MODES: tuple[str, ...] = ("support", "tasknorm")
"""Modes whose statistics come from a context set (the support set), passed as ``context=``."""

KERNEL = 3


def call_net(net, params: Tensor, x: Tensor, context: Tensor | None = None) -> Tensor:  # noqa: ANN001
    """``net(params, x)``, with ``context=`` (the support inputs) for a net that normalizes with a context
    set's statistics (a :class:`Conv4` in one of :data:`CONTEXT_MODES`); any other net, a user's own
    included, is called as ``net(params, x)``."""
    if context is not None and getattr(net, "batch_norm", None) in CONTEXT_MODES:
        return net(params, x, context=context)
    return net(params, x)

CPU_CHUNK_ELEMENTS: int = 2**22
"""On CPU, batch elements (tasks, samples) go through the net in chunks whose first activation
``[N, chunk*F, H, W]`` has at most this many entries (always >= 1 element; never splitting one).
Measured on a 1-thread CPU (VERSA-like, 16 tasks x 80 images 28x28, F=64): chunks of ~80-160
images were ~1.6x faster forward+backward than one 1280-image batch (activations that stay in
cache; fewer large zero-fills). Results equal the unchunked ones up to float round-off."""


# "fp32", or "bf16": the trunk under torch.autocast in bfloat16 (RunConfig.precision; measured in
# experiments/RESULTS.md)
PRECISIONS = ("fp32", "bf16")


class Conv4(FunctionalNet):
    """``blocks`` x [3x3 conv -> batch norm -> ReLU -> downsample], then an optional linear head.

    The conv4 of Vinyals et al. / ProtoNets / VERSA (``downsample="maxpool"``) and of MAML's
    Omniglot net (``downsample="stride"``), with every weight taken from a flat ``params [*B, D]``
    laid out by :attr:`spec` (the net owns no parameters).

    **Blocks.** Each conv is 3x3 with padding 1. ``"maxpool"``: stride-1 conv, then a 2x2
    max-pool with stride 2 (floor), so 28 -> 14 -> 7 -> 3 -> 1; a final map larger than 1x1
    (other image sizes) is flattened channel-major, ``feature_dim = filters * h * w``.
    ``"stride"``: the conv itself has stride 2 (28 -> 14 -> 7 -> 4 -> 2) and the final map is
    averaged over its ``h x w`` positions (as MAML's code does), ``feature_dim = filters``.
    (Padding is 1 on every side; TensorFlow's ``"SAME"`` in MAML's code pads even sizes 0
    before / 1 after, which gives the same map sizes on a grid shifted by one pixel.)

    **Normalization** (a protocol choice; runs state it). Each mode computes, per block and channel, a
    mean and a biased variance and outputs ``y = gamma * (h - mean) / sqrt(var + eps) + beta``; no mode
    keeps running averages, so the same rule holds in meta-training and at test. Outputs of one batch
    element (task / sample / particle) never depend on another element's inputs.

    - ``"task"`` (transductive): the statistics of the ``N`` images passed together for one batch element,
      over ``(N, H, W)`` (MAML's mode). At test the prediction for a query image depends on which other
      query images are passed in the same call: one image alone gives a different answer (for a single
      image and a 1x1 map the block returns ``beta`` whatever the image). ``context`` is ignored.
    - ``"support"``: the statistics of the context images (``context=``, the task's support set) over
      ``(M, H, W)``, applied to the images ``x``; with no ``context``, those of ``x`` itself (``x`` is then
      the support set, as in an inner loop on it). A query image's output depends on the support set and
      itself only.
    - ``"tasknorm"``: TaskNorm-I (Bronskill, Gordon, Requeima, Nowozin & Turner, ICML 2020): the context
      moments blended with each image's own (instance) moments, ``mean = a mu_ctx + (1 - a) mu_img``,
      ``var = a (var_ctx + (mu_ctx - mean)^2) + (1 - a) (var_img + (mu_img - mean)^2)``, with
      ``a = sigmoid(scale * M + offset)`` per block, ``M`` the number of context images, ``scale`` and
      ``offset`` learned (``bn{k}.s``, ``bn{k}.o``; initialized at 0 and 0: ``a = 1/2``).
    - ``"instance"``: each image's own statistics over ``(H, W)``; ``context`` is ignored.
    - ``"none"``: no normalization and no ``bn*`` parameters.

    With batch statistics (``"task"``, ``"support"``) the conv biases cancel in the mean subtraction
    (their gradient is exactly 0); they are kept for parity with MAML's layout.

    ``gamma`` / ``beta`` (``bnK.g`` / ``bnK.b``) are part of the flat params, so an inner loop
    adapts them like every other weight. (MAML's TensorFlow code differs here: its batch norm
    has a learned ``beta`` only, outside the inner-loop fast weights.)

    **Parameters**, in order: ``conv{k}.w [F, Cin_k, 3, 3]``, ``conv{k}.b [F]``,
    ``bn{k}.g [F]``, ``bn{k}.b [F]`` (every mode but ``"none"``), ``bn{k}.s [1]``, ``bn{k}.o [1]``
    (``"tasknorm"`` only) for ``k < blocks``, then
    ``head.w [out_dim, feature_dim]``, ``head.b [out_dim]`` when ``out_dim`` is not None.

    :param out_dim: width of the linear head (MAML's classifier, ``n_way``); None returns the
        ``feature_dim`` features (VERSA's shared feature extractor).
    :param in_channels: ``Cin`` of the images (1 for Omniglot, 3 for miniImageNet).
    :param image_size: ``H = W`` of the (square) images.
    :param filters: channels ``F`` of every conv.
    :param blocks: number of conv blocks.
    :param downsample: one of :data:`DOWNSAMPLE_MODES`.
    :param batch_norm: one of :data:`BATCH_NORM_MODES`.
    :param bn_eps: the ``eps`` added to the variance.
    :param chunk_elements: on CPU, the batch elements go through in chunks of at most this many
        first-layer activation entries (:data:`CPU_CHUNK_ELEMENTS`; None: all at once). A speed
        knob only: outputs are the same up to float round-off.

    ``__call__(params, x, context=None)``: ``params [*B, D]``, ``x [*C, N, Cin, H, W]`` with ``*B`` and ``*C``
    broadcastable -> ``[*broadcast(B, C), N, output_dim]``; ``context [*C', M, Cin, H, W]`` (the support
    set; ``*C'`` broadcastable too) normalizes ``x`` in the ``"support"`` and ``"tasknorm"`` modes. ``params [D]`` (one shared net, e.g.
    VERSA) runs each layer as one ``conv2d`` over all images; batched params (e.g. MAML's adapted
    ``[T, D]``, or ``[S, T, D]``) run each layer as one grouped ``conv2d`` with a group per batch
    element. Both paths are twice differentiable (MAML's second-order meta-gradient).
    """

    def __init__(self, out_dim: int | None, in_channels: int = 1, image_size: int = 28,
                 filters: int = 64, blocks: int = 4, downsample: str = "maxpool",
                 batch_norm: str = "task", bn_eps: float = 1e-5, *,
                 chunk_elements: int | None = CPU_CHUNK_ELEMENTS, precision: str = "fp32"):
        if out_dim is not None and int(out_dim) < 1:
            raise ValueError(f"out_dim must be a positive int or None, got {out_dim}")
        for label, v in (("in_channels", in_channels), ("image_size", image_size),
                         ("filters", filters), ("blocks", blocks)):
            if int(v) < 1:
                raise ValueError(f"{label} must be >= 1, got {v}")
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; known: {list(PRECISIONS)}")
        self.precision = precision
        if downsample not in DOWNSAMPLE_MODES:
            raise ValueError(f"unknown downsample {downsample!r}; known: {list(DOWNSAMPLE_MODES)}")
        if batch_norm not in BATCH_NORM_MODES:
            raise ValueError(f"unknown batch_norm {batch_norm!r}; known: {list(BATCH_NORM_MODES)}")
        if not bn_eps > 0:
            raise ValueError(f"bn_eps must be > 0, got {bn_eps}")
        self.out_dim = None if out_dim is None else int(out_dim)
        self.in_channels, self.image_size = int(in_channels), int(image_size)
        self.filters, self.blocks = int(filters), int(blocks)
        self.downsample, self.batch_norm, self.bn_eps = downsample, batch_norm, float(bn_eps)

        # spatial size after each block
        sizes = [self.image_size]
        for _ in range(self.blocks):
            s = sizes[-1]
            s = s // 2 if downsample == "maxpool" else (s - 1) // 2 + 1  # pool floor / conv ceil
            if s < 1:
                raise ValueError(
                    f"image_size {image_size} is too small for {blocks} maxpool blocks "
                    f"(sizes {sizes + [s]})")
            sizes.append(s)
        self.spatial_sizes: tuple[int, ...] = tuple(sizes)
        """``H = W`` of the input and after each block."""
        final = sizes[-1]
        self.feature_dim = self.filters * (final * final if downsample == "maxpool" else 1)

        shapes: list[tuple[str, tuple[int, ...]]] = []
        cin = self.in_channels
        for k in range(self.blocks):
            shapes += [(f"conv{k}.w", (self.filters, cin, KERNEL, KERNEL)), (f"conv{k}.b", (self.filters,))]
            if batch_norm != "none":
                shapes += [(f"bn{k}.g", (self.filters,)), (f"bn{k}.b", (self.filters,))]
            if batch_norm == "tasknorm":
                shapes += [(f"bn{k}.s", (1,)), (f"bn{k}.o", (1,))]
            cin = self.filters
        if self.out_dim is not None:
            shapes += [("head.w", (self.out_dim, self.feature_dim)), ("head.b", (self.out_dim,))]
        self.spec = ParamSpec(shapes)
        self.input_shape = (self.in_channels, self.image_size, self.image_size)
        self.output_dim = self.feature_dim if self.out_dim is None else self.out_dim
        self._stride = 2 if downsample == "stride" else 1
        if chunk_elements is not None and int(chunk_elements) < 1:
            raise ValueError(f"chunk_elements must be >= 1 or None, got {chunk_elements}")
        self.chunk_elements = None if chunk_elements is None else int(chunk_elements)
        """CPU chunk budget (:data:`CPU_CHUNK_ELEMENTS`); None runs every element at once."""

    # ------------------------------------------------------------------ init / describe

    def init(self, generator: torch.Generator | None = None) -> Tensor:
        """Flat initial parameters ``[D]``, deterministic given ``generator``.

        torch.nn.Conv2d's / nn.Linear's defaults (``kaiming_uniform_(a=sqrt(5))``, which is
        ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``) for conv weights (``fan_in = Cin * 9``), conv
        biases, head weights and head bias (``fan_in = feature_dim``); batch-norm ``gamma = 1``,
        ``beta = 0``. Draws are taken in :attr:`spec` order.
        """
        named = {}
        for name, shape in self.spec.shapes.items():
            layer, kind = name.split(".")
            if layer.startswith("bn"):  # gamma 1; beta, TaskNorm's scale and offset 0
                named[name] = torch.ones(shape) if kind == "g" else torch.zeros(shape)
                continue
            w_shape = self.spec.shapes[f"{layer}.w"]
            fan_in = math.prod(w_shape[1:])
            bound = 1.0 / math.sqrt(fan_in)
            named[name] = (torch.rand(shape, generator=generator) * 2 - 1) * bound
        return self.spec.flatten(named)

    def describe(self) -> dict:
        return {"type": "conv4", "filters": self.filters, "blocks": self.blocks,
                "downsample": self.downsample, "batch_norm": self.batch_norm,
                "bn_eps": self.bn_eps, "out_dim": self.out_dim, "feature_dim": self.feature_dim,
                "in_channels": self.in_channels, "image_size": self.image_size,
                "num_params": self.num_params, "precision": self.precision}

    def __repr__(self) -> str:
        return (f"Conv4(out_dim={self.out_dim}, in_channels={self.in_channels}, "
                f"image_size={self.image_size}, filters={self.filters}, blocks={self.blocks}, "
                f"downsample={self.downsample!r}, batch_norm={self.batch_norm!r}; "
                f"D={self.num_params})")

    # ------------------------------------------------------------------ forward

    def _check(self, params: Tensor, x: Tensor) -> None:
        if params.dim() < 1 or params.shape[-1] != self.num_params:
            raise ValueError(f"{self!r} expects params [..., {self.num_params}], "
                             f"got {tuple(params.shape)}")
        if x.dim() < 4:
            raise ValueError(f"Conv4 expects images x [..., N, {self.in_channels}, "
                             f"{self.image_size}, {self.image_size}], got {tuple(x.shape)}")
        if tuple(x.shape[-3:]) != self.input_shape:
            raise ValueError(f"Conv4 expects images [..., N, Cin={self.in_channels}, "
                             f"H={self.image_size}, W={self.image_size}], got {tuple(x.shape)}")
        if x.shape[-4] < 1:
            raise ValueError(f"Conv4 needs at least one image per batch element, got {tuple(x.shape)}")

    def __call__(self, params: Tensor, x: Tensor, context: Tensor | None = None) -> Tensor:
        """``params [*B, D]``, ``x [*C, N, Cin, H, W]`` -> ``[*broadcast(B, C), N, output_dim]``.

        ``context [*C', M, Cin, H, W]``: the images whose statistics normalize ``x`` in the ``"support"`` and
        ``"tasknorm"`` modes (the task's support set); they go through the trunk with ``x`` (their own
        outputs are dropped). Other modes ignore it.

        With ``precision="bf16"`` the trunk runs under ``torch.autocast`` in bfloat16 (convolutions and the
        head's matmul; batch norm and everything after the trunk stay float32) and returns ``params``'s dtype.

        Leading dims are flattened to ``nb = prod(broadcast(B, C))`` batch elements. On CPU the
        elements are processed in chunks whose first activation has at most
        :attr:`chunk_elements` entries (whole elements only, so batch-norm statistics are
        unchanged); see :data:`CPU_CHUNK_ELEMENTS`.
        """
        self._check(params, x)
        if self.precision == "bf16" and torch.is_autocast_enabled(x.device.type) is False:
            with torch.autocast(x.device.type, dtype=torch.bfloat16):
                return self(params, x, context).to(params.dtype)
        m_ctx = 0
        if context is not None and self.batch_norm in CONTEXT_MODES:
            self._check(params, context)
            try:
                lead = torch.broadcast_shapes(context.shape[:-4], x.shape[:-4])
            except RuntimeError as e:
                raise ValueError(f"context batch dims {tuple(context.shape[:-4])} and image batch dims "
                                 f"{tuple(x.shape[:-4])} do not broadcast") from e
            m_ctx = context.shape[-4]
            x = torch.cat([context.expand(*lead, *context.shape[-4:]), x.expand(*lead, *x.shape[-4:])], dim=-4)
        out = self._call(params, x, m_ctx)
        return out[..., m_ctx:, :] if m_ctx else out

    def _call(self, params: Tensor, x: Tensor, m_ctx: int) -> Tensor:
        """:meth:`__call__` on ``x`` whose first ``m_ctx`` images (per batch element) are the context (0: none)."""
        b_shape, c_shape = params.shape[:-1], x.shape[:-4]
        try:
            batch = torch.broadcast_shapes(b_shape, c_shape)
        except RuntimeError as e:
            raise ValueError(f"params batch dims {tuple(b_shape)} and image batch dims "
                             f"{tuple(c_shape)} do not broadcast") from e
        nb, n = math.prod(batch), x.shape[-4]
        if nb == 0:
            return x.new_zeros(*batch, n, self.output_dim)
        shared = math.prod(b_shape) == 1  # one net for every batch element (e.g. VERSA)
        x_shared = math.prod(c_shape) == 1  # the same images for every batch element
        if shared:
            p = self.spec.unflatten(params.reshape(self.num_params))  # name: *shape
        else:
            flat = params.expand(*batch, self.num_params).reshape(nb, self.num_params)  # nb D
            p = self.spec.unflatten(flat)  # name: nb *shape
        if x_shared:
            xs = x.reshape(n, *self.input_shape)  # N Cin H W
        else:
            xs = x.expand(*batch, *x.shape[-4:]).reshape(nb, n, *self.input_shape)  # nb N Cin H W

        chunk = nb
        if self.chunk_elements is not None and x.device.type == "cpu":
            s1 = self.spatial_sizes[1] if self.downsample == "stride" else self.image_size
            chunk = max(1, self.chunk_elements // (n * self.filters * s1 * s1))
        outs = []
        for a in range(0, nb, chunk):
            m = min(chunk, nb - a)
            pc = p if shared else {k: v[a:a + m] for k, v in p.items()}  # name: m *shape
            xc = xs if x_shared else xs[a:a + m]  # (m) N Cin H W
            outs.append(self._forward(pc, xc, m, n, shared, x_shared, m_ctx))  # m N out
        out = outs[0] if len(outs) == 1 else torch.cat(outs)  # nb N out
        return out.reshape(*batch, n, self.output_dim)  # *batch N out

    def _forward(self, p: dict[str, Tensor], x: Tensor, nb: int, n: int, shared: bool,
                 x_shared: bool, m_ctx: int = 0) -> Tensor:
        """``nb`` batch elements -> ``[nb, N, output_dim]``.

        :param p: ``name -> [*shape]`` if ``shared`` else ``name -> [nb, *shape]``.
        :param x: ``[N, Cin, H, W]`` if ``x_shared`` else ``[nb, N, Cin, H, W]``.

        Every activation is laid out ``[N, nb*F, H, W]`` (channel ``element * F + filter``), so
        the per-element batch norm is ONE training-mode ``batch_norm`` over ``nb*F`` channels
        (statistics over ``(N, H, W)``) with no copies. Convs: shared params view the same
        memory as ``[N*nb, F, H, W]`` for one plain ``conv2d``; batched params run one
        ``conv2d(groups=nb)`` with the elements' filters stacked ``[nb*F, Cin, 3, 3]``; batched
        params on shared images start with one dense conv with the stacked filters.
        """
        f = self.filters
        if x_shared:
            h = x  # N Cin H W (nb = 1 when shared)
        else:
            h = x.transpose(0, 1).reshape(n, nb * self.in_channels, *self.input_shape[1:])  # N nb*Cin H W
        for k in range(self.blocks):
            w, b = p[f"conv{k}.w"], p[f"conv{k}.b"]
            if shared:
                h = h.reshape(n * nb, w.shape[1], *h.shape[-2:])  # N*nb Cin H W
                h = F.conv2d(h, w, b, stride=self._stride, padding=1)  # N*nb F H' W'
                h = h.reshape(n, nb * f, *h.shape[-2:])  # N nb*F H' W'
            else:
                w = w.reshape(nb * f, *w.shape[2:])  # nb*F Cin 3 3
                groups = 1 if (k == 0 and x_shared) else nb
                h = F.conv2d(h, w, b.reshape(nb * f), stride=self._stride, padding=1,
                             groups=groups)  # N nb*F H' W'
            if self.batch_norm != "none":
                g, beta = p[f"bn{k}.g"], p[f"bn{k}.b"]
                if shared:
                    g, beta = g.repeat(nb), beta.repeat(nb)  # nb*F
                g, beta = g.reshape(nb * f), beta.reshape(nb * f)
                if self.batch_norm == "task":
                    h = self._bn(h, g, beta)  # N nb*F H' W'
                else:
                    blend = None
                    if self.batch_norm == "tasknorm":  # a = sigmoid(scale * M + offset), one per element
                        sc, off = p[f"bn{k}.s"], p[f"bn{k}.o"]  # (nb) 1
                        a = torch.sigmoid(sc * float(m_ctx if m_ctx else n) + off).reshape(-1)  # 1 or nb
                        blend = a.repeat_interleave(f) if a.numel() > 1 else a.expand(nb * f)  # nb*F
                    h = self._norm(h, g, beta, m_ctx, blend)
            if self.downsample == "maxpool":
                # relu is monotone, so relu(maxpool(h)) == maxpool(relu(h)) (values and
                # gradients) and the relu runs on a quarter of the elements
                h = F.relu(F.max_pool2d(h, 2, 2))  # N nb*F H'/2 W'/2
            else:
                h = F.relu(h)  # N nb*F H' W'
        if self.downsample == "stride":
            feats = h.mean(dim=(-2, -1)).view(n, nb, f)  # N nb F
        else:
            feats = h.reshape(n, nb, self.feature_dim)  # N nb F*h*w
        feats = feats.transpose(0, 1)  # nb N feat
        if self.out_dim is None:
            return feats
        if shared:
            return F.linear(feats, p["head.w"], p["head.b"])  # nb N out
        return torch.baddbmm(p["head.b"].unsqueeze(1), feats, p["head.w"].transpose(1, 2))  # nb N out

    def _norm(self, h: Tensor, g: Tensor, b: Tensor, m_ctx: int, blend: Tensor | None) -> Tensor:
        """The non-transductive modes on ``h [N, C, H, W]``: ``"instance"`` (per image and channel over
        ``(H, W)``), ``"support"`` (per channel over the first ``m_ctx`` images, or all ``N`` when
        ``m_ctx`` is 0, and ``(H, W)``), ``"tasknorm"`` (their blend with weight ``blend [C]``)."""
        if self.batch_norm == "instance" or blend is not None:
            var_i, mean_i = torch.var_mean(h, dim=(2, 3), correction=0, keepdim=True)  # N C 1 1
        if self.batch_norm in CONTEXT_MODES:
            ctx = h[:m_ctx] if m_ctx else h
            var_c, mean_c = torch.var_mean(ctx, dim=(0, 2, 3), correction=0, keepdim=True)  # 1 C 1 1
        if self.batch_norm == "instance":
            mean, var = mean_i, var_i
        elif blend is None:
            mean, var = mean_c, var_c
        else:
            a = blend.view(1, -1, 1, 1)
            mean = a * mean_c + (1 - a) * mean_i  # N C 1 1
            var = a * (var_c + (mean_c - mean) ** 2) + (1 - a) * (var_i + (mean_i - mean) ** 2)
        scale = g.view(1, -1, 1, 1) * torch.rsqrt(var + self.bn_eps)
        return torch.addcmul(b.view(1, -1, 1, 1) - mean * scale, h, scale)

    def _bn(self, h: Tensor, g: Tensor, b: Tensor) -> Tensor:
        """Training-mode batch norm of ``h [N, C, H, W]`` per channel over ``(N, H, W)``."""
        if h.shape[0] * h.shape[2] * h.shape[3] > 1:
            return F.batch_norm(h, None, None, g, b, training=True, eps=self.bn_eps)
        # one value per channel (F.batch_norm refuses it): h - mean = 0, so the output is beta
        var, mean = torch.var_mean(h, dim=(0, 2, 3), correction=0, keepdim=True)  # 1 C 1 1
        scale = g.view(1, -1, 1, 1) * torch.rsqrt(var + self.bn_eps)  # 1 C 1 1
        return torch.addcmul(b.view(1, -1, 1, 1) - mean * scale, h, scale)  # N C H W
