"""Where the time of one training step goes on the CPU, at the tiny config of `benchmarks/cpu_trainer.py`.

A benchmark, not a test: it prints numbers and asserts nothing. Runs in Eddy's own environment (`.venv`);
no peer is needed for these rows (`cpu_trainer.py` measures the whole process against lucidrains').

1. Kernels: the weight standardization and the unit norm of `models/layers.py` against the forms they
   replace (`torch.var`, `F.normalize`), forward and backward, at the shapes of the tiny Unet;
   `torch.var` against a mean.
2. Steps: forward + backward + clipping + AdamW of the 1.4M-parameter Unet (dim 32, mults 1 2 2, batch
   16 at 16x16, pred_v), in one process, the variants taking turns step by step so that they share the
   machine's state; the median of --steps steps after 10 of warm-up:
   - `eager, before`: `torch.var` and `F.normalize`, the per-parameter AdamW loop (the previous version);
   - `eager`: Eddy as it is (the closed forms, fused AdamW);
   - `channels_last`, `bf16 autocast`, `bf16 autocast + channels_last`: Eddy with those options;
   - with --compile, also the loss through `torch.compile` (its warm-up time printed apart; minutes).

    .venv/bin/python benchmarks/cpu_step.py
    .venv/bin/python benchmarks/cpu_step.py --compile --steps 30
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import models.layers as layers  # noqa: E402
from trainer.build import build_diffusion, build_network  # noqa: E402
from trainer.config import build_config  # noqa: E402


def median_us(fn, n: int = 100) -> float:
    for _ in range(10):
        fn()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def var_standardize(weight, eps):
    """The previous weight standardization: autograd through mean and `torch.var`."""
    dims = tuple(range(1, weight.ndim))
    mean = weight.mean(dim=dims, keepdim=True)
    var = weight.var(dim=dims, keepdim=True, correction=0)
    return (weight - mean) * (var + eps).rsqrt()


def normalize(x):
    return F.normalize(x, dim=1)


def forward_backward(fn, x):
    grad = torch.randn_like(x)
    leaf = x.detach().requires_grad_()
    return lambda: torch.autograd.backward(fn(leaf), grad)


def kernel_rows() -> list[tuple[str, float, float]]:
    rows = []
    for shape in ((32, 32, 3, 3), (64, 64, 3, 3), (128, 192, 3, 3)):
        w = torch.randn(shape)
        rows.append((f"weight standardization {tuple(shape)}, forward + backward",
                     median_us(forward_backward(lambda v: var_standardize(v, 1e-5), w)),
                     median_us(forward_backward(lambda v: layers.standardize_weight(v, 1e-5), w))))
        rows.append((f"torch.var vs mean over {tuple(shape)[1:]}", median_us(lambda: w.var(dim=(1, 2, 3), correction=0)),
                     median_us(lambda: w.mean(dim=(1, 2, 3)))))
    for shape in ((16, 32, 16, 16), (16, 64, 16, 16), (16, 128, 4, 4)):
        x = torch.randn(shape)
        rows.append((f"unit norm over channels {tuple(shape)}, forward + backward",
                     median_us(forward_backward(normalize, x)), median_us(forward_backward(layers.unit_norm, x))))
    return rows


def tiny_diffusion():
    cfg = build_config(dict(preset="tiny", dim=32, dim_mults=[1, 2, 2], attn_heads=4, attn_dim_head=32, image_size=16,
                            timesteps=1000, objective="pred_v", beta_schedule="sigmoid"), has_gpu=False)
    torch.manual_seed(0)
    return build_diffusion(cfg, build_network(cfg))


class Variant:
    def __init__(self, name, diffusion, *, before=False, channels_last=False, bf16=False, compiled=False):
        self.name, self.diffusion, self.before, self.bf16 = name, diffusion, before, bf16
        self.format = torch.channels_last if channels_last else torch.contiguous_format
        self.optimizer = torch.optim.AdamW(diffusion.parameters(), lr=1e-4, betas=(0.9, 0.99), weight_decay=0,
                                           **({} if before else {"fused": True}))
        self.compiled, self.times, self.warmup_s = compiled, [], None

    def step(self, x) -> float:
        saved = layers.standardize_weight, layers.unit_norm
        if self.before:
            layers.standardize_weight, layers.unit_norm = var_standardize, normalize
        self.diffusion.to(memory_format=self.format)
        x = x.contiguous(memory_format=self.format)
        try:
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else nullcontext():
                loss = self.diffusion(x)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.diffusion.parameters(), 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            return time.perf_counter() - start
        finally:
            layers.standardize_weight, layers.unit_norm = saved


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=50, help="timed steps of each variant, after 10 of warm-up")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch.set_num_threads")
    p.add_argument("--compile", action="store_true", help="add a torch.compile row (warm-up takes minutes)")
    p.add_argument("--skip_kernels", action="store_true", help="step rows only")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {torch.backends.cpu.get_cpu_capability()}", flush=True)

    if not args.skip_kernels:
        print("\n| kernel | before us | now us | speed-up |\n|---|---|---|---|")
        for name, before, now in kernel_rows():
            print(f"| {name} | {before:.0f} | {now:.0f} | {before / now:.2f}x |", flush=True)

    diffusion = tiny_diffusion()
    variants = [Variant("eager, before (torch.var, F.normalize, AdamW loop)", diffusion, before=True),
                Variant("eager", diffusion),
                Variant("channels_last", diffusion, channels_last=True),
                Variant("bf16 autocast", diffusion, bf16=True),
                Variant("bf16 autocast + channels_last", diffusion, bf16=True, channels_last=True)]
    if args.compile:
        compiled = tiny_diffusion()
        compiled.compile_loss()
        variants.append(Variant("torch.compile (inductor)", compiled, compiled=True))
    x = torch.rand(16, 3, 16, 16) * 2 - 1
    for v in variants:
        if v.compiled:
            start = time.perf_counter()
            v.step(x)
            v.warmup_s = time.perf_counter() - start
            print(f"{v.name}: first step (compile) {v.warmup_s:.1f} s", flush=True)
    for r in range(10 + args.steps):
        for v in variants:
            elapsed = v.step(x)
            if r >= 10:
                v.times.append(elapsed)
    base = statistics.median(variants[0].times)
    print("\n| step (forward, backward, clip, AdamW) | ms, median | min-max | vs before |\n|---|---|---|---|")
    for v in variants:
        med = statistics.median(v.times)
        print(f"| {v.name} | {1e3 * med:.1f} | {1e3 * min(v.times):.1f}-{1e3 * max(v.times):.1f} | {base / med:.2f}x |")


if __name__ == "__main__":
    main()
