"""Unet and shared layers: shapes, attention against plain-torch references, gradients, bf16, layout."""

import math

import pytest
import torch
import torch.nn.functional as F

from models import Unet
from models.layers import (
    Attention,
    Downsample,
    LinearAttention,
    RandomOrLearnedSinusoidalPosEmb,
    ResnetBlock,
    SinusoidalPosEmb,
    Upsample,
    WeightStandardizedConv2d,
    cast_tuple,
    default,
    divisible_by,
    exists,
    standardize_weight,
    unit_norm,
)

SMALL = dict(attn_heads=2, attn_dim_head=8)


def tiny_unet(**kwargs):
    torch.manual_seed(0)
    return Unet(**{"dim": 8, "dim_mults": (1, 2), **SMALL, **kwargs})


# Helpers.


def test_helpers():
    assert exists(0) and not exists(None)
    assert default(None, 3) == 3 and default(0, 3) == 0
    module = torch.nn.Identity()
    assert default(None, module) is module  # a callable default is returned, not called
    assert cast_tuple(2, 3) == (2, 2, 2) and cast_tuple((1, 2), 3) == (1, 2)
    assert divisible_by(8, 4) and not divisible_by(6, 4)


# Unet shapes.


@pytest.mark.parametrize(
    "kwargs, batch, size",
    [
        (dict(dim_mults=(1, 2)), 1, (8, 8)),
        (dict(dim_mults=(1, 2, 4)), 3, (8, 16)),
        (dict(dim_mults=(1, 1, 2, 2)), 2, (16, 8)),
        (dict(channels=1), 2, (8, 8)),
        (dict(channels=1, out_dim=2), 2, (8, 12)),
        (dict(init_dim=16), 1, (8, 8)),
        (dict(learned_sinusoidal_cond=True), 2, (8, 8)),
        (dict(random_fourier_features=True, learned_sinusoidal_dim=8), 2, (8, 8)),
        (dict(full_attn=True), 2, (8, 8)),
        (dict(full_attn=False), 2, (8, 8)),
        (dict(dim_mults=(1, 2, 4), full_attn=(True, False, True), attn_heads=(1, 2, 2)), 1, (8, 8)),
        (dict(dropout=0.1), 2, (8, 8)),
    ],
)
def test_unet_output_shape(kwargs, batch, size):
    net = tiny_unet(**kwargs)
    channels = kwargs.get("channels", 3)
    x = torch.randn(batch, channels, *size)
    out = net(x, torch.randint(0, 100, (batch,)))
    assert out.shape == (batch, kwargs.get("out_dim", channels), *size)
    assert torch.isfinite(out).all()
    assert net.out_dim == kwargs.get("out_dim", channels)
    assert net.downsample_factor == 2 ** (len(kwargs.get("dim_mults", (1, 2))) - 1)


def test_unet_cond_and_self_condition_change_the_output():
    net = tiny_unet(channels=2, cond_channels=3, self_condition=True)
    assert (net.channels, net.cond_channels, net.self_condition) == (2, 3, True)
    x, t = torch.randn(2, 2, 8, 8), torch.tensor([3, 7])
    cond = {"fields": torch.randn(2, 3, 8, 8)}
    out = net(x, t, cond=cond)
    assert out.shape == (2, 2, 8, 8)
    # x_self_cond=None means zeros.
    assert torch.allclose(out, net(x, t, cond=cond, x_self_cond=torch.zeros_like(x)))
    assert not torch.allclose(out, net(x, t, cond=cond, x_self_cond=torch.randn_like(x)))
    assert not torch.allclose(out, net(x, t, cond={"fields": torch.randn_like(cond["fields"])}))
    # Float timesteps and a scalar t are accepted too.
    assert torch.allclose(out, net(x, t.float(), cond=cond), atol=1e-6)
    assert torch.allclose(net(x, torch.tensor(5), cond=cond), net(x, torch.tensor([5, 5]), cond=cond))


def test_unet_params_vector_changes_the_output_through_the_time_embedding():
    net = tiny_unet(cond_dim=3)
    x, t, params = torch.randn(2, 3, 8, 8), torch.tensor([3, 7]), torch.randn(2, 3)
    out = net(x, t, cond={"params": params})
    assert not torch.allclose(out, net(x, t, cond={"params": params + 1}))
    # The vector only shifts the time embedding: with its MLP zeroed the network ignores it.
    for p in net.params_mlp[-1].parameters():
        torch.nn.init.zeros_(p)
    assert torch.allclose(net(x, t, cond={"params": params}), net(x, t, cond={"params": -params}))


def test_unet_timestep_changes_the_output():
    net = tiny_unet()
    x = torch.randn(1, 3, 8, 8)
    assert not torch.allclose(net(x, torch.tensor([1])), net(x, torch.tensor([50])))


@pytest.mark.parametrize(
    "kwargs, size, match",
    [
        (dict(dim_mults=(1, 2, 4)), (8, 10), r"8x10 .* downsample_factor 4"),
        (dict(dim_mults=(1, 2, 4, 8)), (12, 16), r"12x16 .* downsample_factor 8"),
    ],
)
def test_unet_bad_spatial_size(kwargs, size, match):
    net = tiny_unet(**kwargs)
    with pytest.raises(ValueError, match=match):
        net(torch.randn(1, 3, *size), torch.tensor([0]))


def test_unet_bad_inputs():
    with pytest.raises(ValueError, match="cond_channels=2"):
        tiny_unet(cond_channels=2)(torch.randn(1, 3, 8, 8), torch.tensor([0]))
    with pytest.raises(ValueError, match="cond_channels=0"):
        tiny_unet()(torch.randn(1, 3, 8, 8), torch.tensor([0]), cond={"fields": torch.randn(1, 2, 8, 8)})
    with pytest.raises(ValueError, match="cond_dim=0"):
        tiny_unet()(torch.randn(1, 3, 8, 8), torch.tensor([0]), cond={"params": torch.randn(1, 2)})
    with pytest.raises(ValueError, match=r"cond_dim=2: pass cond\['params'\] of shape \[1, 2\]"):
        tiny_unet(cond_dim=2)(torch.randn(1, 3, 8, 8), torch.tensor([0]), cond={"params": torch.randn(1, 3)})
    with pytest.raises(ValueError, match="cond keys"):
        tiny_unet()(torch.randn(1, 3, 8, 8), torch.tensor([0]), cond={"frames": torch.randn(1, 2)})
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        tiny_unet()(torch.randn(1, 1, 8, 8), torch.tensor([0]))
    with pytest.raises(ValueError, match="full_attn"):
        tiny_unet(full_attn=(True,))
    with pytest.raises(ValueError, match="resnet_block_groups"):
        tiny_unet(dim=12)


def test_unet_gradients_reach_every_parameter():
    net = tiny_unet(dim_mults=(1, 2, 2), learned_sinusoidal_cond=True, self_condition=True, cond_channels=1,
                    cond_dim=2)
    x = torch.randn(2, 3, 8, 8)
    cond = {"fields": torch.randn(2, 1, 8, 8), "params": torch.randn(2, 2)}
    out = net(x, torch.tensor([2, 9]), cond=cond, x_self_cond=torch.randn_like(x))
    out.square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_random_fourier_features_are_fixed():
    net = tiny_unet(random_fourier_features=True)
    frozen = [name for name, p in net.named_parameters() if not p.requires_grad]
    assert frozen == ["time_mlp.0.weights"]
    assert "time_mlp.0.weights" in net.state_dict()  # saved with the checkpoint all the same


def test_unet_bf16_autocast_close_to_fp32():
    net = tiny_unet(dim_mults=(1, 2, 2))
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 30])
    reference = net(x, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, t)
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    rel = (out.float() - reference).norm() / reference.norm()
    assert rel < 0.05
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out.float().mean().backward()  # backward through bf16 autocast too


def test_unet_channels_last_same_output():
    net = tiny_unet(dim_mults=(1, 2, 2), cond_channels=1)
    x, t, fields = torch.randn(2, 3, 8, 8), torch.tensor([4, 20]), torch.randn(2, 1, 8, 8)
    reference = net(x, t, cond={"fields": fields})
    net_cl = net.to(memory_format=torch.channels_last)
    out = net_cl(
        x.to(memory_format=torch.channels_last), t, cond={"fields": fields.to(memory_format=torch.channels_last)}
    )
    assert torch.allclose(out, reference, atol=1e-5)


# Layers.


def test_sinusoidal_pos_emb_formula():
    dim, theta = 8, 10000
    t = torch.tensor([0.0, 1.0, 37.0])
    emb = SinusoidalPosEmb(dim, theta)(t)
    half = dim // 2
    for i, ti in enumerate(t.tolist()):
        for j in range(half):
            freq = theta ** (-j / (half - 1))
            assert emb[i, j].item() == pytest.approx(math.sin(ti * freq), abs=1e-5)
            assert emb[i, half + j].item() == pytest.approx(math.cos(ti * freq), abs=1e-5)
    with pytest.raises(ValueError, match="even"):
        SinusoidalPosEmb(7)


def test_fourier_pos_emb_formula():
    emb_layer = RandomOrLearnedSinusoidalPosEmb(6, is_random=False)
    t = torch.tensor([0.25, 3.0])
    emb = emb_layer(t)
    assert emb.shape == (2, 7)
    args = t[:, None] * emb_layer.weights[None] * 2 * math.pi
    assert torch.allclose(emb, torch.cat((t[:, None], args.sin(), args.cos()), dim=-1))
    assert emb_layer.weights.requires_grad
    assert not RandomOrLearnedSinusoidalPosEmb(6, is_random=True).weights.requires_grad


@pytest.mark.parametrize("dtype, eps", [(torch.float32, 1e-5), (torch.float64, 1e-3)])
def test_weight_standardized_conv(dtype, eps):
    torch.manual_seed(0)
    conv = WeightStandardizedConv2d(3, 4, 3, padding=1).to(dtype)
    x = torch.randn(2, 3, 5, 5, dtype=dtype)
    w = conv.weight
    flat = w.reshape(4, -1)
    w_std = (flat - flat.mean(1, keepdim=True)) / (flat.var(1, unbiased=False, keepdim=True) + eps).sqrt()
    expected = F.conv2d(x, w_std.reshape_as(w), conv.bias, padding=1)
    assert torch.allclose(conv(x), expected, atol=1e-5)


def _reference_standardize(w, eps):
    dims = tuple(range(1, w.ndim))
    return (w - w.mean(dims, keepdim=True)) / (w.var(dims, correction=0, keepdim=True) + eps).sqrt()


@pytest.mark.parametrize("shape", [(4, 3, 3, 3), (5, 2, 3, 3, 3), (6, 7, 1, 1)])
def test_standardize_weight_values_and_gradient_match_autograd_of_the_formula(shape):
    """The closed-form backward of the weight standardization equals autograd through mean and var."""
    torch.manual_seed(0)
    w = (torch.randn(shape, dtype=torch.float64) * 3 + 1).requires_grad_()
    g = torch.randn(shape, dtype=torch.float64)
    out = standardize_weight(w, 1e-3)
    expected = _reference_standardize(w, 1e-3)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    (grad,) = torch.autograd.grad(out, w, g)
    (expected_grad,) = torch.autograd.grad(expected, w, g)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda v: standardize_weight(v, 1e-3), (w,))


@pytest.mark.parametrize("shape", [(3, 5, 4, 4), (2, 6, 3, 4, 4), (4, 8)])
def test_unit_norm_matches_normalize_values_and_gradient(shape):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    g = torch.randn(shape, dtype=torch.float64)
    out, expected = unit_norm(x), F.normalize(x, dim=1)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(expected, x, g)[0],
                               rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(unit_norm, (x,))


def test_unit_norm_zero_vectors_and_low_precision():
    x = torch.zeros(2, 4, 3, 3, requires_grad=True)
    out = unit_norm(x)
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isfinite(grad).all()
    # Channels of 300 square to 90,000, past fp16's range: the norm is taken in fp32 and the output keeps fp16.
    big = torch.full((1, 4, 2, 2), 300.0, dtype=torch.float16, requires_grad=True)
    out = unit_norm(big)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), torch.full((1, 4, 2, 2), 0.5))
    (grad,) = torch.autograd.grad(out.float().sum(), big)
    assert grad.dtype == torch.float16 and torch.isfinite(grad).all()


def test_resnet_block_shapes_and_time_modulation():
    torch.manual_seed(0)
    block = ResnetBlock(8, 16, time_emb_dim=12, groups=4)
    x = torch.randn(2, 8, 6, 6)
    out = block(x, torch.randn(2, 12))
    assert out.shape == (2, 16, 6, 6)
    assert not torch.allclose(out, block(x, torch.randn(2, 12)))
    same = ResnetBlock(8, 8, groups=4)
    assert isinstance(same.res_conv, torch.nn.Identity) and same(x).shape == x.shape


def test_downsample_is_pixel_unshuffle_then_1x1():
    torch.manual_seed(0)
    down = Downsample(2, 5)
    x = torch.randn(1, 2, 4, 6)
    conv = down[1]
    expected = F.conv2d(F.pixel_unshuffle(x, 2), conv.weight, conv.bias)
    assert torch.allclose(down(x), expected, atol=1e-6)
    up = Upsample(5, 2)
    assert up(down(x)).shape == x.shape


def _randomize_norm_gains(layer):
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith(".g"):
                p.copy_(torch.rand_like(p) + 0.5)


def _rms_norm(x, g):  # x: [B, C, N]
    return x / x.norm(dim=1, keepdim=True).clamp(min=1e-12) * g[None, :, None] * math.sqrt(x.shape[1])


def _qkv(layer, x, heads):
    """Plain-torch pre-norm and 1x1 projection: [B, C, H, W] -> q, k, v as [B, heads, N, d]."""
    b, c, h, w = x.shape
    tokens = _rms_norm(x.reshape(b, c, h * w), layer.norm.g)
    qkv = layer.to_qkv.weight[:, :, 0, 0] @ tokens  # [B, 3 * heads * d, N]
    q, k, v = qkv.chunk(3, dim=1)
    return [z.reshape(b, heads, -1, h * w).transpose(-1, -2) for z in (q, k, v)]


def _project_out(conv, out, shape):  # out: [B, heads, N, d] -> [B, C, H, W]
    b, _, h, w = shape
    out = out.transpose(-1, -2).reshape(b, -1, h * w)
    out = conv.weight[:, :, 0, 0] @ out + conv.bias[None, :, None]
    return out


def test_attention_matches_naive_reference():
    torch.manual_seed(0)
    heads, dim_head = 3, 5
    layer = Attention(6, heads=heads, dim_head=dim_head)
    _randomize_norm_gains(layer)
    x = torch.randn(2, 6, 4, 3)
    q, k, v = _qkv(layer, x, heads)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dim_head), dim=-1)
    expected = _project_out(layer.to_out, weights @ v, x.shape).reshape(x.shape)
    assert torch.allclose(layer(x), expected, atol=1e-5)


def test_linear_attention_matches_naive_reference():
    torch.manual_seed(0)
    heads, dim_head = 3, 5
    layer = LinearAttention(6, heads=heads, dim_head=dim_head)
    _randomize_norm_gains(layer)
    x = torch.randn(2, 6, 4, 3)
    q, k, v = _qkv(layer, x, heads)
    q = torch.softmax(q, dim=-1)  # over d
    k = torch.softmax(k, dim=-2)  # over tokens
    out = q @ (k.transpose(-1, -2) @ v)
    out = _project_out(layer.to_out[0], out, x.shape)
    expected = _rms_norm(out, layer.to_out[1].g).reshape(x.shape)
    assert torch.allclose(layer(x), expected, atol=1e-5)


@pytest.mark.parametrize("layer_cls", [Attention, LinearAttention])
def test_attention_bf16(layer_cls):
    torch.manual_seed(0)
    layer = layer_cls(8, heads=2, dim_head=4)
    x = torch.randn(1, 8, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert torch.isfinite(out).all()
    assert torch.allclose(out.float(), layer(x), atol=0.1)
