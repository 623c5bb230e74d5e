"""Blocks shared by the 2D Unet and the Unet3D, written once.

The convolutional blocks take `dims=2` (`[B, C, H, W]`, the default) or `dims=3` (`[B, C, F, H, W]`,
3x3x3 kernels); the attention layers work on `[B, C, H, W]`, and a space-time network applies them per
frame on `(b f) c h w` tensors. The token-level cores (`attend`, `linear_attend`, `apply_rotary`) also
serve temporal attention over `[B*H*W, heads, F, d]`.
"""

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from einops.layers.torch import Rearrange
from torch import nn

# Small helper vocabulary, defined once for the whole `models` package.


def exists(x):
    return x is not None


def default(val, d):
    """`val` unless it is None, else `d` (never called: modules are callable too)."""
    return val if exists(val) else d


def cast_tuple(t, length=1):
    return t if isinstance(t, tuple) else (t,) * length


def divisible_by(numer, denom):
    return (numer % denom) == 0


# Time embeddings: t [B] -> [B, dim] (or [B, dim + 1] for the Fourier features).


class SinusoidalPosEmb(nn.Module):
    """Transformer position encoding of the (possibly fractional) timestep."""

    def __init__(self, dim, theta=10000):
        super().__init__()
        if dim < 4 or not divisible_by(dim, 2):
            raise ValueError(f"SinusoidalPosEmb needs an even dim >= 4, got {dim}")
        self.dim = dim
        self.theta = theta

    def forward(self, t):
        half = self.dim // 2
        freqs = torch.exp(
            torch.arange(half, device=t.device, dtype=torch.float32) * (-math.log(self.theta) / (half - 1))
        )
        args = rearrange(t.float(), "b -> b 1") * rearrange(freqs, "d -> 1 d")
        return torch.cat((args.sin(), args.cos()), dim=-1)


class RandomOrLearnedSinusoidalPosEmb(nn.Module):
    """Fourier features of t with learned (or fixed random) frequencies; output is [t, sin, cos].

    Output dim is `dim + 1`: the raw t is kept as the first feature.
    """

    def __init__(self, dim, is_random=False):
        super().__init__()
        if not divisible_by(dim, 2):
            raise ValueError(f"RandomOrLearnedSinusoidalPosEmb needs an even dim, got {dim}")
        self.weights = nn.Parameter(torch.randn(dim // 2), requires_grad=not is_random)

    def forward(self, t):
        t = rearrange(t.float(), "b -> b 1")
        freqs = t * rearrange(self.weights, "d -> 1 d") * 2 * math.pi
        return torch.cat((t, freqs.sin(), freqs.cos()), dim=-1)


# Convolutional blocks.


class _StandardizeWeight(torch.autograd.Function):
    """`[out, in, *kernel]` -> the kernel standardized per output channel, with its gradient written out.

    The variance is the two-pass mean of squared deviations: on the CPU, `torch.var` runs a scalar
    Welford loop about 60x slower than a mean, and the two-pass form is at least as accurate. Autograd
    through mean, var, rsqrt and the products takes about ten small ops per conv and step; the closed form
    below takes five: with y = (w - mean) / std, dL/dw = (g - mean(g) - y mean(g y)) / std.
    """

    @staticmethod
    def forward(ctx, weight, eps):
        dims = tuple(range(1, weight.ndim))
        centered = weight - weight.mean(dim=dims, keepdim=True)
        rstd = (centered.square().mean(dim=dims, keepdim=True) + eps).rsqrt()
        out = centered * rstd
        ctx.save_for_backward(out, rstd)
        return out

    @staticmethod
    def backward(ctx, grad):
        out, rstd = ctx.saved_tensors
        dims = tuple(range(1, out.ndim))
        mean_grad = grad.mean(dim=dims, keepdim=True)
        mean_proj = (grad * out).mean(dim=dims, keepdim=True)
        return (grad - mean_grad - out * mean_proj) * rstd, None


def standardize_weight(weight, eps):
    """A conv kernel `[out, in, *kernel]` standardized per output channel: zero mean, unit variance
    (population variance, `eps` added to it)."""
    return _StandardizeWeight.apply(weight, eps)


class _WeightStandardized:
    """Mixin for an `nn.ConvNd`: convolve with the standardized kernel (Qiao et al. 2019); pairs with GroupNorm."""

    def forward(self, x):
        eps = 1e-5 if x.dtype == torch.float32 else 1e-3
        return self._conv_forward(x, standardize_weight(self.weight, eps), self.bias)


class WeightStandardizedConv2d(_WeightStandardized, nn.Conv2d):
    """Conv2d whose kernel is standardized per output channel (Qiao et al. 2019); pairs with GroupNorm."""


class WeightStandardizedConv3d(_WeightStandardized, nn.Conv3d):
    """Conv3d whose kernel is standardized per output channel (Qiao et al. 2019); pairs with GroupNorm."""


CONV = {2: nn.Conv2d, 3: nn.Conv3d}
WS_CONV = {2: WeightStandardizedConv2d, 3: WeightStandardizedConv3d}


def _check_dims(dims, block):
    if dims not in CONV:
        raise ValueError(f"{block} takes dims=2 ([B, C, H, W]) or dims=3 ([B, C, F, H, W]), got dims={dims!r}")


class Block(nn.Module):
    """WS conv3x3 (3x3x3 with dims=3) -> GroupNorm -> optional (scale + 1, shift) -> SiLU -> dropout."""

    def __init__(self, dim, dim_out, groups=8, dropout=0.0, *, dims=2):
        super().__init__()
        _check_dims(dims, "Block")
        self.proj = WS_CONV[dims](dim, dim_out, 3, padding=1)
        self.norm = nn.GroupNorm(groups, dim_out)
        self.act = nn.SiLU()
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, scale_shift=None):
        x = self.norm(self.proj(x))
        if exists(scale_shift):
            scale, shift = scale_shift
            x = x * (scale + 1) + shift
        return self.dropout(self.act(x))


class ResnetBlock(nn.Module):
    """Two Blocks with a residual; the time embedding scales and shifts the first block's features.

    `dims=2` works on `[B, C, H, W]`, `dims=3` on `[B, C, F, H, W]` with 3x3x3 kernels.
    """

    def __init__(self, dim, dim_out, *, time_emb_dim=None, groups=8, dropout=0.0, dims=2):
        super().__init__()
        _check_dims(dims, "ResnetBlock")
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(time_emb_dim, dim_out * 2)) if exists(time_emb_dim) else None
        self.block1 = Block(dim, dim_out, groups=groups, dropout=dropout, dims=dims)
        self.block2 = Block(dim_out, dim_out, groups=groups, dims=dims)
        self.res_conv = CONV[dims](dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x, time_emb=None):
        scale_shift = None
        if exists(self.mlp) and exists(time_emb):
            time_emb = rearrange(self.mlp(time_emb), "b c -> b c" + " 1" * (x.ndim - 2))
            scale_shift = time_emb.chunk(2, dim=1)
        h = self.block1(x, scale_shift=scale_shift)
        h = self.block2(h)
        return h + self.res_conv(x)


# Normalization and attention.


class RMSNorm(nn.Module):
    """RMS norm over the channel axis of `[B, C, *spatial]`, with a learned per-channel gain."""

    def __init__(self, dim):
        super().__init__()
        self.scale = dim**0.5
        self.g = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        g = rearrange(self.g, "c -> c" + " 1" * (x.ndim - 2))
        return unit_norm(x) * g * self.scale


class _UnitNorm(torch.autograd.Function):
    """x / max(||x||, 1e-12) over the channel axis (axis 1), as `F.normalize(x, dim=1)`, with its gradient
    written out: dL/dx = (g - y sum(g y)) / ||x||. On `[B, C, H, W]` in the default layout, the norm
    kernel behind `F.normalize` reduces across strides several times slower than a sum of squares, and its
    autograd graph takes twice the ops of this backward."""

    @staticmethod
    def forward(ctx, x):
        wide = x.float() if x.dtype == torch.float16 else x  # squares of fp16 overflow at 256; bf16 has fp32's range
        rnorm = wide.square().sum(dim=1, keepdim=True).clamp_min(1e-24).rsqrt()
        out = (wide * rnorm).to(x.dtype)
        ctx.save_for_backward(out, rnorm)
        return out

    @staticmethod
    def backward(ctx, grad):
        out, rnorm = ctx.saved_tensors
        g, y = grad.to(rnorm.dtype), out.to(rnorm.dtype)
        return ((g - y * (g * y).sum(dim=1, keepdim=True)) * rnorm).to(grad.dtype)


def unit_norm(x):
    """`x` scaled to unit L2 norm along axis 1 (the channels); zero vectors stay zero."""
    return _UnitNorm.apply(x)


def attend(q, k, v, bias=None):
    """Softmax attention, q, k, v: [B, heads, N, d] -> [B, heads, N, d], scale 1/sqrt(d).

    `bias`, broadcastable to [B, heads, N, N], is added to the scores before the softmax (a relative
    position bias). Goes through `scaled_dot_product_attention` so fused kernels are used where available.
    """
    if exists(bias):
        bias = bias.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def rotate_half(x):
    """[..., d] -> [..., d]: (x1, x2) -> (-x2, x1) for the two halves of the last axis."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x, positions, theta=10000):
    """Rotary position embedding (Su et al. 2021, "rotate half" layout) of x [..., N, d] at positions [N].

    Channel pairs (i, i + d/2) are rotated by the angle positions * theta^(-2i/d), so the dot product of a
    rotated q at position m and a rotated k at position n depends on m - n only.
    """
    dim = x.shape[-1]
    if not divisible_by(dim, 2):
        raise ValueError(f"rotary embedding needs an even head dim, got {dim}")
    inv_freq = theta ** (-torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim)  # [d/2]
    angles = torch.einsum("n, i -> n i", positions.float(), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)  # [N, d]
    return x * angles.cos().to(x.dtype) + rotate_half(x) * angles.sin().to(x.dtype)


def linear_attend(q, k, v):
    """Efficient attention (Shen et al. 2021), q, k, v: [B, heads, N, d] -> [B, heads, N, d].

    softmax over d on q, softmax over tokens on k, then out = q (k^T v): cost linear in N.
    """
    q = q.softmax(dim=-1)
    k = k.softmax(dim=-2)
    context = torch.einsum("b h n d, b h n e -> b h d e", k, v)
    return torch.einsum("b h n d, b h d e -> b h n e", q, context)


class _SpatialAttention(nn.Module):
    """Pre-norm, 1x1 qkv projection, token core over the H*W pixels, 1x1 output projection.

    Subclasses set `core` to a token-level attention function. The residual is added by the caller.
    """

    def __init__(self, dim, heads=4, dim_head=32):
        super().__init__()
        self.heads = heads
        hidden = heads * dim_head
        self.norm = RMSNorm(dim)
        self.to_qkv = nn.Conv2d(dim, hidden * 3, 1, bias=False)
        self.to_out = nn.Conv2d(hidden, dim, 1)

    def forward(self, x):  # x: [B, C, H, W]
        height = x.shape[-2]
        qkv = self.to_qkv(self.norm(x)).chunk(3, dim=1)
        q, k, v = (rearrange(z, "b (h d) x y -> b h (x y) d", h=self.heads) for z in qkv)
        out = self.core(q, k, v)  # [B, heads, H*W, d]
        out = rearrange(out, "b h (x y) d -> b (h d) x y", x=height)
        return self.to_out(out)


class Attention(_SpatialAttention):
    """Full softmax attention over the pixels of `[B, C, H, W]`."""

    core = staticmethod(attend)


class LinearAttention(_SpatialAttention):
    """Linear (efficient) attention over the pixels of `[B, C, H, W]`; output is RMS-normalized."""

    core = staticmethod(linear_attend)

    def __init__(self, dim, heads=4, dim_head=32):
        super().__init__(dim, heads, dim_head)
        self.to_out = nn.Sequential(nn.Conv2d(heads * dim_head, dim, 1), RMSNorm(dim))


# Resolution changes.


def Downsample(dim, dim_out):
    """Halve H and W without losing pixels: pixel-unshuffle, then 1x1 conv."""
    return nn.Sequential(
        Rearrange("b c (h p1) (w p2) -> b (c p1 p2) h w", p1=2, p2=2),
        nn.Conv2d(dim * 4, dim_out, 1),
    )


def Upsample(dim, dim_out):
    """Double H and W: nearest neighbour, then 3x3 conv."""
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="nearest"),
        nn.Conv2d(dim, dim_out, 3, padding=1),
    )


# The inputs, time and parameter embeddings of a denoising network (models/cond.py has the condition's keys).


def time_mlp(dim, time_dim, *, learned_sinusoidal_cond=False, random_fourier_features=False,
             learned_sinusoidal_dim=16, theta=10000):
    """t [B] -> [B, time_dim]: fixed sinusoids of width `dim` (or learned / random Fourier features), then an MLP."""
    if learned_sinusoidal_cond or random_fourier_features:
        pos_emb = RandomOrLearnedSinusoidalPosEmb(learned_sinusoidal_dim, is_random=random_fourier_features)
        fourier_dim = learned_sinusoidal_dim + 1
    else:
        pos_emb = SinusoidalPosEmb(dim, theta=theta)
        fourier_dim = dim
    return nn.Sequential(pos_emb, nn.Linear(fourier_dim, time_dim), nn.GELU(), nn.Linear(time_dim, time_dim))


def params_mlp(cond_dim, time_dim):
    """params [B, cond_dim] -> [B, time_dim], added to the time embedding; None when cond_dim is 0."""
    if not cond_dim:
        return None
    return nn.Sequential(nn.Linear(cond_dim, time_dim), nn.GELU(), nn.Linear(time_dim, time_dim))


def stack_inputs(x, x_self_cond, cond, *, self_condition, cond_channels):
    """The first conv's input: x, then the self-conditioning estimate (zeros when None) if the network takes
    one, then `cond["fields"]`, along the channel axis."""
    inputs = [x]
    if self_condition:
        inputs.append(x_self_cond.to(x.dtype) if exists(x_self_cond) else torch.zeros_like(x))
    if cond_channels > 0:
        inputs.append(cond["fields"].to(x.dtype))
    return torch.cat(inputs, dim=1)


def embed_time(t, batch, time_mlp, params_mlp, cond):
    """t [B] (or a scalar for the whole batch) -> the time embedding, plus `params_mlp(cond["params"])`
    when the network has one."""
    emb = time_mlp(t.expand(batch) if t.ndim == 0 else t)
    if exists(params_mlp):
        emb = emb + params_mlp(cond["params"].to(emb.dtype))
    return emb
