"""Time the start-up of an image folder (--train_data_dir): from the call of `load_image_folder` to a
dataset ready for its first item, and the reading of its first 64 items.

A benchmark, not a test: it prints numbers and asserts nothing. It writes --n tiny PNGs (8x8 noise,
1000 to a subfolder; every 1000th file is not an image) into a temporary folder, then times, each with
its own empty $EDDY_CACHE:
- verify="now": every file decoded before the call returns;
- the default, verify="background", first start: the folder listed, the first file decoded, a background
  check started (the seconds until it has decoded every file are printed too);
- the default, second start: the unreadable files known from the first start's record;
- verify="off": the folder listed only.
The files were just written, so they are in the page cache: the times are those of a warm disk.

    python benchmarks/image_folder_startup.py --n 20000
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: `trainer`

from trainer.data.images import load_image_folder  # noqa: E402


def write_folder(root: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        path = root / f"{i // 1000:04d}" / f"{i:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        if i % 1000 == 999:
            path.write_text("not an image")
        else:
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), np.uint8)).save(path)


def timed(folder: Path, cache: Path, verify: str) -> dict[str, float]:
    os.environ["EDDY_CACHE"] = str(cache)
    start = time.perf_counter()
    dataset = load_image_folder(str(folder), image_size=8, channels=3, progress=False, verify=verify)
    ready = time.perf_counter()
    for i in range(64):
        dataset[i]
    row = {"ready_s": ready - start, "first_64_s": time.perf_counter() - ready, "items": len(dataset)}
    if dataset.verification is not None:
        dataset.verification.join()
        row["check_done_s"] = time.perf_counter() - start
    row["skipped"] = len(dataset.skipped)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20000, help="PNG files to write (default: 20000)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="eddy-bench-") as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        write_folder(tmp / "images", args.n)
        print(f"wrote {args.n} files in {time.perf_counter() - start:.1f} s; {os.cpu_count()} CPUs")
        rows = {
            'verify="now"': timed(tmp / "images", tmp / "cache-now", "now"),
            "default, first start": timed(tmp / "images", tmp / "cache", "background"),
            "default, second start": timed(tmp / "images", tmp / "cache", "background"),
            'verify="off"': timed(tmp / "images", tmp / "cache-off", "off"),
        }
    print(f"| start-up ({args.n} files) | ready (s) | first 64 items (s) | background check done (s) | items "
          f"| skipped |")
    print("|---|---|---|---|---|---|")
    for name, row in rows.items():
        done = f"{row['check_done_s']:.2f}" if "check_done_s" in row else "-"
        print(f"| {name} | {row['ready_s']:.3f} | {row['first_64_s']:.3f} | {done} | {row['items']} "
              f"| {row['skipped']} |")


if __name__ == "__main__":
    main()
