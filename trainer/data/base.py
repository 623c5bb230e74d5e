"""What every Eddy dataset is: items as dicts, its own augmentation, and the checks of its shape.

An item is `{"x": float32 [C, *spatial]}` plus optional condition entries (the keys of
`models.cond.COND_KEYS`); the DataLoader stacks items into a batch of the same keys. The same index
gives the same item on every rank, every epoch and after a resume: randomness belongs to
`augment(batch, generator)`, which the Trainer calls on each micro-batch with the step's seeded
generator. A dataset owns its augmentation because only it knows what a transform means for its
channels (a mirrored velocity field must also negate that component).
"""

from __future__ import annotations

import operator

import torch
from torch.utils.data import Dataset

from trainer.errors import ConfigError

IMAGE_CHANNELS = (1, 3)


def check_image_shape(image_size: int, channels: int) -> None:
    """The one check of an image dataset's shape flags."""
    if not isinstance(image_size, int) or image_size < 1:
        raise ConfigError(f"--image_size must be a positive integer, got {image_size}")
    if channels not in IMAGE_CHANNELS:
        raise ConfigError(f"--channels must be 1 (grayscale) or 3 (RGB), got {channels}")


def normalize_index(index, length: int) -> int:
    """A Python index (negative counts from the end) -> 0 <= i < length, or IndexError."""
    i = operator.index(index)
    if i < 0:
        i += length
    if not 0 <= i < length:
        raise IndexError(f"index {index} out of range for a dataset of {length} items")
    return i


class EddyData(Dataset):
    """What the Trainer needs of a dataset: `channels` (generated), `field_channels` (static fields, in
    `item["fields"]`), `frames` (0 for images), `image_size`, `bounded` (values in [-1, 1], so sampling
    may clamp), and `augment`, here the identity."""

    channels: int
    image_size: int | tuple[int, int]
    frames: int = 0
    field_channels: int = 0
    bounded: bool = False
    random_flip: bool = False

    def augment(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        return batch


class ClipData(EddyData):
    """Base of clip datasets: items `{"x": [C, F, H, W]}`, with `{"fields": [Cf, F, H, W]}` where static
    fields go beside the state."""

    frames: int


class ImageData(EddyData):
    """Base of the image datasets: `image(i)` gives float32 `[C, H, W]` in [-1, 1]; items are `{"x": image}`.

    Subclasses set `channels` and `image_size` and implement `__len__` and `image`. `random_flip`
    (set by the builder from `--random_flip`) mirrors each image left-right with probability 1/2.
    """

    bounded = True

    def image(self, index: int) -> torch.Tensor:
        raise NotImplementedError

    def __getitem__(self, index) -> dict[str, torch.Tensor]:
        return {"x": self.image(normalize_index(index, len(self)))}

    def augment(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        return random_hflip(batch, generator) if self.random_flip else batch


def random_hflip(batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """`batch["x"]` [B, C, ..., W] with each sample mirrored along its last axis with probability 1/2, one
    draw per sample from `generator`: a clip [C, F, H, W] is mirrored whole, every frame the same way."""
    x = batch["x"]
    flip = torch.rand(x.shape[0], device=x.device, generator=generator) < 0.5
    return {**batch, "x": torch.where(flip.view(-1, *([1] * (x.ndim - 1))), x.flip(-1), x)}
