"""Image folders and Hugging Face Hub datasets, decoded with PIL on access.

Both sources end in `ImageDataset`. An image folder is the sorted list of its image files, found by
listing the folder: start-up decodes only the first one. An item whose file cannot be read is the next
readable file's; the unreadable files are found by a background check that records them for the next
start with the same files, or up front (`load_image_folder`). A Hub dataset is a `datasets.Dataset` whose
image column is cast to `Image(decode=False)`, so each row gives a file path or the encoded bytes.
`preprocess_image` is the one function that turns any PIL image into a float32 `[C, H, W]` tensor in
[-1, 1]: convert the mode, resize so the shorter side is `image_size`, crop the centre square.

`datasets` is imported inside the functions that need it, so importing this module stays fast.
"""

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import sys
import threading
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from trainer.data.base import ImageData
from trainer.data.builtin import BUILTIN_DATASETS
from trainer.data.fluid import cache_root
from trainer.errors import DataError

logger = logging.getLogger(__name__)

# The files of a --train_data_dir that are read as images (the case of the extension does not matter).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

_HIGH_BIT_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_SAVED_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_WHITE = (255, 255, 255, 255)
_NAMED_FAILURES = 10  # unreadable files named one by one in each process's log


# ----------------------------------------------------------------------------------------------
# Decoding and preprocessing


def open_image(entry) -> Image.Image:
    """Open a file path, or one row of an `Image(decode=False)` column: `{"bytes": ..., "path": ...}`."""
    if isinstance(entry, Image.Image):
        return entry
    if isinstance(entry, (str, os.PathLike)):
        return Image.open(entry)
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


def _read_error(entry, image_size: int, channels: int) -> str | None:
    """Decode and preprocess one image; the reason it failed, or None if it is fine."""
    try:
        with open_image(entry) as image:
            preprocess_image(image, image_size, channels)
    except Exception as e:  # any failure means the file is unusable; report it, do not crash
        return f"{type(e).__name__}: {e}"
    return None


def _none_readable(root: str, n: int, example: str, reason: str) -> DataError:
    return DataError(f"none of the {n} image files in --train_data_dir {root} could be read "
                     f"(for example {example}: {reason}); check that they are valid images")


# ----------------------------------------------------------------------------------------------
# The dataset


class ImageDataset(ImageData):
    """Images decoded and preprocessed on access: the files of an image folder, or one column of a
    Hugging Face `datasets.Dataset`.

    Files (`files`, a list of paths): item i is file i. A file that cannot be decoded is replaced by the
    next readable one (i+1, i+2, ... wrapping around), so an item depends only on its index and the
    files, in every process; each unreadable file is named in a warning once per process (the first ten
    of them). `unreadable` ({index: reason}) are files known to be bad beforehand: they are never
    opened. If no file can be read, reading any item raises DataError.

    Table (`table` with `column` cast to `Image(decode=False)`): item i is row i; a row that cannot be
    read raises DataError.

    `skipped` lists the unreadable files known so far; `verification` is the thread of a background
    check of every file (see `load_image_folder`), or None.
    """

    def __init__(self, image_size: int, channels: int, *, files=None, table=None, column: str | None = None,
                 source: str = "", unreadable: dict[int, str] | None = None):
        assert (files is None) != (table is None), "an ImageDataset reads files or a table"
        self.files, self.table, self.column = files, table, column
        self.image_size = image_size
        self.channels = channels
        self.source = source
        self.unreadable = dict(unreadable or {})  # index -> reason, grown as reads fail
        self.skipped: list[str] = [files[i] for i in sorted(self.unreadable)] if files is not None else []
        self.verification: threading.Thread | None = None
        self._failures = 0  # reads that failed in this process

    def __len__(self) -> int:
        return len(self.table) if self.files is None else len(self.files)

    def image(self, i: int) -> torch.Tensor:
        if self.files is not None:
            return self._first_readable(i)
        entry = self.table[i][self.column]
        try:
            with open_image(entry) as image:
                return preprocess_image(image, self.image_size, self.channels)
        except Exception as e:  # PIL raises many types for bad files; the row and file matter more
            raise DataError(f"could not read {_describe(entry)} (row {i} of {self.source}): "
                            f"{type(e).__name__}: {e}") from e

    def _first_readable(self, i: int) -> torch.Tensor:
        """File i, or the first readable one after it (wrapping around)."""
        n = len(self.files)
        for j in (k % n for k in range(i, i + n)):
            if j in self.unreadable:
                continue
            try:
                with Image.open(self.files[j]) as image:
                    return preprocess_image(image, self.image_size, self.channels)
            except Exception as e:  # any failure means the file is unusable; the next one stands in
                self.unreadable[j] = f"{type(e).__name__}: {e}"
                self._failures += 1
                if self._failures <= _NAMED_FAILURES:
                    more = "; further ones are not named" if self._failures == _NAMED_FAILURES else ""
                    logger.warning("Could not read %s (%s); the items that fall on it read the next readable "
                                   "file%s", self.files[j], self.unreadable[j], more)
        j, reason = min(self.unreadable.items())
        raise _none_readable(self.source, n, self.files[j], reason)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "verification": None}  # a thread stays in its process

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.source!r}, {len(self)} images, "
                f"{self.channels}x{self.image_size}x{self.image_size})")


# ----------------------------------------------------------------------------------------------
# Image folders (--train_data_dir)

VERIFY_MODES = ("background", "now", "off")


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name.startswith("__")


def _list_images(root: str) -> list[str]:
    """The image files under `root` as sorted paths relative to it; hidden files and folders left out.
    Raises DataError on the mistakes users make with --train_data_dir."""
    if not os.path.exists(root):
        raise DataError(f"--train_data_dir {root} does not exist; pass a folder of images")
    if not os.path.isdir(root):
        raise DataError(f"--train_data_dir {root} is a file, not a folder; pass the folder that "
                        f"holds the images (subfolders are fine)")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not _is_hidden(d)]
        rel = os.path.relpath(dirpath, root)
        prefix = "" if rel == "." else rel + os.sep
        found.extend(prefix + name for name in filenames
                     if not _is_hidden(name) and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS)
    if not found:
        raise DataError(f"--train_data_dir {root} holds no image files (looked for "
                        f"{', '.join(IMAGE_EXTENSIONS)}, in subfolders too); put the images there "
                        f"or pass another folder")
    return sorted(found)


def _cache_file(root: str, names: list[str]) -> Path:
    """Where the unreadable files among `names` (relative to `root`) are cached: a name hashed from the
    paths, sizes and modification times, so adding, removing, replacing or touching a file changes it."""
    digest = hashlib.sha256(b"eddy image folder 1\n")
    for name in names:
        try:
            st = os.stat(os.path.join(root, name))
            digest.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:  # gone since it was listed
            digest.update(f"{name}\0missing\n".encode())
    return cache_root() / "image_folders" / f"{digest.hexdigest()[:24]}.json"


def _read_cache(cache: Path, names: list[str]) -> dict[int, str] | None:
    """{index: reason} of the unreadable files recorded in `cache`, or None when it has no record."""
    try:
        recorded = json.loads(cache.read_text())["unreadable"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    index = {name: i for i, name in enumerate(names)}
    return {index[name]: reason for name, reason in recorded.items() if name in index}


def _write_cache(cache: Path, root: str, names: list[str], bad: dict[int, str]) -> None:
    record = {"folder": os.path.abspath(root), "files": len(names),
              "unreadable": {names[i]: reason for i, reason in sorted(bad.items())}}
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, cache)
    except OSError as e:  # a read-only cache only costs the next start a new check
        logger.warning("Could not write the list of unreadable images of %s to %s: %s", root, cache, e)


def _lower_priority() -> None:
    """Give the calling thread the lowest CPU priority (Linux, where each thread has its own nice value)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


def _unreadable(files: list[str], image_size: int, channels: int, workers: int, bar=None,
                low_priority: bool = False) -> dict[int, str]:
    """Decode every file on `workers` daemon threads (PIL releases the GIL while decoding), which never
    hold up the exit of the process. Returns {index: reason} of the files that cannot be read."""
    bad = {}

    def check(first: int) -> None:
        if low_priority:
            _lower_priority()
        for i in range(first, len(files), workers):
            error = _read_error(files[i], image_size, channels)
            if error is not None:
                bad[i] = error
            if bar is not None:
                bar.update()

    threads = [threading.Thread(target=check, args=(k,), name=f"eddy-check-images-{k}", daemon=True)
               for k in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return dict(sorted(bad.items()))


def _warn_skipped(root: str, files: list[str], bad: dict[int, str], how: str) -> None:
    examples = "; ".join(f"{files[i]} ({reason})" for i, reason in list(bad.items())[:5])
    logger.warning("Skipping %d of %d image files in %s that could not be read%s: %s%s", len(bad), len(files),
                   root, how, examples, "; ..." if len(bad) > 5 else "")


def _verify_in_background(dataset: ImageDataset, root: str, names: list[str], cache: Path,
                          workers: int = 2) -> threading.Thread:
    """Start a daemon thread that decodes every file at low priority, then records the unreadable ones in
    `dataset.skipped` and in `cache` for the next start. `dataset`'s items do not change."""

    def run() -> None:
        bad = _unreadable(dataset.files, dataset.image_size, dataset.channels, workers, low_priority=True)
        _write_cache(cache, root, names, bad)
        dataset.skipped = [dataset.files[i] for i in bad]
        if bad:
            _warn_skipped(root, dataset.files, bad, " (found by the background check; the items that fall on "
                          "them read the next readable file)")

    thread = threading.Thread(target=run, name="eddy-verify-images", daemon=True)
    thread.start()
    return thread


def load_image_folder(path: str, *, image_size: int, channels: int, progress: bool = True,
                      verify: str = "background") -> ImageDataset:
    """A folder of images (class subfolders allowed, labels ignored) as an `ImageDataset`, one item per
    file with an extension of `IMAGE_EXTENSIONS`, in sorted order.

    `verify` says how unreadable files are found:
    - "background" (default): start-up lists the folder and decodes only the first readable file. The
      unreadable files of an earlier check of the same files (`$EDDY_CACHE/image_folders/`, default
      ~/.cache/eddy) are never opened and are named in a warning; without such a record, a background
      thread (two threads at low priority, on the first process of each machine) decodes every file,
      warns about the unreadable ones and records them for the next start. Either way an item whose
      file cannot be read reads the next readable file, so the dataset has one item per file and the
      same items with or without the record.
    - "now": every file is decoded before this returns (with a progress bar if `progress`); the
      unreadable ones are left out of the dataset, named in a warning and recorded.
    - "off": no check and no record; unreadable files are found when read.

    Unreadable files known so far are listed in the result's `skipped`. Raises DataError if no file can
    be read.
    """
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify={verify!r} is not one of {', '.join(VERIFY_MODES)}")
    names = _list_images(path)
    files = [os.path.join(path, name) for name in names]
    cache = None if verify == "off" else _cache_file(path, names)

    if verify == "now":
        from tqdm.auto import tqdm

        with tqdm(total=len(files), desc=f"Checking images in {path}", unit="img", disable=not progress) as bar:
            bad = _unreadable(files, image_size, channels, workers=min(8, os.cpu_count() or 1), bar=bar)
        _write_cache(cache, path, names, bad)
        if len(bad) == len(files):
            first, reason = next(iter(bad.items()))
            raise _none_readable(path, len(files), files[first], reason)
        if bad:
            _warn_skipped(path, files, bad, "")
        dataset = ImageDataset(image_size, channels, files=[f for i, f in enumerate(files) if i not in bad],
                               source=path)
        dataset.skipped = [files[i] for i in bad]
        return dataset

    known = None if cache is None else _read_cache(cache, names)
    if known:
        _warn_skipped(path, files, known, f" (found by an earlier check, recorded in {cache}; the items that "
                      f"fall on them read the next readable file)")
    dataset = ImageDataset(image_size, channels, files=files, source=path, unreadable=known)
    dataset.image(0)  # raises DataError here, not in a DataLoader worker, if no file can be read
    if verify == "background" and known is None and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        dataset.verification = _verify_in_background(dataset, path, names, cache)
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
    return ImageDataset(image_size, channels, table=table, column=column, source=name)
