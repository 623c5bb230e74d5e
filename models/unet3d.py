"""The Unet3D on clips `[B, C, F, H, W]`: the 2D Unet's levels, each with a temporal attention block after
its spatial attention. Down- and upsampling change H and W only; the frame count is kept.

Two kinds, `kind=`:

- "factorized" (space-time factorized, Ho et al. 2022 "Video Diffusion Models"): every convolution,
  GroupNorm and spatial attention is the 2D block applied per frame on `(b f) c h w` (a 3x3 conv per frame
  is a (1, 3, 3) Conv3d); frames meet only in the temporal attention.
- "conv3d" (the research code's `Unet3D_with_Conv3D`): ResnetBlocks with 3x3x3 convolutions, a 7x7x7
  input conv, and down/up by (1, 4, 4)-kernel convolutions of stride (1, 2, 2); the spatial and temporal
  attention are the same as in "factorized". Meant for 64x64 frames with dim 64, dim_mults (1, 2, 4).

One level of the encoder (the decoder mirrors it, taking both skips by concatenation):

    x -> ResnetBlock(t) -> skip -> ResnetBlock(t) -> + spatial attention (per frame)
      -> + temporal attention (per pixel, across frames) -> skip -> downsample (H/2, W/2)

The temporal attention is full softmax attention over the F frames of each pixel, with rotary position
embeddings on q and k and a learned relative position bias, one value per head and frame offset.
"""

import torch
from einops import rearrange, repeat
from torch import nn

from models.cond import check_cond
from models.layers import (
    Attention,
    Downsample,
    LinearAttention,
    ResnetBlock,
    RMSNorm,
    Upsample,
    apply_rotary,
    attend,
    cast_tuple,
    default,
    divisible_by,
    embed_time,
    params_mlp,
    stack_inputs,
    time_mlp,
)

KINDS = ("factorized", "conv3d")
DEFAULT_DIM_MULTS = {"factorized": (1, 2, 4, 8), "conv3d": (1, 2, 4)}


class PerFrame(nn.Module):
    """Applies a 2D module to every frame of `[B, C, F, H, W]` by folding the frames into the batch,
    `(b f) c h w`; extra `[B, D]` arguments (the time embedding) are repeated per frame."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x, *args):
        frames = x.shape[2]
        x = rearrange(x, "b c f h w -> (b f) c h w")
        args = [repeat(a, "b d -> (b f) d", f=frames) for a in args]
        out = self.fn(x, *args)
        return rearrange(out, "(b f) c h w -> b c f h w", f=frames)


class RelativePositionBias(nn.Module):
    """A learned bias per head and frame offset j - i, for offsets in [-(max_frames - 1), max_frames - 1].

    Exact per offset rather than T5's log buckets: clips are short (tens of frames), every offset gets its
    own value, and the bound is explicit (Unet3D refuses clips longer than `max_frames`). Starts at zero,
    so an untrained network's temporal attention is positioned by the rotary embedding alone.
    """

    def __init__(self, heads, max_frames):
        super().__init__()
        self.max_frames = max_frames
        self.bias_table = nn.Parameter(torch.zeros(heads, 2 * max_frames - 1))

    def forward(self, frames):  # -> [heads, F, F]
        if frames > self.max_frames:
            raise ValueError(f"RelativePositionBias covers at most max_frames={self.max_frames}, got {frames} frames")
        positions = torch.arange(frames, device=self.bias_table.device)
        offsets = rearrange(positions, "j -> 1 j") - rearrange(positions, "i -> i 1")  # j - i
        return self.bias_table[:, offsets + self.max_frames - 1]


class TemporalAttention(nn.Module):
    """Pre-norm softmax attention across the frames of each pixel of `[B, C, F, H, W]`, as tokens
    `(b h w) heads f d`, with rotary q and k and a relative position bias. The residual is added by the caller.
    """

    def __init__(self, dim, heads=4, dim_head=32, *, max_frames=64, rotary_theta=10000):
        super().__init__()
        if not divisible_by(dim_head, 2):
            raise ValueError(f"TemporalAttention needs an even dim_head for the rotary embedding, got {dim_head}")
        self.heads = heads
        self.rotary_theta = rotary_theta
        hidden = heads * dim_head
        self.norm = RMSNorm(dim)
        self.to_qkv = nn.Linear(dim, hidden * 3, bias=False)
        self.rel_pos_bias = RelativePositionBias(heads, max_frames)
        self.to_out = nn.Linear(hidden, dim)

    def forward(self, x):  # x: [B, C, F, H, W]
        _, _, frames, height, width = x.shape
        tokens = rearrange(self.norm(x), "b c f x y -> (b x y) f c")
        q, k, v = rearrange(self.to_qkv(tokens), "n f (qkv h d) -> qkv n h f d", qkv=3, h=self.heads)
        positions = torch.arange(frames, device=x.device)
        q, k = (apply_rotary(z, positions, self.rotary_theta) for z in (q, k))
        out = attend(q, k, v, bias=self.rel_pos_bias(frames))  # [B*H*W, heads, F, d]
        out = self.to_out(rearrange(out, "n h f d -> n f (h d)"))
        return rearrange(out, "(b x y) f c -> b c f x y", x=height, y=width)


class Unet3D(nn.Module):
    """Denoising network on clips, `net(x, t, *, cond=None, x_self_cond=None) -> [B, out_dim, F, H, W]`;
    `cond` as in models/cond.py (`fields` `[B, cond_channels, F, H, W]`, `params` `[B, cond_dim]`).

    Args:
        dim: base width; stage i has `dim * dim_mults[i]` channels.
        kind: "factorized" (per-frame 2D convolutions, frames mixed by temporal attention only) or
            "conv3d" (3x3x3 convolutions); see the module docstring.
        init_dim: width after the input conv (default `dim`).
        out_dim: output channels (default `channels`).
        dim_mults: width multipliers, one per resolution level (default (1, 2, 4, 8) for "factorized",
            (1, 2, 4) for "conv3d").
        channels: channels of the generated data.
        cond_channels: channels of `cond["fields"]`, concatenated to the input (never generated).
        cond_dim: length of `cond["params"]`, embedded and added to the time embedding.
        self_condition: also take the previous x0 prediction as input (Chen et al. 2022).
        learned_sinusoidal_cond: learned Fourier features of t instead of fixed sinusoids.
        random_fourier_features: fixed random Fourier features of t.
        learned_sinusoidal_dim: number of Fourier features (even).
        sinusoidal_pos_emb_theta: base period of the fixed sinusoidal embedding.
        dropout: dropout inside the ResnetBlocks.
        attn_heads, attn_dim_head: shape of the spatial and temporal attention, an int or one value per level.
        full_attn: bool or one bool per level; True uses full spatial attention, False (default) linear
            attention. The middle always has full spatial attention.
        max_frames: the most frames a clip may have (the range of the relative position bias).
        rotary_theta: base period of the rotary embedding of the temporal attention.
        resnet_block_groups: GroupNorm groups; every width must be divisible by it.
    """

    # One FSDP unit each (trainer/parallel/fsdp.py).
    fsdp_units = (ResnetBlock, LinearAttention, Attention, TemporalAttention)

    def __init__(
        self,
        dim=64,
        *,
        kind="factorized",
        init_dim=None,
        out_dim=None,
        dim_mults=None,
        channels=3,
        cond_channels=0,
        cond_dim=0,
        self_condition=False,
        learned_sinusoidal_cond=False,
        random_fourier_features=False,
        learned_sinusoidal_dim=16,
        sinusoidal_pos_emb_theta=10000,
        dropout=0.0,
        attn_heads=4,
        attn_dim_head=32,
        full_attn=False,
        max_frames=64,
        rotary_theta=10000,
        resnet_block_groups=8,
    ):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown Unet3D kind {kind!r}; valid: {', '.join(KINDS)}")
        dim_mults = tuple(default(dim_mults, DEFAULT_DIM_MULTS[kind]))
        num_levels = len(dim_mults)
        if num_levels < 1:
            raise ValueError("Unet3D needs at least one entry in dim_mults")
        if max_frames < 1:
            raise ValueError(f"Unet3D needs max_frames >= 1, got {max_frames}")
        self.kind = kind
        self.channels = channels
        self.cond_channels, self.cond_dim = cond_channels, cond_dim
        self.self_condition = self_condition
        self.out_dim = default(out_dim, channels)
        self.downsample_factor = 2 ** (num_levels - 1)
        self.max_frames = max_frames

        input_channels = channels * (2 if self_condition else 1) + cond_channels
        init_dim = default(init_dim, dim)
        dims = [init_dim, *(dim * m for m in dim_mults)]
        for width in dims:
            if not divisible_by(width, resnet_block_groups):
                raise ValueError(
                    f"Unet3D widths {dims} must all be divisible by resnet_block_groups={resnet_block_groups}"
                )
        in_out = list(zip(dims[:-1], dims[1:]))

        # Time embedding t [B] -> [B, 4 * dim], plus the embedded physical parameters.
        time_dim = dim * 4
        self.time_mlp = time_mlp(
            dim, time_dim, learned_sinusoidal_cond=learned_sinusoidal_cond,
            random_fourier_features=random_fourier_features, learned_sinusoidal_dim=learned_sinusoidal_dim,
            theta=sinusoidal_pos_emb_theta,
        )
        self.params_mlp = params_mlp(cond_dim, time_dim)

        # Per-level attention settings.
        full_attn = cast_tuple(full_attn, num_levels)
        attn_heads = cast_tuple(attn_heads, num_levels)
        attn_dim_head = cast_tuple(attn_dim_head, num_levels)
        for name, value in (("full_attn", full_attn), ("attn_heads", attn_heads), ("attn_dim_head", attn_dim_head)):
            if len(value) != num_levels:
                raise ValueError(f"Unet3D {name} needs one value per level ({num_levels}), got {value}")

        # What the two kinds differ in: the convolutions.
        if kind == "factorized":
            def block(d_in, d_out):
                return PerFrame(ResnetBlock(d_in, d_out, time_emb_dim=time_dim, groups=resnet_block_groups,
                                            dropout=dropout))

            def downsample(d_in, d_out):
                return PerFrame(Downsample(d_in, d_out))

            def upsample(d_in, d_out):
                return PerFrame(Upsample(d_in, d_out))

            def same_size_conv(d_in, d_out):
                return PerFrame(nn.Conv2d(d_in, d_out, 3, padding=1))

            self.init_conv = PerFrame(nn.Conv2d(input_channels, init_dim, 7, padding=3))
        else:
            def block(d_in, d_out):
                return ResnetBlock(d_in, d_out, time_emb_dim=time_dim, groups=resnet_block_groups, dropout=dropout,
                                   dims=3)

            def downsample(d_in, d_out):
                return nn.Conv3d(d_in, d_out, (1, 4, 4), stride=(1, 2, 2), padding=(0, 1, 1))

            def upsample(d_in, d_out):
                return nn.ConvTranspose3d(d_in, d_out, (1, 4, 4), stride=(1, 2, 2), padding=(0, 1, 1))

            def same_size_conv(d_in, d_out):
                return nn.Conv3d(d_in, d_out, 3, padding=1)

            self.init_conv = nn.Conv3d(input_channels, init_dim, 7, padding=3)

        def spatial_attention(full, d, heads, dim_head):
            return PerFrame((Attention if full else LinearAttention)(d, heads=heads, dim_head=dim_head))

        def temporal_attention(d, heads, dim_head):
            return TemporalAttention(d, heads=heads, dim_head=dim_head, max_frames=max_frames,
                                     rotary_theta=rotary_theta)

        # Encoder: per level 2 ResnetBlocks, spatial and temporal attention, then halve H and W (not at the
        # deepest level).
        self.downs = nn.ModuleList()
        for ind, ((dim_in, dim_out), full, heads, dim_head) in enumerate(
            zip(in_out, full_attn, attn_heads, attn_dim_head)
        ):
            is_last = ind == num_levels - 1
            self.downs.append(
                nn.ModuleList(
                    [
                        block(dim_in, dim_in),
                        block(dim_in, dim_in),
                        spatial_attention(full, dim_in, heads, dim_head),
                        temporal_attention(dim_in, heads, dim_head),
                        same_size_conv(dim_in, dim_out) if is_last else downsample(dim_in, dim_out),
                    ]
                )
            )

        mid_dim = dims[-1]
        self.mid_block1 = block(mid_dim, mid_dim)
        self.mid_spatial_attn = spatial_attention(True, mid_dim, attn_heads[-1], attn_dim_head[-1])
        self.mid_temporal_attn = temporal_attention(mid_dim, attn_heads[-1], attn_dim_head[-1])
        self.mid_block2 = block(mid_dim, mid_dim)

        # Decoder: mirror of the encoder; each ResnetBlock takes a skip connection by concatenation.
        self.ups = nn.ModuleList()
        for ind, ((dim_in, dim_out), full, heads, dim_head) in enumerate(
            zip(*(reversed(v) for v in (in_out, full_attn, attn_heads, attn_dim_head)))
        ):
            is_last = ind == num_levels - 1
            self.ups.append(
                nn.ModuleList(
                    [
                        block(dim_out + dim_in, dim_out),
                        block(dim_out + dim_in, dim_out),
                        spatial_attention(full, dim_out, heads, dim_head),
                        temporal_attention(dim_out, heads, dim_head),
                        same_size_conv(dim_out, dim_in) if is_last else upsample(dim_out, dim_in),
                    ]
                )
            )

        self.final_res_block = block(init_dim * 2, init_dim)
        self.final_conv = nn.Conv3d(init_dim, self.out_dim, 1)  # per voxel: per frame in both kinds

    def _check_inputs(self, x, cond):
        if x.ndim != 5 or x.shape[1] != self.channels:
            hint = ""
            if x.ndim == 5 and x.shape[2] == self.channels:
                hint = "; it looks frames-first [B, F, C, H, W]: pass x.transpose(1, 2)"
            elif x.ndim == 4:
                hint = "; for images use models.Unet, or add a frame axis with x.unsqueeze(2)"
            raise ValueError(f"Unet3D expects x of shape [B, {self.channels}, F, H, W], got {tuple(x.shape)}{hint}")
        frames, height, width = x.shape[2:]
        factor = self.downsample_factor
        if not (divisible_by(height, factor) and divisible_by(width, factor)):
            raise ValueError(
                f"Unet3D frame size {height}x{width} is not divisible by its downsample_factor {factor} "
                f"(2 ** (len(dim_mults) - 1)); use a frame size that is a multiple of {factor} "
                "or fewer dim_mults"
            )
        if frames > self.max_frames:
            raise ValueError(
                f"Unet3D got {frames} frames but its relative position bias covers at most max_frames="
                f"{self.max_frames}; build it with max_frames >= {frames} or use shorter clips"
            )
        check_cond(cond, x, cond_channels=self.cond_channels, cond_dim=self.cond_dim, network="Unet3D")

    def forward(self, x, t, *, cond=None, x_self_cond=None):
        self._check_inputs(x, cond)
        x = self.init_conv(stack_inputs(x, x_self_cond, cond, self_condition=self.self_condition,
                                        cond_channels=self.cond_channels))
        r = x.clone()
        t = embed_time(t, x.shape[0], self.time_mlp, self.params_mlp, cond)

        skips = []
        for block1, block2, spatial_attn, temporal_attn, downsample in self.downs:
            x = block1(x, t)
            skips.append(x)
            x = block2(x, t)
            x = spatial_attn(x) + x
            x = temporal_attn(x) + x
            skips.append(x)
            x = downsample(x)

        x = self.mid_block1(x, t)
        x = self.mid_spatial_attn(x) + x
        x = self.mid_temporal_attn(x) + x
        x = self.mid_block2(x, t)

        for block1, block2, spatial_attn, temporal_attn, upsample in self.ups:
            x = block1(torch.cat((x, skips.pop()), dim=1), t)
            x = block2(torch.cat((x, skips.pop()), dim=1), t)
            x = spatial_attn(x) + x
            x = temporal_attn(x) + x
            x = upsample(x)

        x = self.final_res_block(torch.cat((x, r), dim=1), t)
        return self.final_conv(x)
