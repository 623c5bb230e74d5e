"""Clips of pictures as datasets: built-in moving shapes, and folders of the user's clips.

Items are `{"x": float32 [C, F, S, S] in [-1, 1]}` (trainer/data/base.py), the same for the same index;
`augment` mirrors whole clips left-right (every frame the same way, one draw per clip) when
`random_flip` is set.

- `MovingShapesDataset`: one to three of ShapesDataset's shapes gliding with constant velocity and
  bouncing off the edges of the frame, on a plain background; no download.
- `load_clip_folder` (--train_data_dir): every clip file under a folder, cut into windows of `frames`
  frames `ts` apart, every start counted (`WindowIndex`).

Clip files, found at any depth (names starting with "." or "__" are left out):
- `.gif`: every frame, through PIL.
- `.npy`, `.npz`: one array per file (in an .npz, the array named `data` or the only one). Layout, by
  the array's shape:
    [T, H, W]     one gray channel;
    [T, H, W, C]  when only the last axis has 1, 3 or 4 entries;
    [T, C, H, W]  when only axis 1 has 1, 3 or 4 entries;
  C = 1 is gray, 3 RGB, 4 RGBA (composited over white, as for images). Refused, naming the file: a 4-axis
  array where both axis 1 and the last axis could be the channels (e.g. [T, 3, 64, 4]), or neither can;
  a 3-axis array whose last axis has 1, 3 or 4 entries (it reads as one [H, W, C] image); any other
  number of axes. Range, by the dtype and the values of the whole clip:
    uint8 and other integers: 0..255 (other integers must lie in 0..255);
    floats with no value below 0: [0, 1];
    floats with some value below 0: [-1, 1];
  refused: floats outside [-1, 1] (e.g. 0..255 saved as float), NaN or infinity, any other dtype. An
  all-positive clip stored in [-1, 1] is read as [0, 1] (the two cannot be told apart); save such clips as
  uint8 to be exact. Floats are rounded to 8 bits, the precision of every image Eddy reads.
- videos (`VIDEO_EXTENSIONS`): decoded with PyAV (`av`) or else `imageio-ffmpeg`, whichever imports;
  with neither, video files are skipped and counted in one warning that names the package to install.

Every frame goes through `preprocess_image` (trainer/data/images.py): shorter side resized to
`image_size`, centre square kept, `channels` 1 or 3. Unreadable files and clips shorter than one window are
skipped and counted in a warning; files that break the rules above raise DataError naming the file.

Decoding: every clip is decoded once up front, which checks it and counts its frames. Its frames are
kept in memory as uint8 `[T, C, S, S]` while their total stays within `keep_bytes` (1 GiB by default:
about 85,000 RGB frames of 64x64), so a folder of that size is served from memory with no decoding during
training. Clips past the budget are decoded again when a window of theirs is read, and the last
`cache_clips` of those (per process, so per DataLoader worker) are kept in an LRU cache.

Helpers written here for other modules to share (they may move): `shape_coverage` and `visible_colour`
(ShapesDataset's drawing as functions), `WindowIndex` (every window of F frames ts apart in sequences of
any lengths), `random_hflip` (the body of ImageData.augment, for any rank).
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageSequence

from trainer.data.base import ClipData, check_image_shape, normalize_index, random_hflip
from trainer.data.builtin import ShapesDataset, _rng
from trainer.data.fluid import SIM_FILE
from trainer.data.images import _is_hidden, preprocess_image
from trainer.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

GIF_EXTENSIONS = (".gif",)
ARRAY_EXTENSIONS = (".npy", ".npz")
VIDEO_EXTENSIONS = (".mp4", ".webm", ".avi", ".mov", ".mkv", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".ogv")
CLIP_EXTENSIONS = GIF_EXTENSIONS + ARRAY_EXTENSIONS + VIDEO_EXTENSIONS
VIDEO_PACKAGES = "PyAV (pip install av) or imageio-ffmpeg (pip install imageio-ffmpeg)"

CHANNEL_SIZES = (1, 3, 4)  # gray, RGB, RGBA: the sizes an array's channel axis may have
_PIL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


# ----------------------------------------------------------------------------------------------
# Shared pieces: drawing, windows, flips


CIRCLE, SQUARE, TRIANGLE = 0, 1, 2
SQUARE_HALF_SIDE = 0.85  # a square's half-side, as a fraction of its `radius`


def shape_coverage(kind: int, dy: np.ndarray, dx: np.ndarray, radius: float, angle: float = 0.0) -> np.ndarray:
    """Antialiased coverage in [0, 1] (float32) of one of ShapesDataset's shapes, at the offsets (dy, dx) in
    pixels from its centre (arrays that broadcast, e.g. [F, H, 1] and [F, 1, W] for a clip).

    A circle of `radius`, an axis-aligned square of half-side `0.85 radius`, or an equilateral triangle
    inscribed in the circle and rotated by `angle`. Coverage `clip(0.5 - d, 0, 1)` of the signed distance d
    gives a one-pixel antialiased edge; the same arithmetic as ShapesDataset, so its images are unchanged
    when it draws through this function.
    """
    if kind == CIRCLE:
        dist = np.sqrt(dy * dy + dx * dx) - radius
    elif kind == SQUARE:
        dist = np.maximum(np.abs(dy), np.abs(dx)) - radius * SQUARE_HALF_SIDE
    else:
        assert kind == TRIANGLE, f"unknown shape kind {kind}"
        dist = ShapesDataset._triangle_distance(dy, dx, radius, angle)
    return np.clip(0.5 - dist, 0.0, 1.0).astype(np.float32)


def visible_colour(colour: np.ndarray, background: np.ndarray) -> np.ndarray:
    """`colour`, or where it is too close to `background` to be seen, the background shifted by a fixed
    contrast (ShapesDataset's rule)."""
    if np.abs(colour - background).max() < 0.5:
        return np.where(background > 0, background - 1.0, background + 1.0).astype(np.float32)
    return colour


class WindowIndex:
    """Every window of `frames` frames `ts` apart in sequences of `lengths` frames: window i -> (sequence,
    start).

    A sequence of T frames holds T - (frames - 1) ts windows (none when shorter), at starts 0, 1, 2, ...,
    window s taking frames s, s + ts, ..., s + (frames - 1) ts; the windows of sequence 0 come first.
    """

    def __init__(self, lengths: Sequence[int], frames: int, ts: int):
        assert frames >= 1 and ts >= 1, (frames, ts)
        self.frames, self.ts = frames, ts
        self.span = (frames - 1) * ts + 1
        counts = np.maximum(np.asarray(lengths, dtype=np.int64) - self.span + 1, 0)
        self.offsets = np.concatenate([[0], np.cumsum(counts)])  # windows of sequence k: offsets[k] .. offsets[k+1]

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> tuple[int, int]:
        i = normalize_index(index, len(self))
        sequence = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return sequence, i - int(self.offsets[sequence])

    def frame_slice(self, start: int) -> slice:
        """The frames of the window at `start`, as a slice of its sequence."""
        return slice(start, start + self.span, self.ts)


class VideoData(ClipData):
    """Base of the clip datasets of pictures: values in [-1, 1], so sampling may clamp (`bounded`), and
    `augment` mirrors whole clips left-right when `random_flip` is set (by the builder, --random_flip)."""

    bounded = True

    def augment(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        return random_hflip(batch, generator) if self.random_flip else batch


def _check_windows(frames: int, ts: int) -> None:
    if not isinstance(frames, int) or frames < 1 or not isinstance(ts, int) or ts < 1:
        raise ConfigError(f"--frames and --ts must be whole numbers of at least 1, got {frames} and {ts}")


# ----------------------------------------------------------------------------------------------
# Built-in moving shapes


@dataclass(frozen=True)
class MovingShape:
    """One shape of a clip: `centres` [F, 2] (y, x) in pixels, one per frame; `extent` is how far its
    antialiased edge reaches from the centre along y and x, which the centre keeps from the frame's edges."""

    kind: int
    radius: float
    angle: float
    colour: np.ndarray  # [C]
    centres: np.ndarray  # [F, 2]
    extent: float


def bounce(p: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Positions `p` of a point moving freely, folded into [lo, hi]: the point reflects off both ends (a
    triangle wave of period 2 (hi - lo)). Folding is 1-Lipschitz, so no step is longer than the free one."""
    span = hi - lo
    if span <= 0:
        return np.full_like(p, (lo + hi) / 2)
    u = np.mod(p - lo, 2 * span)
    return lo + np.where(u <= span, u, 2 * span - u)


class MovingShapesDataset(VideoData):
    """Clips of one to three filled circles, squares and triangles (ShapesDataset's, drawn by
    `shape_coverage`) moving with constant velocity and bouncing off the frame's edges, on a plain background.

    Clip i is drawn from a numpy Generator seeded by (seed, i). Each shape has a radius of
    `radius_range` x image_size and a speed of `speed_range` x image_size pixels per frame in a uniform
    direction; it stays whole inside the frame, antialiased edge included. Shapes keep their size, angle
    and colour; later shapes are drawn over earlier ones. With `channels=1` all colours are gray levels.
    """

    radius_range = (0.1, 0.25)  # fractions of image_size
    speed_range = (0.02, 0.06)  # fractions of image_size per frame

    def __init__(self, image_size: int = 32, channels: int = 3, frames: int = 8, length: int = 10000, seed: int = 0):
        check_image_shape(image_size, channels)
        _check_windows(frames, 1)
        if length < 1:
            raise ConfigError(f"the number of built-in clips must be at least 1, got {length}")
        self.image_size, self.channels, self.frames = image_size, channels, frames
        self.length, self.seed = length, seed
        centres = np.arange(image_size, dtype=np.float32) + 0.5  # pixel centres, in pixels
        self._y = centres[None, :, None]  # [1, H, 1]
        self._x = centres[None, None, :]  # [1, 1, W]

    def __len__(self) -> int:
        return self.length

    @property
    def max_speed(self) -> float:
        """The most pixels a shape's centre moves, along y and along x, from one frame to the next."""
        return self.speed_range[1] * self.image_size

    def scene(self, i: int) -> tuple[np.ndarray, list[MovingShape]]:
        """(background [C], shapes) of clip i."""
        rng = _rng(self.seed, i)
        size, channels = float(self.image_size), self.channels
        t = np.arange(self.frames, dtype=np.float64)[:, None]  # [F, 1]
        background = rng.uniform(-1.0, 1.0, channels).astype(np.float32)
        shapes = []
        for _ in range(rng.integers(1, 4)):
            kind = int(rng.integers(3))
            radius = size * rng.uniform(*self.radius_range)
            extent = (radius * SQUARE_HALF_SIDE if kind == SQUARE else radius) + 0.5  # + the antialiased edge
            start = rng.uniform(extent, size - extent, 2)  # (y, x)
            heading = rng.uniform(0.0, 2.0 * np.pi)
            velocity = size * rng.uniform(*self.speed_range) * np.array([np.sin(heading), np.cos(heading)])
            angle = rng.uniform(0.0, 2.0 * np.pi)
            colour = visible_colour(rng.uniform(-1.0, 1.0, channels).astype(np.float32), background)
            centres = bounce(start + t * velocity, extent, size - extent)  # [F, 2]
            shapes.append(MovingShape(kind, radius, angle, colour, centres, extent))
        return background, shapes

    def __getitem__(self, index) -> dict[str, torch.Tensor]:
        background, shapes = self.scene(normalize_index(index, len(self)))
        shape = (self.channels, self.frames, self.image_size, self.image_size)
        clip = np.broadcast_to(background[:, None, None, None], shape).copy()  # [C, F, H, W]
        for s in shapes:
            dy = self._y - s.centres[:, 0, None, None]  # [F, H, 1]
            dx = self._x - s.centres[:, 1, None, None]  # [F, 1, W]
            alpha = shape_coverage(s.kind, dy, dx, s.radius, s.angle)  # [F, H, W]
            clip += alpha * (s.colour[:, None, None, None] - clip)
        return {"x": torch.from_numpy(clip)}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.length} clips of {self.channels}x{self.frames}x"
                f"{self.image_size}x{self.image_size}, seed {self.seed})")


# ----------------------------------------------------------------------------------------------
# Decoding one clip file


def clip_layout(shape: tuple[int, ...], path) -> str:
    """The layout of an array clip, "THW", "THWC" or "TCHW" (the rules in the module docstring), or a
    DataError naming `path`."""
    dims = list(shape)
    layouts = "[T, H, W], [T, H, W, C] or [T, C, H, W] with C = 1, 3 or 4"
    if len(shape) == 3:
        if shape[2] in CHANNEL_SIZES:
            raise DataError(f"{path}: an array of shape {dims} reads as one [H, W, C] image, not as frames "
                            f"{shape[2]} pixel(s) wide; a clip is {layouts}")
        return "THW"
    if len(shape) == 4:
        first, last = shape[1] in CHANNEL_SIZES, shape[3] in CHANNEL_SIZES
        if first and last:
            raise DataError(f"{path}: the array of shape {dims} is ambiguous: [T, C, H, W] with C = {shape[1]} or "
                            f"[T, H, W, C] with C = {shape[3]}? Frames 1, 3 or 4 pixels high or wide cannot be told "
                            f"from channels; resize them, or save gray clips as [T, H, W]")
        if first or last:
            return "TCHW" if first else "THWC"
    raise DataError(f"{path}: an array of shape {dims} is not a clip; a clip is {layouts} (one clip per file)")


def clip_to_uint8(array: np.ndarray, path) -> np.ndarray:
    """An array clip -> uint8 [T, H, W, C] with C in (1, 3, 4): its layout and range decided by the rules in
    the module docstring; a DataError naming `path` for what they refuse."""
    layout = clip_layout(array.shape, path)
    array = array[..., None] if layout == "THW" else array.transpose(0, 2, 3, 1) if layout == "TCHW" else array
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if array.dtype.kind in "iu":
        lo, hi = (int(array.min()), int(array.max())) if array.size else (0, 0)
        if lo < 0 or hi > 255:
            raise DataError(f"{path}: integer clips must hold 0..255, this one holds {lo}..{hi}; "
                            f"rescale it and save as uint8")
        return array.astype(np.uint8)
    if array.dtype.kind != "f":
        raise DataError(f"{path}: arrays of dtype {array.dtype} are not clips; save uint8 (0..255) or "
                        f"floats in [0, 1] or [-1, 1]")
    if not np.isfinite(array).all():
        raise DataError(f"{path} holds NaN or infinite values; fix or remove the file")
    lo, hi = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
    if lo < -1.0 or hi > 1.0:
        raise DataError(f"{path}: float clips must be in [0, 1] or [-1, 1], this one spans [{lo:g}, {hi:g}]"
                        f"{' (0..255 saved as float? save it as uint8)' if hi > 1.0 and lo >= 0 else ''}")
    unit = array.astype(np.float32) if lo >= 0.0 else (array.astype(np.float32) + 1.0) / 2.0  # now [0, 1]
    return np.rint(unit * 255.0).astype(np.uint8)


def _read_array(path: Path) -> np.ndarray:
    if path.suffix.lower() == ".npy":
        return np.load(path, allow_pickle=False)
    with np.load(path, allow_pickle=False) as z:
        keys = list(z.keys())
        if "data" not in keys and len(keys) != 1:
            raise DataError(f"{path} holds the arrays {keys}; a clip file holds one array (or names it `data`)")
        return z["data" if "data" in keys else keys[0]]


@cache
def video_backend() -> str | None:
    """"av" or "imageio_ffmpeg", the first that imports, or None: then video files cannot be read."""
    for name in ("av", "imageio_ffmpeg"):
        try:
            __import__(name)
            return name
        except ImportError:
            continue
    return None


def _video_frames(path: Path) -> Iterator[Image.Image]:
    """The frames of a video file, in order, as RGB PIL images."""
    if video_backend() == "av":
        import av

        with av.open(str(path)) as container:
            for frame in container.decode(video=0):
                yield frame.to_image()
        return
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    try:
        size = next(reader)["size"]  # the first item is the metadata
        for frame in reader:
            yield Image.frombytes("RGB", size, frame)
    finally:
        reader.close()


def _quantize(frames: list[torch.Tensor], image_size: int, channels: int) -> np.ndarray:
    """Frames from `preprocess_image` ([C, S, S] in [-1, 1], on the 8-bit grid) -> uint8 [T, C, S, S], exactly."""
    if not frames:
        return np.zeros((0, channels, image_size, image_size), np.uint8)
    return np.rint((torch.stack(frames).numpy() + 1.0) * 127.5).astype(np.uint8)


def decode_clip(path: Path, image_size: int, channels: int) -> np.ndarray:
    """One clip file -> uint8 [T, channels, image_size, image_size], every frame through `preprocess_image`.

    Raises DataError where the file breaks the rules of the module docstring; whatever a decoder raises
    for a damaged file passes through.
    """
    suffix = path.suffix.lower()
    if suffix in GIF_EXTENSIONS:
        with Image.open(path) as gif:
            frames = [preprocess_image(frame, image_size, channels) for frame in ImageSequence.Iterator(gif)]
    elif suffix in ARRAY_EXTENSIONS:
        array = clip_to_uint8(_read_array(path), path)  # [T, H, W, C]
        frames = [preprocess_image(Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a), image_size, channels)
                  for a in array]
    else:
        assert suffix in VIDEO_EXTENSIONS, path
        frames = [preprocess_image(frame, image_size, channels) for frame in _video_frames(path)]
    return _quantize(frames, image_size, channels)


# ----------------------------------------------------------------------------------------------
# A folder of clips (--train_data_dir)


class ClipFolder(VideoData):
    """Windows of `frames` frames `ts` apart of the clips `files` (their frame counts `lengths`), every start
    counted. `resident` holds the decoded clips kept from the first pass (index -> uint8 [T, C, S, S]); the
    others are decoded on access, the last `cache_clips` kept. Built by `load_clip_folder`."""

    def __init__(self, files: list[Path], lengths: list[int], *, frames: int, ts: int, image_size: int,
                 channels: int, resident: dict[int, np.ndarray] | None = None, cache_clips: int = 8,
                 source: str = ""):
        assert len(files) == len(lengths) and files, "a ClipFolder needs one length per file, and some files"
        self.files, self.lengths, self.source = files, lengths, source
        self.frames, self.ts, self.image_size, self.channels = frames, ts, image_size, channels
        self.windows = WindowIndex(lengths, frames, ts)
        self.resident = resident or {}
        self.cache_clips = cache_clips
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()  # least recently used first
        self.skipped: list[tuple[str, str]] = []  # (path, why) of the files left out, set by load_clip_folder

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index) -> dict[str, torch.Tensor]:
        k, start = self.windows[normalize_index(index, len(self))]
        window = self.decoded(k)[self.windows.frame_slice(start)]  # [F, C, S, S] uint8
        x = torch.from_numpy(window.astype(np.float32) / 127.5 - 1.0)  # the arithmetic of preprocess_image
        return {"x": x.permute(1, 0, 2, 3).contiguous()}  # [C, F, S, S]

    def decoded(self, k: int) -> np.ndarray:
        """Clip k as uint8 [T, C, S, S]: kept from the first pass, or from the LRU cache, or decoded again."""
        if k in self.resident:
            return self.resident[k]
        clip = self._cache.pop(k, None)
        if clip is None:
            try:
                clip = decode_clip(self.files[k], self.image_size, self.channels)
            except DataError:
                raise
            except Exception as e:  # the file was readable when the folder was loaded
                raise DataError(f"could not read {self.files[k]} (clip {k} of {self.source}): "
                                f"{type(e).__name__}: {e}") from e
            if len(clip) != self.lengths[k]:
                raise DataError(f"{self.files[k]} changed since {self.source} was loaded: it had "
                                f"{self.lengths[k]} frames, now {len(clip)}")
        self._cache[k] = clip  # most recently used last
        while len(self._cache) > self.cache_clips:
            self._cache.popitem(last=False)
        return clip

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.source!r}, {len(self.files)} clips, {len(self)} windows of "
                f"{self.channels}x{self.frames}x{self.image_size}x{self.image_size}, ts {self.ts})")


def _walk(root: str) -> list[Path]:
    """The non-hidden files under `root`, at any depth, sorted by path (the same order on every machine)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not _is_hidden(d)]
        found.extend(Path(dirpath, name) for name in filenames if not _is_hidden(name))
    return sorted(found)


def is_clip_folder(path: str) -> bool:
    """Whether `path` is a folder holding clip files (.gif, .npy, .npz or a video, at any depth) and no
    sim_XXXXXX.npz (those are simulations, trainer/data/fluid.py). Looks at file names only."""
    if not os.path.isdir(path):
        return False
    clips = False
    for file in _walk(path):
        if SIM_FILE.match(file.name):
            return False
        clips = clips or file.suffix.lower() in CLIP_EXTENSIONS
    return clips


def _decode_or_reason(path: Path, image_size: int, channels: int) -> tuple[np.ndarray | None, str | None]:
    """(clip, None), or (None, why the file could not be read); DataError (the file breaks a rule) passes."""
    try:
        return decode_clip(path, image_size, channels), None
    except DataError:
        raise
    except Exception as e:  # decoders raise many types for damaged files; the file and reason matter
        return None, f"{type(e).__name__}: {e}"


def _examples(items: list[tuple[Path, str]], n: int = 5) -> str:
    return "; ".join(f"{p} ({why})" for p, why in items[:n]) + ("; ..." if len(items) > n else "")


def load_clip_folder(path: str, *, frames: int, ts: int = 1, image_size: int, channels: int,
                     keep_bytes: int = 1 << 30, cache_clips: int = 8, progress: bool = True) -> ClipFolder:
    """The clip files under `path` (any depth) as windows of `frames` frames `ts` apart, every start counted.

    Every file is decoded once here (see the module docstring for the formats and rules); decoded clips
    are kept in memory while they total at most `keep_bytes`, the rest decoded again on access with an LRU
    cache of `cache_clips` clips. Unreadable files, video files without a decoder and clips shorter than
    one window are skipped with one warning each kind, and listed in the result's `skipped`. Raises
    DataError naming --train_data_dir when no clip is left, and naming the file for one that breaks a rule.
    """
    check_image_shape(image_size, channels)
    _check_windows(frames, ts)
    if not os.path.exists(path):
        raise DataError(f"--train_data_dir {path} does not exist; pass a folder of clips")
    if not os.path.isdir(path):
        raise DataError(f"--train_data_dir {path} is a file, not a folder; pass the folder that holds the clips "
                        f"(subfolders are fine)")
    files = _walk(path)
    candidates = [f for f in files if f.suffix.lower() in CLIP_EXTENSIONS]
    videos: list[Path] = []  # video files skipped for want of a decoder
    if video_backend() is None:
        videos = [f for f in candidates if f.suffix.lower() in VIDEO_EXTENSIONS]
        candidates = [f for f in candidates if f.suffix.lower() not in VIDEO_EXTENSIONS]
    if videos:
        logger.warning("Skipping %d video file(s) in %s (e.g. %s): no video decoder is installed; install %s",
                       len(videos), path, videos[0], VIDEO_PACKAGES)

    # Decode every clip once: keep the good ones within the memory budget, note the others.
    from tqdm.auto import tqdm

    span = (frames - 1) * ts + 1
    usable, lengths, resident, kept = [], [], {}, 0
    short: list[tuple[Path, str]] = []
    unreadable: list[tuple[Path, str]] = []
    workers = min(8, os.cpu_count() or 1)  # PIL and the video decoders release the GIL
    chunk = 4 * workers  # files in flight at once, so clips past the budget do not pile up in memory
    with ThreadPoolExecutor(workers) as pool, \
            tqdm(total=len(candidates), desc=f"Reading clips in {path}", unit="clip", disable=not progress) as bar:
        for first in range(0, len(candidates), chunk):
            batch = candidates[first: first + chunk]
            decoded = list(pool.map(lambda f: _decode_or_reason(f, image_size, channels), batch))
            bar.update(len(batch))
            for file, (clip, reason) in zip(batch, decoded):
                if clip is None:
                    unreadable.append((file, reason))
                elif len(clip) < span:
                    short.append((file, f"{len(clip)} frames"))
                else:
                    if kept + clip.nbytes <= keep_bytes:
                        resident[len(usable)] = clip
                        kept += clip.nbytes
                    usable.append(file)
                    lengths.append(len(clip))

    if unreadable:
        logger.warning("Skipping %d of %d clip files in %s that could not be read: %s",
                       len(unreadable), len(candidates), path, _examples(unreadable))
    if short:
        logger.warning("Skipping %d of %d clips in %s shorter than one window (--frames %d with --ts %d spans %d "
                       "frames): %s", len(short), len(candidates), path, frames, ts, span, _examples(short))
    if not usable:
        raise DataError(_nothing_usable(path, files, candidates, videos, unreadable, short, frames, ts, span))

    dataset = ClipFolder(usable, lengths, frames=frames, ts=ts, image_size=image_size, channels=channels,
                         resident=resident, cache_clips=cache_clips, source=path)
    dataset.skipped = ([(str(f), "no video decoder") for f in videos] + [(str(f), r) for f, r in unreadable]
                       + [(str(f), f"shorter than one window: {r}") for f, r in short])
    return dataset


def _nothing_usable(path, files, candidates, videos, unreadable, short, frames, ts, span) -> str:
    """The message for a folder with no usable clip: what was found, and why none of it served."""
    if not candidates and not videos:
        return (f"--train_data_dir {path} holds no clip files (looked for {', '.join(CLIP_EXTENSIONS)}, in "
                f"subfolders too; found {len(files)} other file(s)); put the clips there or pass another folder")
    found = []
    if videos:
        found.append(f"{len(videos)} video file(s) skipped because no video decoder is installed "
                     f"(install {VIDEO_PACKAGES})")
    if unreadable:
        found.append(f"{len(unreadable)} file(s) that could not be read (e.g. {unreadable[0][0]}: "
                     f"{unreadable[0][1]})")
    if short:
        found.append(f"{len(short)} clip(s) shorter than one window: --frames {frames} with --ts {ts} spans {span} "
                     f"frames (e.g. {short[0][0]}: {short[0][1]}); lower --frames or --ts")
    return f"--train_data_dir {path} holds no usable clip: it has {'; '.join(found)}"
