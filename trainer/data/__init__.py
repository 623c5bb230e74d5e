"""Datasets for Eddy.

Every dataset here is an `ImageData` (trainer/data/base.py): item i is `{"x": float32 [C, H, W] in
[-1, 1]}`, the same for the same index; `augment(batch, generator)` draws its random flips from the
step's seeded generator. Each has the attributes `channels` and `image_size`.

`build_image_dataset` picks the source from the flags:
- `--train_data_dir PATH`: a folder of images, listed at start-up and checked in the background;
- `--dataset NAME` with NAME in `BUILTIN_DATASETS`: procedural data, no download;
- any other `--dataset NAME`: a Hugging Face Hub dataset, or a folder saved with `save_to_disk`.
"""

from trainer.data.base import ImageData, check_image_shape
from trainer.data.builtin import BUILTIN_DATASETS, MAX_SHAPES, SHAPE_RADIUS, ShapesDataset, TwoModesDataset
from trainer.data.images import ImageDataset, load_hub_dataset, load_image_folder, preprocess_image
from trainer.errors import ConfigError

__all__ = [
    "BUILTIN_DATASETS",
    "ImageData",
    "ImageDataset",
    "ShapesDataset",
    "TwoModesDataset",
    "build_image_dataset",
    "load_hub_dataset",
    "load_image_folder",
    "preprocess_image",
]

DEFAULT_DATASET = "shapes"


def build_image_dataset(*, dataset: str, train_data_dir: str | None, image_size: int, channels: int,
                        split: str = "train", image_column: str | None = None, seed: int = 0,
                        num_builtin: int = 10000, random_flip: bool = False,
                        progress: bool = True, max_shapes: int = MAX_SHAPES,
                        shape_radius: tuple[float, float] = SHAPE_RADIUS) -> ImageData:
    """The training images chosen by `--dataset` / `--train_data_dir`.

    Args:
        dataset: a name from `BUILTIN_DATASETS`, a Hub dataset name, or a folder saved with
            `save_to_disk`. Ignored when `train_data_dir` is given, unless it names a built-in other
            than the default "shapes" (then the two flags contradict each other).
        train_data_dir: a folder of images, subfolders allowed; None to use `dataset`.
        image_size: side of the square images returned.
        channels: 1 (grayscale) or 3 (RGB).
        split: split of a Hub or saved dataset.
        image_column: column holding the images; default the first column of `Image` type.
        seed: seed of the built-in datasets (each item is drawn from (seed, index)).
        num_builtin: number of items of a built-in dataset.
        random_flip: whether `augment` mirrors images left-right (`--random_flip`).
        progress: show a progress bar while an image folder is checked.
        max_shapes, shape_radius: most shapes per image and their radius range (fractions of the side)
            of the built-in "shapes".
    """
    check_image_shape(image_size, channels)
    dataset = _source(dataset, train_data_dir, image_size, channels, split, image_column, seed, num_builtin,
                      progress, dict(max_shapes=max_shapes, radius=tuple(shape_radius)))
    dataset.random_flip = random_flip
    return dataset


def _source(dataset, train_data_dir, image_size, channels, split, image_column, seed, num_builtin,
            progress, shapes) -> ImageData:
    if train_data_dir is not None:
        if dataset in BUILTIN_DATASETS and dataset != DEFAULT_DATASET:
            raise ConfigError(f"--dataset {dataset} is a built-in dataset but --train_data_dir "
                              f"{train_data_dir} was given too; pass one or the other")
        return load_image_folder(train_data_dir, image_size=image_size, channels=channels, progress=progress)

    if dataset == "shapes":
        return ShapesDataset(image_size=image_size, channels=channels, length=num_builtin, seed=seed, **shapes)
    if dataset == "two_modes":
        return TwoModesDataset(image_size=image_size, channels=channels, length=num_builtin, seed=seed)
    assert dataset not in BUILTIN_DATASETS, f"built-in dataset {dataset!r} has no branch here"

    if not dataset:
        raise ConfigError("--dataset is empty; pass a built-in name "
                          f"({', '.join(BUILTIN_DATASETS)}), a Hub dataset name, or --train_data_dir")
    return load_hub_dataset(dataset, split=split, image_column=image_column,
                            image_size=image_size, channels=channels)
