"""Evaluate a forecaster: `python trainer/evaluate.py CHECKPOINT [flags]`.

A forecaster is a run trained with `--model unet3d --frames F --cond_steps k`. From the first k frames of
each held-out trajectory it is rolled forward autoregressively: a window of F frames is generated whose
first k are given; the window's last k frames are the next window's given frames; and so on until
--rollout_frames L frames exist (the last window is cut). Each window reads the static fields of the
trajectory at its own frames (past the trajectory's end, its last frame's). Frames are counted as the
windows see them: every --ts-th frame of a trajectory.

Held-out data: for `--dataset navier_stokes` runs the test split of the same generated data (the cache,
or regenerated identically); for runs on a simulation folder, --data_dir, a folder of sim_XXXXXX.npz
trajectories held out from training. Either is standardized with the run's own statistics
(`normalization.json`); every metric is computed in physical units.

Metrics, for every predicted frame t >= k, per trajectory, then mean and standard deviation over them:

    relative L2     ||pred_t - true_t|| / ||true_t||, over channels and pixels
    correlation     Pearson's r between pred_t and true_t, over channels and pixels
    corr time       predicted frames before the correlation first drops below 0.8 (a trajectory that
                    never drops counts the full horizon, L - k), in frames and in the data's time units
                    where known (navier_stokes: the preset's t_every times --ts); mean and median
    fno_relative_l2 the relative L2 of the whole block of predicted frames k..L-1 at once (Li et al.
                    2021's LpLoss over [S, S, T] per sample), averaged over trajectories: the headline

and the same for persistence, the last given frame repeated. Written to a new folder
`<run>/evaluation/<YYYY-mm-dd_HH-MM-SS>_<sampler>_<steps>/` unless --out is given:

    report.json     checkpoint, step, settings, per-frame arrays, summary numbers, elapsed seconds
    rollout.png     relative L2 and correlation against frame, model and persistence, the 0.8 line
    rollout.gif     the first few trajectories, prediction beside truth
    rollout.npz     prediction, truth [N, C, L, H, W] in physical units (float32), per-trajectory metrics

A run tracked with W&B gets the summary numbers and the plot in its own W&B run (--no-wandb skips it).
The same checkpoint, seed, --batch_size, sampling settings and device give the same numbers.
A user error prints one message naming the flag or path and exits with status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # As in trainer/sample.py: trainer/trainer.py must not shadow the package `trainer`.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, replace  # noqa: E402
from typing import Any, Callable  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from trainer.config import Config, validate_sampling  # noqa: E402
from trainer.errors import CheckpointError, ConfigError, DataError, EddyError  # noqa: E402
from trainer.sample import (  # noqa: E402
    WEIGHTS, _resolve_device, add_sampling_flags, check_sampling_run_flags, checkpoint_config, load_weights,
    output_folder, resolve_checkpoint)

CORR_THRESHOLD = 0.8
GIF_TRAJECTORIES = 4  # trajectories shown in rollout.gif
# Li et al. 2021 (FNO), Table 1, Navier-Stokes at viscosity 1e-3, T = 50, N = 1000: relative L2 over frames
# 11-50 given frames 1-10, on 64x64 vorticity.
FNO_TABLE1 = {"FNO-3D": 0.0086, "FNO-2D": 0.0128, "U-Net": 0.0245}
FNO_PROTOCOL = dict(ns_preset="fno", viscosity=1e-3, cond_steps=10)

EXAMPLES = """\
examples:
  python trainer/evaluate.py latest                        roll out the newest run on all its test trajectories
  python trainer/evaluate.py results/ns-fno --num_trajectories 200 --sampler dpmpp_2m --sampling_timesteps 20
  python trainer/evaluate.py results/my-sims --data_dir /data/sims_test --rollout_frames 100
  python trainer/evaluate.py latest --weights model --no-wandb --out /tmp/eval
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="trainer/evaluate.py", description="Roll a forecaster forward on held-out trajectories and score it "
        "against the solver and against persistence.", epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="A run folder (its newest intact checkpoint), a checkpoint folder "
                        ".../checkpoints/step-XXXXXXXX, or `latest` (the newest run under --results_path).")
    p.add_argument("--data_dir", default=None,
                   help="Held-out sim_XXXXXX.npz trajectories; required for runs trained on a simulation folder "
                        "(default for --dataset navier_stokes runs: the test split of the run's data).")
    p.add_argument("--num_trajectories", type=int, default=None,
                   help="Held-out trajectories to roll out, from the first (default: all).")
    p.add_argument("--rollout_frames", type=int, default=None,
                   help="Frames L of each rollout, the given ones included (default: the trajectory length "
                        "used in training, --traj_len, or the held-out data's).")
    p.add_argument("--batch_size", type=int, default=16,
                   help="Trajectories rolled out at once (default: 16). Part of what fixes the numbers of a seed.")
    add_sampling_flags(p, "window")
    p.add_argument("--out", default=None,
                   help="Output folder; must be new or empty "
                        "(default: <run>/evaluation/<YYYY-mm-dd_HH-MM-SS>_<sampler>_<steps>/).")
    p.add_argument("--device", default=None, help="Torch device (default: cuda if available, else cpu).")
    p.add_argument("--bf16", action="store_true", help="Run the network under bfloat16 autocast.")
    p.add_argument("--no-wandb", dest="log_wandb", action="store_false",
                   help="Do not log to the run's W&B run (logged by default when the run used --report_to wandb).")
    p.add_argument("--results_path", default="results",
                   help="Folder of runs that `latest` searches (default: results).")
    return p


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    try:
        result = evaluate(**args)
    except EddyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary_table(result.report))
    return 0


# ----------------------------------------------------------------------------------------------
# Rolling out

# sample_window(x_known [B, C, F, H, W], cond) -> [B, C, F, H, W]: a window whose first k frames are x_known's.
SampleWindow = Callable[[torch.Tensor, "dict[str, torch.Tensor] | None"], torch.Tensor]


def window_starts(length: int, frames: int, cond_steps: int) -> list[int]:
    """First frames of the windows that roll `cond_steps` given frames out to `length` frames: each window
    adds frames - cond_steps new ones, and the last may run past `length` (it is cut)."""
    assert 0 < cond_steps < frames and length > cond_steps
    return list(range(0, length - cond_steps, frames - cond_steps))


def rollout(sample_window: SampleWindow, first: torch.Tensor, fields: torch.Tensor | None, *, frames: int,
            length: int, progress=None) -> torch.Tensor:
    """Roll `first` [B, C, k, H, W] (the given frames) out to [B, C, length, H, W], window by window.

    `fields` [B, Cf, T, H, W] are the trajectories' static fields at every frame; a window reads those at its
    own frames (clamped to T - 1 past the end). `progress` (a tqdm bar) advances once per window.
    """
    batch, channels, k, height, width = first.shape
    out = first.new_empty(batch, channels, length, height, width)
    out[:, :, :k] = first
    for s in window_starts(length, frames, k):
        x_known = first.new_zeros(batch, channels, frames, height, width)
        x_known[:, :, :k] = out[:, :, s: s + k]  # the previous window's last k frames (or the given ones)
        cond = None
        if fields is not None:
            at = torch.arange(s, s + frames, device=fields.device).clamp(max=fields.shape[2] - 1)
            cond = {"fields": fields[:, :, at]}
        x = sample_window(x_known, cond)
        n = min(frames, length - s)  # the last window is cut at `length`
        out[:, :, s + k: s + n] = x[:, :, k:n].to(out.dtype)
        if progress is not None:
            progress.update(1)
    return out


def diffusion_window(diffusion, net: torch.nn.Module, *, generator: torch.Generator, sampler: str, steps: int,
                     eta: float) -> SampleWindow:
    """A SampleWindow drawing from `diffusion` with `net`: the given frames come out unchanged."""
    def sample_window(x_known, cond):
        return diffusion.sample(len(x_known), model=net, cond=cond, x_known=x_known, generator=generator,
                                sampler=sampler, sampling_timesteps=steps, eta=eta).float()

    return sample_window


def persistence(true: torch.Tensor | np.ndarray, cond_steps: int):
    """The persistence forecast of [N, C, L, H, W]: the last given frame, repeated from frame cond_steps on."""
    pred = true.clone() if isinstance(true, torch.Tensor) else true.copy()
    pred[:, :, cond_steps:] = true[:, :, cond_steps - 1: cond_steps]
    return pred


# ----------------------------------------------------------------------------------------------
# Metrics: numpy [N, C, T, H, W] in, per trajectory (and frame) out, accumulated in float64.

_PER_FRAME = (1, 3, 4)  # channels and pixels


def relative_l2(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """[N, T]: ||pred_t - true_t||_2 / ||true_t||_2 over channels and pixels."""
    pred, true = np.asarray(pred, np.float64), np.asarray(true, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.sqrt(np.square(pred - true).sum(_PER_FRAME)) / np.sqrt(np.square(true).sum(_PER_FRAME))


def correlation(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """[N, T]: Pearson's r between pred_t and true_t over channels and pixels (NaN where either is constant)."""
    p = np.asarray(pred, np.float64)
    q = np.asarray(true, np.float64)
    p = p - p.mean(_PER_FRAME, keepdims=True)
    q = q - q.mean(_PER_FRAME, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (p * q).sum(_PER_FRAME) / np.sqrt(np.square(p).sum(_PER_FRAME) * np.square(q).sum(_PER_FRAME))


def frames_above(corr: np.ndarray, threshold: float = CORR_THRESHOLD) -> tuple[np.ndarray, np.ndarray]:
    """(frames [N], never [N]): predicted frames before the correlation first drops below `threshold`
    (NaN counts as a drop); a trajectory that never drops counts all T frames and is marked in `never`."""
    below = ~(corr >= threshold)
    never = ~below.any(axis=1)
    return np.where(never, corr.shape[1], below.argmax(axis=1)), never


def block_relative_l2(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """[N]: the relative L2 error of each trajectory's whole block [C, T, H, W] flattened, as Li et al. 2021's
    LpLoss (p = 2, per sample, before its mean over the batch)."""
    pred, true = np.asarray(pred, np.float64), np.asarray(true, np.float64)
    axes = tuple(range(1, pred.ndim))
    return np.sqrt(np.square(pred - true).sum(axes)) / np.sqrt(np.square(true).sum(axes))


def score(pred: np.ndarray, true: np.ndarray, cond_steps: int, frame_dt: float | None = None) -> dict[str, Any]:
    """Every metric of one forecast `pred` of `true` [N, C, L, H, W] on the predicted frames cond_steps..L-1:
    per trajectory (`trajectories`), per frame over trajectories (`per_frame`), and the summary numbers."""
    pred, true = pred[:, :, cond_steps:], true[:, :, cond_steps:]
    rel, corr = relative_l2(pred, true), correlation(pred, true)
    above, never = frames_above(corr)
    block = block_relative_l2(pred, true)
    time_above = above * frame_dt if frame_dt is not None else None
    per_frame = {"relative_l2_mean": rel.mean(0), "relative_l2_std": rel.std(0),
                 "correlation_mean": corr.mean(0), "correlation_std": corr.std(0)}
    summary = {
        "fno_relative_l2": float(block.mean()), "fno_relative_l2_std": float(block.std()),
        "relative_l2_mean": float(rel.mean()),
        "corr_time_frames_mean": float(above.mean()), "corr_time_frames_median": float(np.median(above)),
        "corr_time_mean": None if time_above is None else float(time_above.mean()),
        "corr_time_median": None if time_above is None else float(np.median(time_above)),
        "never_below_threshold": int(never.sum()),
    }
    trajectories = {"relative_l2": rel, "correlation": corr, "corr_time_frames": above, "fno_relative_l2": block}
    return {"per_frame": per_frame, "summary": summary, "trajectories": trajectories}


# ----------------------------------------------------------------------------------------------
# Evaluating


@dataclass
class Evaluation:
    out: Path                 # folder the files were written to
    checkpoint: Path          # checkpoint folder evaluated
    step: int
    prediction: torch.Tensor  # float32 [N, C, L, H, W], physical units, on the CPU
    truth: torch.Tensor       # the same shape
    report: dict[str, Any]    # what report.json holds


def check_forecaster(cfg: Config, checkpoint: str) -> tuple[int, int]:
    """(cond_steps k, frames F) of a forecaster run; a ConfigError saying what evaluate needs otherwise."""
    m, data = cfg.model.model, cfg.data
    if m != "unet3d" or data.cond_steps < 1:
        raise ConfigError(f"CHECKPOINT {checkpoint} is a run of --model {m} --frames {data.frames} --cond_steps "
                          f"{data.cond_steps}, not a forecaster: evaluate rolls out runs trained with --model unet3d "
                          f"--frames F --cond_steps k (0 < k < F), on --dataset navier_stokes or sim_XXXXXX.npz "
                          f"trajectories. Use trainer/sample.py for other runs.")
    return data.cond_steps, data.frames


def _is_builtin(cfg: Config) -> bool:
    """Whether the run trained on the built-in Navier-Stokes data (rather than a simulation folder)."""
    return cfg.data.dataset == "navier_stokes" and cfg.data.train_data_dir is None


def _model_frames(traj_len: int, ts: int) -> int:
    """Frames of a trajectory of `traj_len` solver frames as windows see them (every ts-th)."""
    return (traj_len - 1) // ts + 1


def _held_out(cfg: Config, data_dir: str | None, progress: bool):
    """The held-out trajectories (TrajectoryWindows): the test split of a navier_stokes run's data, or the
    whole of --data_dir (every frame of its trajectories: the rollout length is checked against them)."""
    from trainer.build import build_dataset
    from trainer.data.fluid import is_simulation_folder

    if data_dir is None:
        return build_dataset(cfg, split="test", progress=progress)
    if not is_simulation_folder(data_dir):
        raise DataError(f"--data_dir {data_dir} holds no sim_XXXXXX.npz files (one [T, C, H, W] trajectory each, "
                        f"held out from training).")
    return build_dataset(replace(cfg, data=replace(cfg.data, train_data_dir=str(data_dir), traj_len=None)),
                         split="test", progress=progress)


def _check_data(dataset, cfg: Config, normalization, source: str) -> None:
    data = cfg.data
    total = dataset.trajectories[0].shape[1]
    if len(normalization.mean) != total:
        raise DataError(f"{source}: trajectories of {total} channels, but the run's normalization.json has "
                        f"{len(normalization.mean)}: this is not the data the run was trained on.")
    got = (dataset.channels, dataset.field_channels, dataset.image_size)
    want = (data.channels, data.field_channels, data.image_size)
    if got != want:
        raise DataError(f"{source}: {got[0]} state channel(s), {got[1]} field channel(s), frames of {got[2]}; the run "
                        f"was trained on {want[0]}, {want[1]}, {want[2]}. Pass held-out data of the same kind.")


def _reference(cfg: Config, length: int, builtin: bool) -> tuple[dict[str, Any] | None, str]:
    """(Li et al.'s Table 1 anchors with the protocol's deviations, or None; a note on comparability).
    `builtin`: the rollout runs on the test split of the built-in Navier-Stokes data."""
    from trainer.data.navier_stokes import PRESETS

    data = cfg.data
    protocol = ("Li et al. 2021 (FNO), Table 1: --ns_preset fno (viscosity 1e-3), frames 11-50 predicted from "
                "frames 1-10 (--cond_steps 10, --rollout_frames 50), 64x64 vorticity, 1000 training and 200 "
                "test trajectories")
    preset = data.ns_preset if builtin else None
    if (preset != FNO_PROTOCOL["ns_preset"] or PRESETS[preset].viscosity != FNO_PROTOCOL["viscosity"]
            or data.cond_steps != FNO_PROTOCOL["cond_steps"]):
        what = (f"--ns_preset {preset}" if preset else "a simulation folder") + f", --cond_steps {data.cond_steps}"
        return None, f"no published anchor: the protocol differs ({what}); the anchors are for {protocol}."
    deviations = []
    checks = [("--rollout_frames", length, 50), ("--ts", data.ts, 1), ("--ns_size", data.ns_size or 64, 64),
              ("--ns_channels", " ".join(data.ns_channels), "vorticity"),
              ("--num_trajectories", data.num_trajectories, 1000)]
    for flag, got, want in checks:
        if got != want:
            deviations.append(f"{flag} {got} (protocol: {want})")
    note = protocol + (f"; this run deviates: {', '.join(deviations)}" if deviations else "; this run follows it")
    return {"source": "Li et al. 2021, Fourier Neural Operator, Table 1 (nu = 1e-3)",
            "fno_relative_l2": dict(FNO_TABLE1), "deviations": deviations}, note


def _check_flags(num_trajectories: int | None, rollout_frames: int | None, batch_size: int, seed: int,
                 weights: str, cond_steps: int) -> None:
    if num_trajectories is not None and num_trajectories < 1:
        raise ConfigError(f"--num_trajectories must be at least 1, got {num_trajectories}.")
    if rollout_frames is not None and rollout_frames <= cond_steps:
        raise ConfigError(f"--rollout_frames {rollout_frames} must be above the run's --cond_steps {cond_steps}: "
                          f"the first {cond_steps} frames are given, so nothing would be predicted.")
    check_sampling_run_flags(batch_size, seed, weights)


def evaluate(checkpoint: str | Path, *, data_dir: str | None = None, num_trajectories: int | None = None,
             rollout_frames: int | None = None, batch_size: int = 16, sampler: str | None = None,
             sampling_timesteps: int | None = None, ddim_eta: float | None = None, seed: int = 0,
             weights: str = "ema", out: str | Path | None = None, device: str | None = None, bf16: bool = False,
             log_wandb: bool = True, results_path: str | Path = "results", progress: bool = True,
             say: Callable[[str], None] = print) -> Evaluation:
    """Roll CHECKPOINT's forecaster out on held-out trajectories and write report.json, rollout.png,
    rollout.gif and rollout.npz. Raises EddyError subclasses for anything the user can fix, all before the
    network runs (a navier_stokes test split missing from the cache is regenerated first)."""
    from trainer.build import build_diffusion, build_network
    from trainer.data.fluid import Normalization
    from trainer.data.navier_stokes import PRESETS
    from trainer.tracking import resolve_wandb_mode

    # Check everything the flags and the run decide.
    started = time.perf_counter()
    dev = _resolve_device(device)
    run_dir, ckpt_dir = resolve_checkpoint(str(checkpoint), results_path)
    cfg, state = checkpoint_config(ckpt_dir, run_dir, has_gpu=dev.type == "cuda")
    k, frames = check_forecaster(cfg, str(checkpoint))
    _check_flags(num_trajectories, rollout_frames, batch_size, seed, weights, k)
    d, data = cfg.diffusion, cfg.data
    sampler = d.sampler if sampler is None else sampler
    steps = d.sampling_timesteps if sampling_timesteps is None else sampling_timesteps
    eta = ddim_eta if ddim_eta is not None else d.ddim_eta if sampler == "ddim" else 0.0
    validate_sampling(sampler, steps, d.timesteps, eta)
    builtin = _is_builtin(cfg) and data_dir is None
    if not builtin and data_dir is None:
        raise ConfigError(f"CHECKPOINT {checkpoint} was trained on the simulation folder {data.train_data_dir}: "
                          f"pass --data_dir, a folder of sim_XXXXXX.npz trajectories held out from training.")
    norm_path = run_dir / "normalization.json"
    if not norm_path.is_file():
        raise CheckpointError(f"{norm_path} does not exist: the run's per-channel statistics are needed to put the "
                              f"forecasts in physical units (runs write it when they start).")
    trained_len = _model_frames(data.traj_len, data.ts) if data.traj_len else None
    if builtin:  # the test split's length is known before it is read (or generated)
        available = _model_frames(data.traj_len or PRESETS[data.ns_preset].n_frames, data.ts)
        _check_length(rollout_frames or available, available, "the test trajectories")
    log_wandb = log_wandb and cfg.run.report_to == "wandb"
    wandb_note = resolve_wandb_mode()[1] if log_wandb else None  # raises for WANDB_MODE=online without a key

    # Held-out data, standardized as in training.
    dataset = _held_out(cfg, data_dir, progress)
    normalization = Normalization.load(norm_path)
    dataset.normalization = normalization
    _check_data(dataset, cfg, normalization, dataset.source)
    length = rollout_frames or trained_len or _model_frames(dataset.traj_len, dataset.ts)
    _check_length(length, _model_frames(dataset.traj_len, dataset.ts), dataset.source)
    count = len(dataset.trajectories)
    if num_trajectories is not None and num_trajectories > count:
        raise ConfigError(f"--num_trajectories {num_trajectories}: {dataset.source} holds {count} trajectories.")
    n = num_trajectories or count
    out_dir = output_folder(out, run_dir, f"{sampler}_{steps}", kind="evaluation")

    # The network.
    net = build_network(cfg)
    load_weights(net, ckpt_dir / WEIGHTS[weights])
    diffusion = build_diffusion(cfg, net).to(dev).eval()
    step = int(state.get("step", -1))
    windows = len(window_starts(length, frames, k))
    say(f"rolling out {n} trajectories of {dataset.source} to {length} frames ({k} given, {windows} windows of "
        f"{frames}) from {ckpt_dir} (step {step}, {weights} weights) on {dev}: {sampler.upper()} {steps} steps"
        + (f", eta {eta}" if sampler == "ddim" else "") + (", bf16 autocast" if bf16 else ""))

    # Roll out, and score in physical units: the state channels are the first of the normalization's.
    generator = torch.Generator(device=dev).manual_seed(seed)
    sample_window = diffusion_window(diffusion, net, generator=generator, sampler=sampler, steps=steps, eta=eta)
    start = time.perf_counter()
    with torch.autocast(device_type=dev.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
        pred, truth = roll_out_all(sample_window, dataset, n=n, length=length, frames=frames, cond_steps=k,
                                   batch_size=batch_size, device=dev, progress=progress)
    rollout_s = time.perf_counter() - start
    state_norm = Normalization(normalization.mean[: data.channels], normalization.std[: data.channels])
    pred, truth = state_norm.invert(pred, channel_axis=1), state_norm.invert(truth, channel_axis=1)
    frame_dt = PRESETS[data.ns_preset].t_every * data.ts if builtin else None
    model = score(pred.numpy(), truth.numpy(), k, frame_dt)
    base = score(persistence(truth, k).numpy(), truth.numpy(), k, frame_dt)

    # Write the files; log to W&B.
    reference, reference_note = _reference(cfg, length, builtin)
    report = {
        "checkpoint": str(ckpt_dir.resolve()), "run": str(run_dir.resolve()), "step": step, "weights": weights,
        "settings": {
            "data": dataset.source, "num_trajectories": n, "rollout_frames": length, "frames": frames,
            "cond_steps": k, "windows": windows, "ts": data.ts,
            "channels": list(dataset.channel_names[: data.channels]),
            "frame_dt": frame_dt, "sampler": sampler, "sampling_timesteps": steps, "timesteps": d.timesteps,
            "eta": eta, "seed": seed, "batch_size": batch_size, "device": str(dev), "bf16": bf16},
        "frames": list(range(k, length)),  # 0-based indices of the predicted frames; 0..k-1 are given
        "times": None if frame_dt is None else [(t - k + 1) * frame_dt for t in range(k, length)],
        "per_frame": {"model": model["per_frame"], "persistence": base["per_frame"]},
        "summary": {"model": model["summary"], "persistence": base["summary"]},
        "corr_threshold": CORR_THRESHOLD,
        "notes": _notes(k, length),
        "reference": reference, "reference_note": reference_note,
        "rollout_s": round(rollout_s, 3), "elapsed_s": None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "torch_version": torch.__version__,
    }
    png = write_outputs(out_dir, report, pred, truth, {"model": model, "persistence": base})
    report["elapsed_s"] = round(time.perf_counter() - started, 3)
    (out_dir / "report.json").write_text(json.dumps(_jsonable(report), indent=2, allow_nan=False) + "\n")
    if log_wandb:
        if wandb_note:
            say(f"W&B: {wandb_note}")
        log_to_wandb(cfg, run_dir, state.get("tracker_run_id") or "", step, report, png, say)
    say(f"wrote report.json, rollout.png, rollout.gif, rollout.npz in {report['elapsed_s']:.1f} s to {out_dir}")
    return Evaluation(out=out_dir, checkpoint=ckpt_dir, step=step, prediction=pred, truth=truth, report=report)


def roll_out_all(sample_window: SampleWindow, dataset, *, n: int, length: int, frames: int, cond_steps: int,
                 batch_size: int, device: torch.device, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(forecasts, truth) [n, C, length, H, W] in model units on the CPU, for the first n trajectories of
    `dataset` (a TrajectoryWindows), batch_size at a time, behind one tqdm bar over all windows."""
    from tqdm.auto import tqdm

    k = cond_steps
    batches = [range(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    preds, truths = [], []
    total = len(batches) * len(window_starts(length, frames, k))
    with tqdm(total=total, desc="rollout", unit="window", disable=not progress) as bar:
        for idx in batches:
            items = [dataset.trajectory(i) for i in idx]
            x = torch.stack([it["x"] for it in items])[:, :, :length]  # [B, C, L, H, W]
            fields = torch.stack([it["fields"] for it in items]).to(device) if "fields" in items[0] else None
            pred = rollout(sample_window, x[:, :, :k].to(device), fields, frames=frames, length=length, progress=bar)
            preds.append(pred.float().cpu())
            truths.append(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return torch.cat(preds), torch.cat(truths)


def write_outputs(out_dir: Path, report: dict[str, Any], pred: torch.Tensor, truth: torch.Tensor,
                  scores: dict[str, dict[str, Any]]) -> Path:
    """rollout.npz, rollout.png and rollout.gif (report.json is written last, with the elapsed time).
    Returns the plot's path."""
    from trainer.tracking import save_clip_gif

    out_dir.mkdir(parents=True, exist_ok=True)
    per_trajectory = {f"{who}_{key}": np.asarray(v, np.float32) for who, s in scores.items()
                      for key, v in s["trajectories"].items()}
    np.savez(out_dir / "rollout.npz", prediction=pred.numpy().astype(np.float32),
             truth=truth.numpy().astype(np.float32), frames=np.asarray(report["frames"]), **per_trajectory)
    png = plot_rollout(report, out_dir / "rollout.png")
    shown = min(GIF_TRAJECTORIES, len(pred))
    save_clip_gif(pred[:shown], out_dir / "rollout.gif", truth=truth[:shown], bounded=False)
    return png


def _notes(k: int, length: int) -> dict[str, str]:
    return {
        "frames": f"0-based indices of the predicted frames; frames 0-{k - 1} are given",
        "times": "time since the last given frame, in the data's time units (null when unknown)",
        "corr_time": f"predicted frames (and time) before the correlation first drops below {CORR_THRESHOLD}; "
                     f"a trajectory that never drops counts the full horizon of {length - k} frames "
                     f"(never_below_threshold counts those trajectories)",
        "fno_relative_l2": f"per trajectory, ||pred - true|| / ||true|| over the whole block of predicted frames "
                           f"{k + 1}-{length} (1-based) given frames 1-{k}, then the mean over trajectories "
                           f"(Li et al. 2021's LpLoss); relative_l2_mean is the mean of the per-frame errors",
    }

def _check_length(length: int, available: int, source: str) -> None:
    if length > available:
        raise ConfigError(f"--rollout_frames {length} is beyond the {available} frames of {source}"
                          f"; pass --rollout_frames {available} or fewer.")


def _jsonable(value):
    """numpy arrays and numbers as lists and floats; NaN and infinities as null (strict JSON)."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in (value.tolist() if isinstance(value, np.ndarray) else value)]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


# ----------------------------------------------------------------------------------------------
# Reporting


def plot_rollout(report: dict[str, Any], path: Path) -> Path:
    """rollout.png: relative L2 and correlation against frame, model and persistence (mean +- std)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.asarray(report["frames"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
    for ax, metric, label in ((axes[0], "relative_l2", "relative L2 error"), (axes[1], "correlation", "correlation")):
        for who, colour in (("model", "tab:blue"), ("persistence", "tab:gray")):
            mean = np.asarray(report["per_frame"][who][f"{metric}_mean"], dtype=float)
            std = np.asarray(report["per_frame"][who][f"{metric}_std"], dtype=float)
            ax.plot(t, mean, color=colour, label=who, marker="." if len(t) < 30 else None)
            ax.fill_between(t, mean - std, mean + std, color=colour, alpha=0.2, linewidth=0)
        given = "frame 0" if t[0] == 1 else f"frames 0-{t[0] - 1}"
        ax.set_xlabel(f"frame (0-based; {given} given)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].axhline(report["corr_threshold"], color="tab:red", linestyle="--", linewidth=1,
                    label=f"{report['corr_threshold']}")
    axes[0].legend()
    axes[1].legend()
    s = report["summary"]
    fig.suptitle(f"step {report['step']}: relative L2 over the block {s['model']['fno_relative_l2']:.4g} "
                 f"(persistence {s['persistence']['fno_relative_l2']:.4g})", fontsize=10)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def log_to_wandb(cfg: Config, run_dir: Path, run_id: str, step: int, report: dict[str, Any], png: Path,
                 say: Callable[[str], None] = print) -> None:
    """The summary numbers and the plot into the run's own W&B run, against `eval/step` = the checkpoint's
    step (a step metric: W&B drops rows logged at a step below the run's last, as an older checkpoint's is)."""
    import wandb

    if not run_id:
        say("W&B: the checkpoint names no tracker run (tracker_run_id); not logged.")
        return
    run = wandb.init(project=cfg.run.wandb_project, id=run_id, resume="allow", dir=str(run_dir))
    try:
        run.define_metric("eval/step")
        run.define_metric("eval/*", step_metric="eval/step")
        metrics = {f"eval/{who}/{key}": value for who, summary in report["summary"].items()
                   for key, value in summary.items() if isinstance(value, (int, float)) and math.isfinite(value)}
        run.log({"eval/step": step, **metrics, "eval/rollout": wandb.Image(str(png))})
    finally:
        run.finish()
    say(f"W&B: logged the evaluation to run {run_id} (project {cfg.run.wandb_project}) at step {step}")


def summary_table(report: dict[str, Any]) -> str:
    """A few frames of model vs persistence, the headline number and the time to corr < 0.8."""
    frames, k = report["frames"], report["settings"]["cond_steps"]
    per = report["per_frame"]
    picks = sorted({0, len(frames) // 4, len(frames) // 2, (3 * len(frames)) // 4, len(frames) - 1})
    fmt = lambda v: "   n/a" if v is None else f"{v:6.4f}"  # noqa: E731
    lines = [f"frames from 0; {k} given", f"{'frame':>6} {'rel L2 model':>13} {'persistence':>12} {'corr model':>11} {'persistence':>12}"]
    for i in picks:
        vals = [per[w][m][i] for m in ("relative_l2_mean", "correlation_mean") for w in ("model", "persistence")]
        vals = [None if v is None or not math.isfinite(v) else float(v) for v in vals]
        lines.append(f"{frames[i]:>6} {fmt(vals[0]):>13} {fmt(vals[1]):>12} {fmt(vals[2]):>11} {fmt(vals[3]):>12}")
    s, unit = report["summary"], report["settings"]["frame_dt"]
    model, base = s["model"], s["persistence"]
    lines.append(f"relative L2 of frames {k + 1}-{frames[-1] + 1} (Li et al.'s protocol): model "
                 f"{model['fno_relative_l2']:.4f}, persistence {base['fno_relative_l2']:.4f} "
                 f"(mean per frame {model['relative_l2_mean']:.4f} vs {base['relative_l2_mean']:.4f})")
    for who in ("model", "persistence"):
        m = s[who]
        when = f" = {m['corr_time_mean']:.3g} time units" if unit is not None else ""
        lines.append(f"frames to corr < {report['corr_threshold']} ({who}): mean {m['corr_time_frames_mean']:.1f}"
                     f"{when}, median {m['corr_time_frames_median']:.1f}; never below in "
                     f"{m['never_below_threshold']} of {report['settings']['num_trajectories']}")
    if report["reference"]:
        ref = ", ".join(f"{name} {value}" for name, value in report["reference"]["fno_relative_l2"].items())
        lines.append(f"Li et al. 2021, Table 1: {ref}")
    lines.append(report["reference_note"])
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
