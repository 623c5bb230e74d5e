"""Sample from a trained run: `python trainer/sample.py CHECKPOINT [flags]` or `./launch.sh sample ...`.

CHECKPOINT is a run folder (its newest intact checkpoint is used), one checkpoint folder
`.../checkpoints/step-XXXXXXXX`, or `latest` (the newest run under --results_path). The network is
rebuilt from the config stored in the checkpoint, the EMA (or, with --weights model, the raw) weights are
loaded strictly, and the samples are written to a folder named by the time and the sampler under
`<run>/generated/` (e.g. `2026-11-17_12-30-45_dpmpp_2m_20`) unless --out is given.

Every model Eddy trains: images `[N, C, H, W]` from the 2D Unet, clips `[N, C, F, H, W]` from
`--model unet3d`. A conditional run, one with given frames (`--cond_steps k`: a forecaster) or static
fields, takes its conditions from data: items in a random order seeded by --seed (cycled when
--num_samples exceeds them), standardized with the run's own `normalization.json` for physical fields.
The data are --split test (default) or train of --dataset navier_stokes; the built-in set of
--dataset moving_shapes; for a run trained on a folder, --data_dir, a folder of the same kind held out
from training (as trainer/evaluate.py takes it), or --split train, the run's own folder.

    grid.png        images: all samples in one grid (small images enlarged with nearest-neighbour)
    samples.gif     clips: one row per sample, the truth beside it when conditional; physical fields
                    (runs that do not clamp to [-1, 1]) through a colour map
    samples.npz     samples: clips float32 [N, C, F, H, W] in model units (standardized, for physical
                    fields); images float16 [N, C, H, W] (in [-1, 1] for pictures) beside images, uint8
                    [N, H, W, C]. Physical fields add physical, the samples in physical units; conditional
                    runs add truth (and truth_physical), the items each sample took its conditions from
                    (its given frames are theirs, exactly), and indices, those items' places in the data
    000000.png ...  one file per sample (000000.gif ... for clips), with --save_individual
    info.json       checkpoint, step, kind, conditions, seed, sampler settings, weights, processes, time

`accelerate launch trainer/sample.py ...` spreads the samples over processes. The samples are cut into
batches of --batch_size, batch b drawing all its noise from a generator seeded by (--seed, b); process
r samples batches r, r + P, r + 2P, ... and the main process gathers them and writes the files. The
samples of a seed therefore depend on --batch_size but not on the number of processes: one process and
several write the same files on the same kind of device (only info.json's times and process count
differ). On CPUs "the same" includes the intra-op threads: `accelerate launch` gives each process one
(OMP_NUM_THREADS=1), and a plain run on more threads differs in the last float bits. Use --batch_size
at most N / P so that every process has a batch.

The same checkpoint, seed, --batch_size, sampling settings and kind of device give the same samples.
A user error prints one message naming the flag or path and exits with status 2 (under `accelerate
launch`, the main process prints it and the launcher reports the failed processes).
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
import os  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, replace  # noqa: E402
from typing import Any, Callable  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from trainer import checkpoint as ckpt_io  # noqa: E402
from trainer.config import Config, build_config, field_specs, flatten, validate_sampling  # noqa: E402
from trainer.errors import CheckpointError, ConfigError, DataError, EddyError  # noqa: E402
from models.sampling import SAMPLER_NAMES  # noqa: E402

WEIGHTS = {"ema": "ema.safetensors", "model": "model.safetensors"}
SPLITS = ("test", "train")
MIN_TILE_PX = 128  # grid tiles smaller than this are enlarged (nearest) for viewing
_ORDER = 1  # stream of mix_seed(--seed, _ORDER) that orders the conditions' items; batch b's noise is (seed, b)

EXAMPLES = """\
examples:
  python trainer/sample.py latest                          64 EMA samples from the newest run under results/
  python trainer/sample.py results/my-run --num_samples 16 --seed 3
  python trainer/sample.py latest --sampler dpmpp_2m --sampling_timesteps 20   fast: DPM-Solver++ in 20 steps
  python trainer/sample.py results/my-run/checkpoints/step-00005000 --sampling_timesteps 50 --save_individual
  python trainer/sample.py results/ns-forecaster --split train      forecasts from training windows, not test ones
  python trainer/sample.py results/my-sims --data_dir /data/sims_test   a run trained on a simulation folder
  accelerate launch --num_processes 4 trainer/sample.py latest --num_samples 256 --batch_size 64
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
                   help="Samples generated at once by one process (default: 64). Part of what fixes the samples "
                        "of a seed; under `accelerate launch` each process takes whole batches.")
    add_sampling_flags(p, "sample")
    p.add_argument("--split", choices=SPLITS, default=None,
                   help="Conditional runs: the split the conditions come from, test (default) or train of "
                        "--dataset navier_stokes; train for a run trained on a folder (its own folder).")
    p.add_argument("--data_dir", default=None,
                   help="Conditional runs: a folder of the kind the run trained on (sim_XXXXXX.npz trajectories, "
                        "or clips), held out from training, to take the conditions from; required for runs "
                        "trained on a folder unless --split train.")
    p.add_argument("--out", default=None,
                   help="Output folder; must be new or empty "
                        "(default: <run>/generated/<YYYY-mm-dd_HH-MM-SS>_<sampler>_<steps>/).")
    p.add_argument("--device", default=None,
                   help="Torch device (default: cuda if available, else cpu; under `accelerate launch`, each "
                        "process's own).")
    p.add_argument("--bf16", action="store_true", help="Run the network under bfloat16 autocast.")
    p.add_argument("--save_individual", action="store_true",
                   help="Also write each sample as 000000.png, ... (clips: 000000.gif, ...).")
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
        if os.environ.get("RANK", "0") == "0":  # every rank raises the same error: one message
            print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        # Close the process group of `accelerate launch` while the interpreter is whole (trainer/train.py).
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
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
# Conditions


@dataclass(frozen=True)
class ConditionSource:
    """Where a conditional run's conditions come from: a split of the run's own data, or a folder."""

    split: str | None = None     # "train" or "test" of the run's data (the built-in sets: "train", their one set)
    data_dir: str | None = None  # a folder held out from training (--data_dir)


@dataclass
class Conditions:
    """The data a conditional run's samples continue, and the seeded random order its items are taken in."""

    dataset: Any       # an EddyData: items {"x": [C, (F,) H, W]} and maybe {"fields": ...}, in model units
    order: list[int]   # a permutation of the items; sample i takes item order[i % len(order)]
    source: ConditionSource

    def items(self, samples: range) -> list[int]:
        return [self.order[i % len(self.order)] for i in samples]


def is_conditional(cfg: Config) -> bool:
    """Whether the run's samples need data: given frames (--cond_steps) or static fields beside the state."""
    return cfg.data.cond_steps > 0 or cfg.data.field_channels > 0


def condition_source(cfg: Config, split: str | None, data_dir: str | None, checkpoint: str,
                     physical: bool) -> ConditionSource | None:
    """Check --split and --data_dir against the run; None for a run that samples without conditions."""
    from trainer.evaluate import _is_builtin

    data = cfg.data
    if split is not None and split not in SPLITS:
        raise ConfigError(f"--split {split!r} is not one of: {', '.join(SPLITS)}.")
    if not is_conditional(cfg):
        for flag, value in (("--split", split), ("--data_dir", data_dir)):
            if value is not None:
                raise ConfigError(f"{flag} {value}: CHECKPOINT {checkpoint} samples without conditions (no "
                                  f"--cond_steps, no static fields), so no data is read; drop {flag}.")
        return None
    if data_dir is not None:
        if split is not None:
            raise ConfigError(f"--split {split} and --data_dir {data_dir} both name the conditions' data; pass one.")
        if not Path(data_dir).is_dir():
            raise ConfigError(f"--data_dir {data_dir} is not a folder.")
        return ConditionSource(data_dir=str(data_dir))
    if _is_builtin(cfg):
        return ConditionSource(split=split or "test")
    if data.train_data_dir is None:  # moving_shapes: one built-in set
        if split == "test":
            raise ConfigError(f"--split test: --dataset {data.dataset} is one built-in set without a test split; "
                              f"drop --split (its items are drawn from the whole set).")
        return ConditionSource(split="train")
    kind = "sim_XXXXXX.npz trajectories" if physical else "clips"
    if split == "train":
        if not Path(data.train_data_dir).is_dir():
            raise ConfigError(f"--split train: the run's training folder {data.train_data_dir} does not exist here; "
                              f"pass --data_dir, a folder of {kind}.")
        return ConditionSource(split="train")
    raise ConfigError(f"CHECKPOINT {checkpoint} was trained on the folder {data.train_data_dir}: pass --data_dir, a "
                      f"folder of {kind} held out from training, or --split train to take the conditions from "
                      f"the training folder.")


def load_conditions(cfg: Config, source: ConditionSource, normalization, *, seed: int,
                    progress: bool = True) -> Conditions:
    """The data of `source`, standardized with the run's `normalization` (physical fields; None for pictures),
    checked against the run, and its items in the random order of `seed`."""
    from trainer.build import build_dataset
    from trainer.data.sampler import mix_seed
    from trainer.data.video import is_clip_folder
    from trainer.evaluate import _check_data, _held_out

    if source.data_dir is None:
        dataset = build_dataset(cfg, split=source.split, progress=progress)
    elif normalization is not None:  # a folder of held-out trajectories, as trainer/evaluate.py reads it
        dataset = _held_out(cfg, source.data_dir, progress)
    else:
        if not is_clip_folder(source.data_dir):
            raise DataError(f"--data_dir {source.data_dir} holds no clips (.gif, .npy, .npz, videos): the run "
                            f"was trained on clips.")
        dataset = build_dataset(replace(cfg, data=replace(cfg.data, train_data_dir=str(source.data_dir))),
                                progress=progress)
    name = getattr(dataset, "source", "") or cfg.data.dataset
    if normalization is not None:
        dataset.normalization = normalization
        _check_data(dataset, cfg, normalization, name)
    if len(dataset) < 1:
        raise DataError(f"{name} holds no items to take conditions from.")
    g = torch.Generator().manual_seed(mix_seed(seed, _ORDER))
    return Conditions(dataset, torch.randperm(len(dataset), generator=g).tolist(), source)


def describe(conditions: Conditions | None, cfg: Config, num_samples: int) -> dict[str, Any] | None:
    """What info.json says of the conditions."""
    if conditions is None:
        return None
    s = conditions.source
    return {"data": getattr(conditions.dataset, "source", "") or cfg.data.dataset, "split": s.split,
            "data_dir": None if s.data_dir is None else str(Path(s.data_dir).resolve()),
            "items": len(conditions.order), "repeated": num_samples > len(conditions.order),
            "order": "a random permutation of the items seeded by --seed; sample i takes item indices[i]",
            "cond_steps": cfg.data.cond_steps, "field_channels": cfg.data.field_channels}


def run_normalization(run_dir: Path, channels: int):
    """The run's per-channel statistics (normalization.json), which put physical fields in model units."""
    from trainer.data.fluid import Normalization

    path = run_dir / "normalization.json"
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: the run's per-channel statistics are needed to standardize "
                              f"the conditions and to put the samples in physical units (runs write it when "
                              f"they start).")
    norm = Normalization.load(path)
    if len(norm.mean) < channels:
        raise CheckpointError(f"{path} holds statistics of {len(norm.mean)} channel(s); the run generates {channels}.")
    return norm


# ----------------------------------------------------------------------------------------------
# Generating


@dataclass
class Generated:
    out: Path                           # folder the files were written to
    checkpoint: Path                    # checkpoint folder sampled from
    step: int
    samples: torch.Tensor               # float32 [N, C, H, W] or [N, C, F, H, W], model units, on the CPU
    info: dict[str, Any]
    truth: torch.Tensor | None = None   # conditional runs: the data whose conditions sample i got, model units
    physical: torch.Tensor | None = None  # physical fields: the samples in physical units


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


def _process_device(device: str | None, world) -> torch.device:
    """--device for one process; under `accelerate launch`, the launch's device of this process."""
    if world.num_processes == 1:
        return _resolve_device(device)
    if device is not None and _resolve_device(device).type != world.device.type:
        raise ConfigError(f"--device {device}: `accelerate launch` runs these {world.num_processes} processes on "
                          f"{world.device.type}, each on its own device; drop --device.")
    return torch.device("cpu") if world.device.type == "cpu" else world.device  # `cpu`, as one process says


def _check_flags(num_samples: int, batch_size: int, seed: int, weights: str) -> None:
    if num_samples < 1:
        raise ConfigError(f"--num_samples must be at least 1, got {num_samples}.")
    check_sampling_run_flags(batch_size, seed, weights)


def check_sampling_run_flags(batch_size: int, seed: int, weights: str) -> None:
    """--batch_size, --seed and --weights of the commands that sample a checkpoint."""
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


def _main_first(make: Callable[[], Any], is_main: bool) -> Any:
    """`make()` on the main process, then on the others (the main one fills any cache, e.g. generated
    Navier-Stokes data); a user error it raises on the main process is raised on every rank."""
    from trainer.parallel.base import main_decides

    made = []
    main_decides(lambda: made.append(make()), is_main)
    return made[0] if is_main else make()


def generate(checkpoint: str | Path, *, num_samples: int = 64, batch_size: int = 64, sampler: str | None = None,
             sampling_timesteps: int | None = None, ddim_eta: float | None = None, seed: int = 0,
             weights: str = "ema", split: str | None = None, data_dir: str | Path | None = None,
             out: str | Path | None = None, device: str | None = None, bf16: bool = False,
             save_individual: bool = False, results_path: str | Path = "results", progress: bool = True,
             say: Callable[[str], None] = print) -> Generated | None:
    """Sample from CHECKPOINT and write the files of the module docstring to the output folder.

    Under `accelerate launch` every process calls this: each samples its share of the batches, and the
    main process gathers them, writes the files and returns the result; the others return None.
    Raises EddyError subclasses for anything the user can fix, on every rank alike; nothing is written
    before all checks pass.
    """
    from accelerate import PartialState
    from accelerate.utils import gather_object, parse_flag_from_env

    from trainer.build import build_diffusion, build_network, diffusion_spec
    from trainer.parallel.base import main_decides

    # Check everything the flags and the run decide, alike on every rank. The main process picks the
    # checkpoint and the folder, so that every rank samples the same one and the files go to one place.
    world = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    main_proc = world.is_main_process
    say = say if main_proc else (lambda m: None)
    _check_flags(num_samples, batch_size, seed, weights)
    dev = _process_device(device, world)
    run_dir, ckpt_dir = main_decides(lambda: resolve_checkpoint(str(checkpoint), results_path), main_proc)
    cfg, state = checkpoint_config(ckpt_dir, run_dir, has_gpu=dev.type == "cuda")
    d = cfg.diffusion
    sampler = d.sampler if sampler is None else sampler
    steps = d.sampling_timesteps if sampling_timesteps is None else sampling_timesteps
    eta = ddim_eta if ddim_eta is not None else d.ddim_eta if sampler == "ddim" else 0.0
    validate_sampling(sampler, steps, d.timesteps, eta)
    bounded = diffusion_spec(cfg)["clip_denoised"]  # pictures in [-1, 1]; else physical fields
    source = condition_source(cfg, split, None if data_dir is None else str(data_dir), str(checkpoint),
                              physical=not bounded)
    normalization = None if bounded else run_normalization(run_dir, cfg.data.channels)
    out_dir = main_decides(lambda: output_folder(out, run_dir, f"{sampler}_{steps}"), main_proc)

    # The conditions: the data's items in a seeded random order, standardized as in training.
    conditions = None
    if source is not None:
        conditions = _main_first(lambda: load_conditions(cfg, source, normalization, seed=seed,
                                                         progress=progress and main_proc), main_proc)

    # The network.
    net = build_network(cfg)
    load_weights(net, ckpt_dir / WEIGHTS[weights])
    diffusion = build_diffusion(cfg, net).to(dev).eval()
    step = int(state.get("step", -1))
    batches = [range(i, min(i + batch_size, num_samples)) for i in range(0, num_samples, batch_size)]
    processes = f" in {world.num_processes} processes" if world.num_processes > 1 else ""
    say(f"sampling {num_samples} from {ckpt_dir} (step {step}, {weights} weights) on {dev}{processes}: "
        f"{sampler.upper()} {steps} steps" + (f", eta {eta}" if sampler == "ddim" else "")
        + (", bf16 autocast" if bf16 else "")
        + (f"; conditions from {describe(conditions, cfg, num_samples)['data']}" if conditions else ""))
    if world.num_processes > len(batches):
        say(f"WARNING: {len(batches)} batch(es) of --batch_size {batch_size} for {world.num_processes} processes: "
            f"some processes sit idle; pass --batch_size {-(-num_samples // world.num_processes)} to use them all.")

    # Sample this process's batches, then gather every process's on all of them.
    autocast = torch.autocast(device_type=dev.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    start = time.perf_counter()
    with autocast:
        mine = sample_batches(diffusion, net, batches, range(world.process_index, len(batches), world.num_processes),
                              conditions, seed=seed, device=dev, sampler=sampler, steps=steps, eta=eta,
                              progress=progress and main_proc)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    done = sorted(gather_object(mine), key=lambda part: part[0])  # every rank takes part
    elapsed = time.perf_counter() - start
    if not main_proc:
        return None
    samples = torch.cat([part[1] for part in done])
    if bounded:
        samples = samples.clamp(-1, 1)
    truth = torch.cat([part[2] for part in done]) if conditions is not None else None
    assert len(samples) == num_samples and [part[0] for part in done] == list(range(len(batches)))

    # Write the files.
    physical = truth_physical = None
    if normalization is not None:
        from trainer.data.fluid import Normalization

        channels = cfg.data.channels  # the state channels come first in the normalization
        state_norm = Normalization(normalization.mean[:channels], normalization.std[:channels])
        physical = state_norm.invert(samples, channel_axis=1)
        truth_physical = None if truth is None else state_norm.invert(truth, channel_axis=1)
    kind = "clips" if samples.ndim == 5 else "images"
    indices = None if conditions is None else conditions.items(range(num_samples))
    files = write_outputs(out_dir, samples, truth=truth, physical=physical, truth_physical=truth_physical,
                          indices=indices, bounded=bounded, save_individual=save_individual)
    info = {
        "checkpoint": str(ckpt_dir.resolve()), "run": str(run_dir.resolve()), "step": step,
        "weights": weights, "seed": seed, "num_samples": num_samples, "batch_size": batch_size,
        "sampler": sampler, "sampling_timesteps": steps, "timesteps": d.timesteps, "eta": eta,
        "kind": kind, "shape": list(samples.shape[1:]), "bounded": bounded,
        "conditions": describe(conditions, cfg, num_samples),
        "normalization": None if normalization is None else str((run_dir / "normalization.json").resolve()),
        "noise": "batch b (samples b*batch_size ...) draws its noise from a generator seeded by "
                 "mix_seed(seed, b): the same samples whatever the number of processes",
        "device": str(dev), "num_processes": world.num_processes, "bf16": bf16,
        "elapsed_s": round(elapsed, 3), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "torch_version": torch.__version__, "files": files,
    }
    (out_dir / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    shown = [f for f in files if not f[0].isdigit()]
    say(f"wrote {num_samples} samples in {elapsed:.1f} s to {out_dir}: {', '.join(shown)}, info.json"
        + (f", {files[-num_samples]} ... {files[-1]}" if save_individual else ""))
    return Generated(out=out_dir, checkpoint=ckpt_dir, step=step, samples=samples, info=info, truth=truth,
                     physical=physical)


def sample_batches(diffusion, net: torch.nn.Module, batches: list[range], mine: range, conditions: Conditions | None,
                   *, seed: int, device: torch.device, sampler: str, steps: int, eta: float,
                   progress: bool) -> list[tuple[int, torch.Tensor, torch.Tensor | None]]:
    """(b, samples, truth) on the CPU for each batch b in `mine`, whose samples are `batches[b]`. Batch b draws
    its noise from mix_seed(seed, b) alone, so it comes out the same on whichever process samples it."""
    from torch.utils.data import default_collate
    from tqdm.auto import tqdm

    from models.cond import cond_of
    from trainer.data.sampler import mix_seed

    out = []
    for b in tqdm(mine, desc="sampling", unit="batch", disable=not progress):
        cond = x_known = truth = None
        if conditions is not None:
            batch = default_collate([conditions.dataset[i] for i in conditions.items(batches[b])])
            truth = batch["x"]  # [B, C, (F,) H, W]
            cond = {k: v.to(device) for k, v in (cond_of(batch) or {}).items()} or None
            x_known = truth.to(device) if diffusion.cond_steps else None
        generator = torch.Generator(device=device).manual_seed(mix_seed(seed, b))
        x = diffusion.sample(len(batches[b]), model=net, cond=cond, x_known=x_known, generator=generator,
                             sampler=sampler, sampling_timesteps=steps, eta=eta)
        out.append((b, x.float().cpu(), truth))
    return out


def write_outputs(out_dir: Path, samples: torch.Tensor, *, truth: torch.Tensor | None = None,
                  physical: torch.Tensor | None = None, truth_physical: torch.Tensor | None = None,
                  indices: list[int] | None = None, bounded: bool = True, save_individual: bool = False) -> list[str]:
    """grid.png (images) or samples.gif (clips), samples.npz and the individual files; returns their names."""
    from trainer.tracking import save_clip_gif, save_image_grid, to_uint8

    out_dir.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    if samples.ndim == 4:  # images [N, C, H, W]
        images = np.ascontiguousarray(to_uint8(samples).transpose(0, 2, 3, 1))  # [N, H, W, C]
        arrays.update(images=images, samples=samples.to(torch.float16).numpy())
        save_image_grid(samples, out_dir / "grid.png", scale=max(1, MIN_TILE_PX // samples.shape[-1]))
        files = ["grid.png", "samples.npz"]
    else:  # clips [N, C, F, H, W]
        arrays["samples"] = samples.numpy().astype(np.float32)
        save_clip_gif(samples, out_dir / "samples.gif", truth=truth, bounded=bounded)
        files = ["samples.gif", "samples.npz"]
    extra = {"physical": physical, "truth": truth, "truth_physical": truth_physical}
    arrays.update({k: v.float().numpy() for k, v in extra.items() if v is not None})
    if indices is not None:
        arrays["indices"] = np.asarray(indices, dtype=np.int64)
    np.savez(out_dir / "samples.npz", **arrays)
    if save_individual:
        from PIL import Image

        for i in range(len(samples)):
            if samples.ndim == 4:
                img = arrays["images"][i]
                Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(out_dir / f"{i:06d}.png")
                files.append(f"{i:06d}.png")
            else:
                save_clip_gif(samples[i: i + 1], out_dir / f"{i:06d}.gif",
                              truth=None if truth is None else truth[i: i + 1], bounded=bounded)
                files.append(f"{i:06d}.gif")
    return files


if __name__ == "__main__":
    sys.exit(main())
