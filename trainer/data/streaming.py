"""Images streamed as they are trained on (`--streaming`): Hub datasets and local parquet or webdataset shards.

`load_image_stream` opens the source with `datasets.load_dataset(..., streaming=True)`: a Hub dataset
name, or a local folder, file or glob of `.parquet` files or of webdataset `.tar` shards. The image
column (`--image_column`, else the first of `Image` type, as in images.py) is cast to
`Image(decode=False)`, so the stream carries encoded images and only the rows trained on are decoded,
by `preprocess_image`, into the same float32 `[C, H, W]` tensors in [-1, 1] as the map-style path.

The order. Each rank reads its share of the stream (`split_dataset_by_node`: whole shards when their
number is a multiple of the number of processes, else every world_size-th example) through a shuffle
buffer of `--shuffle_buffer` rows seeded by the run's seed (`shuffle`; `set_epoch` reshuffles the
shards and the buffer every epoch), cut into batches of `--batch_size`. The shares of the ranks may
differ in length, so an epoch ends on every rank at once, when any rank cannot fill its next batch: the
ranks agree on it before each batch, with one all-reduce of a flag on a gloo process group.

The position is the map-style one, (epoch, offset), with the offset in samples consumed in the epoch by
all ranks together (`StreamPosition`), so `Trainer.checkpoint()` and `Trainer.load()` treat both alike.
A resume rebuilds the epoch's stream and lets each rank pass over its first offset / world_size rows
without decoding them: the resumed run sees the samples of the uninterrupted one, in the same order, at
the cost of reading those rows again. (`IterableDataset.state_dict()` would skip the re-reading, but it
does not hold the content of the shuffle buffer, so a run resumed from it sees other samples.) The main
process of each rank reads the stream and hands whole encoded batches to the DataLoader workers, which
only decode them, so the samples and their order do not depend on `--num_workers`.

`datasets` is imported inside the functions that need it, so importing this module stays fast.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from trainer.data.base import ImageData
from trainer.data.images import _describe, _find_image_column, _is_hidden, _offline_note, open_image, preprocess_image
from trainer.data.sampler import mix_seed
from trainer.errors import ConfigError, DataError

# The loader of each kind of local shard, by file extension.
SHARD_BUILDERS = {".parquet": "parquet", ".tar": "webdataset"}
# Streams of the seed, so that the training order and the preview's draw never share their shuffles.
_ORDER, _PREVIEW = 0x57E4, 0x57E5
# Column types that `Image(decode=False)` reads as file paths or encoded images.
_PATH_OR_BYTES = ("string", "large_string", "binary", "large_binary")


def find_shards(path: str, flag: str = "--dataset") -> tuple[str, list[str]] | None:
    """(builder, sorted files) of a local folder (any depth), file or glob of parquet or webdataset (.tar)
    shards; None when `path` is none of these on this machine (then it names a Hub dataset). Raises
    ConfigError for local files that are not such shards."""
    if os.path.isdir(path):
        root = Path(path)
        files = sorted(str(p) for p in root.rglob("*")
                       if p.is_file() and not any(_is_hidden(part) for part in p.relative_to(root).parts))
    elif any(c in path for c in "*?["):
        import glob

        files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
        if not files:
            raise ConfigError(f"{flag} {path} matches no files; pass a folder, file or glob of .parquet or .tar "
                              f"shards, or a Hub dataset name.")
    elif os.path.isfile(path):
        files = [path]
    else:
        return None
    shards = [f for f in files if os.path.splitext(f)[1].lower() in SHARD_BUILDERS]
    kinds = sorted({SHARD_BUILDERS[os.path.splitext(f)[1].lower()] for f in shards})
    if not shards:
        raise ConfigError(f"--streaming reads parquet (.parquet) or webdataset (.tar) shards, and {flag} {path} "
                          f"holds none. A folder of image files, or one saved with save_to_disk, is read from disk: "
                          f"drop --streaming.")
    if len(kinds) > 1:
        raise ConfigError(f"{flag} {path} holds both .parquet and .tar shards; a stream reads one kind: pass a "
                          f"glob of one, e.g. {flag} '{os.path.join(path, '*.parquet')}'.")
    return kinds[0], shards


class StreamingImageDataset(ImageData):
    """An image stream: `rows(epoch, rank, world_size, seed)` gives one rank's encoded images of an epoch, in
    order, and indexing with one of them (a `{"bytes", "path"}` row of an `Image(decode=False)` column)
    decodes it to `{"x": float32 [C, H, W] in [-1, 1]}`. It has no length; `position(...)` is the data
    position and batch sampler the Trainer uses in place of `ResumableBatchSampler`, and `head(n, seed)` an
    in-memory dataset of the first n images of a seeded shuffle, for previews."""

    streaming = True

    def __init__(self, stream, column: str, image_size: int, channels: int, *, source: str,
                 shuffle_buffer: int = 1000):
        self.stream, self.column, self.source = stream, column, source
        self.image_size, self.channels, self.shuffle_buffer = image_size, channels, shuffle_buffer

    def rows(self, epoch: int, rank: int, world_size: int, seed: int) -> Iterator[Any]:
        """The encoded images of `rank`'s share of epoch `epoch`, in the seeded shuffled order."""
        from datasets.distributed import split_dataset_by_node

        stream = self.stream if world_size == 1 else split_dataset_by_node(self.stream, rank=rank,
                                                                            world_size=world_size)
        return _shuffled(stream, self.column, mix_seed(seed, _ORDER), self.shuffle_buffer, epoch)

    def __getitem__(self, entry) -> dict[str, torch.Tensor]:
        try:
            with open_image(entry) as image:
                return {"x": preprocess_image(image, self.image_size, self.channels)}
        except Exception as e:  # PIL raises many types for bad files; the source matters more
            raise DataError(f"could not read {_describe(entry)} of the stream {self.source}: "
                            f"{type(e).__name__}: {e}") from e

    def position(self, batch_size: int, rank: int, world_size: int, seed: int) -> StreamPosition:
        return StreamPosition(self, batch_size, rank, world_size, seed)

    def head(self, n: int, seed: int) -> HeldImages:
        """`n` images drawn by `seed` from the first 4n of the stream (unshuffled), decoded and kept in memory:
        the same on every rank."""
        rows = [row[self.column] for row in itertools.islice(self.stream, 4 * n)]
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(mix_seed(seed, _PREVIEW)))
        return HeldImages([self[rows[i]]["x"] for i in sorted(order[:n].tolist())], source=self.source)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.source!r}, a stream of {self.channels}x{self.image_size}x"
                f"{self.image_size} images)")


def _shuffled(stream, column: str, seed: int, buffer_size: int, epoch: int) -> Iterator[Any]:
    stream = stream.shuffle(seed=seed, buffer_size=buffer_size)
    stream.set_epoch(epoch)
    return (row[column] for row in stream)


class HeldImages(ImageData):
    """Decoded images `[C, H, W]` kept in memory."""

    def __init__(self, images: list[torch.Tensor], *, source: str = ""):
        self.images, self.source = images, source
        self.channels, self.image_size = (images[0].shape[0], images[0].shape[-1]) if images else (0, 0)

    def __len__(self) -> int:
        return len(self.images)

    def image(self, index: int) -> torch.Tensor:
        return self.images[index]


class StreamPosition:
    """The data position in a stream, with the interface of `ResumableBatchSampler`: `epoch`, `offset`
    (samples consumed in the epoch, all ranks together), `global_batch`, `advance()` after each batch
    consumed, `set_position(epoch, offset)`.

    As the DataLoader's batch sampler it gives this rank's batches of encoded images of the current epoch,
    from the current offset; `epochs(loader)` iterates that DataLoader one epoch at a time and ends the epoch
    on every rank at once (see the module's docstring)."""

    def __init__(self, dataset: StreamingImageDataset, batch_size: int, rank: int, world_size: int, seed: int):
        self.dataset, self.batch_size, self.rank, self.world_size, self.seed = (
            dataset, batch_size, rank, world_size, seed)
        self.global_batch = batch_size * world_size
        self.epoch, self.offset = 0, 0
        self._group = _gloo_group() if world_size > 1 else None

    def set_position(self, epoch: int, offset: int) -> int:
        """Continue at `offset` samples into `epoch`. Returns how many samples before it are seen again
        because the offset is not a whole number of this layout's global batches."""
        replay = offset % self.global_batch
        self.epoch, self.offset = epoch, offset - replay
        return replay

    def advance(self) -> None:
        """Record that one global micro-batch was consumed."""
        self.offset += self.global_batch

    def __iter__(self) -> Iterator[list[Any]]:
        rows = self.dataset.rows(self.epoch, self.rank, self.world_size, self.seed)
        rows = itertools.islice(rows, self.offset // self.world_size, None)  # consumed before a resume
        while len(batch := list(itertools.islice(rows, self.batch_size))) == self.batch_size:
            yield batch

    def epochs(self, loader: Iterable[dict[str, torch.Tensor]]) -> StreamEpochs:
        return StreamEpochs(loader, self)

    def all_ranks_have(self, have: bool) -> bool:
        """Whether every rank has its next batch (a collective where there are several ranks)."""
        if self._group is None:
            return have
        import torch.distributed as dist

        flag = torch.tensor([int(have)], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self._group)
        return bool(flag.item())


class StreamEpochs:
    """A stream's DataLoader, iterated one epoch at a time: the epoch ends on every rank when any rank's
    loader runs out, and the position moves on to the next epoch. Raises DataError for an epoch that ends
    before its first batch."""

    def __init__(self, loader: Iterable[dict[str, torch.Tensor]], position: StreamPosition):
        self.loader, self.position = loader, position

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        p = self.position
        start, count = p.offset, 0
        for batch in itertools.chain(self.loader, [None]):
            if not p.all_ranks_have(batch is not None):
                break
            count += 1
            yield batch
        if start == 0 and count == 0:
            raise DataError(
                f"epoch {p.epoch} of the stream {p.dataset.source} ended before its first batch: a process's share "
                f"of it (split across {p.world_size} process(es)) holds fewer than --batch_size {p.batch_size} "
                f"images. Lower --batch_size, use fewer processes, or add data.")
        p.epoch, p.offset = p.epoch + 1, 0


def _gloo_group():
    """A gloo process group over all ranks, for agreeing on CPU flags beside the training's collectives."""
    import torch.distributed as dist

    assert dist.is_available() and dist.is_initialized(), "a stream split across processes needs torch.distributed"
    return dist.new_group(backend="gloo")


def _open_stream(source: str, split: str):
    import datasets

    shards = find_shards(source)
    try:
        if shards is None:
            return datasets.load_dataset(source, split=split, streaming=True)
        builder, files = shards
        return datasets.load_dataset(builder, data_files=files, split="train", streaming=True)
    except Exception as e:  # offline, unknown name, bad split, unreadable shard: all end the same way
        note = _offline_note() if shards is None else "Check that the shards are complete and readable."
        raise DataError(f"--dataset {source!r} could not be streamed: {type(e).__name__}: {e}. {note}") from e


def load_image_stream(source: str, *, split: str = "train", image_column: str | None = None, image_size: int,
                      channels: int, shuffle_buffer: int = 1000, random_flip: bool = False) -> StreamingImageDataset:
    """A Hub dataset, or local parquet or webdataset shards (all of a folder's, or a glob's; `split` applies
    to Hub datasets), as a `StreamingImageDataset`. The first image is read here, so that a source that
    cannot be read fails before training."""
    import datasets

    stream = _open_stream(source, split)
    if stream.features is None:
        stream = stream._resolve_features()
    column = _find_image_column(stream, image_column, f"--dataset {source}")
    feature = stream.features[column]
    if not (isinstance(feature, datasets.Image) or getattr(feature, "dtype", None) in _PATH_OR_BYTES):
        raise DataError(f"--image_column {column!r} of --dataset {source} does not hold images (type {feature}); "
                        f"pass a column of images, file paths or encoded bytes")
    stream = stream.select_columns([column]).cast_column(column, datasets.Image(decode=False))
    dataset = StreamingImageDataset(stream, column, image_size, channels, source=source,
                                    shuffle_buffer=shuffle_buffer)
    dataset.random_flip = random_flip
    try:
        first = next(iter(stream), None)
    except Exception as e:  # a damaged shard, a column that does not cast
        raise DataError(f"--dataset {source} could not be streamed: {type(e).__name__}: {e}") from e
    if first is None:
        raise DataError(f"--dataset {source} (streamed) has no rows; check the split (--split {split}) or the shards.")
    dataset[first[column]]
    return dataset
