"""Time one diffusion training step and DDIM sampling: Eddy against the lucidrains peer.

A benchmark, not a test: it prints numbers and asserts nothing. Measured, at one config for both
(default: Unet dim 128, dim_mults 1 2 2 2, 3x32x32 images, batch 128; with --frames F, clips of F frames:
Eddy's Unet3D against lucidrains' video-diffusion-pytorch Unet3D):

- training step = forward + backward + AdamW step of the diffusion loss at random timesteps, on
  random data already on the device, for
  (a) Eddy: `models.Unet` + `models.GaussianDiffusion`, eagerly and (with --compile) through
      `torch.compile` (the compile itself is never timed; a failure is reported, not raised);
  (b) the peer: `denoising_diffusion_pytorch.Unet` + `GaussianDiffusion`, from its released package
      (`pip install '.[bench]'`); skipped with a note when the package is missing;
  in bf16 autocast and in fp32 (--precisions). On CUDA each step is timed with CUDA events after
  warm-up and the median is reported; on the CPU with a wall clock.
- FLOPs per step: forward + backward counted once with `torch.utils.flop_counter.FlopCounterMode`;
  MFU = FLOPs per step / step time / --peak_flops (default on CUDA: 989e12, the H100/H200 dense bf16
  peak; on the CPU no MFU unless --peak_flops is given).
- peak memory: `torch.cuda.max_memory_allocated` over model, optimizer and steps of that row.
- sampling: --num_samples samples with Eddy's DDIM and the peer's DDIM (`sampling_timesteps`) at each
  of --sample_steps, in bf16 autocast on CUDA; seconds of one call after a short warm-up call.

A markdown table is printed last; --json writes the same rows (rewritten after every row, so a run
stopped part-way keeps what it measured).

    python benchmarks/train_step.py --json bench.json              # GPU, about 1 minute (+ compile)
    python benchmarks/train_step.py --compile --json bench.json    # adds torch.compile for Eddy
    python benchmarks/train_step.py --device cpu --tiny            # seconds: checks the script itself
    python benchmarks/train_step.py --frames 16 --image_size 64 --dim 64 --dim_mults 1 2 4 8 --batch_size 8 \
        --precisions bf16 --sample_steps                           # BENCHMARKS.md's Unet3D row
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # the peer's sampling loop draws a progress bar; read at tqdm's import

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: `models`

from models import GaussianDiffusion, Unet, Unet3D  # noqa: E402

H100_BF16_DENSE_PEAK = 989e12
TINY = dict(dim=32, dim_mults=[1, 2, 2], image_size=16, batch_size=8, warmup=1, steps=3,
            num_samples=8, sample_steps=[5, 10])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="benchmarks/train_step.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Time a diffusion training step (forward + backward + AdamW) and DDIM sampling, "
                    "Eddy against the lucidrains denoising-diffusion-pytorch peer, at the same config.")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"), help="auto: cuda if available.")
    p.add_argument("--tiny", action="store_true",
                   help=f"a config that runs in seconds on a CPU, to check the script: {TINY}. "
                        "Flags given explicitly still win.")
    p.add_argument("--models", nargs="+", default=["eddy", "peer"], choices=("eddy", "peer"))
    p.add_argument("--precisions", nargs="+", default=None, choices=("bf16", "fp32"),
                   help="autocast precisions of the training step (default: bf16 fp32 on CUDA, fp32 on the CPU).")
    p.add_argument("--compile", action="store_true",
                   help="also time Eddy through torch.compile (bf16 on CUDA; compile time reported, not timed).")
    p.add_argument("--compile_mode", default="default", help="the `mode` of torch.compile.")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--dim_mults", type=int, nargs="+", default=[1, 2, 2, 2])
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--frames", type=int, default=0,
                   help="frames per clip: 0 benchmarks the 2D Unets; F > 0 the Unet3Ds on [B, C, F, H, W].")
    p.add_argument("--unet3d_kind", default="factorized", choices=("factorized", "conv3d"),
                   help="Eddy's Unet3D kind, with --frames.")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--objective", default="pred_noise", choices=("pred_noise", "pred_x0", "pred_v"),
                   help="what both networks predict (BENCHMARKS.md measures the eps loss).")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before the timed ones.")
    p.add_argument("--steps", type=int, default=20, help="timed steps; the median is reported.")
    p.add_argument("--num_samples", type=int, default=256, help="samples per sampling call.")
    p.add_argument("--sample_steps", type=int, nargs="*", default=[50, 250],
                   help="DDIM steps to time sampling at; none skips sampling.")
    p.add_argument("--peak_flops", type=float, default=None,
                   help=f"peak FLOP/s for MFU (default on CUDA: {H100_BF16_DENSE_PEAK:.0f}, dense bf16 of an "
                        "H100/H200; on the CPU no MFU unless given).")
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
    if args.image_size % factor:
        p.error(f"--image_size {args.image_size} is not divisible by {factor} for --dim_mults {args.dim_mults}.")
    return args


# ----------------------------------------------------------------------------------------------
# The two implementations, behind one interface: build() -> (diffusion module, make_batch, sample)


class Subject:
    """One implementation: how to build its diffusion model, feed it data and sample from it."""

    name = ""

    def __init__(self, args: argparse.Namespace):
        self.args = args

    def build(self) -> torch.nn.Module:
        raise NotImplementedError

    def batch(self, generator: torch.Generator) -> torch.Tensor:
        a = self.args
        frames = (a.frames,) if a.frames else ()
        return torch.rand((a.batch_size, a.channels, *frames, a.image_size, a.image_size), generator=generator,
                          device=a.device)

    def sample(self, diffusion: torch.nn.Module, n: int, steps: int) -> torch.Tensor:
        raise NotImplementedError


class Eddy(Subject):
    name = "eddy"

    def build(self) -> torch.nn.Module:
        a = self.args
        common = dict(dim_mults=tuple(a.dim_mults), channels=a.channels, attn_heads=4, attn_dim_head=32)
        net = Unet3D(a.dim, kind=a.unet3d_kind, **common) if a.frames else Unet(dim=a.dim, **common)
        frames = (a.frames,) if a.frames else ()
        return GaussianDiffusion(net, sample_shape=(a.channels, *frames, a.image_size, a.image_size), timesteps=1000,
                                 objective=a.objective, beta_schedule="sigmoid")

    def batch(self, generator: torch.Generator) -> torch.Tensor:
        return super().batch(generator) * 2 - 1  # Eddy trains in model space, [-1, 1]

    def sample(self, diffusion: torch.nn.Module, n: int, steps: int) -> torch.Tensor:
        return diffusion.sample(n, sampling_timesteps=steps)


class VideoPeer(Subject):
    """lucidrains' video-diffusion-pytorch: its Unet3D and GaussianDiffusion on clips [B, C, F, H, W]."""

    name = "video-diffusion-pytorch"

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        import video_diffusion_pytorch as vdp  # ImportError: the caller reports the peer as skipped

        self.vdp = vdp

    def build(self) -> torch.nn.Module:
        a = self.args
        net = self.vdp.Unet3D(dim=a.dim, dim_mults=tuple(a.dim_mults), channels=a.channels)
        # Its loss takes clips in [0, 1] and normalizes them itself.
        return self.vdp.GaussianDiffusion(net, image_size=a.image_size, num_frames=a.frames, channels=a.channels,
                                          timesteps=1000, loss_type="l2")

    def sample(self, diffusion: torch.nn.Module, n: int, steps: int) -> torch.Tensor:
        return diffusion.sample(batch_size=n)  # ancestral only: --sample_steps does not apply


class Peer(Subject):
    name = "lucidrains"

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        import denoising_diffusion_pytorch as ddp  # ImportError: the caller reports the peer as skipped

        self.ddp = ddp

    def build(self) -> torch.nn.Module:
        a = self.args
        net = self.ddp.Unet(dim=a.dim, dim_mults=tuple(a.dim_mults), channels=a.channels, attn_heads=4,
                            attn_dim_head=32, flash_attn=False)  # flash_attn fails in fp32 on Hopper
        # Its forward takes images in [0, 1] and normalizes them itself (auto_normalize).
        return self.ddp.GaussianDiffusion(net, image_size=a.image_size, timesteps=1000, objective=a.objective,
                                          beta_schedule="sigmoid")

    def sample(self, diffusion: torch.nn.Module, n: int, steps: int) -> torch.Tensor:
        diffusion.sampling_timesteps = steps
        diffusion.is_ddim_sampling = steps < diffusion.num_timesteps
        return diffusion.sample(batch_size=n)


# ----------------------------------------------------------------------------------------------
# Measurement


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def autocast(device: str, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def time_steps(step: Callable[[], None], n: int, device: str) -> list[float]:
    """Milliseconds of each of `n` calls of `step`: CUDA events on CUDA, a wall clock on the CPU."""
    times = []
    if device == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for start, end in events:
            start.record()
            step()
            end.record()
        torch.cuda.synchronize()
        times = [start.elapsed_time(end) for start, end in events]
    else:
        for _ in range(n):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def count_flops(diffusion: torch.nn.Module, x: torch.Tensor, device: str, precision: str) -> int:
    """FLOPs of one forward + backward of the loss (the optimizer step is not counted)."""
    with FlopCounterMode(display=False) as counter:
        with autocast(device, precision):
            loss = diffusion(x)
        loss.backward()
    diffusion.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def measure_training(subject: Subject, mode: str, precision: str, args: argparse.Namespace,
                     flops_cache: dict[str, int]) -> dict[str, Any]:
    """One row: build the model and AdamW, warm up, time `args.steps` steps."""
    device = args.device
    row: dict[str, Any] = {"model": subject.name, "mode": mode, "precision": precision}
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(args.seed)
    diffusion = subject.build().to(device)
    row["params_m"] = sum(p.numel() for p in diffusion.parameters()) / 1e6
    optimizer = torch.optim.AdamW(diffusion.parameters(), lr=args.lr, fused=device == "cuda")
    g = torch.Generator(device=device).manual_seed(args.seed)
    x = subject.batch(g)

    # FLOPs from the eager model (equal for the compiled one, which computes the same thing).
    if subject.name not in flops_cache:
        flops_cache[subject.name] = count_flops(diffusion, x, device, precision)
    row["gflop_per_step"] = flops_cache[subject.name] / 1e9

    forward = torch.compile(diffusion, mode=args.compile_mode) if mode == "compile" else diffusion
    last_loss: list[torch.Tensor] = []  # kept on the device: reading it would synchronize every step

    def step() -> None:
        with autocast(device, precision):
            loss = forward(x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        last_loss[:] = [loss.detach()]

    if mode == "compile":  # the first calls compile forward and backward: reported, never timed
        t0 = time.perf_counter()
        for _ in range(2):
            step()
        sync(device)
        row["compile_s"] = time.perf_counter() - t0
    for _ in range(args.warmup):
        step()
    sync(device)
    times = time_steps(step, args.steps, device)
    ms = statistics.median(times)
    row.update(step_ms=ms, step_ms_min=min(times), step_ms_max=max(times),
               samples_per_s=args.batch_size / (ms / 1e3))
    row["mfu"] = (flops_cache[subject.name] / (ms / 1e3) / args.peak_flops) if args.peak_flops else None
    row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    row["final_loss"] = float(last_loss[0])
    del forward, diffusion, optimizer, x, last_loss
    return row


def measure_sampling(subject: Subject, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Seconds of one call of `args.num_samples` samples at each of `args.sample_steps` DDIM steps."""
    device = args.device
    precision = "bf16" if device == "cuda" else "fp32"
    torch.manual_seed(args.seed)
    diffusion = subject.build().to(device).eval()
    rows = []
    with torch.no_grad(), autocast(device, precision):
        subject.sample(diffusion, args.num_samples, 2)  # warm-up: kernels, allocator, cuDNN choices
        sync(device)
        for steps in args.sample_steps:
            t0 = time.perf_counter()
            out = subject.sample(diffusion, args.num_samples, steps)
            sync(device)
            seconds = time.perf_counter() - t0
            rows.append({"model": subject.name, "sampler": "ddim", "steps": steps, "num_samples": args.num_samples,
                         "precision": precision, "seconds": seconds, "samples_per_s": args.num_samples / seconds,
                         "finite": bool(torch.isfinite(out).all())})
    del diffusion
    return rows


# ----------------------------------------------------------------------------------------------
# Reporting


def fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def pct(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.1f}%"


def markdown(results: dict[str, Any]) -> str:
    lines = ["| model (params) | mode | precision | step ms | samples/s | GFLOP/step | MFU | peak GiB | compile s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results["train"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['mode']} | {r['precision']} | failed: {r['error'][:80]} |"
                         " | | | | |")
            continue
        lines.append(f"| {r['model']} ({r['params_m']:.1f}M) | {r['mode']} | {r['precision']} | "
                     f"{r['step_ms']:.1f} | {r['samples_per_s']:.0f} | {r['gflop_per_step']:.1f} | "
                     f"{pct(r['mfu'])} | "
                     f"{fmt(r['peak_gib'], '.2f')} | {fmt(r.get('compile_s'), '.0f')} |")
    if results["sample"]:
        lines += ["", "| model | sampler | steps | samples | precision | seconds | samples/s |",
                  "|---|---|---|---|---|---|---|"]
        for r in results["sample"]:
            if "error" in r:
                lines.append(f"| {r['model']} | ddim | | | | failed: {r['error'][:80]} | |")
                continue
            lines.append(f"| {r['model']} | {r['sampler']} | {r['steps']} | {r['num_samples']} | {r['precision']} | "
                         f"{r['seconds']:.2f} | {r['samples_per_s']:.0f} |")
    ratios = speed_ratios(results)
    if ratios:
        lines += ["", "Eddy / lucidrains: " + "; ".join(ratios)]
    return "\n".join(lines)


def speed_ratios(results: dict[str, Any]) -> list[str]:
    """Eddy's speed relative to the peer's, for each configuration measured for both."""
    out = []
    ok = [r for r in results["train"] if "error" not in r]
    for r in ok:
        if r["model"] != "eddy":
            continue
        peer = [p for p in ok if p["model"] == "lucidrains" and p["mode"] == "eager" and p["precision"] == r["precision"]]
        if peer:
            out.append(f"train {r['mode']} {r['precision']}: {r['samples_per_s'] / peer[0]['samples_per_s']:.2f}x")
    ok = [r for r in results["sample"] if "error" not in r]
    for r in ok:
        peer = [p for p in ok if p["model"] == "lucidrains" and p["steps"] == r["steps"]]
        if r["model"] == "eddy" and peer:
            out.append(f"sample {r['steps']} steps: {peer[0]['seconds'] / r['seconds']:.2f}x")
    return out


def environment(args: argparse.Namespace) -> dict[str, Any]:
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": args.device,
           "cpu_count": os.cpu_count()}
    if args.device == "cuda":
        env.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                   capability=".".join(map(str, torch.cuda.get_device_capability())))
    else:
        env.update(cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    try:
        from importlib.metadata import version

        env["denoising_diffusion_pytorch"] = version("denoising-diffusion-pytorch")
    except Exception:
        env["denoising_diffusion_pytorch"] = None
    return env


def run_training_row(subject: Subject, mode: str, precision: str, args: argparse.Namespace, flops: dict[str, int],
                     results: dict[str, Any]) -> None:
    print(f"training step: {subject.name} {mode} {precision} ...", flush=True)
    try:
        row = measure_training(subject, mode, precision, args, flops)
        print(f"  {row['step_ms']:.2f} ms/step (min {row['step_ms_min']:.2f}, max {row['step_ms_max']:.2f}), "
              f"{row['samples_per_s']:.0f} samples/s, {row['gflop_per_step']:.1f} GFLOP/step, "
              f"MFU {pct(row['mfu'])}, peak {fmt(row['peak_gib'], '.2f')} GiB, "
              f"loss {row['final_loss']:.4f}"
              + (f", compiled in {row['compile_s']:.0f} s" if "compile_s" in row else ""), flush=True)
    except Exception as e:  # a failed row (compile above all) is reported and the others go on
        traceback.print_exc()
        row = {"model": subject.name, "mode": mode, "precision": precision,
               "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        print(f"  FAILED: {row['error']}", flush=True)
    results["train"].append(row)
    if args.device == "cuda":
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    results: dict[str, Any] = {"environment": environment(args), "config": config, "train": [], "sample": [],
                               "notes": []}

    def note(msg: str) -> None:
        results["notes"].append(msg)
        print(f"note: {msg}", flush=True)

    def save() -> None:
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=2) + "\n")

    print(f"environment: {results['environment']}", flush=True)
    frames = f"{args.frames}x" if args.frames else ""
    print(f"config: dim {args.dim}, dim_mults {args.dim_mults}, {args.channels}x{frames}{args.image_size}x{args.image_size}, "
          f"batch {args.batch_size}, {args.objective}, warm-up {args.warmup}, timed {args.steps}", flush=True)

    subjects: list[Subject] = []
    for name in args.models:
        if name == "eddy":
            subjects.append(Eddy(args))
            continue
        peer = VideoPeer if args.frames else Peer
        try:
            subjects.append(peer(args))
        except Exception as e:  # ImportError, or a broken dependency (torchvision, scipy) beneath it
            package = "video_diffusion_pytorch" if args.frames else "denoising_diffusion_pytorch"
            note(f"peer skipped: {package} could not be imported ({type(e).__name__}: "
                 f"{str(e).splitlines()[0] if str(e) else ''}); install it with pip install '.[bench]'")

    plan = [(s, "eager", p) for p in args.precisions for s in subjects]  # Eddy and the peer alternate
    if args.compile:
        if any(s.name == "eddy" for s in subjects):
            plan.append((next(s for s in subjects if s.name == "eddy"), "compile",
                         "bf16" if "bf16" in args.precisions else args.precisions[0]))
        else:
            note("--compile applies to Eddy, which --models leaves out")
    flops: dict[str, int] = {}
    # Compile last: it is the slowest and the likeliest to fail; everything else is measured by then.
    for subject, mode, precision in [p for p in plan if p[1] != "compile"]:
        run_training_row(subject, mode, precision, args, flops, results)
        save()
    for subject in subjects if args.sample_steps else []:
        print(f"sampling: {subject.name}, {args.num_samples} samples at {args.sample_steps} DDIM steps", flush=True)
        try:
            rows = measure_sampling(subject, args)
            for r in rows:
                print(f"  {r['steps']} steps: {r['seconds']:.2f} s", flush=True)
            results["sample"] += rows
        except Exception as e:
            traceback.print_exc()
            results["sample"].append({"model": subject.name, "error": f"{type(e).__name__}: {e}"})
        save()
    for subject, mode, precision in [p for p in plan if p[1] == "compile"]:
        run_training_row(subject, mode, precision, args, flops, results)
        save()

    print()
    print(markdown(results), flush=True)
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
