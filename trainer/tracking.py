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

    def log_video(self, name: str, gif_path: Path, step: int) -> None:
        pass

    def log_checkpoint(self, folder: Path, step: int, *, best: bool) -> None:
        pass

    def finish(self) -> None:
        pass

    def log_media(self, name: str, path: Path, step: int) -> None:
        """An image (PNG) or an animation (GIF), by the file's suffix."""
        (self.log_video if path.suffix == ".gif" else self.log_images)(name, path, step)


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

    def log_video(self, name: str, gif_path: Path, step: int) -> None:
        if self.backend == "wandb":
            import wandb

            self.raw.log({name: wandb.Video(str(gif_path), format="gif")}, step=step)
        else:  # TensorBoard's video summaries need moviepy: its last frame as an image
            with Image.open(gif_path) as gif:
                gif.seek(gif.n_frames - 1)
                image = np.asarray(gif.convert("RGB"))
            self.raw.add_image(name, image, global_step=step, dataformats="HWC")

    def log_checkpoint(self, folder: Path, step: int, *, best: bool) -> None:
        """`folder` as a new version of the W&B artifact `model-<run id>` (type model): aliases `best` and
        `step-N` for the best checkpoint, else `latest` and `step-N` (W&B also moves `latest` to every new
        version by itself). The files are copied into W&B's staging area before this returns, so pruning the
        folder later cannot break the upload (or an offline sync)."""
        if self.backend != "wandb":
            return
        import wandb

        artifact = wandb.Artifact(f"model-{self.raw.id}", type="model",
                                  description=f"Eddy checkpoint of run {self.run_dir.name}",
                                  metadata={"step": step, "best": best, "checkpoint": folder.name,
                                            "run_dir": str(self.run_dir)})
        artifact.add_dir(str(folder))
        self.raw.log_artifact(artifact, aliases=["best" if best else "latest", f"step-{step}"])

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


def save_media(x: torch.Tensor, stem: Path, *, truth: torch.Tensor | None = None, bounded: bool = True) -> Path:
    """Images `[N, C, H, W]` as a PNG grid (`stem`.png; `progress.gif` beside it follows the grids of a
    run), clips `[N, C, F, H, W]` as an animated GIF (`stem`.gif) with `truth` beside each sample when given.
    `bounded`: values in [-1, 1] (images); else physical fields, shown through a colour map."""
    if x.ndim == 4 and not bounded:  # physical fields: coloured, one panel per channel
        return save_clip_gif(x[:, :, None], stem.with_suffix(".png"), truth=None if truth is None else truth[:, :, None],
                             bounded=False)
    if x.ndim == 4:
        path = save_image_grid(x, stem.with_suffix(".png"), scale=max(1, 128 // x.shape[-1]))
        if stem.name.startswith("step-"):
            write_progress_gif(path.parent)
        return path
    return save_clip_gif(x, stem.with_suffix(".gif"), truth=truth, bounded=bounded)


def save_clip_gif(x: torch.Tensor, path: Path, *, truth: torch.Tensor | None = None, bounded: bool = True,
                  frame_ms: int = 250) -> Path:
    """Clips `[N, C, F, H, W]` as one GIF: row n shows clip n, its channels side by side, then the same for
    `truth[n]`. Fields are coloured with matplotlib's RdBu_r on a symmetric range per channel (the 99.5th
    percentile of |truth|, or of |x| without truth), so the same colour means the same value everywhere."""
    panels = [x.detach().float().cpu()] + ([truth.detach().float().cpu()] if truth is not None else [])
    n, c, frames, h, w = panels[0].shape
    if bounded:
        colour = lambda v, ch: np.repeat(to_uint8(v)[..., None], 3, -1)  # noqa: E731  gray per channel
        if c == 3:
            panels = [rearrange(p, "n c f h w -> n 1 f h w c") for p in panels]
            colour = lambda v, ch: to_uint8(v)  # noqa: E731
    else:
        from matplotlib import colormaps

        cmap = colormaps["RdBu_r"]
        ref = panels[-1]
        scale = [max(float(ref[:, k].abs().flatten().quantile(0.995)), 1e-6) for k in range(c)]
        colour = lambda v, ch: (cmap(np.clip(v.numpy() / (2 * scale[ch]) + 0.5, 0, 1))[..., :3] * 255  # noqa: E731
                                ).astype(np.uint8)
    pad, zoom = 2, max(1, 96 // max(h, w))
    images = []
    for f in range(frames):
        rows = []
        for i in range(n):
            tiles = [colour(p[i, k, f], k) for p in panels for k in range(p.shape[1])]
            rows.append(np.concatenate([np.pad(t, ((pad, pad), (pad, pad), (0, 0)), constant_values=255)
                                        for t in tiles], axis=1))
        frame = Image.fromarray(np.concatenate(rows, axis=0))
        images.append(frame.resize((frame.width * zoom, frame.height * zoom), Image.NEAREST))
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=frame_ms, loop=0)
    return path


def nice_ticks(lo: float, hi: float, count: int = 6) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi], about `count` of them."""
    span = max(hi - lo, 1e-12)
    raw = span / max(count - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def log_ticks(lo: float, hi: float) -> list[float]:
    """Ticks of a log axis over [lo, hi] (lo > 0): the powers of ten inside, with 2 and 5 times them when
    fewer than three decades are shown (and 3 times them below one and a half); the ends themselves when no
    such value falls inside."""
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    span = math.log10(hi / lo)
    mults = (1,) if span >= 3 else (1, 2, 5) if span >= 1.5 else (1, 2, 3, 5)
    values = (float(f"{m}e{e}") for e in decades for m in mults)  # exact decimals: 3e-2, not 3 * 10**-2
    ticks = [v for v in values if lo <= v <= hi]
    return ticks or [lo, hi]


def tick_label(v: float) -> str:
    return f"{v:.0e}".replace("e-0", "e-").replace("e+0", "e") if v and (abs(v) < 1e-3 or abs(v) >= 1e5) \
        else f"{v:g}"


def plot_loss_curve(metrics_jsonl: Path, path: Path) -> Path | None:
    """The loss of every log point of `metrics.jsonl` against the step, as a PNG (log scale); None when
    there is nothing to plot. Drawn with PIL alone: matplotlib's import costs more than a second at the
    end of every run."""
    if not metrics_jsonl.is_file():
        return None
    rows = [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r and math.isfinite(r["loss"]) and r["loss"] > 0]
    if not rows:
        return None
    from PIL import ImageDraw, ImageFont

    steps = [float(r["step"]) for r in rows]
    losses = [float(r["loss"]) for r in rows]
    x_lo, x_hi = min(steps), max(steps)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    y_lo, y_hi = min(losses), max(losses)
    if y_hi / y_lo < 1.5:  # widen a flat curve to a visible range around it
        mid = math.sqrt(y_lo * y_hi)
        y_lo, y_hi = mid / 1.3, mid * 1.3
    ly_lo, ly_hi = math.log10(y_lo), math.log10(y_hi)
    pad = 0.05 * (ly_hi - ly_lo)
    ly_lo, ly_hi = ly_lo - pad, ly_hi + pad

    width, height = 720, 420
    left, right, top, bottom = 78, 20, 36, 52
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=13)
    small = ImageFont.load_default(size=11)

    def px(step: float) -> float:
        return left + (step - x_lo) / (x_hi - x_lo) * (width - left - right)

    def py(loss: float) -> float:
        return top + (ly_hi - math.log10(loss)) / (ly_hi - ly_lo) * (height - top - bottom)

    grid, ink = (226, 226, 226), (60, 60, 60)
    for v in log_ticks(10 ** ly_lo, 10 ** ly_hi):
        y = py(v)
        draw.line([(left, y), (width - right, y)], fill=grid)
        draw.text((left - 6, y), tick_label(v), fill=ink, font=small, anchor="rm")
    for v in nice_ticks(x_lo, x_hi):
        x = px(v)
        draw.line([(x, top), (x, height - bottom)], fill=grid)
        draw.text((x, height - bottom + 6), tick_label(v), fill=ink, font=small, anchor="mt")
    draw.rectangle([(left, top), (width - right, height - bottom)], outline=ink)
    points = [(px(s), py(v)) for s, v in zip(steps, losses)]
    colour = (31, 119, 180)
    if len(points) > 1:
        draw.line(points, fill=colour, width=2, joint="curve")
    if len(points) < 50:
        for x, y in points:
            draw.ellipse([(x - 2.5, y - 2.5), (x + 2.5, y + 2.5)], fill=colour)
    draw.text(((left + width - right) / 2, top / 2), metrics_jsonl.parent.name, fill=ink, font=font, anchor="mm")
    draw.text(((left + width - right) / 2, height - 14), "step", fill=ink, font=font, anchor="mm")
    label = Image.new("RGB", (height - top - bottom, 18), "white")
    ImageDraw.Draw(label).text((label.width / 2, 9), "training loss (log scale)", fill=ink, font=font, anchor="mm")
    image.paste(label.rotate(90, expand=True), (6, top))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
