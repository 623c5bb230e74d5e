"""Unet3D and its 3D blocks: shapes, which ops mix frames, rotary and relative position bias against plain-torch
references, gradients, bf16, training and sampling through GaussianDiffusion, bad inputs, parameter counts."""

import math

import pytest
import torch
import torch.nn.functional as F

from models import GaussianDiffusion, Unet3D
from models.layers import (
    Block,
    ResnetBlock,
    WeightStandardizedConv2d,
    WeightStandardizedConv3d,
    apply_rotary,
    rotate_half,
)
from models.unet3d import KINDS, PerFrame, RelativePositionBias, TemporalAttention

SMALL = dict(dim=8, dim_mults=(1, 2), attn_heads=2, attn_dim_head=8)


def tiny_unet3d(kind="factorized", **kwargs):
    torch.manual_seed(0)
    return Unet3D(**{**SMALL, "kind": kind, **kwargs})


def _cond(net, batch, frames, size):
    cond = {}
    if net.cond_channels:
        cond["fields"] = torch.randn(batch, net.cond_channels, frames, *size)
    if net.cond_dim:
        cond["params"] = torch.randn(batch, net.cond_dim)
    return cond or None


def _zero_temporal_attention(net):
    """Every temporal attention block becomes the identity residual: its output projection is zeroed."""
    count = 0
    for m in net.modules():
        if isinstance(m, TemporalAttention):
            torch.nn.init.zeros_(m.to_out.weight)
            torch.nn.init.zeros_(m.to_out.bias)
            count += 1
    assert count == 2 * len(net.downs) + 1  # one per encoder and decoder level, one in the middle


# Shapes.


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "kwargs, batch, frames, size",
    [
        (dict(), 1, 1, (8, 8)),
        (dict(self_condition=True), 2, 2, (8, 8)),
        (dict(channels=1, cond_channels=2), 1, 5, (8, 16)),
        (dict(cond_dim=3), 3, 8, (8, 8)),
        # The research layout: 3 state channels generated, 4 static fields read (mask, 2 offsets, control).
        (dict(channels=3, cond_channels=4, cond_dim=2, self_condition=True), 2, 5, (8, 8)),
        (dict(channels=2, out_dim=1, dim_mults=(1, 2, 2)), 1, 2, (16, 8)),
        (dict(init_dim=16, full_attn=(True, False), learned_sinusoidal_cond=True), 2, 2, (8, 8)),
    ],
)
def test_unet3d_output_shape(kind, kwargs, batch, frames, size):
    net = tiny_unet3d(kind, **kwargs)
    channels = kwargs.get("channels", 3)
    x = torch.randn(batch, channels, frames, *size)
    x_self_cond = torch.randn_like(x) if net.self_condition else None
    out = net(x, torch.randint(0, 100, (batch,)), cond=_cond(net, batch, frames, size), x_self_cond=x_self_cond)
    assert out.shape == (batch, kwargs.get("out_dim", channels), frames, *size)
    assert torch.isfinite(out).all()
    assert net.channels == channels and net.out_dim == kwargs.get("out_dim", channels)
    assert (net.cond_channels, net.cond_dim) == (kwargs.get("cond_channels", 0), kwargs.get("cond_dim", 0))
    assert net.self_condition == kwargs.get("self_condition", False)
    assert net.downsample_factor == 2 ** (len(kwargs.get("dim_mults", SMALL["dim_mults"])) - 1)


def test_unet3d_default_mults_and_fsdp_units():
    assert Unet3D(8, kind="conv3d").downsample_factor == 4  # (1, 2, 4)
    net = Unet3D(8)  # factorized, (1, 2, 4, 8)
    assert net.downsample_factor == 8
    present = {type(m) for m in net.modules()}
    assert set(Unet3D.fsdp_units) <= present


@pytest.mark.parametrize("kind", KINDS)
def test_unet3d_cond_self_condition_and_timestep_change_the_output(kind):
    net = tiny_unet3d(kind, channels=2, cond_channels=1, cond_dim=2, self_condition=True)
    x, t = torch.randn(2, 2, 3, 8, 8), torch.tensor([3, 7])
    cond = {"fields": torch.randn(2, 1, 3, 8, 8), "params": torch.randn(2, 2)}
    out = net(x, t, cond=cond)
    assert torch.allclose(out, net(x, t, cond=cond, x_self_cond=torch.zeros_like(x)))  # None means zeros
    assert not torch.allclose(out, net(x, t, cond=cond, x_self_cond=torch.randn_like(x)))
    assert not torch.allclose(out, net(x, t, cond={**cond, "fields": torch.randn_like(cond["fields"])}))
    assert not torch.allclose(out, net(x, t, cond={**cond, "params": cond["params"] + 1}))
    assert not torch.allclose(out, net(x, torch.tensor([50, 60]), cond=cond))
    assert torch.allclose(net(x, torch.tensor(5), cond=cond), net(x, torch.tensor([5, 5]), cond=cond))


# Which operations mix frames.


def _perturb_frame(x, frame):
    y = x.clone()
    y[:, :, frame] += torch.randn_like(y[:, :, frame])
    return y


def test_factorized_frames_meet_only_in_temporal_attention():
    net = tiny_unet3d("factorized", cond_channels=1, self_condition=True)
    x, t = torch.randn(2, 3, 5, 8, 8), torch.tensor([4, 9])
    cond = {"fields": torch.randn(2, 1, 5, 8, 8)}
    y = _perturb_frame(x, 2)
    others = [0, 1, 3, 4]
    with torch.no_grad():
        out_x, out_y = net(x, t, cond=cond), net(y, t, cond=cond)
        assert not torch.allclose(out_x[:, :, others], out_y[:, :, others], atol=1e-4)  # (a) mixed by attention
        _zero_temporal_attention(net)
        out_x, out_y = net(x, t, cond=cond), net(y, t, cond=cond)
    assert not torch.allclose(out_x[:, :, 2], out_y[:, :, 2])
    torch.testing.assert_close(out_x[:, :, others], out_y[:, :, others], atol=1e-5, rtol=0)  # (b) per frame


def test_conv3d_convolutions_mix_neighbouring_frames():
    net = tiny_unet3d("conv3d")
    _zero_temporal_attention(net)
    x, t = torch.randn(1, 3, 5, 8, 8), torch.tensor([4])
    with torch.no_grad():
        out_x, out_y = net(x, t), net(_perturb_frame(x, 2), t)
    for frame in (1, 3):
        assert not torch.allclose(out_x[:, :, frame], out_y[:, :, frame], atol=1e-4), frame


def test_per_frame_conv_equals_a_1x3x3_conv3d():
    torch.manual_seed(0)
    conv2d = torch.nn.Conv2d(3, 4, 3, padding=1)
    conv3d = torch.nn.Conv3d(3, 4, (1, 3, 3), padding=(0, 1, 1))
    with torch.no_grad():
        conv3d.weight.copy_(conv2d.weight.unsqueeze(2))
        conv3d.bias.copy_(conv2d.bias)
    x = torch.randn(2, 3, 5, 6, 7)
    torch.testing.assert_close(PerFrame(conv2d)(x), conv3d(x), atol=1e-5, rtol=0)
    # A time embedding [B, D] is repeated per frame: each frame gets its own sample's embedding.
    block = ResnetBlock(3, 8, time_emb_dim=6, groups=2)
    emb = torch.randn(2, 6)
    out = PerFrame(block)(x, emb)
    torch.testing.assert_close(out[:, :, 3], block(x[:, :, 3], emb), atol=1e-5, rtol=0)


# Dimension-generic blocks.


def test_weight_standardized_conv3d_and_3d_resnet_block():
    torch.manual_seed(0)
    conv = WeightStandardizedConv3d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 4, 5, 5)
    flat = conv.weight.reshape(4, -1)
    w_std = (flat - flat.mean(1, keepdim=True)) / (flat.var(1, unbiased=False, keepdim=True) + 1e-5).sqrt()
    torch.testing.assert_close(conv(x), F.conv3d(x, w_std.reshape_as(conv.weight), conv.bias, padding=1),
                               atol=1e-5, rtol=0)
    assert type(Block(4, 8, dims=2).proj) is WeightStandardizedConv2d
    block = ResnetBlock(3, 8, time_emb_dim=6, groups=4, dims=3)
    assert block.block1.proj.kernel_size == (3, 3, 3) and isinstance(block.res_conv, torch.nn.Conv3d)
    out = block(x, torch.randn(2, 6))
    assert out.shape == (2, 8, 4, 5, 5)
    assert not torch.allclose(out, block(x, torch.randn(2, 6)))
    with pytest.raises(ValueError, match="dims=2 .* or dims=3"):
        ResnetBlock(3, 8, dims=1)


# Rotary embedding, relative position bias, temporal attention.


def test_rotary_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 8)
    positions = torch.arange(6)

    def scores(q_shift, k_shift):
        return apply_rotary(q, positions + q_shift) @ apply_rotary(k, positions + k_shift).transpose(-1, -2)

    reference = scores(0, 0)
    for shift in (1, 5, 37):
        torch.testing.assert_close(scores(shift, shift), reference, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(scores(1, 0), reference, atol=1e-3)
    # A rotation: norms are kept, position 0 is the identity, and rotate_half twice negates.
    torch.testing.assert_close(apply_rotary(q, positions).norm(dim=-1), q.norm(dim=-1))
    torch.testing.assert_close(apply_rotary(q, torch.zeros(6)), q)
    torch.testing.assert_close(rotate_half(rotate_half(q)), -q)


def test_relative_position_bias_is_one_value_per_offset():
    layer = RelativePositionBias(heads=2, max_frames=4)
    with torch.no_grad():
        layer.bias_table.copy_(torch.randn_like(layer.bias_table))
    bias = layer(3)
    assert bias.shape == (2, 3, 3)
    for i in range(3):
        for j in range(3):
            torch.testing.assert_close(bias[:, i, j], layer.bias_table[:, j - i + 3])
    assert layer(4).shape == (2, 4, 4)
    with pytest.raises(ValueError, match="max_frames=4"):
        layer(5)


def test_temporal_attention_matches_naive_reference():
    torch.manual_seed(0)
    heads, dim_head, dim, frames = 2, 4, 6, 5
    layer = TemporalAttention(dim, heads=heads, dim_head=dim_head, max_frames=6)
    with torch.no_grad():
        layer.norm.g.copy_(torch.rand(dim) + 0.5)
        layer.rel_pos_bias.bias_table.copy_(torch.randn_like(layer.rel_pos_bias.bias_table))
    x = torch.randn(2, dim, frames, 3, 2)
    out = layer(x)
    assert out.shape == x.shape
    # Plain torch, one pixel at a time.
    positions = torch.arange(frames)
    offsets = positions[None, :] - positions[:, None] + 5
    for b, h, w in [(0, 0, 0), (1, 2, 1)]:
        tokens = x[b, :, :, h, w].T  # [F, C]
        tokens = tokens / tokens.norm(dim=-1, keepdim=True) * layer.norm.g * math.sqrt(dim)
        q, k, v = (tokens @ layer.to_qkv.weight.T).chunk(3, dim=-1)
        q, k, v = (z.reshape(frames, heads, dim_head).transpose(0, 1) for z in (q, k, v))  # [heads, F, d]
        q, k = apply_rotary(q, positions), apply_rotary(k, positions)
        scores = q @ k.transpose(-1, -2) / math.sqrt(dim_head) + layer.rel_pos_bias.bias_table[:, offsets]
        mixed = (scores.softmax(dim=-1) @ v).transpose(0, 1).reshape(frames, heads * dim_head)
        expected = mixed @ layer.to_out.weight.T + layer.to_out.bias  # [F, C]
        torch.testing.assert_close(out[b, :, :, h, w], expected.T, atol=1e-5, rtol=1e-5)


# Gradients, bf16, diffusion.


@pytest.mark.parametrize("kind", KINDS)
def test_unet3d_gradients_reach_every_parameter(kind):
    net = tiny_unet3d(kind, learned_sinusoidal_cond=True, self_condition=True, cond_channels=1, cond_dim=2)
    with torch.no_grad():  # the relative position bias starts at zero; give the temporal attention some
        for m in net.modules():
            if isinstance(m, RelativePositionBias):
                m.bias_table.normal_()
    x = torch.randn(2, 3, 3, 8, 8)
    cond = {"fields": torch.randn(2, 1, 3, 8, 8), "params": torch.randn(2, 2)}
    out = net(x, torch.tensor([2, 9]), cond=cond, x_self_cond=torch.randn_like(x))
    out.square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kind", KINDS)
def test_unet3d_bf16_autocast_close_to_fp32(kind):
    net = tiny_unet3d(kind)
    x, t = torch.randn(2, 3, 4, 8, 8), torch.tensor([1, 30])
    reference = net(x, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, t)
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    assert (out.float() - reference).norm() / reference.norm() < 0.05
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out.float().mean().backward()


@pytest.mark.parametrize("kind", KINDS)
def test_unet3d_trains_and_samples_through_gaussian_diffusion(kind):
    net = tiny_unet3d(kind, channels=2, self_condition=True)
    diffusion = GaussianDiffusion(net, sample_shape=(2, 3, 8, 8), timesteps=20)
    x0 = torch.rand(2, 2, 3, 8, 8) * 2 - 1
    loss = diffusion(x0, generator=torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in net.parameters())
    samples = diffusion.sample(2, sampler="ddim", sampling_timesteps=3)
    assert samples.shape == (2, 2, 3, 8, 8)
    assert torch.isfinite(samples).all()


# Bad inputs.


@pytest.mark.parametrize("kind", KINDS)
def test_unet3d_bad_inputs(kind):
    net = tiny_unet3d(kind, dim_mults=(1, 2, 4), max_frames=4)
    t = torch.tensor([0])
    with pytest.raises(ValueError, match=r"8x10 .* downsample_factor 4 .* multiple of 4"):
        net(torch.randn(1, 3, 2, 8, 10), t)
    with pytest.raises(ValueError, match=r"\[B, 3, F, H, W\].*for images use models.Unet"):
        net(torch.randn(1, 3, 8, 8), t)
    with pytest.raises(ValueError, match=r"\[B, 3, F, H, W\].*frames-first"):
        net(torch.randn(1, 2, 3, 8, 8), t)
    with pytest.raises(ValueError, match=r"\[B, 3, F, H, W\], got \(1, 1, 2, 8, 8\)$"):
        net(torch.randn(1, 1, 2, 8, 8), t)
    with pytest.raises(ValueError, match="5 frames .* max_frames=4; build it with max_frames >= 5"):
        net(torch.randn(1, 3, 5, 8, 8), t)
    with pytest.raises(ValueError, match="Unet3D .* cond_channels=0"):
        net(torch.randn(1, 3, 2, 8, 8), t, cond={"fields": torch.randn(1, 2, 2, 8, 8)})
    fielded = tiny_unet3d(kind, cond_channels=2, cond_dim=1)
    x = torch.randn(1, 3, 2, 8, 8)
    with pytest.raises(ValueError, match=r"cond_channels=2: pass cond\['fields'\] of shape \[1, 2, 2, 8, 8\]"):
        fielded(x, t, cond={"fields": torch.randn(1, 2, 3, 8, 8), "params": torch.randn(1, 1)})
    with pytest.raises(ValueError, match=r"cond_dim=1: pass cond\['params'\]"):
        fielded(x, t, cond={"fields": torch.randn(1, 2, 2, 8, 8)})
    with pytest.raises(ValueError, match="cond keys"):
        fielded(x, t, cond={"frames": x})


def test_unet3d_bad_construction():
    with pytest.raises(ValueError, match="unknown Unet3D kind 'conv2d'; valid: factorized, conv3d"):
        Unet3D(8, kind="conv2d")
    with pytest.raises(ValueError, match="resnet_block_groups"):
        Unet3D(12)
    with pytest.raises(ValueError, match="attn_heads needs one value per level"):
        Unet3D(8, dim_mults=(1, 2), attn_heads=(1, 2, 3))
    with pytest.raises(ValueError, match="even dim_head"):
        Unet3D(8, dim_mults=(1, 2), attn_dim_head=5)


# Parameter counts (reported, not asserted). For reference, lucidrains' video-diffusion-pytorch Unet3D at
# dim 64, dim_mults (1, 2, 4, 8) has 35.7M parameters.


@pytest.mark.parametrize("kind, dim_mults", [("factorized", (1, 2, 4, 8)), ("conv3d", (1, 2, 4))])
def test_report_parameter_count(kind, dim_mults, capsys):
    with torch.device("meta"):  # counts without allocating or initializing the weights
        net = Unet3D(64, kind=kind, dim_mults=dim_mults)
    count = sum(p.numel() for p in net.parameters())
    with capsys.disabled():
        print(f"\nUnet3D kind={kind} dim=64 dim_mults={dim_mults}: {count / 1e6:.2f}M parameters")
