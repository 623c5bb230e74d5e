"""Sample from a trained run: `python trainer/sample.py CHECKPOINT [flags]` or `./launch.sh sample ...`.

CHECKPOINT is a run folder (its newest intact checkpoint is used), one checkpoint folder
`.../checkpoints/step-XXXXXXXX`, or `latest` (the newest run under --results_path). The network is
rebuilt from the config stored in the checkpoint, the EMA (or raw) weights are loaded strictly, and
the samples are written to a folder named by the time and the sampler under `<run>/generated/`
(e.g. `2026-11-17_12-30-45_dpmpp_2m_20`) unless --out is given:

    grid.png        all samples in one grid (small images enlarged with nearest-neighbour)
    samples.npz     images: uint8 [N, H, W, C]; samples: float16 [N, C, H, W] in [-1, 1]
    000000.png ...  one file per sample, with --save_individual
    info.json       checkpoint, step, seed, sampler settings, weights, elapsed time

The same checkpoint, seed, --batch_size, sampling settings and device give the same samples.
A user error prints one message naming the flag or path and exits with status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script, Python puts trainer/ first on sys.path, where trainer/trainer.py would shadow
    # the package `trainer`. Put the repository root there instead.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any, Callable  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from trainer import checkpoint as ckpt_io  # noqa: E402
from trainer.config import Config, build_config, field_specs, flatten, validate_sampling  # noqa: E402
from trainer.errors import CheckpointError, ConfigError, EddyError  # noqa: E402
from models.sampling import SAMPLER_NAMES  # noqa: E402

WEIGHTS = {"ema": "ema.safetensors", "model": "model.safetensors"}
MIN_TILE_PX = 128  # grid tiles smaller than this are enlarged (nearest) for viewing

EXAMPLES = """\
examples:
  python trainer/sample.py latest                          64 EMA samples from the newest run under results/
  python trainer/sample.py results/my-run --num_samples 16 --seed 3
  python trainer/sample.py latest --sampler dpmpp_2m --sampling_timesteps 20   fast: DPM-Solver++ in 20 steps
  python trainer/sample.py results/my-run/checkpoints/step-00005000 --sampling_timesteps 50 --save_individual
  ./launch.sh sample latest --weights model --out /tmp/samples
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="trainer/sample.py", description="Generate samples from an Eddy checkpoint.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="A run folder (its newest intact checkpoint), a checkpoint folder "
                        ".../checkpoints/step-XXXXXXXX, or `latest` (the newest run under --results_path).")
    p.add_argument("--num_samples", type=int, default=64, help="Samples to generate (default: 64).")
    p.add_argument("--batch_size", type=int, default=64,
                   help="Samples generated at once (default: 64). Part of what fixes the samples of a seed.")
    add_sampling_flags(p, "sample")
    p.add_argument("--out", default=None,
                   help="Output folder; must be new or empty "
                        "(default: <run>/generated/<YYYY-mm-dd_HH-MM-SS>_<sampler>_<steps>/).")
    p.add_argument("--device", default=None, help="Torch device (default: cuda if available, else cpu).")
    p.add_argument("--bf16", action="store_true", help="Run the network under bfloat16 autocast.")
    p.add_argument("--save_individual", action="store_true", help="Also write each sample as 000000.png, ...")
    p.add_argument("--results_path", default="results",
                   help="Folder of runs that `latest` searches (default: results).")
    return p


def add_sampling_flags(p: argparse.ArgumentParser, what: str) -> None:
    """--sampler, --sampling_timesteps, --ddim_eta, --seed and --weights, for the commands that sample a checkpoint
    (checked with trainer.config.validate_sampling). `what` is the sampled unit, for the help text."""
    p.add_argument("--sampler", choices=SAMPLER_NAMES, default=None,
                   help="ddpm (ancestral), ddim, or dpmpp_2m (DPM-Solver++ 2M, good at 10-25 steps) "
                        "(default: the run's --sampler).")
    p.add_argument("--sampling_timesteps", type=int, default=None,
                   help=f"Network evaluations per {what}, at most the run's --timesteps "
                        "(default: the run's --sampling_timesteps).")
    p.add_argument("--ddim_eta", type=float, default=None,
                   help="DDIM eta, --sampler ddim only: 0 is deterministic, 1 is DDPM-like "
                        "(default: the run's --ddim_eta, or 0 with another --sampler).")
    p.add_argument("--seed", type=int, default=0, help="Seed of the sampling noise (default: 0).")
    p.add_argument("--weights", choices=tuple(WEIGHTS), default="ema",
                   help="Use the EMA weights or the raw trained weights (default: ema).")


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    try:
        generate(**args)
    except EddyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


# ----------------------------------------------------------------------------------------------
# Finding the checkpoint


def resolve_checkpoint(checkpoint: str, results_path: str | Path = "results",
                       warn: Callable[[str], None] | None = None) -> tuple[Path, Path]:
    """CHECKPOINT -> (run folder, verified checkpoint folder). A run folder gives its newest intact
    checkpoint; a checkpoint folder named explicitly must be intact itself."""
    warn = warn or (lambda m: print(f"WARNING: {m}", file=sys.stderr))
    run_dir, ckpt_dir = ckpt_io.find_run_to_resume(checkpoint, Path(results_path), flag="CHECKPOINT")
    if ckpt_dir is not None:
        try:
            ckpt_io.verify(ckpt_dir)
        except CheckpointError as e:
            raise CheckpointError(f"CHECKPOINT {checkpoint} is not intact: {e} "
                                  f"Pass the run folder to use its newest intact checkpoint.") from None
        return run_dir, ckpt_dir
    found = ckpt_io.newest_intact(run_dir, warn)
    if found is None:
        raise CheckpointError(f"CHECKPOINT {checkpoint}: no intact checkpoint in {run_dir / 'checkpoints'}.")
    return run_dir, found


def checkpoint_config(ckpt_dir: Path, run_dir: Path, *, has_gpu: bool) -> tuple[Config, dict[str, Any]]:
    """(the run's Config as saved in the checkpoint, the checkpoint's state.json).

    Every saved value is passed explicitly, so the preset only fills fields the checkpoint predates.
    The config is not re-validated: paths in it (e.g. --train_data_dir) need not exist where we sample.
    """
    try:
        state = json.loads((ckpt_dir / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{ckpt_dir / 'state.json'} is unreadable: {e}") from None
    nested = state.get("config")
    if not nested:
        saved = run_dir / "config.json"
        if not saved.is_file():
            raise CheckpointError(f"{ckpt_dir / 'state.json'} holds no config and {saved} does not exist: "
                                  f"the network cannot be rebuilt.")
        nested = json.loads(saved.read_text())
    known = {f.name for _, f, _ in field_specs()}
    flat = {k: v for k, v in flatten(nested).items() if k in known}
    if "sampler" not in flat and flat.get("sampling_timesteps") == flat.get("timesteps"):
        flat["sampler"] = "ddpm"  # runs from before --sampler sampled all their steps with DDPM
    return build_config(flat, has_gpu=has_gpu), state


def load_weights(module: torch.nn.Module, path: Path) -> None:
    """Strict load of a safetensors state dict, with a message that names what does not fit."""
    from safetensors.torch import load_file

    try:
        sd = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for malformed files
        raise CheckpointError(f"{path} could not be read: {e}") from None
    ckpt_io.load_weights_checked(module, sd, str(path), "Was the checkpoint's config edited by hand?")


# ----------------------------------------------------------------------------------------------
# Generating


@dataclass
class Generated:
    out: Path                 # folder the files were written to
    checkpoint: Path          # checkpoint folder sampled from
    step: int
    samples: torch.Tensor     # float32 [N, C, H, W] in [-1, 1], on the CPU
    info: dict[str, Any]


def _resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1).") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: CUDA is not available on this machine; use --device cpu.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s).")
    elif dev.type != "cpu":
        try:
            torch.empty(0, device=dev)
        except Exception:
            raise ConfigError(f"--device {device} is not usable on this machine; use cpu or cuda.") from None
    return dev


def _check_flags(num_samples: int, batch_size: int, seed: int, weights: str) -> None:
    if num_samples < 1:
        raise ConfigError(f"--num_samples must be at least 1, got {num_samples}.")
    if batch_size < 1:
        raise ConfigError(f"--batch_size must be at least 1, got {batch_size}.")
    if not 0 <= seed < 2 ** 63:
        raise ConfigError(f"--seed must be in [0, 2^63), got {seed}.")
    if weights not in WEIGHTS:
        raise ConfigError(f"--weights {weights!r} is not one of: {', '.join(WEIGHTS)}.")


def output_folder(out: str | Path | None, run_dir: Path, label: str, kind: str = "generated") -> Path:
    """--out (new or empty), or a new `<run>/<kind>/<YYYY-mm-dd_HH-MM-SS>_<label>/`."""
    if out is not None:
        folder = Path(out)
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"--out {out} is a file; pass a folder.")
        if folder.is_dir() and any(folder.iterdir()):
            raise ConfigError(f"--out {out} already holds files; pass a new or empty folder.")
        return folder
    base = run_dir / kind / f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_{label}"
    folder, n = base, 1
    while folder.exists():  # two runs within the same second
        n += 1
        folder = base.with_name(f"{base.name}-{n}")
    return folder


def generate(checkpoint: str | Path, *, num_samples: int = 64, batch_size: int = 64, sampler: str | None = None,
             sampling_timesteps: int | None = None, ddim_eta: float | None = None, seed: int = 0,
             weights: str = "ema", out: str | Path | None = None, device: str | None = None,
             bf16: bool = False, save_individual: bool = False, results_path: str | Path = "results",
             progress: bool = True, say: Callable[[str], None] = print) -> Generated:
    """Sample from CHECKPOINT and write grid.png, samples.npz, info.json (and PNGs) to the output folder.

    Raises EddyError subclasses for anything the user can fix; nothing is written before all checks pass.
    """
    from tqdm.auto import tqdm

    from trainer.build import build_diffusion, build_network
    from trainer.tracking import save_image_grid, to_uint8

    _check_flags(num_samples, batch_size, seed, weights)
    dev = _resolve_device(device)
    run_dir, ckpt_dir = resolve_checkpoint(str(checkpoint), results_path)
    cfg, state = checkpoint_config(ckpt_dir, run_dir, has_gpu=dev.type == "cuda")
    d = cfg.diffusion
    sampler = d.sampler if sampler is None else sampler
    steps = d.sampling_timesteps if sampling_timesteps is None else sampling_timesteps
    eta = ddim_eta if ddim_eta is not None else d.ddim_eta if sampler == "ddim" else 0.0
    validate_sampling(sampler, steps, d.timesteps, eta)
    out_dir = output_folder(out, run_dir, f"{sampler}_{steps}")

    net = build_network(cfg)
    load_weights(net, ckpt_dir / WEIGHTS[weights])
    diffusion = build_diffusion(cfg, net).to(dev).eval()
    step = int(state.get("step", -1))
    say(f"sampling {num_samples} from {ckpt_dir} (step {step}, {weights} weights) on {dev}: "
        f"{sampler.upper()} {steps} steps" + (f", eta {eta}" if sampler == "ddim" else "")
        + (", bf16 autocast" if bf16 else ""))

    generator = torch.Generator(device=dev).manual_seed(seed)
    autocast = torch.autocast(device_type=dev.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    sizes = [min(batch_size, num_samples - i) for i in range(0, num_samples, batch_size)]
    chunks = []
    start = time.perf_counter()
    with autocast:
        for n in tqdm(sizes, desc="sampling", unit="batch", disable=not progress):
            x = diffusion.sample(n, model=net, generator=generator, sampler=sampler, sampling_timesteps=steps, eta=eta)
            chunks.append(x.float().clamp(-1, 1).cpu())
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elapsed = time.perf_counter() - start
    samples = torch.cat(chunks)

    out_dir.mkdir(parents=True, exist_ok=True)
    images = np.ascontiguousarray(to_uint8(samples).transpose(0, 2, 3, 1))  # [N, H, W, C]
    np.savez(out_dir / "samples.npz", images=images, samples=samples.to(torch.float16).numpy())
    save_image_grid(samples, out_dir / "grid.png", scale=max(1, MIN_TILE_PX // samples.shape[-1]))
    if save_individual:
        from PIL import Image

        for i, img in enumerate(images):
            Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(out_dir / f"{i:06d}.png")
    info = {
        "checkpoint": str(ckpt_dir.resolve()), "run": str(run_dir.resolve()), "step": step,
        "weights": weights, "seed": seed, "num_samples": num_samples, "batch_size": batch_size,
        "sampler": sampler, "sampling_timesteps": steps, "timesteps": d.timesteps, "eta": eta,
        "device": str(dev), "bf16": bf16, "shape": list(samples.shape[1:]),
        "elapsed_s": round(elapsed, 3), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "torch_version": torch.__version__,
    }
    (out_dir / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    say(f"wrote {num_samples} samples in {elapsed:.1f} s to {out_dir}: grid.png, samples.npz, info.json"
        + (f", {0:06d}.png ... {num_samples - 1:06d}.png" if save_individual else ""))
    return Generated(out=out_dir, checkpoint=ckpt_dir, step=step, samples=samples, info=info)


if __name__ == "__main__":
    sys.exit(main())
