"""Trajectories of physical fields as clip datasets: windows of `frames` frames, `ts` frames apart.

A trajectory is an array `[T, C, H, W]`. Item i of a `TrajectoryWindows` dataset is one window of one
trajectory, `{"x": [C_state, F, H, W]}` plus `{"fields": [C_fields, F, H, W]}` when some channels are
static fields (read by the network, never generated): the first `state_channels` channels are the
state, the rest fields. Every window start is counted: a trajectory of `traj_len` frames gives
`traj_len - (frames - 1) * ts` windows, at starts 0, 1, 2, ..., each window taking frames
s, s + ts, ..., s + (frames - 1) ts.

Channels are standardized with per-channel statistics of the training trajectories (`Normalization`),
which a run stores beside its config, so that samples and forecasts can be put back in physical units.

Sources:
- a folder in the layout of the research code Eddy grew from: `sim_XXXXXX.npz` files, each holding one
  `[T, C, H, W]` array (under the key `data`, or its only array), optionally with a static field array
  `fields` `[Cf, H, W]` or `[T, Cf, H, W]` beside it (`load_simulation_folder`);
- the built-in Navier-Stokes generator (trainer/data/navier_stokes.py), written once into a cache of
  memory-mapped arrays (`navier_stokes_dataset`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from trainer.data.base import ClipData, normalize_index
from trainer.errors import ConfigError, DataError

SIM_FILE = re.compile(r"^sim_\d+\.npz$")


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean and standard deviation: x_model = (x - mean) / std."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def of(cls, arrays: list[np.ndarray]) -> "Normalization":
        """The statistics of channel axis 1 over `[T, C, H, W]` arrays, accumulated in float64."""
        channels = arrays[0].shape[1]
        total, sq, n = np.zeros(channels), np.zeros(channels), 0
        for a in arrays:
            a = np.asarray(a, dtype=np.float64)
            total += a.sum(axis=(0, 2, 3))
            sq += np.square(a).sum(axis=(0, 2, 3))
            n += a.shape[0] * a.shape[2] * a.shape[3]
        mean = total / n
        std = np.sqrt(np.maximum(sq / n - mean**2, 0.0))
        return cls(tuple(mean.tolist()), tuple(np.where(std > 1e-12, std, 1.0).tolist()))

    def apply(self, x: np.ndarray | torch.Tensor, channel_axis: int = 0):
        """(x - mean) / std along `channel_axis`."""
        mean, std = self._shaped(x, channel_axis)
        return (x - mean) / std

    def invert(self, x: torch.Tensor, channel_axis: int = 1) -> torch.Tensor:
        mean, std = self._shaped(x, channel_axis)
        return x * std + mean

    def _shaped(self, x, axis):
        shape = [1] * x.ndim
        shape[axis] = -1
        if isinstance(x, torch.Tensor):
            return (torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(shape),
                    torch.tensor(self.std, dtype=x.dtype, device=x.device).view(shape))
        return np.asarray(self.mean, np.float32).reshape(shape), np.asarray(self.std, np.float32).reshape(shape)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "Normalization":
        raw = json.loads(path.read_text())
        return cls(tuple(raw["mean"]), tuple(raw["std"]))


class TrajectoryWindows(ClipData):
    """Windows of trajectories `[T, C, H, W]` (numpy arrays, memory-mapped or not) as clips.

    Args:
        trajectories: the arrays, all of one shape `[T, C, H, W]`.
        frames: frames per window F.
        ts: stride between the frames of a window (1: consecutive frames).
        traj_len: frames of each trajectory to use, from its start (default: all).
        state_channels: the first this many channels are generated; the others are static fields
            (default: all channels are the state).
        normalization: per-channel statistics over all channels (default: those of `trajectories`).
        channel_names: one name per channel, for pictures and messages.
        static: optional static fields `[Cf, H, W]` per trajectory, appended to the fields.
        source: where the data came from, for messages.
        squeeze_frames: items without the frame axis, `[C, H, W]` (single frames for the 2D Unet; frames 1).
    """

    def __init__(self, trajectories: list[np.ndarray], *, frames: int, ts: int = 1, traj_len: int | None = None,
                 state_channels: int | None = None, normalization: Normalization | None = None,
                 channel_names: tuple[str, ...] | None = None, static: list[np.ndarray] | None = None,
                 source: str = "", squeeze_frames: bool = False):
        if not trajectories:
            raise DataError(f"{source or 'the dataset'} holds no trajectories")
        total, channels, height, width = trajectories[0].shape
        self.traj_len = total if traj_len is None else traj_len
        span = (frames - 1) * ts + 1
        if frames < 1 or ts < 1:
            raise ConfigError(f"--frames and --ts must be at least 1, got {frames} and {ts}")
        if self.traj_len > total:
            raise ConfigError(f"--traj_len {self.traj_len} exceeds the {total} frames of each trajectory in {source}")
        if self.traj_len < span:
            raise ConfigError(f"--traj_len {self.traj_len} is shorter than one window: --frames {frames} with --ts {ts} "
                              f"spans {span} frames. Lower --frames or --ts, or use longer trajectories.")
        self.state_channels = channels if state_channels is None else state_channels
        if not 1 <= self.state_channels <= channels:
            raise ConfigError(f"--state_channels {self.state_channels} must be between 1 and the {channels} channels "
                              f"of {source}")
        self.trajectories, self.static, self.source = trajectories, static, source
        self.frames, self.ts = frames, ts
        self.squeeze_frames = squeeze_frames and frames == 1
        self.channels = self.state_channels
        self.image_size = height if height == width else (height, width)
        self.field_channels = channels - self.state_channels + (static[0].shape[0] if static else 0)
        self.normalization = normalization or Normalization.of([t[: self.traj_len] for t in trajectories])
        self.channel_names = channel_names or tuple(f"channel {c}" for c in range(channels))
        self.windows_per_trajectory = self.traj_len - (frames - 1) * ts

    def __len__(self) -> int:
        return len(self.trajectories) * self.windows_per_trajectory

    def window(self, index: int) -> tuple[int, int]:
        """(trajectory, first frame) of window `index`."""
        return divmod(index, self.windows_per_trajectory)

    def __getitem__(self, index) -> dict[str, torch.Tensor]:
        return self.clip(*self.window(normalize_index(index, len(self))), self.frames)

    def trajectory(self, index: int) -> dict[str, torch.Tensor]:
        """All of trajectory `index` that windows use (its first `traj_len` frames, every `ts`-th) as one clip."""
        return self.clip(normalize_index(index, len(self.trajectories)), 0, (self.traj_len - 1) // self.ts + 1)

    def clip(self, trajectory: int, start: int, frames: int) -> dict[str, torch.Tensor]:
        """Frames start, start + ts, ... (`frames` of them) of one trajectory, standardized."""
        raw = np.asarray(self.trajectories[trajectory][start: start + (frames - 1) * self.ts + 1: self.ts],
                         dtype=np.float32)  # [F, C, H, W]
        clip = torch.from_numpy(np.ascontiguousarray(self.normalization.apply(raw, channel_axis=1)))
        clip = clip.permute(1, 0, 2, 3).contiguous()  # [C, F, H, W]
        item = {"x": clip[: self.state_channels]}
        fields = [clip[self.state_channels:]] if self.state_channels < clip.shape[0] else []
        if self.static:
            static = torch.from_numpy(np.asarray(self.static[trajectory], dtype=np.float32))
            fields.append(static[:, None].expand(-1, frames, -1, -1))
        if fields:
            item["fields"] = torch.cat(fields)
        return {k: v[:, 0] for k, v in item.items()} if self.squeeze_frames else item


# ----------------------------------------------------------------------------------------------
# The research code's layout


def is_simulation_folder(path: str) -> bool:
    """Whether `path` is a folder holding sim_XXXXXX.npz files (a look at its names). Start-up asks this
    several times (validation, building, fitting the config); a folder of many images is listed once for
    each state of its entries (the folder's modification time)."""
    try:
        return _lists_simulations(os.path.realpath(path), os.stat(path).st_mtime_ns)
    except OSError:
        return False


@functools.lru_cache(maxsize=16)
def _lists_simulations(path: str, mtime_ns: int) -> bool:
    return any(SIM_FILE.match(entry.name) for entry in os.scandir(path))


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = list(z.keys())
            key = "data" if "data" in keys else keys[0] if len(keys) == 1 else None
            if key is None:
                raise DataError(f"{path} holds the arrays {keys}; name the trajectory `data` (and static fields "
                                f"`fields`)")
            return z[key], (z["fields"] if "fields" in keys else None)
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is not a readable .npz file: {e}") from None


def load_simulation_folder(path: str, **windows) -> TrajectoryWindows:
    """The `sim_*.npz` files of `path` (sorted by name) as windows; every file is checked first: the same
    `[T, C, H, W]` shape, finite values. Raises DataError naming the file that is not."""
    folder = Path(path)
    files = sorted(p for p in folder.iterdir() if SIM_FILE.match(p.name)) if folder.is_dir() else []
    if not files:
        raise DataError(f"--train_data_dir {path} holds no sim_XXXXXX.npz files (one [T, C, H, W] array each)")
    trajectories, static = [], []
    for f in files:
        data, fields = _read_npz(f)
        if data.ndim != 4:
            raise DataError(f"{f} holds an array of shape {list(data.shape)}; a trajectory is [T, C, H, W]")
        if trajectories and data.shape != trajectories[0].shape:
            raise DataError(f"{f} has shape {list(data.shape)} but {files[0].name} has "
                            f"{list(trajectories[0].shape)}: every trajectory must have the same shape")
        if not np.isfinite(data).all():
            raise DataError(f"{f} holds NaN or infinite values; fix or remove the file")
        if fields is not None:
            fields = fields[0] if fields.ndim == 4 else fields
            if fields.ndim != 3 or fields.shape[1:] != data.shape[2:]:
                raise DataError(f"{f}: `fields` has shape {list(fields.shape)}; expected [Cf, H, W] with the "
                                f"trajectory's H, W {list(data.shape[2:])}")
            static.append(fields)
        trajectories.append(data)
    if static and len(static) != len(trajectories):
        raise DataError(f"some sim_*.npz files in {path} hold `fields` and some do not: all or none must")
    return TrajectoryWindows(trajectories, static=static or None, source=path, **windows)


# ----------------------------------------------------------------------------------------------
# The built-in Navier-Stokes data, generated once


def cache_root() -> Path:
    return Path(os.environ.get("EDDY_CACHE", Path.home() / ".cache" / "eddy"))


def navier_stokes_dataset(*, preset: str, split: str, num_train: int, num_test: int, channels: tuple[str, ...],
                          seed: int, size: int | None = None, n_frames: int | None = None, device: str | None = None,
                          progress: bool = True, **windows) -> TrajectoryWindows:
    """Windows of the built-in Navier-Stokes trajectories of `split` ("train" or "test"), generated on the
    first call (on the GPU when there is one) into `$EDDY_CACHE/navier_stokes/<key>/` as `.npy` files and
    memory-mapped afterwards. `size` (frames of size x size, solved on a grid as much finer as the preset's)
    and `n_frames` (frames per trajectory) override the preset's. The test trajectories are other indices
    than the training ones; both splits are standardized with the training statistics."""
    from trainer.data import navier_stokes as ns

    if preset not in ns.PRESETS:
        raise ConfigError(f"--ns_preset {preset!r} is not one of: {', '.join(ns.PRESETS)}")
    if split not in ("train", "test"):
        raise ConfigError(f"--split {split!r}: the Navier-Stokes data has the splits train and test")
    base = ns.PRESETS[preset]
    size = size or base.size
    spec_preset = ns.get_preset(preset, size=size, resolution=size * base.resolution // base.size,
                                n_frames=n_frames or base.n_frames)
    spec = {"preset": {k: v for k, v in asdict(spec_preset).items() if k != "forcing"}, "channels": list(channels),
            "seed": seed, "num_train": num_train, "num_test": num_test, "version": 1}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    folder = cache_root() / "navier_stokes" / f"{preset}-{key}"
    if not (folder / "stats.json").is_file():
        _generate(folder, spec, spec_preset, num_train, num_test, channels, seed, device, progress)
    arrays = np.load(folder / f"{split}.npy", mmap_mode="r")  # [N, T, C, H, W]
    return TrajectoryWindows(list(arrays), normalization=Normalization.load(folder / "stats.json"),
                             channel_names=tuple(channels), source=f"navier_stokes {preset} ({split})", **windows)


def _generate(folder: Path, spec: dict, spec_preset, num_train: int, num_test: int, channels: tuple[str, ...],
              seed: int, device: str | None, progress: bool) -> None:
    from trainer.data import navier_stokes as ns

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    for split, count, start in (("train", num_train, 0), ("test", num_test, num_train)):
        omega = ns.generate(spec_preset, count, seed=seed, start=start, device=device, progress=progress)
        data = ns.fields(omega, channels, spec_preset.length)  # [n, T, C, N, N]
        np.save(tmp / f"{split}.npy", data.numpy().astype(np.float32))
    Normalization.of(list(np.load(tmp / "train.npy", mmap_mode="r"))).save(tmp / "stats.json")
    (tmp / "spec.json").write_text(json.dumps(spec, indent=2) + "\n")
    try:
        os.replace(tmp, folder)
    except OSError:  # another process finished first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
