"""Conv4: shapes, equivalence with a per-task reference, batch-norm protocol, 1st/2nd-order grads."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

from pyro_meta.nn import Conv4

DOWNSAMPLES = ["maxpool", "stride"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are small: intra-op threads only add overhead, and on a loaded 2-core box
    OpenMP threads spinning at barriers made the double-backward checks ~100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _params(net: Conv4, *batch: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """Initial params plus noise, so gamma / beta / biases are not at their trivial values."""
    g = torch.Generator().manual_seed(seed)
    p0 = net.init(g).to(dtype)
    return p0 + 0.3 * torch.randn(*batch, net.num_params, generator=g, dtype=dtype)


def _images(*shape: int, seed: int = 1, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _reference(net: Conv4, params: torch.Tensor, x: torch.Tensor, ctx: torch.Tensor | None = None) -> torch.Tensor:
    """One task by hand: ``params [D]``, ``x [N, Cin, H, W]`` -> ``[N, output_dim]``.

    Plain per-task ops in the textbook order (conv, normalization written out, relu, then pool), reading
    the weights from the unflattened params. ``ctx [M, ...]`` (the support-statistics modes): it goes
    through the trunk with ``x``, its moments normalize (support: the context's; instance: each image's;
    tasknorm: their blend with a = sigmoid(s M + o); task: all images passed); only ``x``'s outputs return.
    """
    p = net.spec.unflatten(params)
    m = 0 if ctx is None else ctx.shape[0]
    h = x if ctx is None else torch.cat([ctx, x])
    stride = 2 if net.downsample == "stride" else 1
    for k in range(net.blocks):
        h = F.conv2d(h, p[f"conv{k}.w"], p[f"conv{k}.b"], stride=stride, padding=1)
        if net.batch_norm != "none":
            c = h[:m] if m else h
            mu_c = c.mean(dim=(0, 2, 3), keepdim=True)
            var_c = ((c - mu_c) ** 2).mean(dim=(0, 2, 3), keepdim=True)  # biased
            mu_i = h.mean(dim=(2, 3), keepdim=True)
            var_i = ((h - mu_i) ** 2).mean(dim=(2, 3), keepdim=True)
            if net.batch_norm in ("task", "support"):
                mean, var = mu_c, var_c
            elif net.batch_norm == "instance":
                mean, var = mu_i, var_i
            else:
                a = torch.sigmoid(p[f"bn{k}.s"] * (m or h.shape[0]) + p[f"bn{k}.o"])
                mean = a * mu_c + (1 - a) * mu_i
                var = a * (var_c + (mu_c - mean) ** 2) + (1 - a) * (var_i + (mu_i - mean) ** 2)
            h = (h - mean) / torch.sqrt(var + net.bn_eps)
            h = h * p[f"bn{k}.g"].view(1, -1, 1, 1) + p[f"bn{k}.b"].view(1, -1, 1, 1)
        h = F.relu(h)
        if net.downsample == "maxpool":
            h = F.max_pool2d(h, kernel_size=2, stride=2)
    feats = h.mean(dim=(2, 3)) if net.downsample == "stride" else h.flatten(1)
    out = feats if net.out_dim is None else feats @ p["head.w"].T + p["head.b"]
    return out[m:]


# ------------------------------------------------------------------ construction / shapes


@pytest.mark.parametrize("downsample,sizes", [("maxpool", (28, 14, 7, 3, 1)),
                                              ("stride", (28, 14, 7, 4, 2))])
def test_spatial_sizes_and_feature_dim(downsample, sizes):
    net = Conv4(5, filters=8, downsample=downsample)
    assert net.spatial_sizes == sizes
    assert net.feature_dim == 8 and net.output_dim == 5
    assert net.input_shape == (1, 28, 28)
    # maxpool with a final map larger than 1x1 flattens it: 32 -> 16 -> 8 -> 4 -> 2
    big = Conv4(None, in_channels=3, image_size=32, filters=8, downsample="maxpool")
    assert big.feature_dim == 8 * 2 * 2 and big.output_dim == big.feature_dim


def test_parameter_layout_and_describe():
    net = Conv4(5, in_channels=3, filters=8, blocks=4)
    shapes = dict(net.spec.shapes)
    assert list(shapes)[:4] == ["conv0.w", "conv0.b", "bn0.g", "bn0.b"]
    assert shapes["conv0.w"] == (8, 3, 3, 3) and shapes["conv3.w"] == (8, 8, 3, 3)
    assert shapes["head.w"] == (5, 8) and shapes["head.b"] == (5,)
    conv = 8 * 3 * 9 + 8 + 3 * (8 * 8 * 9 + 8)
    assert net.num_params == conv + 4 * 2 * 8 + 5 * 8 + 5
    assert Conv4(5, in_channels=3, filters=8, batch_norm="none").num_params == conv + 5 * 8 + 5
    assert Conv4(None, in_channels=3, filters=8).num_params == conv + 4 * 2 * 8
    d = net.describe()
    assert d["type"] == "conv4" and d["num_params"] == net.num_params
    for key in ("filters", "blocks", "downsample", "batch_norm", "out_dim", "image_size"):
        assert key in d


def test_init_is_deterministic_and_follows_torch_defaults():
    net = Conv4(5, filters=8)
    a = net.init(torch.Generator().manual_seed(3))
    b = net.init(torch.Generator().manual_seed(3))
    c = net.init(torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    p = net.spec.unflatten(a)
    for k in range(4):
        fan_in = math.prod(net.spec.shapes[f"conv{k}.w"][1:])
        assert p[f"conv{k}.w"].abs().max() <= 1 / math.sqrt(fan_in)
        assert p[f"conv{k}.w"].abs().max() > 0.5 / math.sqrt(fan_in)  # U(-b, b), not tiny
        assert torch.equal(p[f"bn{k}.g"], torch.ones(8)) and torch.equal(p[f"bn{k}.b"], torch.zeros(8))
    assert p["head.w"].abs().max() <= 1 / math.sqrt(8)


@pytest.mark.parametrize("downsample", DOWNSAMPLES)
@pytest.mark.parametrize("out_dim", [None, 5])
def test_output_shapes(downsample, out_dim):
    net = Conv4(out_dim, filters=8, downsample=downsample)
    t, n, s = 3, 4, 2
    x = torch.randn(t, n, 1, 28, 28)
    p = net.init(torch.Generator().manual_seed(0))
    o = net.output_dim
    assert net(p, x).shape == (t, n, o)  # B = (), C = (T,)
    assert net(p, x[0]).shape == (n, o)  # B = (), C = ()
    assert net(p.expand(t, -1), x).shape == (t, n, o)  # B = (T,)
    assert net(p.expand(s, t, -1), x).shape == (s, t, n, o)  # B = (S, T)
    assert net(p.expand(s, 1, -1), x).shape == (s, t, n, o)  # B = (S, 1) broadcasts over tasks
    assert net(p.expand(t, -1), x[0]).shape == (t, n, o)  # B = (T,), C = (): images shared
    assert net(p.expand(1, -1), x).shape == (t, n, o)  # B = (1,) takes the shared path
    assert net(p, x).dtype == torch.float32


# ------------------------------------------------------------------ equivalence


@pytest.mark.parametrize("downsample", DOWNSAMPLES)
@pytest.mark.parametrize("batch_norm", ["task", "none"])
@pytest.mark.parametrize("out_dim", [None, 4])
def test_batched_paths_match_a_per_task_reference(downsample, batch_norm, out_dim):
    net = Conv4(out_dim, filters=4, downsample=downsample, batch_norm=batch_norm)
    s, t, n = 2, 3, 5
    params = _params(net, s, t)  # S T D
    x = _images(t, n, 1, 28, 28)
    ref = torch.stack([torch.stack([_reference(net, params[i, j], x[j]) for j in range(t)])
                       for i in range(s)])  # S T N out
    assert_close(net(params, x), ref, rtol=1e-9, atol=1e-10, msg="grouped [S, T, D]")
    assert_close(net(params[0], x), ref[0], rtol=1e-9, atol=1e-10, msg="grouped [T, D]")
    # shared weights: one conv2d over all tasks' images, still per-task BN statistics
    ref_shared = torch.stack([_reference(net, params[0, 0], x[j]) for j in range(t)])
    assert_close(net(params[0, 0], x), ref_shared, rtol=1e-9, atol=1e-10, msg="shared")
    assert_close(net(params[0, 0].expand(t, -1), x), ref_shared, rtol=1e-9, atol=1e-10,
                 msg="shared params expanded take the grouped path")
    # images shared by every element (B = (T,), C = ()): a dense first conv
    ref_x = torch.stack([_reference(net, params[0, j], x[0]) for j in range(t)])
    assert_close(net(params[0], x[0]), ref_x, rtol=1e-9, atol=1e-10, msg="shared images")


def test_flattened_final_map_matches_reference():
    net = Conv4(3, in_channels=3, image_size=20, filters=4, downsample="maxpool")  # 20->10->5->2->1
    net32 = Conv4(3, in_channels=3, image_size=32, filters=4, blocks=3)  # 32->16->8->4: 4x4 map
    for m in (net, net32):
        params = _params(m, 2)
        x = _images(2, 3, 3, m.image_size, m.image_size)
        ref = torch.stack([_reference(m, params[j], x[j]) for j in range(2)])
        assert_close(m(params, x), ref, rtol=1e-9, atol=1e-10)
        ref_shared = torch.stack([_reference(m, params[0], x[j]) for j in range(2)])
        assert_close(m(params[0], x), ref_shared, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("downsample", DOWNSAMPLES)
def test_cpu_chunking_over_batch_elements_does_not_change_outputs(downsample):
    t, n = 5, 3
    chunked = Conv4(4, filters=4, downsample=downsample, chunk_elements=1)  # 1 element/chunk
    first = n * 4 * chunked.spatial_sizes[1 if downsample == "stride" else 0] ** 2
    uneven = Conv4(4, filters=4, downsample=downsample, chunk_elements=2 * first)  # 2, 2, 1
    whole = Conv4(4, filters=4, downsample=downsample, chunk_elements=None)
    params = _params(whole, 2, t)
    x = _images(t, n, 1, 28, 28)
    for p, xx in [(params, x), (params[0], x), (params[0, 0], x), (params[0], x[0])]:
        ref = whole(p, xx)
        assert_close(chunked(p, xx), ref, rtol=1e-12, atol=1e-13)
        assert_close(uneven(p, xx), ref, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("shared", [True, False])
def test_task_batch_norm_statistics_are_per_task(shared):
    net = Conv4(5, filters=4)
    params = _params(net) if shared else _params(net, 3)
    x = _images(3, 6, 1, 28, 28)
    out = net(params, x)
    x2 = x.clone()
    x2[1] = 5 * x2[1] + 2  # other images AND other statistics for task 1 only
    out2 = net(params, x2)
    assert torch.equal(out2[0], out[0]) and torch.equal(out2[2], out[2])
    assert (out2[1] - out[1]).abs().max() > 1e-3
    # BN statistics depend on the other points of the same task (transductive within a task)
    x3 = x.clone()
    x3[0, 1:] = 3 * x3[0, 1:]
    assert (net(params, x3)[0, 0] - out[0, 0]).abs().max() > 1e-3


@pytest.mark.parametrize("shared", [True, False])
def test_task_batch_norm_normalizes_per_task_and_channel(shared):
    """A 1-block stride net on 2x2 images: the conv gives 1x1 maps and the features are
    ``relu(gamma * z + beta)`` with ``z`` normalized over each task's N points."""
    net = Conv4(None, image_size=2, filters=3, blocks=1, downsample="stride")
    named = net.spec.unflatten(_params(net, seed=5))
    named = {k: v.clone() for k, v in named.items()}
    named["bn0.g"].fill_(1.0)
    named["bn0.b"].fill_(10.0)  # relu is then the identity (|z| <= sqrt(N - 1))
    params = net.spec.flatten(named)
    if not shared:
        params = params.expand(4, -1)
    x = 3 * _images(4, 7, 1, 2, 2) + torch.arange(4, dtype=torch.float64).view(4, 1, 1, 1, 1)
    z = net(params, x) - 10.0  # T N F
    assert_close(z.mean(dim=1), torch.zeros(4, 3), atol=1e-12)
    assert_close(z.var(dim=1, correction=0), torch.ones(4, 3), rtol=1e-4)


def test_single_value_per_channel_batch_norm_gives_beta():
    """N = 1 image whose last map is 1x1: batch norm has one value per channel -> beta."""
    net = Conv4(None, image_size=2, filters=3, blocks=1, downsample="stride")
    named = {k: v.clone() for k, v in net.spec.unflatten(_params(net, seed=2)).items()}
    named["bn0.b"] = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    params = net.spec.flatten(named)
    x = _images(2, 1, 1, 2, 2)
    expected = torch.tensor([0.5, 0.0, 2.0], dtype=torch.float64).expand(2, 1, 3)
    assert_close(net(params, x), expected, atol=1e-12)
    assert_close(net(params.expand(2, -1), x), expected, atol=1e-12)


@pytest.mark.parametrize("downsample", DOWNSAMPLES)
@pytest.mark.parametrize("shared", [True, False])
def test_permuting_points_permutes_outputs(downsample, shared):
    net = Conv4(5, filters=4, downsample=downsample)
    params = _params(net) if shared else _params(net, 2)
    x = _images(2, 6, 1, 28, 28)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    assert_close(net(params, x[:, perm]), net(params, x)[:, perm], rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ gradients (float64)


def _tiny(downsample: str, chunk_elements: int | None = None) -> tuple[Conv4, torch.Tensor, torch.Tensor]:
    net = Conv4(2, image_size=8, filters=2, blocks=2, downsample=downsample,
                chunk_elements=chunk_elements)
    return net, _params(net, 2, seed=11), _images(2, 4, 1, 8, 8, seed=12)


@pytest.mark.parametrize("downsample", DOWNSAMPLES)
def test_first_and_second_derivatives_match_finite_differences(downsample):
    net, params, x = _tiny(downsample)
    params.requires_grad_()
    assert torch.autograd.gradcheck(lambda p: net(p, x), (params,), eps=1e-6, atol=1e-6)
    assert torch.autograd.gradgradcheck(lambda p: net(p, x), (params,), eps=1e-6, atol=1e-5)
    shared = params[0].detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda p: net(p, x), (shared,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("downsample,chunk_elements", [("maxpool", None), ("stride", None),
                                                       ("maxpool", 1)])
def test_maml_meta_gradient_through_one_inner_step(downsample, chunk_elements):
    """d/d theta of L_query(theta - lr * dL_support/dtheta) (create_graph) vs finite differences."""
    net, _, x = _tiny(downsample, chunk_elements)
    theta0 = _params(net, seed=13).requires_grad_()  # D
    xs, xq = x[:, :2], x[:, 2:]  # 2 tasks, 2 support + 2 query images each
    ys, yq = torch.tensor([[0, 1], [1, 0]]), torch.tensor([[1, 0], [0, 1]])
    lr = 0.5

    def meta_loss(theta: torch.Tensor) -> torch.Tensor:
        th = theta.expand(2, -1)  # T D: one adapted copy per task (the grouped path)
        support = F.cross_entropy(net(th, xs).reshape(-1, 2), ys.reshape(-1), reduction="sum")
        (g,) = torch.autograd.grad(support, th, create_graph=True)
        return F.cross_entropy(net(th - lr * g, xq).reshape(-1, 2), yq.reshape(-1))

    assert torch.autograd.gradcheck(meta_loss, (theta0,), eps=1e-6, atol=1e-7, rtol=1e-5)
    # the second-order term is really there: first-order MAML gives another gradient
    (g2,) = torch.autograd.grad(meta_loss(theta0), theta0)
    th = theta0.expand(2, -1)
    support = F.cross_entropy(net(th, xs).reshape(-1, 2), ys.reshape(-1), reduction="sum")
    (g,) = torch.autograd.grad(support, th)
    (g1,) = torch.autograd.grad(
        F.cross_entropy(net(th - lr * g, xq).reshape(-1, 2), yq.reshape(-1)), theta0)
    assert (g2 - g1).abs().max() > 1e-3 * g2.abs().max()


# ------------------------------------------------------------------ bad input


def test_bad_inputs_raise_clear_errors():
    net = Conv4(5, filters=4)
    p = net.init()
    x = torch.randn(2, 3, 1, 28, 28)
    with pytest.raises(ValueError, match="params"):
        net(p[:-1], x)
    with pytest.raises(ValueError, match="Cin=1"):
        net(p, torch.randn(2, 3, 3, 28, 28))
    with pytest.raises(ValueError, match="H=28"):
        net(p, torch.randn(2, 3, 1, 32, 32))
    with pytest.raises(ValueError, match="images"):
        net(p, torch.randn(28, 28))
    with pytest.raises(ValueError, match="at least one image"):
        net(p, torch.randn(2, 0, 1, 28, 28))
    with pytest.raises(ValueError, match="broadcast"):
        net(p.expand(3, -1), x)
    with pytest.raises(ValueError, match="downsample"):
        Conv4(5, downsample="avgpool")
    with pytest.raises(ValueError, match="batch_norm"):
        Conv4(5, batch_norm="running")
    with pytest.raises(ValueError, match="too small"):
        Conv4(5, image_size=8, blocks=4)
    with pytest.raises(ValueError, match="out_dim"):
        Conv4(0)
    with pytest.raises(ValueError, match="filters"):
        Conv4(5, filters=0)
    with pytest.raises(ValueError, match="chunk_elements"):
        Conv4(5, chunk_elements=0)


def test_bf16_trunk_is_close_to_fp32_and_returns_float32():
    """precision="bf16": the trunk runs under autocast (bfloat16 convolutions) and hands back float32
    logits within bfloat16's precision of the float32 trunk's; gradients reach every weight."""
    from pyro_meta.nn.conv import Conv4

    fp32 = Conv4(5, filters=8)
    bf16 = Conv4(5, filters=8, precision="bf16")
    params = fp32.init(torch.Generator().manual_seed(0)).expand(3, -1).clone().requires_grad_()
    x = torch.rand(3, 4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    a, b = fp32(params, x), bf16(params, x)
    assert b.dtype == torch.float32 and b.shape == a.shape
    assert (a - b).abs().max() < 0.05 * a.abs().max()
    assert (a - b).abs().max() > 0  # it did run in bfloat16
    b.sum().backward()
    assert params.grad is not None and torch.isfinite(params.grad).all() and params.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="precision"):
        Conv4(5, precision="fp16")


# ------------------------------------------------------------------ normalization without the query set
@pytest.mark.parametrize("downsample", DOWNSAMPLES)
@pytest.mark.parametrize("batch_norm", ["support", "tasknorm", "instance"])
def test_context_modes_match_a_per_task_reference(downsample, batch_norm):
    net = Conv4(3, filters=4, downsample=downsample, batch_norm=batch_norm)
    s, t, m, n = 2, 3, 4, 5
    params = _params(net, s, t)  # S T D
    x, ctx = _images(t, n, 1, 28, 28), _images(t, m, 1, 28, 28, seed=5)
    ref = torch.stack([torch.stack([_reference(net, params[i, j], x[j], ctx[j]) for j in range(t)])
                       for i in range(s)])  # S T N out
    assert_close(net(params, x, context=ctx), ref, rtol=1e-9, atol=1e-10, msg="grouped [S, T, D]")
    ref_shared = torch.stack([_reference(net, params[0, 0], x[j], ctx[j]) for j in range(t)])
    assert_close(net(params[0, 0], x, context=ctx), ref_shared, rtol=1e-9, atol=1e-10, msg="shared")
    if batch_norm != "instance":  # no context: the statistics of x itself (x is the support set)
        own = torch.stack([_reference(net, params[0, j], x[j], x[j]) for j in range(t)])
        assert_close(net(params[0], x), own, rtol=1e-9, atol=1e-10, msg="no context")


@pytest.mark.parametrize("batch_norm", ["support", "tasknorm", "instance"])
def test_context_modes_first_and_second_derivatives_match_finite_differences(batch_norm):
    """Through the weights and the context images (an inner loop on the support set differentiates both
    paths): gradcheck and gradgradcheck in float64."""
    net = Conv4(2, image_size=8, filters=2, blocks=2, downsample="maxpool", batch_norm=batch_norm)
    params = _params(net, 2, seed=11).requires_grad_()
    x, ctx = _images(2, 3, 1, 8, 8, seed=12), _images(2, 2, 1, 8, 8, seed=13)
    assert torch.autograd.gradcheck(lambda p: net(p, x, context=ctx), (params,), eps=1e-6, atol=1e-6)
    assert torch.autograd.gradgradcheck(lambda p: net(p, x, context=ctx), (params,), eps=1e-6, atol=1e-5)
