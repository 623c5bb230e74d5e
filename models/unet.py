"""The 2D Unet: ResnetBlocks with time scale-and-shift, linear attention at the high resolutions and
full attention at the deepest one, skip connections by concatenation."""

import torch
from torch import nn

from models.cond import check_cond
from models.layers import (
    Attention,
    Downsample,
    LinearAttention,
    ResnetBlock,
    Upsample,
    cast_tuple,
    default,
    divisible_by,
    embed_time,
    params_mlp,
    stack_inputs,
    time_mlp,
)


class Unet(nn.Module):
    """Denoising network `net(x, t, *, cond=None, x_self_cond=None) -> [B, out_dim, H, W]`; `cond` as in
    models/cond.py.

    Args:
        dim: base width; stage i has `dim * dim_mults[i]` channels.
        init_dim: width after the 7x7 input conv (default `dim`).
        out_dim: output channels (default `channels`).
        dim_mults: width multipliers, one per resolution level.
        channels: channels of the generated data.
        cond_channels: channels of `cond["fields"]`, concatenated to the input (never generated).
        cond_dim: length of `cond["params"]`, embedded and added to the time embedding.
        self_condition: also take the previous x0 prediction as input (Chen et al. 2022).
        learned_sinusoidal_cond: learned Fourier features of t instead of fixed sinusoids.
        random_fourier_features: fixed random Fourier features of t.
        learned_sinusoidal_dim: number of Fourier features (even).
        sinusoidal_pos_emb_theta: base period of the fixed sinusoidal embedding.
        dropout: dropout inside the ResnetBlocks.
        attn_heads, attn_dim_head: attention shape, an int or one value per level.
        full_attn: bool or one bool per level; True uses full attention, False linear attention.
            Default: full attention only at the deepest level.
        resnet_block_groups: GroupNorm groups; every width must be divisible by it.
    """

    fsdp_units = (ResnetBlock, LinearAttention, Attention)  # one FSDP unit each (trainer/parallel/fsdp.py)

    def __init__(
        self,
        dim=64,
        *,
        init_dim=None,
        out_dim=None,
        dim_mults=(1, 2, 4, 8),
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
        full_attn=None,
        resnet_block_groups=8,
    ):
        super().__init__()
        num_levels = len(dim_mults)
        if num_levels < 1:
            raise ValueError("Unet needs at least one entry in dim_mults")
        self.channels = channels
        self.cond_channels, self.cond_dim = cond_channels, cond_dim
        self.self_condition = self_condition
        self.out_dim = default(out_dim, channels)
        self.downsample_factor = 2 ** (num_levels - 1)

        input_channels = channels * (2 if self_condition else 1) + cond_channels
        init_dim = default(init_dim, dim)
        self.init_conv = nn.Conv2d(input_channels, init_dim, 7, padding=3)

        dims = [init_dim, *(dim * m for m in dim_mults)]
        for width in dims:
            if not divisible_by(width, resnet_block_groups):
                raise ValueError(
                    f"Unet widths {dims} must all be divisible by resnet_block_groups={resnet_block_groups}"
                )
        in_out = list(zip(dims[:-1], dims[1:]))

        # Time embedding: t [B] -> [B, 4 * dim]; physical parameters [B, cond_dim] are added to it.
        time_dim = dim * 4
        self.time_mlp = time_mlp(dim, time_dim, learned_sinusoidal_cond=learned_sinusoidal_cond,
                                 random_fourier_features=random_fourier_features,
                                 learned_sinusoidal_dim=learned_sinusoidal_dim, theta=sinusoidal_pos_emb_theta)
        self.params_mlp = params_mlp(cond_dim, time_dim)

        # Per-level attention settings.
        full_attn = default(full_attn, (False,) * (num_levels - 1) + (True,))
        full_attn = cast_tuple(full_attn, num_levels)
        attn_heads = cast_tuple(attn_heads, num_levels)
        attn_dim_head = cast_tuple(attn_dim_head, num_levels)
        for name, value in (("full_attn", full_attn), ("attn_heads", attn_heads), ("attn_dim_head", attn_dim_head)):
            if len(value) != num_levels:
                raise ValueError(f"Unet {name} needs one value per level ({num_levels}), got {value}")

        def block(d_in, d_out):
            return ResnetBlock(d_in, d_out, time_emb_dim=time_dim, groups=resnet_block_groups, dropout=dropout)

        def attention(full, d, heads, dim_head):
            return (Attention if full else LinearAttention)(d, heads=heads, dim_head=dim_head)

        # Encoder: per level 2 ResnetBlocks, attention, then halve the resolution (not at the deepest).
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
                        attention(full, dim_in, heads, dim_head),
                        nn.Conv2d(dim_in, dim_out, 3, padding=1) if is_last else Downsample(dim_in, dim_out),
                    ]
                )
            )

        mid_dim = dims[-1]
        self.mid_block1 = block(mid_dim, mid_dim)
        self.mid_attn = Attention(mid_dim, heads=attn_heads[-1], dim_head=attn_dim_head[-1])
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
                        attention(full, dim_out, heads, dim_head),
                        nn.Conv2d(dim_out, dim_in, 3, padding=1) if is_last else Upsample(dim_out, dim_in),
                    ]
                )
            )

        self.final_res_block = block(init_dim * 2, init_dim)
        self.final_conv = nn.Conv2d(init_dim, self.out_dim, 1)

    def _check_inputs(self, x, cond):
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(f"Unet expects x of shape [B, {self.channels}, H, W], got {tuple(x.shape)}")
        height, width = x.shape[-2:]
        factor = self.downsample_factor
        if not (divisible_by(height, factor) and divisible_by(width, factor)):
            raise ValueError(
                f"Unet input size {height}x{width} is not divisible by its downsample_factor {factor} "
                f"(2 ** (len(dim_mults) - 1)); use an image size that is a multiple of {factor} "
                "or fewer dim_mults"
            )
        check_cond(cond, x, cond_channels=self.cond_channels, cond_dim=self.cond_dim, network="Unet")

    def forward(self, x, t, *, cond=None, x_self_cond=None):
        self._check_inputs(x, cond)
        x = self.init_conv(stack_inputs(x, x_self_cond, cond, self_condition=self.self_condition,
                                        cond_channels=self.cond_channels))
        r = x.clone()
        t = embed_time(t, x.shape[0], self.time_mlp, self.params_mlp, cond)

        skips = []
        for block1, block2, attn, downsample in self.downs:
            x = block1(x, t)
            skips.append(x)
            x = block2(x, t)
            x = attn(x) + x
            skips.append(x)
            x = downsample(x)

        x = self.mid_block1(x, t)
        x = self.mid_attn(x) + x
        x = self.mid_block2(x, t)

        for block1, block2, attn, upsample in self.ups:
            x = block1(torch.cat((x, skips.pop()), dim=1), t)
            x = block2(torch.cat((x, skips.pop()), dim=1), t)
            x = attn(x) + x
            x = upsample(x)

        x = self.final_res_block(torch.cat((x, r), dim=1), t)
        return self.final_conv(x)
