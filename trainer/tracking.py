"""Experiment tracking behind one small interface, and the pictures it shows.

The training loop calls `tracker.log(...)` and `tracker.log_images(...)` and never asks which
backend is on. Backends go through Accelerate's trackers (created on the main process only);
`--report_to none` gives a tracker that only appends metrics to `metrics.jsonl` in the run folder,
which every backend does too, so a run always leaves a plain-text record.

W&B: with no API key and no WANDB_MODE, the run goes offline by itself, and the user is told where
the run lives and how to `wandb sync` it. WANDB_MODE=online with no key is an error, raised before
any training starts.
"""

from __future__ import annotations

import json
import math
import netrc
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import rearrange
from PIL import Image

from trainer.errors import ConfigError


def wandb_has_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc().authenticators("api.wandb.ai")
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return bool(auth and auth[2])


def resolve_wandb_mode() -> tuple[str, str | None]:
    """(mode, note for the user). Sets WANDB_MODE=offline when no key is available."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "disabled", "dryrun"):
        return mode, None
    if wandb_has_key():
        return mode or "online", None
    if mode == "online":
        raise ConfigError("WANDB_MODE=online but no W&B API key is set: run `wandb login`, set WANDB_API_KEY, "
                          "or use WANDB_MODE=offline (sync later with `wandb sync`), or --report_to none.")
    os.environ["WANDB_MODE"] = "offline"
    return "offline", "no W&B API key found: logging offline."


class NullTracker:
    """Records nothing: the tracker of every process but the main one, so the loop never asks which it is."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_images(self, name: str, grid_path: Path, step: int) -> None:
        pass

    def finish(self) -> None:
        pass


class Tracker(NullTracker):
    """Writes metrics to `metrics.jsonl`; the base for the real backends. Main process only."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self._jsonl = open(run_dir / "metrics.jsonl", "a")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self._jsonl.flush()

    def finish(self) -> None:
        self._jsonl.close()


class AccelerateTracker(Tracker):
    """W&B or TensorBoard through `accelerator.init_trackers`."""

    def __init__(self, accelerator, backend: str, run_dir: Path, project: str, config: dict, run_id: str):
        super().__init__(run_dir)
        self.accelerator, self.backend = accelerator, backend
        init_kwargs: dict[str, Any] = {}
        dirs = accelerator.project_configuration  # TensorBoard writes under its logging_dir
        dirs.project_dir = dirs.logging_dir = str(run_dir)
        if backend == "tensorboard":  # its hparams take flat scalars only
            from trainer.config import flatten

            config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flatten(config).items()}
        if backend == "wandb":
            (run_dir / "wandb").mkdir(exist_ok=True)
            init_kwargs["wandb"] = {"dir": str(run_dir), "id": run_id, "resume": "allow",
                                    "name": run_dir.name}
        accelerator.init_trackers(project, config=config, init_kwargs=init_kwargs)
        self.raw = accelerator.get_tracker(backend, unwrap=True)
        # Where the backend writes: a W&B run folder (offline-run-*/ or run-*/), else the run folder.
        self.location = Path(self.raw.dir).parent if backend == "wandb" else run_dir

    def log(self, metrics: dict[str, float], step: int) -> None:
        super().log(metrics, step)
        self.accelerator.log(metrics, step=step)

    def log_images(self, name: str, grid_path: Path, step: int) -> None:
        if self.backend == "wandb":
            import wandb

            self.raw.log({name: wandb.Image(str(grid_path))}, step=step)
        else:
            image = np.asarray(Image.open(grid_path).convert("RGB"))
            self.raw.add_image(name, image, global_step=step, dataformats="HWC")

    def finish(self) -> None:
        super().finish()
        for tracker in self.accelerator.trackers:  # not end_training(): that also ends the process group
            tracker.finish()
        self.accelerator.trackers = []  # finished: end_training() at the very end must not finish them again


def make_tracker(accelerator, backend: str, run_dir: Path, project: str, config: dict, run_id: str) -> NullTracker:
    """The run's tracker on the main process; a NullTracker on the others."""
    if not accelerator.is_main_process:
        return NullTracker()
    if backend == "none":
        return Tracker(run_dir)
    return AccelerateTracker(accelerator, backend, run_dir, project, config, run_id)


# ----------------------------------------------------------------------------------------------
# Pictures


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] floats -> uint8, same layout."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()


def image_grid(images: torch.Tensor, per_row: int | None = None, pad: int = 2) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] -> one HWC (or HW for C=1) uint8 grid, white `pad` pixels around tiles."""
    n, c, h, w = images.shape
    per_row = per_row or math.ceil(math.sqrt(n))
    rows = math.ceil(n / per_row)
    tiles = torch.full((rows * per_row, c, h + 2 * pad, w + 2 * pad), 1.0)
    tiles[:n, :, pad:pad + h, pad:pad + w] = images.detach().float().cpu()
    grid = rearrange(tiles, "(r k) c h w -> (r h) (k w) c", r=rows, k=per_row)
    grid = to_uint8(grid)
    return grid[..., 0] if c == 1 else grid


def save_image_grid(images: torch.Tensor, path: Path, *, scale: int = 1) -> Path:
    """Save samples as a PNG grid; `scale` enlarges tiny images with nearest-neighbour for viewing."""
    img = Image.fromarray(image_grid(images))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def write_progress_gif(samples_dir: Path, frame_ms: int = 400) -> Path | None:
    """`progress.gif`: the sample grids of every save so far, in order, to watch the model learn."""
    frames = sorted(samples_dir.glob("step-*.png"))
    if not frames:
        return None
    images = [Image.open(f).convert("RGB") for f in frames]
    path = samples_dir / "progress.gif"
    images[0].save(path, save_all=True, append_images=images[1:], duration=frame_ms, loop=0)
    return path
