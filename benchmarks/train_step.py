"""Time diffusion training steps and sampling: Eddy against its peers, from their released packages.

A benchmark, not a test: it prints numbers and asserts nothing. Two ways to run it:

- one configuration (the default: Unet dim 128, dim_mults 1 2 2 2, 3x32x32 images, batch 128; with
  --frames F, clips of F frames: Eddy's Unet3D against lucidrains' video-diffusion-pytorch Unet3D);
- --suite: every configuration of shared/BENCHMARKS.md in one call within --budget_s seconds, for Eddy and
  every peer (benchmarks/gpu_suite.py says which rows, in which order).

The subjects, each skipped with a note when its package is missing (`pip install '.[bench]'`):
  eddy        `models.Unet` / `models.Unet3D` + `models.GaussianDiffusion`;
  lucidrains  `denoising_diffusion_pytorch.Unet` + `GaussianDiffusion` (flash_attn off: it fails in fp32 on Hopper);
  video       `video_diffusion_pytorch.Unet3D` + `GaussianDiffusion`, for clips;
  diffusers   `diffusers.UNet2DModel` in the layout of google/ddpm-cifar10-32 (block_out_channels dim x dim_mults,
              attention at the second level, layers_per_block 2, freq_shift 1, no sin/cos flip, downsample_padding
              0, norm_eps 1e-6), trained on the eps loss through `DDPMScheduler.add_noise`.

Training step = forward + backward + AdamW step (fused on CUDA, for every subject) of the eps loss, on random
data already on the device. The timesteps t and the noise are drawn outside the step (and outside any compiled
region) from one seeded generator, one set per step, so that every mode of a subject sees the same inputs:
  eager     the subject as released;
  compiled  Eddy: its own path, `diffusion.compile_loss(mode="default")` with the 2D network and its inputs
            channels-last; diffusers: the network channels-last and through `torch.compile` (BENCHMARKS.md's
            fastest peer); lucidrains: its network through `torch.compile`;
  captured  Eddy: `compile_loss(mode="reduce-overhead")` (CUDA graphs); CUDA only.
What each row reports:
- step ms: median and [min-max] of --steps steps (at least 20 on CUDA), each timed with CUDA events after
  --warmup untimed steps (a wall clock on the CPU); samples/s = batch / median;
- compile s: wall seconds of the first compiled forward + backward; capture s (captured): the next two steps,
  which record the CUDA graphs. Neither is ever part of the timed steps;
- GFLOP/sample: forward + backward of the eager loss counted by `torch.utils.flop_counter.FlopCounterMode`, on two
  samples, halved: the same count for every subject. MFU = FLOP/s / peak, against the datasheet peak (989e12,
  dense bf16 of an H100/H200; --peak_flops) and against the measured peak (an 8192^3 bf16 matmul, median of 10
  after warm-up; CUDA only), both printed in the environment block;
- peak GiB: `torch.cuda.max_memory_allocated` over the timed steps (reset after warm-up), less the pre-drawn
  inputs;
- gate (every fast row): before timing, on the same x0, t and noise and the same weights, the loss and the gradients
  of the fast path against the eager one in the same precision: the relative difference of the loss and the
  largest over parameters of ||g_fast - g_eager|| / ||g_eager|| (parameters whose eager gradient is under 1e-5 of
  the whole gradient's norm left out: zero up to rounding, such as a bias just before a GroupNorm), with the same
  measure between two eager passes beside it (the noise floor). Over 1e-2 / 5e-2 in bf16 (1e-4 / 1e-3 in fp32)
  the row is marked failed-gate and still timed. A compile that fell back to eager (models/compiled.py warns) is
  marked too, and so is a captured row of which inductor declined to capture a graph (it then runs uncaptured).

Sampling (randomly initialized networks unless --checkpoint gives Eddy a run's EMA weights): --num_samples samples
per sampler and step count, seconds as the median of 3 calls after a warm-up call, in bf16 autocast on CUDA. Each
sampler also runs on --ref_samples of the same noise in fp32 and in bf16: the RMS difference (model space,
[-1, 1]) against a 1000-step (--ref_steps) fp32 DDIM (eta 0) of the same network from the same x_T, the
probability-flow reference, and the RMS difference between its bf16 and fp32 samples. x_T is the same because each
subject draws it from the same seed (Eddy: `diffusion.sample(..., generator=)`; lucidrains: the global seed;
diffusers: a generator). Every subject clips x0_hat to [-1, 1] at each step (Eddy's clip_denoised, lucidrains' DDIM,
diffusers' thresholding with its threshold fixed at 1), its reference too. DDPM is stochastic: its difference from
the ODE reference is no solver error. Compiled sampling rows (the network through torch.compile) are timed only:
their solver is the eager row's, and the comparison's other batch size and precision would compile again.

A markdown table is printed last; --json writes the same rows (rewritten after every row, so a run stopped
part-way keeps what it measured).

    python benchmarks/train_step.py --suite --json bench.json               # GPU: every configuration, <= 280 s
    python benchmarks/train_step.py --device cpu --tiny --suite --budget_s 120  # CPU: checks the suite itself
    python benchmarks/train_step.py --json bench.json                      # GPU: one configuration
    python benchmarks/train_step.py --compile --json bench.json            # adds Eddy compiled (compile_mode)
    python benchmarks/train_step.py --device cpu --tiny                    # seconds: checks the script itself
    python benchmarks/train_step.py --frames 16 --image_size 64 --dim 64 --dim_mults 1 2 4 8 --batch_size 8 \\
        --precisions bf16 --sample_steps                                   # BENCHMARKS.md's Unet3D row
"""

from __future__ import annotations

import time

T_START = time.monotonic()  # the --suite budget counts from here, imports included

import os  # noqa: E402

os.environ.setdefault("TQDM_DISABLE", "1")  # the peers' sampling loops draw progress bars; read at tqdm's import

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the repository root: `models`, `trainer`

from models import GaussianDiffusion, Unet, Unet3D  # noqa: E402

H100_BF16_DENSE_PEAK = 989e12
TIMESTEPS = 1000
TINY = dict(dim=32, dim_mults=[1, 2, 2], image_size=16, batch_size=8, warmup=1, steps=3, num_samples=8,
            sample_steps=[5, 10], ref_samples=4, ref_steps=100, compile_backend="aot_eager", trainer_steps=20,
            trainer_log_every=5)
# Gate thresholds: (loss, gradient) relative differences of a fast row against eager, per precision.
GATE = {"bf16": (1e-2, 5e-2), "fp32": (1e-4, 1e-3)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="benchmarks/train_step.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Time a diffusion training step (forward + backward + AdamW) and sampling, Eddy against its "
                    "peers (lucidrains' denoising-diffusion-pytorch and video-diffusion-pytorch, diffusers), at one "
                    "configuration or (--suite) at every configuration of BENCHMARKS.md.")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"), help="auto: cuda if available.")
    p.add_argument("--tiny", action="store_true",
                   help=f"a config that runs in seconds on a CPU, to check the script: {TINY}; with --suite, every "
                        "configuration shrunk alike. Flags given explicitly still win.")
    p.add_argument("--suite", action="store_true",
                   help="every configuration of BENCHMARKS.md, most important rows first, within --budget_s "
                        "(benchmarks/gpu_suite.py); the configuration flags below are then ignored.")
    p.add_argument("--budget_s", type=float, default=280.0,
                   help="--suite: seconds for the whole call, from process start; rows that would overrun are "
                        "skipped with a note, and a row still running at the end is stopped.")
    p.add_argument("--models", nargs="+", default=["eddy", "peer"], choices=("eddy", "peer", "diffusers"),
                   help="one configuration: the subjects (peer: lucidrains, or video-diffusion-pytorch with --frames).")
    p.add_argument("--precisions", nargs="+", default=None, choices=("bf16", "fp32"),
                   help="one configuration: autocast precisions of the training step (default: bf16 fp32 on CUDA, "
                        "fp32 on the CPU).")
    p.add_argument("--compile", action="store_true",
                   help="one configuration: also time Eddy compiled (bf16 on CUDA), through --compile_mode "
                        "(reduce-overhead: the captured mode).")
    p.add_argument("--compile_mode", default="default", choices=("default", "reduce-overhead"),
                   help="one configuration: the `mode` of Eddy's compile_loss with --compile.")
    p.add_argument("--compile_backend", default="inductor", choices=("inductor", "aot_eager", "eager"),
                   help="the torch.compile backend of every compiled row (aot_eager: a quick check of the paths).")
    p.add_argument("--dim", type=int, default=128, help="one configuration, as the flags down to --batch_size.")
    p.add_argument("--dim_mults", type=int, nargs="+", default=[1, 2, 2, 2])
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--frames", type=int, default=0,
                   help="frames per clip: 0 benchmarks the 2D Unets; F > 0 the Unet3Ds on [B, C, F, H, W].")
    p.add_argument("--unet3d_kind", default="factorized", choices=("factorized", "conv3d"),
                   help="Eddy's Unet3D kind, with --frames.")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--objective", default="pred_noise", choices=("pred_noise", "pred_x0", "pred_v"),
                   help="what Eddy and lucidrains predict (BENCHMARKS.md measures the eps loss; diffusers and "
                        "video-diffusion-pytorch always predict eps).")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before the timed ones.")
    p.add_argument("--steps", type=int, default=20, help="timed steps; the median is reported.")
    p.add_argument("--num_samples", type=int, default=256, help="samples per timed sampling call.")
    p.add_argument("--sample_steps", type=int, nargs="*", default=[50, 250],
                   help="one configuration: DDIM steps to time sampling at; none skips sampling.")
    p.add_argument("--ref_samples", type=int, default=32,
                   help="samples (of the same noise) on which each sampler is compared with the 1000-step fp32 "
                        "reference and bf16 with fp32; 0 skips the comparison.")
    p.add_argument("--ref_steps", type=int, default=TIMESTEPS,
                   help="DDIM steps of the reference (all T = 1000 of them by default; fewer only to check the "
                        "script quickly).")
    p.add_argument("--checkpoint", default=None,
                   help="a run folder (or checkpoint folder) of Eddy: its EMA weights sample in Eddy's sampling rows "
                        "(the training rows and the peers stay randomly initialized).")
    p.add_argument("--peak_flops", type=float, default=None,
                   help=f"datasheet peak FLOP/s for MFU (default on CUDA: {H100_BF16_DENSE_PEAK:.0f}, dense bf16 of an "
                        "H100/H200; on the CPU no MFU unless given).")
    p.add_argument("--trainer_steps", type=int, default=60,
                   help="--suite: optimizer steps of each Trainer end-to-end row (windows of --trainer_log_every).")
    p.add_argument("--trainer_log_every", type=int, default=10, help="--suite: steps per logged window.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the results here as JSON.")
    args = p.parse_args(argv)
    if args.tiny:
        given = {a.lstrip("-").split("=")[0] for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--")}
        for k, v in TINY.items():
            if k not in given:
                setattr(args, k, v)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible to torch.")
    if args.precisions is None:
        args.precisions = ["bf16", "fp32"] if args.device == "cuda" else ["fp32"]
    if args.peak_flops is None and args.device == "cuda":
        args.peak_flops = H100_BF16_DENSE_PEAK
    factor = 2 ** (len(args.dim_mults) - 1)
    if not args.suite and args.image_size % factor:
        p.error(f"--image_size {args.image_size} is not divisible by {factor} for --dim_mults {args.dim_mults}.")
    return args


# ----------------------------------------------------------------------------------------------
# A configuration, and the subjects measured at it


@dataclass(frozen=True)
class Setup:
    """One configuration: the network's width and levels, the data's shape and the batch."""

    name: str
    dim: int
    dim_mults: tuple[int, ...]
    image_size: int
    batch_size: int
    frames: int = 0  # 0: images [B, C, H, W]; F: clips [B, C, F, H, W]
    channels: int = 3

    @property
    def shape(self) -> tuple[int, ...]:
        """One sample's shape."""
        frames = (self.frames,) if self.frames else ()
        return (self.channels, *frames, self.image_size, self.image_size)

    def describe(self) -> str:
        frames = f"{self.frames}x" if self.frames else ""
        return (f"dim {self.dim}, mults {' '.join(map(str, self.dim_mults))}, {self.channels}x{frames}"
                f"{self.image_size}x{self.image_size}, batch {self.batch_size}")


LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x0, t, noise) -> scalar loss


class Subject:
    """One implementation at one Setup: how to build it, its loss at given (x0, t, noise) eagerly and fast,
    and how it samples. Every subject takes x0 and returns samples in [-1, 1]."""

    name = ""
    fast_modes: tuple[str, ...] = ()  # the modes beyond eager
    samplers: tuple[str, ...] = ()    # the samplers of `sample`

    def __init__(self, setup: Setup, args: argparse.Namespace):
        self.setup, self.args = setup, args

    def build(self) -> nn.Module:
        raise NotImplementedError

    def loss(self, module: nn.Module) -> LossFn:
        raise NotImplementedError

    def fast_loss(self, module: nn.Module, mode: str) -> LossFn:
        """The loss of `mode`; called before the optimizer is built (it may change the weights' layout)."""
        raise NotImplementedError

    def channels_last(self, mode: str) -> bool:
        """Whether `mode` feeds channels-last inputs."""
        return False

    def sample(self, module: nn.Module, n: int, sampler: str, steps: int, seed: int, *,
               compiled: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def reference(self, module: nn.Module, n: int, seed: int) -> torch.Tensor:
        """The --ref_steps-step (default 1000) DDIM (eta 0) samples from the same x_T as `sample(..., seed)`."""
        raise NotImplementedError


def compiled_network(net: nn.Module, args: argparse.Namespace, mode: str = "default") -> nn.Module:
    options = {"mode": mode} if args.compile_backend == "inductor" else {}
    return torch.compile(net, backend=args.compile_backend, **options)


class Eddy(Subject):
    name = "eddy"
    samplers = ("ddim", "dpmpp_2m", "ddpm")

    @property
    def fast_modes(self) -> tuple[str, ...]:
        return ("compiled", "captured") if self.args.device == "cuda" else ("compiled",)

    def build(self) -> nn.Module:
        s, a = self.setup, self.args
        common = dict(dim_mults=s.dim_mults, channels=s.channels, attn_heads=4, attn_dim_head=32)
        net = Unet3D(s.dim, kind=a.unet3d_kind, **common) if s.frames else Unet(dim=s.dim, **common)
        return GaussianDiffusion(net, sample_shape=s.shape, timesteps=TIMESTEPS, objective=a.objective,
                                 beta_schedule="sigmoid")

    def loss(self, module: nn.Module) -> LossFn:
        return lambda x0, t, noise: module.loss_at(x0, t, noise)  # the loss itself, never the compiled one

    def fast_loss(self, module: nn.Module, mode: str) -> LossFn:
        # What trainer/parallel/base.py's prepare_network does for --compile: channels-last 2D weights, then
        # the loss compiled with the network inside.
        if self.channels_last(mode):
            module.model.to(memory_format=torch.channels_last)
        module.compile_loss(mode="default" if mode == "compiled" else "reduce-overhead",
                            backend=self.args.compile_backend)
        return lambda x0, t, noise: module.p_losses(x0, t, noise)

    def channels_last(self, mode: str) -> bool:
        return mode != "eager" and not self.setup.frames

    def sample(self, module, n, sampler, steps, seed, *, compiled=False):
        net = None
        if compiled:
            if getattr(module, "_benchmark_sampling_net", None) is None:
                from models.compiled import compiled as compile_fn

                if not self.setup.frames:
                    module.model.to(memory_format=torch.channels_last)
                module._benchmark_sampling_net = compile_fn(module.model, name="the sampling network",
                                                            backend=self.args.compile_backend)
            net = module._benchmark_sampling_net
        g = torch.Generator(device=self.args.device).manual_seed(seed)
        return module.sample(n, model=net, generator=g, sampler=sampler, sampling_timesteps=steps,
                             eta=0.0 if sampler == "ddim" else None)

    def reference(self, module, n, seed):
        g = torch.Generator(device=self.args.device).manual_seed(seed)
        return module.sample(n, generator=g, sampler="ddim", sampling_timesteps=self.args.ref_steps, eta=0.0)


class Lucidrains(Subject):
    """lucidrains' denoising-diffusion-pytorch; its loss is `p_losses` on data already in [-1, 1]."""

    name = "lucidrains"
    fast_modes = ("compiled",)
    samplers = ("ddim",)

    def __init__(self, setup: Setup, args: argparse.Namespace):
        super().__init__(setup, args)
        import denoising_diffusion_pytorch as ddp  # ImportError: the caller reports the subject as skipped

        self.ddp = ddp

    def build(self) -> nn.Module:
        s = self.setup
        net = self.ddp.Unet(dim=s.dim, dim_mults=s.dim_mults, channels=s.channels, attn_heads=4, attn_dim_head=32,
                            flash_attn=False)
        return self.ddp.GaussianDiffusion(net, image_size=s.image_size, timesteps=TIMESTEPS,
                                          objective=self.args.objective, beta_schedule="sigmoid")

    def loss(self, module: nn.Module) -> LossFn:
        return lambda x0, t, noise: module.p_losses(x0, t, noise=noise)

    def fast_loss(self, module: nn.Module, mode: str) -> LossFn:
        eager_net, fast_net = module.model, compiled_network(module.model, self.args)

        def loss(x0, t, noise):
            module.model = fast_net
            try:
                return module.p_losses(x0, t, noise=noise)
            finally:
                module.model = eager_net

        return loss

    def sample(self, module, n, sampler, steps, seed, *, compiled=False):
        if sampler != "ddim" or compiled:
            raise ValueError(f"lucidrains subject: only eager ddim, not {sampler!r}{' compiled' if compiled else ''}")
        module.sampling_timesteps = steps
        module.is_ddim_sampling = steps < module.num_timesteps
        torch.manual_seed(seed)  # its x_T: torch.randn on the global generator
        return module.sample(batch_size=n) * 2 - 1  # it returns [0, 1]

    def reference(self, module, n, seed):
        s = self.setup
        module.sampling_timesteps = self.args.ref_steps  # its sample() would go ancestral at T steps: DDIM directly
        torch.manual_seed(seed)
        return module.ddim_sample((n, s.channels, s.image_size, s.image_size)) * 2 - 1


class Video(Subject):
    """lucidrains' video-diffusion-pytorch Unet3D (eps, l2); no sampler but ancestral, so no sampling rows."""

    name = "video"

    def __init__(self, setup: Setup, args: argparse.Namespace):
        super().__init__(setup, args)
        import video_diffusion_pytorch as vdp  # ImportError: the caller reports the subject as skipped

        self.vdp = vdp

    def build(self) -> nn.Module:
        s = self.setup
        net = self.vdp.Unet3D(dim=s.dim, dim_mults=s.dim_mults, channels=s.channels)
        return self.vdp.GaussianDiffusion(net, image_size=s.image_size, num_frames=s.frames, channels=s.channels,
                                          timesteps=TIMESTEPS, loss_type="l2")

    def loss(self, module: nn.Module) -> LossFn:
        return lambda x0, t, noise: module.p_losses(x0, t, noise=noise)


class DDPMCifar(nn.Module):
    """diffusers' UNet2DModel and the DDPMScheduler it trains with (google/ddpm-cifar10-32's schedule)."""

    def __init__(self, unet: nn.Module, scheduler):
        super().__init__()
        self.unet, self.scheduler = unet, scheduler


# diffusers' samplers clip x0_hat to [-1, 1] as Eddy's and lucidrains' do: dynamic thresholding whose threshold is
# clamped to [1, 1] is that clip (the DDIM steps re-derive eps from the clipped x0_hat, as the others do).
CLIP_X0 = {"thresholding": True, "sample_max_value": 1.0}


class Diffusers(Subject):
    name = "diffusers"
    fast_modes = ("compiled",)
    samplers = ("dpmpp_2m", "ddim")

    def __init__(self, setup: Setup, args: argparse.Namespace):
        super().__init__(setup, args)
        import diffusers  # ImportError: the caller reports the subject as skipped

        self.diffusers = diffusers

    def build(self) -> nn.Module:
        s, d = self.setup, self.diffusers
        levels = len(s.dim_mults)
        down = ["DownBlock2D"] * levels
        down[1] = "AttnDownBlock2D"  # attention at 16x16 in the 32x32 layout: the second level
        unet = d.UNet2DModel(sample_size=s.image_size, in_channels=s.channels, out_channels=s.channels,
                             block_out_channels=tuple(s.dim * m for m in s.dim_mults), layers_per_block=2,
                             down_block_types=tuple(down), up_block_types=tuple(
                                 b.replace("Down", "Up") for b in reversed(down)),
                             attention_head_dim=None, center_input_sample=False, downsample_padding=0,
                             flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, norm_num_groups=32, act_fn="silu",
                             time_embedding_type="positional", mid_block_scale_factor=1)
        scheduler = d.DDPMScheduler(num_train_timesteps=TIMESTEPS, beta_start=1e-4, beta_end=0.02,
                                    beta_schedule="linear", clip_sample=True, variance_type="fixed_large")
        return DDPMCifar(unet, scheduler)

    def _loss(self, module: nn.Module, net: nn.Module) -> LossFn:
        def loss(x0, t, noise):
            x_t = module.scheduler.add_noise(x0, noise, t)
            return F.mse_loss(net(x_t, t).sample.float(), noise.float())

        return loss

    def loss(self, module: nn.Module) -> LossFn:
        return self._loss(module, module.unet)

    def fast_loss(self, module: nn.Module, mode: str) -> LossFn:
        module.unet.to(memory_format=torch.channels_last)
        return self._loss(module, compiled_network(module.unet, self.args))

    def channels_last(self, mode: str) -> bool:
        return mode != "eager"

    def _run(self, module, scheduler, net, n, seed, **step_kwargs):
        s = self.setup
        g = torch.Generator(device=self.args.device).manual_seed(seed)
        x = torch.randn((n, *s.shape), generator=g, device=self.args.device) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            eps = net(x, t).sample.float()  # the solver's state stays fp32 under autocast
            x = scheduler.step(eps, t, x, **step_kwargs).prev_sample
        return x

    def sample(self, module, n, sampler, steps, seed, *, compiled=False):
        d, config = self.diffusers, module.scheduler.config
        if sampler == "dpmpp_2m":
            scheduler = d.DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++",
                                                                  solver_order=2, **CLIP_X0)
        elif sampler == "ddim":
            scheduler = d.DDIMScheduler.from_config(config, clip_sample=False, **CLIP_X0)
        else:
            raise ValueError(f"diffusers subject: no sampler {sampler!r}; valid: {', '.join(self.samplers)}")
        scheduler.set_timesteps(steps, device=self.args.device)
        net = module.unet
        if compiled:
            if getattr(module, "_benchmark_sampling_net", None) is None:
                module.unet.to(memory_format=torch.channels_last)
                module._benchmark_sampling_net = compiled_network(module.unet, self.args)
            net = module._benchmark_sampling_net
        ddim = {"eta": 0.0, "use_clipped_model_output": True}
        return self._run(module, scheduler, net, n, seed, **(ddim if sampler == "ddim" else {}))

    def reference(self, module, n, seed):
        scheduler = self.diffusers.DDIMScheduler.from_config(module.scheduler.config, clip_sample=False, **CLIP_X0)
        scheduler.set_timesteps(self.args.ref_steps, device=self.args.device)
        return self._run(module, scheduler, module.unet, n, seed, eta=0.0, use_clipped_model_output=True)


SUBJECT_CLASSES = {"eddy": Eddy, "lucidrains": Lucidrains, "video": Video, "diffusers": Diffusers}


def make_subject(name: str, setup: Setup, args: argparse.Namespace) -> tuple[Subject | None, str | None]:
    """(the subject, None), or (None, why it is skipped) when its package cannot be imported."""
    try:
        return SUBJECT_CLASSES[name](setup, args), None
    except Exception as e:  # ImportError, or a broken dependency (torchvision, scipy) beneath it
        package = {"lucidrains": "denoising-diffusion-pytorch", "video": "video-diffusion-pytorch",
                   "diffusers": "diffusers"}.get(name, name)
        return None, (f"{name} skipped: {package} could not be imported ({type(e).__name__}: "
                      f"{first_line(e)}); install it with pip install '.[bench]'")


# ----------------------------------------------------------------------------------------------
# Measurement helpers


def stamp() -> str:
    """Seconds since process start, to begin a progress line."""
    return f"[{time.monotonic() - T_START:4.0f}s]"


def first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else ""


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def autocast(device: str, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def time_calls(call: Callable[[int], None], n: int, device: str) -> list[float]:
    """Milliseconds of each of `n` calls `call(0..n-1)`: CUDA events on CUDA, a wall clock on the CPU."""
    if device == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for k, (start, end) in enumerate(events):
            start.record()
            call(k)
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) for start, end in events]
    times = []
    for k in range(n):
        t0 = time.perf_counter()
        call(k)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def measure_matmul_peak(device: str) -> float | None:
    """FLOP/s of an 8192^3 bf16 matmul on random data: the median of 10 after 3 warm-ups (CUDA only)."""
    if device != "cuda":
        return None
    n = 8192
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    times = time_calls(lambda k: a @ b, 10, device)
    return 2 * n**3 / (statistics.median(times) / 1e3)  # the 256 MiB of a and b go with this frame


def count_flops_per_sample(loss: LossFn, x0, t, noise, device: str, precision: str) -> float:
    """FLOPs of one forward + backward of the loss per sample, counted on the first two samples."""
    n = min(2, x0.shape[0])
    with FlopCounterMode(display=False) as counter:
        with autocast(device, precision):
            out = loss(x0[:n], t[:n], noise[:n])
        out.backward()
    return counter.get_total_flops() / n


def loss_and_grads(loss: LossFn, params: list[nn.Parameter], x0, t, noise, device: str, precision: str
                   ) -> tuple[float, list[torch.Tensor | None]]:
    """The loss and a copy of every parameter's gradient after one forward + backward; the grads are cleared."""
    with autocast(device, precision):
        out = loss(x0, t, noise)
    out.backward()
    grads = [None if p.grad is None else p.grad.detach().float().clone() for p in params]
    value = float(out.detach())
    for p in params:
        p.grad = None
    return value, grads


GRAD_FLOOR = 1e-5  # parameters whose reference gradient is below this share of the whole gradient's norm


def grad_difference(a: list[torch.Tensor | None], b: list[torch.Tensor | None]) -> tuple[float, float, int]:
    """(max over parameters of ||a - b|| / ||b||, the same over all parameters as one vector, the number of
    parameters left out of the max). A missing gradient counts as zeros. Left out: parameters whose gradient
    in `b` is under GRAD_FLOOR of the whole gradient's norm, zero up to rounding (a bias just before a GroupNorm
    has a gradient of exactly zero in exact arithmetic, so its relative difference is rounding over rounding)."""
    pairs = []
    for ga, gb in zip(a, b):
        if ga is None and gb is None:
            continue
        ga = torch.zeros_like(gb) if ga is None else ga
        gb = torch.zeros_like(ga) if gb is None else gb
        pairs.append((float((ga - gb).norm()), float(gb.norm())))
    total = math.sqrt(sum(n * n for _, n in pairs))
    overall = math.sqrt(sum(d * d for d, _ in pairs)) / total if total else 0.0
    worst, left_out = 0.0, 0
    for diff, norm in pairs:
        if norm <= GRAD_FLOOR * total:
            left_out += 1
            continue
        worst = max(worst, diff / norm)
    return worst, overall, left_out


def cudagraph_skips() -> int:
    """How many graphs inductor has declined to capture as CUDA graphs so far in this process."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"].get("cudagraph_skips", 0))


class FallbackWatch(logging.Handler):
    """Collects the warnings of models/compiled.py: a compile that fell back to eager."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> "FallbackWatch":
        logging.getLogger("models.compiled").addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger("models.compiled").removeHandler(self)


def free_device(device: str, compiled: bool) -> None:
    if compiled:
        torch._dynamo.reset()  # drops compiled graphs and their CUDA-graph pools
    if device == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# A training row


def measure_training(subject: Subject, mode: str, precision: str, args: argparse.Namespace,
                     flops_cache: dict[tuple[str, str], float], peaks: dict[str, float | None]) -> dict[str, Any]:
    """One row: build, draw the inputs, gate a fast mode against eager, warm up, time `args.steps` steps."""
    device, setup = args.device, subject.setup
    row: dict[str, Any] = {"config": setup.name, "model": subject.name, "mode": mode, "precision": precision,
                           "batch": setup.batch_size}
    if device == "cuda":
        torch.cuda.empty_cache()
    torch.manual_seed(args.seed)
    module = subject.build().to(device)
    params = [p for p in module.parameters() if p.requires_grad]
    row["params_m"] = sum(p.numel() for p in params) / 1e6

    # Inputs: one x0, and (t, noise) for the gate and for every step, drawn here from one seeded generator.
    g = torch.Generator(device=device).manual_seed(args.seed)
    layout = torch.channels_last if subject.channels_last(mode) else torch.contiguous_format
    x0 = (torch.rand((setup.batch_size, *setup.shape), generator=g, device=device) * 2 - 1).contiguous(
        memory_format=layout)
    n_sets = 1 + args.warmup + args.steps
    ts = [torch.randint(0, TIMESTEPS, (setup.batch_size,), generator=g, device=device) for _ in range(n_sets)]
    noises = [torch.randn(x0.shape, generator=g, device=device).contiguous(memory_format=layout)
              for _ in range(n_sets)]
    bank_bytes = sum(n.numel() * n.element_size() for n in noises) + sum(t.numel() * 8 for t in ts)

    # FLOPs from the eager loss, the same count for every subject and mode.
    eager = subject.loss(module)
    key = (subject.name, setup.name)
    if key not in flops_cache:
        flops_cache[key] = count_flops_per_sample(eager, x0, ts[0], noises[0], device, precision)
        for p in params:
            p.grad = None
    row["gflop_per_sample"] = flops_cache[key] / 1e9

    # The gate: the fast path against eager on the same weights and inputs (the first fast call compiles).
    loss = eager
    skips_before = cudagraph_skips()
    if mode != "eager":
        ref = loss_and_grads(eager, params, x0, ts[0], noises[0], device, precision)
        again = loss_and_grads(eager, params, x0, ts[0], noises[0], device, precision)
        loss = subject.fast_loss(module, mode)
        with FallbackWatch() as watch:
            t0 = time.perf_counter()
            fast = loss_and_grads(loss, params, x0, ts[0], noises[0], device, precision)
            sync(device)
            row["compile_s"] = time.perf_counter() - t0
        loss_tol, grad_tol = GATE[precision]
        grad_rel, grad_rel_all, left_out = grad_difference(fast[1], ref[1])
        gate = {"loss_rel": abs(fast[0] - ref[0]) / max(abs(ref[0]), 1e-12), "grad_rel": grad_rel,
                "grad_rel_all": grad_rel_all, "grad_rel_floor": grad_difference(again[1], ref[1])[0],
                "params_left_out": left_out, "loss_tol": loss_tol, "grad_tol": grad_tol,
                "fallback": watch.messages[:1]}
        gate["passed"] = gate["loss_rel"] <= loss_tol and gate["grad_rel"] <= grad_tol and not watch.messages
        row["gate"] = gate
        del ref, again, fast
    optimizer = torch.optim.AdamW(params, lr=args.lr, fused=device == "cuda")
    last_loss: list[torch.Tensor] = []  # kept on the device: reading it would synchronize every step

    def step(k: int) -> None:
        if mode == "captured":
            torch.compiler.cudagraph_mark_step_begin()
        with autocast(device, precision):
            out = loss(x0, ts[1 + k], noises[1 + k])
        out.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        last_loss[:] = [out.detach().clone()]

    # Warm-up: in the captured mode its first two steps record the CUDA graphs (reported, never timed).
    t0 = time.perf_counter()
    for k in range(args.warmup):
        step(k)
        if k == 1 and mode == "captured":
            sync(device)
            row["capture_s"] = time.perf_counter() - t0
    sync(device)
    if mode == "captured":  # inductor counts the graphs it would not capture (and then runs them uncaptured)
        row["gate"]["cudagraph_skips"] = cudagraph_skips() - skips_before
        row["gate"]["passed"] &= row["gate"]["cudagraph_skips"] == 0
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = time_calls(lambda k: step(args.warmup + k), args.steps, device)
    ms = statistics.median(times)
    row.update(step_ms=ms, step_ms_min=min(times), step_ms_max=max(times),
               samples_per_s=setup.batch_size / (ms / 1e3), steps_timed=len(times))
    row.update(mfu_metrics(flops_cache[key], row["samples_per_s"], peaks))
    row["peak_gib"] = ((torch.cuda.max_memory_allocated() - bank_bytes) / 2**30) if device == "cuda" else None
    row["final_loss"] = float(last_loss[0])
    return row


def mfu_metrics(flops_per_sample: float | None, samples_per_s: float, peaks: dict[str, float | None]) -> dict:
    """MFU against the datasheet peak and against the measured matmul peak (None where either is unknown)."""
    out = {}
    for name in ("datasheet", "measured"):
        peak = peaks.get(name)
        out[f"mfu_{name}"] = flops_per_sample * samples_per_s / peak if peak and flops_per_sample else None
    return out


def gate_label(row: dict[str, Any]) -> str:
    gate = row.get("gate")
    if gate is None:  # a Trainer row: only whether its --compile fell back
        return "fell back to eager" if row.get("fallback") else "-"
    if gate["passed"]:
        verdict = "pass"
    elif gate["fallback"]:
        verdict = "fell back to eager"
    elif gate.get("cudagraph_skips"):
        verdict = f"{gate['cudagraph_skips']} graph(s) not captured"
    else:
        verdict = "FAILED-GATE"
    return f"{verdict} (loss {gate['loss_rel']:.0e}, grad {gate['grad_rel']:.0e}, floor {gate['grad_rel_floor']:.0e})"


# ----------------------------------------------------------------------------------------------
# Sampling rows


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).pow(2).mean().sqrt())


def build_for_sampling(subject: Subject, args: argparse.Namespace) -> tuple[nn.Module, str]:
    """(the module in eval mode on the device, where its weights come from)."""
    torch.manual_seed(args.seed)
    if subject.name == "eddy" and args.checkpoint:
        from trainer.build import build_diffusion, build_network
        from trainer.sample import WEIGHTS, checkpoint_config, load_weights, resolve_checkpoint

        run_dir, ckpt_dir = resolve_checkpoint(args.checkpoint)
        cfg, _ = checkpoint_config(ckpt_dir, run_dir, has_gpu=args.device == "cuda")
        net = build_network(cfg)
        load_weights(net, ckpt_dir / WEIGHTS["ema"])
        return build_diffusion(cfg, net).to(args.device).eval(), f"EMA of {ckpt_dir}"
    return subject.build().to(args.device).eval(), "random init"


def measure_sampling(subject: Subject, plan: list[tuple[str, int, bool]], args: argparse.Namespace,
                     emit: Callable[[dict[str, Any]], None], references: dict[Any, Any] | None = None) -> None:
    """For each (sampler, steps, compiled) of `plan`: seconds of `args.num_samples` samples (median of 3 after a
    warm-up call), and on `args.ref_samples` of the same noise the RMS difference against the 1000-step fp32
    reference (bf16 and fp32) and between bf16 and fp32. Each row goes to `emit` as soon as it is measured.
    `references` keeps each subject's reference for later calls (the same seed builds the same weights)."""
    device = args.device
    timed_precision = "bf16" if device == "cuda" else "fp32"
    module, weights = build_for_sampling(subject, args)
    n, seed = args.num_samples, args.seed
    references = {} if references is None else references
    with torch.no_grad():
        reference, ref_s = None, None
        key = (subject.name, subject.setup, weights, args.ref_samples, args.ref_steps, seed)
        if args.ref_samples and key not in references:
            t0 = time.perf_counter()
            references[key] = subject.reference(module, args.ref_samples, seed)
            sync(device)
            ref_s = time.perf_counter() - t0
        if args.ref_samples:
            reference = references[key]
        warmed: set[bool] = set()
        for sampler, steps, compiled in plan:
            row: dict[str, Any] = {"model": subject.name, "sampler": sampler, "steps": steps,
                                   "mode": "compiled" if compiled else "eager", "num_samples": n,
                                   "precision": timed_precision, "weights": weights}
            try:
                with autocast(device, timed_precision):
                    if compiled not in warmed:  # kernels, allocator, cuDNN choices; the compile when compiled
                        t0 = time.perf_counter()
                        subject.sample(module, n, sampler, 2, seed, compiled=compiled)
                        sync(device)
                        if compiled:
                            row["compile_s"] = time.perf_counter() - t0
                        warmed.add(compiled)
                    seconds = []
                    for _ in range(3):
                        t0 = time.perf_counter()
                        out = subject.sample(module, n, sampler, steps, seed, compiled=compiled)
                        sync(device)
                        seconds.append(time.perf_counter() - t0)
                row.update(seconds=statistics.median(seconds), seconds_min=min(seconds), seconds_max=max(seconds),
                           samples_per_s=n / statistics.median(seconds), finite=bool(torch.isfinite(out).all()))
                if reference is not None and not compiled:  # compiled: another batch or precision would recompile
                    fp32 = subject.sample(module, args.ref_samples, sampler, steps, seed, compiled=compiled)
                    with autocast(device, "bf16"):
                        bf16 = subject.sample(module, args.ref_samples, sampler, steps, seed, compiled=compiled)
                    row.update(ref_samples=args.ref_samples, ref_steps=args.ref_steps, ref_s=ref_s,
                               rms_vs_ref_fp32=rms(fp32, reference),
                               rms_vs_ref_bf16=rms(bf16, reference), rms_bf16_fp32=rms(bf16, fp32))
            except Exception as e:
                traceback.print_exc()
                row["error"] = f"{type(e).__name__}: {first_line(e)}"
            emit(row)
    del module
    free_device(device, compiled=any(c for _, _, c in plan))


# ----------------------------------------------------------------------------------------------
# Reporting


def fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def pct(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.1f}%"


def not_measured(r: dict[str, Any]) -> str:
    """Why a row has no numbers ("failed: ...", "skipped: ..."), or "" for a measured row."""
    if "error" in r:
        return f"failed: {r['error'][:90]}"
    return f"skipped: {r['skipped'][:90]}" if "skipped" in r else ""


def training_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| config | model (params) | mode | precision | step ms median [min-max] | samples/s | GFLOP/sample | "
             "MFU datasheet / measured | peak GiB | compile s | gate |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r.get('config', '-')} | {r['model']}"
        if not_measured(r):
            lines.append(f"{head} | {r['mode']} | {r.get('precision', '-')} | {not_measured(r)} | | | | | | |")
            continue
        params = f" ({r['params_m']:.1f}M)" if r.get("params_m") else ""
        compile_s = r.get("compile_s")
        if compile_s is not None and r.get("capture_s") is not None:
            compile_s_text = f"{compile_s:.0f} + {r['capture_s']:.1f} capture"
        else:
            compile_s_text = fmt(compile_s, ".0f")
        span = (f"{r['step_ms']:.1f} [{r['step_ms_min']:.1f}-{r['step_ms_max']:.1f}]"
                if r.get("step_ms_min") is not None else f"{r['step_ms']:.1f}")
        lines.append(f"{head}{params} | {r['mode']} | {r['precision']} | {span} | {r['samples_per_s']:.0f} | "
                     f"{fmt(r.get('gflop_per_sample'), '.1f')} | {pct(r.get('mfu_datasheet'))} / "
                     f"{pct(r.get('mfu_measured'))} | {fmt(r.get('peak_gib'), '.2f')} | {compile_s_text} | "
                     f"{gate_label(r)} |")
    return lines


def sampling_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| model | sampler | steps | mode | precision | seconds median [min-max] | RMS vs reference "
             "(as timed / fp32) | bf16-fp32 RMS | compile s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r['model']} | {r.get('sampler', '-')} | {r.get('steps', '-')} | {r.get('mode', '-')}"
        if not_measured(r):
            lines.append(f"{head} | {r.get('precision', '-')} | {not_measured(r)} | | | |")
            continue
        err = "-"
        if r.get("rms_vs_ref_fp32") is not None:
            timed = r["rms_vs_ref_bf16"] if r["precision"] == "bf16" else r["rms_vs_ref_fp32"]
            err = f"{timed:.4f} / {r['rms_vs_ref_fp32']:.4f}"
        lines.append(f"{head} | {r['precision']} | {r['seconds']:.3f} [{r['seconds_min']:.3f}-{r['seconds_max']:.3f}] | "
                     f"{err} | {fmt(r.get('rms_bf16_fp32'), '.4f')} | {fmt(r.get('compile_s'), '.0f')} |")
    return lines


def usable(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows measured, less those whose gate failed."""
    return [r for r in rows if "error" not in r and "skipped" not in r and r.get("gate", {}).get("passed", True)]


def speed_ratios(results: dict[str, Any]) -> list[str]:
    """Eddy against the best peer, per configuration and precision (training) and per step count (sampling)."""
    out = []
    train = usable(results["train"])
    groups = sorted({(r.get("config"), r["precision"]) for r in train}, key=str)
    for config, precision in groups:
        same = [r for r in train if r.get("config") == config and r["precision"] == precision
                and not r["mode"].startswith("Trainer")]
        eddy = [r for r in same if r["model"] == "eddy"]
        peers = [r for r in same if r["model"] != "eddy"]
        if not eddy or not peers:
            continue
        e, p = max(eddy, key=lambda r: r["samples_per_s"]), max(peers, key=lambda r: r["samples_per_s"])
        text = (f"{config} {precision}: Eddy {e['mode']} / {p['model']} {p['mode']} = "
                f"{e['samples_per_s'] / p['samples_per_s']:.2f}x samples/s")
        if e.get("peak_gib") and p.get("peak_gib"):
            text += f", peak memory {e['peak_gib'] / p['peak_gib']:.2f}x"
        out.append(text)
    trainers = [r for r in train if r["mode"].startswith("Trainer")]
    eddy_t = [r for r in trainers if r["model"] == "eddy"]
    peer_t = [r for r in trainers if r["model"] != "eddy"]
    if eddy_t and peer_t:
        e, p = max(eddy_t, key=lambda r: r["samples_per_s"]), max(peer_t, key=lambda r: r["samples_per_s"])
        out.append(f"Trainer end to end: Eddy {e['mode']} / {p['model']} {p['mode']} = "
                   f"{e['samples_per_s'] / p['samples_per_s']:.2f}x samples/s")
    sample = usable(results["sample"])
    for steps in sorted({r["steps"] for r in sample}):
        eddy = [r for r in sample if r["model"] == "eddy" and r["steps"] == steps]
        peers = [r for r in sample if r["model"] != "eddy" and r["steps"] == steps]
        if eddy and peers:
            e, p = min(eddy, key=lambda r: r["seconds"]), min(peers, key=lambda r: r["seconds"])
            out.append(f"sampling {steps} steps: {p['model']} {p['sampler']} {p['mode']} {p['seconds']:.3f} s / Eddy "
                       f"{e['sampler']} {e['mode']} {e['seconds']:.3f} s = {p['seconds'] / e['seconds']:.2f}x faster")
    return out


def markdown(results: dict[str, Any]) -> str:
    lines = training_table(results["train"])
    if results["sample"]:
        lines += [""] + sampling_table(results["sample"])
    ratios = speed_ratios(results)
    if ratios:
        lines += ["", "Eddy / best peer (rows that failed their gate left out):"] + [f"- {r}" for r in ratios]
    if results.get("notes"):
        lines += ["", "Notes:"] + [f"- {n}" for n in results["notes"]]
    return "\n".join(lines)


def package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def environment(args: argparse.Namespace, peaks: dict[str, float | None]) -> dict[str, Any]:
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": args.device,
           "cpu_count": os.cpu_count(), "peak_flops_datasheet": peaks.get("datasheet"),
           "peak_flops_measured_bf16_matmul": peaks.get("measured")}
    if args.device == "cuda":
        env.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                   capability=".".join(map(str, torch.cuda.get_device_capability())),
                   cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                   matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32)
    else:
        env.update(cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    for package in ("denoising-diffusion-pytorch", "video-diffusion-pytorch", "diffusers", "torchvision"):
        env[package] = package_version(package)
    return env


def reference_note(args: argparse.Namespace) -> str:
    return (f"sampling error: RMS (model space, [-1, 1]) on {args.ref_samples} samples against the {args.ref_steps}-step "
            f"fp32 DDIM (eta 0) of the same network from the same x_T; bf16-fp32: the same sampler's bf16 and fp32 "
            f"samples of that noise; timed calls: {args.num_samples} samples, median of 3 after a warm-up")


def describe_peaks(peaks: dict[str, float | None]) -> str:
    def tf(x):
        return "-" if x is None else f"{x / 1e12:.0f} TFLOP/s"

    return f"peak for MFU: datasheet {tf(peaks.get('datasheet'))}, measured 8192^3 bf16 matmul {tf(peaks.get('measured'))}"


class Results:
    """The rows measured so far, the notes, and the JSON file they are rewritten to after every row."""

    def __init__(self, args: argparse.Namespace, env: dict[str, Any], config: dict[str, Any]):
        self.args = args
        self.data: dict[str, Any] = {"environment": env, "config": config, "train": [], "sample": [], "notes": []}

    def note(self, msg: str) -> None:
        self.data["notes"].append(msg)
        print(f"note: {msg}", flush=True)

    def add(self, kind: str, row: dict[str, Any]) -> None:
        self.data[kind].append(row)
        self.save()

    def save(self) -> None:
        if self.args.json:
            self.args.json.parent.mkdir(parents=True, exist_ok=True)
            self.args.json.write_text(json.dumps(self.data, indent=2, default=str) + "\n")


def describe_training(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"  FAILED: {row['error']}"
    text = (f"  {row['step_ms']:.2f} ms/step (min {row['step_ms_min']:.2f}, max {row['step_ms_max']:.2f}), "
            f"{row['samples_per_s']:.0f} samples/s, {fmt(row.get('gflop_per_sample'), '.1f')} GFLOP/sample, "
            f"MFU {pct(row.get('mfu_datasheet'))} / {pct(row.get('mfu_measured'))}, "
            f"peak {fmt(row.get('peak_gib'), '.2f')} GiB, loss {fmt(row.get('final_loss'), '.4f')}")
    if "compile_s" in row:
        text += f", compiled in {row['compile_s']:.1f} s"
    if "capture_s" in row:
        text += f", captured in {row['capture_s']:.1f} s"
    if "gate" in row:
        text += f", gate {gate_label(row)}"
    return text


def describe_sampling(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"  {row['sampler']} {row['steps']} ({row['mode']}): FAILED: {row['error']}"
    text = f"  {row['sampler']} {row['steps']} steps ({row['mode']}): {row['seconds']:.3f} s"
    if row.get("rms_vs_ref_fp32") is not None:
        text += (f", RMS vs reference {row['rms_vs_ref_bf16']:.4f} (bf16) / {row['rms_vs_ref_fp32']:.4f} "
                 f"(fp32), bf16-fp32 {row['rms_bf16_fp32']:.4f}")
    return text


def run_training_row(subject: Subject, mode: str, precision: str, args: argparse.Namespace,
                     flops: dict[tuple[str, str], float], peaks: dict[str, float | None], results: Results) -> None:
    print(f"{stamp()} training step: {subject.setup.name} {subject.name} {mode} {precision} ...", flush=True)
    try:
        row = measure_training(subject, mode, precision, args, flops, peaks)
    except Exception as e:  # a failed row (a compile above all) is reported and the others go on
        traceback.print_exc()
        row = {"config": subject.setup.name, "model": subject.name, "mode": mode, "precision": precision,
               "error": f"{type(e).__name__}: {first_line(e)}"}
    print(describe_training(row), flush=True)
    results.add("train", row)
    free_device(args.device, compiled=mode != "eager")


def run_sampling(subject: Subject, plan: list[tuple[str, int, bool]], args: argparse.Namespace,
                 results: Results, references: dict[Any, Any] | None = None) -> None:
    print(f"{stamp()} sampling: {subject.name}, {args.num_samples} samples: "
          + ", ".join(f"{s} {n}{' compiled' if c else ''}" for s, n, c in plan), flush=True)

    def emit(row: dict[str, Any]) -> None:
        print(f"{stamp()} {describe_sampling(row).strip()}", flush=True)
        results.add("sample", row)

    try:
        measure_sampling(subject, plan, args, emit, references)
    except Exception as e:
        traceback.print_exc()
        emit({"model": subject.name, "sampler": plan[0][0], "steps": plan[0][1], "mode": "-",
              "error": f"{type(e).__name__}: {first_line(e)}"})


# ----------------------------------------------------------------------------------------------
# One configuration


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.suite:
        sys.modules.setdefault("train_step", sys.modules[__name__])  # gpu_suite's `import train_step`: this module
        from gpu_suite import run_suite  # benchmarks/ is on sys.path as this script's folder

        return run_suite(args)
    peaks = {"datasheet": args.peak_flops, "measured": measure_matmul_peak(args.device)}
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    results = Results(args, environment(args, peaks), config)
    setup = Setup("custom", args.dim, tuple(args.dim_mults), args.image_size, args.batch_size, args.frames,
                  args.channels)
    print(f"environment: {results.data['environment']}", flush=True)
    print(describe_peaks(peaks), flush=True)
    print(f"config: {setup.describe()}, {args.objective}, warm-up {args.warmup}, timed {args.steps}", flush=True)

    subjects: list[Subject] = []
    for name in args.models:
        name = ("video" if args.frames else "lucidrains") if name == "peer" else name
        subject, why = make_subject(name, setup, args)
        if subject is None:
            results.note(why)
        else:
            subjects.append(subject)

    if args.sample_steps and args.ref_samples:
        results.note(reference_note(args))
    flops: dict[tuple[str, str], float] = {}
    for precision in args.precisions:  # Eddy and the peers alternate
        for subject in subjects:
            run_training_row(subject, "eager", precision, args, flops, peaks, results)
    for subject in subjects if args.sample_steps else []:
        if subject.samplers:
            run_sampling(subject, [("ddim", s, False) for s in args.sample_steps if "ddim" in subject.samplers],
                         args, results)
    # Compile last: it is the slowest and the likeliest to fail; everything else is measured by then.
    eddy = next((s for s in subjects if s.name == "eddy"), None)
    if args.compile and eddy is None:
        results.note("--compile applies to Eddy, which --models leaves out")
    elif args.compile:
        mode = "compiled" if args.compile_mode == "default" else "captured"
        if mode not in eddy.fast_modes:
            results.note(f"{mode} skipped: CUDA graphs need a CUDA device")
        else:
            run_training_row(eddy, mode, "bf16" if "bf16" in args.precisions else args.precisions[0], args, flops,
                             peaks, results)

    print()
    print(markdown(results.data), flush=True)
    results.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
