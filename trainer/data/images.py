"""Image folders and Hugging Face Hub datasets, read through Hugging Face `datasets`.

Both sources end in `ImageDataset`: a `datasets.Dataset` whose image column is cast to
`Image(decode=False)`, so each row gives a file path or the encoded bytes, and we decode with PIL
ourselves. `preprocess_image` is the one function that turns any PIL image into a float32
`[C, H, W]` tensor in [-1, 1]: convert the mode, resize so the shorter side is `image_size`, crop the
centre square.

`datasets` is imported inside the functions that need it, so importing this module stays fast.
"""

import io
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image, ImageOps

from trainer.data.base import ImageData
from trainer.data.builtin import BUILTIN_DATASETS
from trainer.errors import DataError

logger = logging.getLogger(__name__)

# Extensions counted when checking that --train_data_dir holds images. The `imagefolder` loader
# accepts more (every format PIL opens); these are the ones worth naming in an error message.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

_HIGH_BIT_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_SAVED_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_WHITE = (255, 255, 255, 255)


# ----------------------------------------------------------------------------------------------
# Decoding and preprocessing


def open_image(entry) -> Image.Image:
    """Open one row of an `Image(decode=False)` column: `{"bytes": ..., "path": ...}`."""
    if isinstance(entry, Image.Image):
        return entry
    data, path = entry.get("bytes"), entry.get("path")
    if data is not None:
        return Image.open(io.BytesIO(data))
    if path is not None:
        return Image.open(path)
    raise ValueError("the row has neither image bytes nor a path")


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float gray images -> 8-bit "L" (PIL's own convert clips them)."""
    arr = np.asarray(image, dtype=np.float32)
    if image.mode.startswith("I;16"):
        arr = arr / 257.0
    elif image.mode == "I" and arr.size and arr.max() > 255:
        arr = arr / 257.0  # 16-bit data opened as 32-bit integers
    elif image.mode == "F" and arr.size and arr.max() <= 1.0:
        arr = arr * 255.0  # floats in [0, 1]
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def _normalize_mode(image: Image.Image) -> Image.Image:
    """Any PIL mode -> one of "L", "LA", "RGB", "RGBA"."""
    mode = image.mode
    if mode in _HIGH_BIT_DEPTH_MODES:
        return _to_8bit(image)
    if mode in ("LA", "La"):
        return image.convert("LA")
    if mode in ("RGBA", "RGBa", "PA") or "transparency" in image.info:
        return image.convert("RGBA")  # palette or single-colour transparency becomes alpha
    if mode in ("L", "RGB"):
        return image
    if mode == "1":
        return image.convert("L")
    return image.convert("RGB")  # P, CMYK, YCbCr, LAB, HSV, RGBX


def preprocess_image(image: Image.Image, image_size: int, channels: int) -> torch.Tensor:
    """PIL image -> float32 tensor `[channels, image_size, image_size]` in [-1, 1].

    Resizes so the shorter side is `image_size` and keeps the centre square, in one `resize` call
    whose box is the centre square of the source: the same as resize-then-crop, without rounding the
    intermediate size. JPEGs are decoded at a reduced scale (draft mode) when they are much larger
    than needed. Transparent pixels are composited over white. EXIF orientation is applied.
    """
    w, h = image.size
    if image.format == "JPEG" and min(w, h) > 2 * image_size:
        # Decode at the smallest DCT scale that keeps at least twice the target resolution.
        scale = 2 * image_size / min(w, h)
        image.draft(None, (math.ceil(w * scale), math.ceil(h * scale)))
    if image.getexif().get(0x0112, 1) != 1:  # EXIF orientation tag
        image = ImageOps.exif_transpose(image)
    image = _normalize_mode(image)

    w, h = image.size
    side = min(w, h)
    if (w, h) != (image_size, image_size):
        left, top = (w - side) / 2, (h - side) / 2
        image = image.resize((image_size, image_size), Image.Resampling.BICUBIC,
                             box=(left, top, left + side, top + side), reducing_gap=3.0)

    if image.mode in ("LA", "RGBA"):
        image = Image.alpha_composite(Image.new("RGBA", image.size, _WHITE), image.convert("RGBA"))
    image = image.convert("RGB" if channels == 3 else "L")

    arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # [H, W, C] or [H, W]
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))  # [C, H, W]


def _describe(entry) -> str:
    if isinstance(entry, dict) and entry.get("path"):
        return str(entry["path"])
    return "an embedded image"


# ----------------------------------------------------------------------------------------------
# The dataset


class ImageDataset(ImageData):
    """Images from one column of a Hugging Face `datasets.Dataset`, decoded and preprocessed on access.

    `table` must have `column` cast to `Image(decode=False)`. `indices`, when given, are the rows
    to serve (the readable ones of an image folder); `__len__` and `__getitem__` go over them only.
    """

    def __init__(self, table, column: str, image_size: int, channels: int, indices=None, source: str = ""):
        self.table = table
        self.column = column
        self.image_size = image_size
        self.channels = channels
        self.indices = None if indices is None else np.asarray(indices, dtype=np.int64)
        self.source = source
        self.skipped: list[str] = []  # unreadable files left out, filled in by `load_image_folder`

    def __len__(self) -> int:
        return len(self.table) if self.indices is None else len(self.indices)

    def image(self, i: int) -> torch.Tensor:
        row = i if self.indices is None else int(self.indices[i])
        entry = self.table[row][self.column]
        try:
            with open_image(entry) as image:
                return preprocess_image(image, self.image_size, self.channels)
        except Exception as e:  # PIL raises many types for bad files; the row and file matter more
            raise DataError(f"could not read {_describe(entry)} (row {row} of {self.source}): "
                            f"{type(e).__name__}: {e}") from e

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.source!r}, {len(self)} images, "
                f"{self.channels}x{self.image_size}x{self.image_size})")


# ----------------------------------------------------------------------------------------------
# Image folders (--train_data_dir)


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name.startswith("__")


def _has_image_file(root: str) -> bool:
    """Whether any non-hidden file under `root` has an image extension; stops at the first one."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not _is_hidden(d)]
        for name in filenames:
            if not _is_hidden(name) and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                return True
    return False


def _check_folder(path: str) -> None:
    """Fail fast, before `datasets` is imported, on the mistakes users make with the flag."""
    if not os.path.exists(path):
        raise DataError(f"--train_data_dir {path} does not exist; pass a folder of images")
    if not os.path.isdir(path):
        raise DataError(f"--train_data_dir {path} is a file, not a folder; pass the folder that "
                        f"holds the images (subfolders are fine)")
    if not _has_image_file(path):
        raise DataError(f"--train_data_dir {path} holds no image files (looked for "
                        f"{', '.join(IMAGE_EXTENSIONS)}, in subfolders too); put the images there "
                        f"or pass another folder")


def _read_error(entry, image_size: int, channels: int) -> str | None:
    """Decode and preprocess one image; the reason it failed, or None if it is fine."""
    try:
        with open_image(entry) as image:
            preprocess_image(image, image_size, channels)
    except Exception as e:  # any failure means the file is unusable; report it, do not crash
        return f"{type(e).__name__}: {e}"
    return None


def _readable_rows(table, column: str, image_size: int, channels: int, desc: str, progress: bool):
    """Decode every image once. Returns (good row indices, [(path, reason)] of the bad ones)."""
    from tqdm.auto import tqdm

    good, bad = [], []
    workers = min(8, os.cpu_count() or 1)  # PIL releases the GIL while decoding
    with ThreadPoolExecutor(workers) as pool, \
            tqdm(total=len(table), desc=desc, unit="img", disable=not progress) as bar:
        start = 0
        for batch in table.iter(batch_size=512):
            entries = batch[column]
            errors = pool.map(lambda e: _read_error(e, image_size, channels), entries)
            for offset, (entry, error) in enumerate(zip(entries, errors)):
                if error is None:
                    good.append(start + offset)
                else:
                    bad.append((_describe(entry), error))
            start += len(entries)
            bar.update(len(entries))
    return good, bad


def load_image_folder(path: str, *, image_size: int, channels: int, progress: bool = True) -> ImageDataset:
    """A folder of images (class subfolders allowed, labels ignored) as an `ImageDataset`.

    Every file is decoded once up front; unreadable ones are skipped with a warning that gives their
    count and the first few paths, and listed in the result's `skipped`.
    """
    _check_folder(path)
    import datasets

    try:
        table = datasets.load_dataset("imagefolder", data_dir=path, split="train", drop_labels=True)
    except Exception as e:  # the loader's own error, reworded with the flag
        raise DataError(f"--train_data_dir {path} could not be read as an image folder: "
                        f"{type(e).__name__}: {e}") from e
    column = _find_image_column(table, None, source=f"--train_data_dir {path}")
    table = table.select_columns([column]).cast_column(column, datasets.Image(decode=False))

    good, bad = _readable_rows(table, column, image_size, channels,
                               desc=f"Checking images in {path}", progress=progress)
    if not good:
        first_path, first_error = bad[0]
        raise DataError(f"none of the {len(bad)} image files in --train_data_dir {path} could be read "
                        f"(for example {first_path}: {first_error}); check that they are valid images")
    if bad:
        examples = "; ".join(f"{p} ({err})" for p, err in bad[:5])
        logger.warning("Skipping %d of %d image files in %s that could not be read: %s%s",
                       len(bad), len(table), path, examples, "; ..." if len(bad) > 5 else "")

    dataset = ImageDataset(table, column, image_size, channels, indices=good, source=path)
    dataset.skipped = [p for p, _ in bad]
    return dataset


# ----------------------------------------------------------------------------------------------
# Hub datasets and datasets saved with `save_to_disk` (--dataset)


def _find_image_column(table, image_column: str | None, source: str) -> str:
    """`image_column` if given, else the first column with the `Image` feature type."""
    import datasets

    columns = list(table.column_names)
    if image_column is not None:
        if image_column not in columns:
            raise DataError(f"--image_column {image_column!r} is not a column of {source}; "
                            f"its columns are {columns}")
        return image_column
    for name in columns:
        if isinstance(table.features[name], datasets.Image):
            return name
    raise DataError(f"{source} has no column of image type (columns: {columns}); "
                    f"pass the one that holds the images with --image_column")


def _offline_note() -> str:
    flags = {name: os.environ.get(name) for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    set_flags = [f"{name}={value}" for name, value in flags.items() if value not in (None, "", "0")]
    if set_flags:
        return (f"Offline mode is on ({', '.join(set_flags)}), so only datasets already in the local "
                f"cache can be loaded.")
    return ("HF_DATASETS_OFFLINE and HF_HUB_OFFLINE are not set, so the Hub was asked: check the name "
            "and the network, or set HF_HUB_OFFLINE=1 to use only datasets already in the local cache.")


def _load_table(name: str, split: str):
    """A `datasets.Dataset` from a folder saved with `save_to_disk`, or from the Hub or its cache."""
    import datasets

    if os.path.isdir(name) and any(os.path.exists(os.path.join(name, m)) for m in _SAVED_DATASET_MARKERS):
        try:
            table = datasets.load_from_disk(name)
        except Exception as e:  # a half-copied or foreign folder
            raise DataError(f"--dataset {name} looks like a dataset saved with save_to_disk but could "
                            f"not be loaded: {type(e).__name__}: {e}") from e
        if isinstance(table, datasets.DatasetDict):
            if split not in table:
                raise DataError(f"--dataset {name} has no split {split!r}; its splits are "
                                f"{list(table)} (choose one with --split)")
            table = table[split]
        return table

    try:
        return datasets.load_dataset(name, split=split)
    except Exception as e:  # offline, unknown name, not cached, bad split: all end the same way
        builtins = ", ".join(BUILTIN_DATASETS)
        raise DataError(
            f"--dataset {name!r} (split {split!r}) could not be loaded: {type(e).__name__}: {e}. "
            f"{_offline_note()} For images in a local folder pass --train_data_dir PATH; for a dataset "
            f"saved with save_to_disk pass its folder as --dataset; or use a built-in dataset "
            f"({builtins}), e.g. --dataset shapes.") from e


def load_hub_dataset(name: str, *, split: str = "train", image_column: str | None = None,
                     image_size: int, channels: int) -> ImageDataset:
    """A Hub dataset (or a local folder saved with `save_to_disk`) as an `ImageDataset`.

    Images are decoded on access; a column of file paths or raw bytes named by `image_column` is
    cast to the `Image` type.
    """
    import datasets

    table = _load_table(name, split)
    source = f"--dataset {name}"
    column = _find_image_column(table, image_column, source)
    table = table.select_columns([column])
    try:
        table = table.cast_column(column, datasets.Image(decode=False))
    except Exception as e:  # e.g. a column of numbers or labels
        raise DataError(f"--image_column {column!r} of {source} does not hold images "
                        f"(type {table.features[column]}): {type(e).__name__}: {e}") from e
    if len(table) == 0:
        raise DataError(f"{source} split {split!r} has no rows; choose another split with --split")
    return ImageDataset(table, column, image_size, channels, source=name)
