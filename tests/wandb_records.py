"""Reading the records of an offline W&B run (`run-*.wandb`), for the tests.

The file is W&B's LevelDB-style log: a 7-byte header (":W&B", magic, version), then 32 KiB blocks of
chunks, each with a 7-byte header (CRC32 4 bytes, length 2, type 1: full, first, middle, last); a chunk
never straddles a block, and a block's tail under 7 bytes is padding. Each reassembled record is a
`wandb_internal_pb2.Record` protobuf.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Iterator

BLOCK, HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> Iterator:
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, parts = HEADER, []
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:
            pos += left
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + HEADER])
        if kind == 0 and length == 0:  # zero padding to the end of the block
            pos += left
            continue
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        parts = [chunk] if kind in (FULL, FIRST) else parts + [chunk]
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            yield record


def artifacts(run_dir: Path) -> list[dict]:
    """The artifacts logged by the offline W&B run(s) under `run_dir`/wandb, in order: name, type, aliases,
    file paths and metadata (a JSON string)."""
    found = []
    for path in sorted(Path(run_dir).glob("wandb/offline-run-*/*.wandb")):
        for record in records(path):
            if record.WhichOneof("record_type") == "artifact":
                a = record.artifact
                found.append({"name": a.name, "type": a.type, "aliases": list(a.aliases),
                              "files": sorted(entry.path for entry in a.manifest.contents), "metadata": a.metadata})
    return found
