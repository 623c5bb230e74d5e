"""Procedural image datasets that need no download.

Both are deterministic per index: item i is drawn from a numpy Generator seeded by (seed, i), so
the same index gives the same tensor on every rank, every epoch and after a resume. Items are
`{"x": float32 [C, H, W] in [-1, 1]}` (trainer/data/base.py).

- `ShapesDataset`: one to three (`max_shapes`) filled circles, squares or triangles on a plain background.
  Enough structure that a small diffusion model shows within a few CPU minutes whether it learns; one
  large shape per image (the `tiny` preset's setting) is learned crisply soonest.
- `TwoModesDataset`: two fixed templates plus a little noise, for tests that check a sampler lands
  near one of the two modes.
"""

import numpy as np
import torch

from trainer.data.base import ImageData, check_image_shape
from trainer.errors import ConfigError

BUILTIN_DATASETS: dict[str, str] = {
    "shapes": "procedural circles, squares and triangles on plain backgrounds (no download)",
    "two_modes": "two fixed templates plus small noise, for checking that samplers find both modes",
}

_SEED_MASK = (1 << 64) - 1

# The shapes of every preset but tiny (--max_shapes, --shape_radius): 1 to 3 per image, radii as fractions of the side.
MAX_SHAPES = 3
SHAPE_RADIUS = (0.12, 0.3)


def _rng(seed: int, index: int) -> np.random.Generator:
    """A generator that depends only on (seed, index)."""
    return np.random.default_rng((seed & _SEED_MASK, index))


def _check_args(image_size: int, channels: int, length: int) -> None:
    check_image_shape(image_size, channels)
    if length < 1:
        raise ConfigError(f"the number of built-in images must be at least 1, got {length}")


class ShapesDataset(ImageData):
    """Filled circles, squares and triangles of random colour, position and size.

    Shapes are rendered from signed distances in pixel units; coverage `clip(0.5 - d, 0, 1)` gives a
    one-pixel antialiased edge at almost no cost. With `channels=1` all colours are gray levels. Each image
    holds 1 to `max_shapes` shapes, each of a radius drawn uniformly from `radius` (fractions of the side).
    """

    def __init__(self, image_size: int = 32, channels: int = 3, length: int = 10000, seed: int = 0,
                 max_shapes: int = MAX_SHAPES, radius: tuple[float, float] = SHAPE_RADIUS):
        _check_args(image_size, channels, length)
        if max_shapes < 1:
            raise ConfigError(f"--max_shapes must be at least 1 (shapes per built-in image), got {max_shapes}")
        if len(radius) != 2 or not 0 < radius[0] <= radius[1] <= 0.5:
            raise ConfigError(f"--shape_radius takes two fractions of the image side, 0 < LO <= HI <= 0.5, "
                              f"got {' '.join(map(str, radius))}")
        self.max_shapes = max_shapes
        self.radius = (float(radius[0]), float(radius[1]))
        self.image_size = image_size
        self.channels = channels
        self.length = length
        self.seed = seed
        # Pixel centres, in pixels: y varies down the rows, x along the columns.
        centres = np.arange(image_size, dtype=np.float32) + 0.5
        self._y = centres[:, None]
        self._x = centres[None, :]

    def __len__(self) -> int:
        return self.length

    def image(self, i: int) -> torch.Tensor:
        rng = _rng(self.seed, i)
        size = float(self.image_size)
        background = rng.uniform(-1.0, 1.0, self.channels).astype(np.float32)
        img = np.broadcast_to(background[:, None, None], (self.channels, self.image_size, self.image_size))
        img = img.copy()  # [C, H, W]

        for _ in range(rng.integers(1, self.max_shapes + 1)):
            kind = rng.integers(3)
            radius = size * rng.uniform(*self.radius)
            cy, cx = rng.uniform(radius * 0.5, size - radius * 0.5, 2)
            colour = rng.uniform(-1.0, 1.0, self.channels).astype(np.float32)
            if np.abs(colour - background).max() < 0.5:
                # Too close to the background to be seen: shift it by a fixed contrast.
                colour = np.where(background > 0, background - 1.0, background + 1.0).astype(np.float32)

            dy, dx = self._y - cy, self._x - cx
            if kind == 0:  # circle
                dist = np.sqrt(dy * dy + dx * dx) - radius
            elif kind == 1:  # axis-aligned square with half-side `radius * 0.85`
                dist = np.maximum(np.abs(dy), np.abs(dx)) - radius * 0.85
            else:  # triangle: intersection of three half-planes, randomly rotated
                dist = self._triangle_distance(dy, dx, radius, rng.uniform(0, 2 * np.pi))

            alpha = np.clip(0.5 - dist, 0.0, 1.0).astype(np.float32)  # [H, W]
            img += alpha * (colour[:, None, None] - img)

        return torch.from_numpy(img)

    def score(self, samples: torch.Tensor) -> dict[str, float]:
        """How crisp `samples` `[N, C, H, W]` are: their mean `off_palette` share (lower is crisper), beside the
        same number of training images and of uniform noise: a number a newcomer can read at the end of a run."""
        n = len(samples)
        data = torch.stack([self.image(i) for i in range(min(n, len(self)))])
        noise = torch.rand(data.shape, generator=torch.Generator().manual_seed(self.seed)) * 2 - 1
        return {name: float(off_palette(v).mean()) for name, v in
                (("samples", samples.clamp(-1, 1)), ("data", data), ("noise", noise))}

    @staticmethod
    def _triangle_distance(dy: np.ndarray, dx: np.ndarray, radius: float, angle: float) -> np.ndarray:
        """Approximate signed distance to an equilateral triangle inscribed in a circle of `radius`.

        For a convex polygon the largest distance to its edge lines is exact inside and a close
        bound outside, which is all a one-pixel antialiased edge needs.
        """
        inradius = radius * 0.5
        dist = None
        for k in range(3):
            a = angle + k * 2.0 * np.pi / 3.0
            d = dx * np.cos(a) + dy * np.sin(a) - inradius
            dist = d if dist is None else np.maximum(dist, d)
        return dist


def off_palette(images: torch.Tensor, colours: int = 4, tolerance: float = 0.1, iterations: int = 10) -> torch.Tensor:
    """The share of each image's pixels that are not painted in one of its `colours` main flat colours: pixels
    farther than `tolerance` (in [-1, 1] units, Euclidean over the channels) from the nearest of `colours`
    centres that k-means finds in colour space (farthest-point start, `iterations` Lloyd steps). Built-in shapes
    (a background and up to three shapes) score about 0.13 at 16x16, their antialiased edges; blurred images
    score about twice that, and noise 1. `images` `[N, C, H, W]`; returns [N]."""
    x = images.detach().float().flatten(2).transpose(1, 2)  # [N, P, C]
    centres = [x[:, 0]]  # a corner: usually the background
    for _ in range(colours - 1):  # the pixel farthest from the centres so far
        d = torch.cdist(x, torch.stack(centres, 1)).min(-1).values  # [N, P]
        centres.append(x[torch.arange(len(x)), d.argmax(-1)])
    c = torch.stack(centres, 1)  # [N, K, C]
    for _ in range(iterations):
        nearest = torch.cdist(x, c).argmin(-1)  # [N, P]
        onehot = torch.nn.functional.one_hot(nearest, colours).float()  # [N, P, K]
        count = onehot.sum(1)[..., None]  # [N, K, 1]
        c = torch.where(count > 0, onehot.transpose(1, 2) @ x / count.clamp(min=1), c)
    return (torch.cdist(x, c).min(-1).values > tolerance).float().mean(-1)


class TwoModesDataset(ImageData):
    """Two fixed templates in [-1, 1] plus small Gaussian noise; item i uses template i % 2.

    Template 0 is bright on the left half and dark on the right; template 1 is bright on the top
    half and dark on the bottom (amplitude 0.8, zero on a middle row or column of an odd size).
    `templates` is a `[2, C, H, W]` tensor, so a test can measure how far generated samples are
    from the nearest mode.
    """

    amplitude = 0.8

    def __init__(self, image_size: int = 8, channels: int = 1, length: int = 1024, seed: int = 0,
                 noise: float = 0.05):
        _check_args(image_size, channels, length)
        if noise < 0:
            raise ConfigError(f"the noise of the two_modes dataset must be >= 0, got {noise}")
        self.image_size = image_size
        self.channels = channels
        self.length = length
        self.seed = seed
        self.noise = noise

        centres = torch.arange(image_size, dtype=torch.float32) + 0.5
        half = torch.sign(image_size / 2 - centres) * self.amplitude  # +a first half, -a second half
        left_right = half[None, :].expand(image_size, image_size)  # varies along x (columns)
        top_bottom = half[:, None].expand(image_size, image_size)  # varies along y (rows)
        self.templates = torch.stack([left_right, top_bottom])[:, None].expand(
            2, channels, image_size, image_size).contiguous()  # [2, C, H, W]

    def __len__(self) -> int:
        return self.length

    def image(self, i: int) -> torch.Tensor:
        shape = (self.channels, self.image_size, self.image_size)
        noise = _rng(self.seed, i).standard_normal(shape, dtype=np.float32) * np.float32(self.noise)
        return (self.templates[i % 2] + torch.from_numpy(noise)).clamp_(-1.0, 1.0)
