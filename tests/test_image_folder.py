"""Image folders (--train_data_dir): a start-up that lists and does not decode, unreadable files read as
the next readable one, a background check recorded for the next start."""

from __future__ import annotations

import io
import logging
import os
import pickle
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.data import images
from trainer.data.images import load_image_folder
from trainer.errors import DataError

GOOD = ("a.png", "d.png", "sub/f.jpg")
BAD = ("b.png", "c.png", "e.png")  # not an image, a truncated PNG, not an image


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDDY_CACHE", str(tmp_path / "cache"))


def noise(seed: int, size: int = 24) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), np.uint8))


def truncated_png() -> bytes:
    buf = io.BytesIO()
    noise(99, 64).save(buf, format="PNG")
    return buf.getvalue()[:buf.tell() // 2]


def make_folder(root):
    """a, d, sub/f readable; b, c, e not; plus files that are not listed (hidden, other extensions)."""
    (root / "sub").mkdir(parents=True)
    for seed, name in enumerate(GOOD):
        noise(seed).save(root / name)
    (root / "b.png").write_text("not an image")
    (root / "c.png").write_bytes(truncated_png())
    (root / "e.png").write_text("not an image either")
    (root / ".hidden.png").write_text("hidden")
    (root / "__pycache__").mkdir()
    noise(7).save(root / "__pycache__" / "x.png")
    (root / "notes.txt").write_text("not listed")
    return str(root)


def load(folder, **kwargs):
    return load_image_folder(folder, image_size=8, channels=3, progress=False, **kwargs)


def names(ds, paths) -> list[str]:
    return [os.path.relpath(p, ds.source) for p in paths]


def finished(ds):
    ds.verification.join(timeout=60)
    assert not ds.verification.is_alive()
    return ds


def count_calls(monkeypatch, owner, name: str, within: str | None = None) -> list[tuple[str, str]]:
    """Patch `owner.name` to record (thread name, file name of the first argument) of each call, for files
    under `within` only when given."""
    calls, real = [], getattr(owner, name)

    def record(first, *args, **kwargs):
        path = str(getattr(first, "filename", first))
        if within is None or path.startswith(within):  # a check of another test's folder may still be running
            calls.append((threading.current_thread().name, os.path.basename(path)))
        return real(first, *args, **kwargs)

    monkeypatch.setattr(owner, name, record)
    return calls


def test_listing_is_sorted_and_leaves_out_hidden_and_other_files(tmp_path):
    folder = make_folder(tmp_path / "imgs")
    noise(8).save(tmp_path / "imgs" / "G.PNG")
    ds = load(folder, verify="off")
    assert names(ds, ds.files) == ["G.PNG", "a.png", "b.png", "c.png", "d.png", "e.png", "sub/f.jpg"]
    assert len(ds) == 7 and ds.verification is None and ds.skipped == []


def test_start_up_decodes_only_the_first_file(tmp_path, monkeypatch):
    folder = tmp_path / "imgs"
    make_folder(folder)
    for i in range(40):
        noise(i).save(folder / "sub" / f"more_{i:02d}.png")
    opened = count_calls(monkeypatch, Image, "open", within=str(folder))
    decoded = count_calls(monkeypatch, images, "preprocess_image")
    ds = load(str(folder))  # the default: a background check
    here = threading.current_thread().name
    assert [call for call in opened if call[0] == here] == [(here, "a.png")]  # the first file, only
    assert [call for call in decoded if call[0] == here] == [(here, "a.png")]
    finished(ds)
    assert len(ds) == 46 and len(opened) == 1 + len(ds)  # then the background check opened every file once


def test_an_unreadable_file_reads_as_the_next_readable_one(tmp_path, caplog):
    folder = make_folder(tmp_path / "imgs")
    with caplog.at_level(logging.WARNING, logger="trainer.data"):
        ds = load(folder, verify="off")
        items = [ds[i]["x"] for i in range(len(ds))]
        again = [ds[i]["x"] for i in range(len(ds))]
    assert names(ds, ds.files) == ["a.png", "b.png", "c.png", "d.png", "e.png", "sub/f.jpg"]
    assert torch.equal(items[1], items[3]) and torch.equal(items[2], items[3])  # b, c -> d
    assert torch.equal(items[4], items[5]) and not torch.equal(items[3], items[5])  # e -> sub/f
    assert all(torch.equal(x, y) for x, y in zip(items, again))
    warned = [r.getMessage() for r in caplog.records if "Could not read" in r.getMessage()]
    assert [os.path.basename(m.split()[3]) for m in warned] == ["b.png", "c.png", "e.png"]  # once each

    # Another process reading in another order, or a pickled copy in a DataLoader worker: the same items.
    fresh = load(folder, verify="off")
    assert all(torch.equal(fresh[i]["x"], items[i]) for i in reversed(range(len(fresh))))
    copy = pickle.loads(pickle.dumps(finished(load(folder))))
    assert all(torch.equal(copy[i]["x"], items[i]) for i in range(len(copy)))


def test_the_last_file_wraps_around_to_the_first(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    noise(0).save(folder / "a.png")
    noise(1).save(folder / "b.png")
    (folder / "c.png").write_bytes(truncated_png())
    ds = load(str(folder), verify="off")
    assert torch.equal(ds[2]["x"], ds[0]["x"]) and not torch.equal(ds[1]["x"], ds[0]["x"])


def test_the_background_check_is_recorded_and_the_next_start_never_opens_the_bad_files(tmp_path, caplog,
                                                                                       monkeypatch):
    folder = make_folder(tmp_path / "imgs")
    with caplog.at_level(logging.WARNING, logger="trainer.data"):
        first = finished(load(folder))
    assert names(first, first.skipped) == list(BAD)
    assert "Skipping 3 of 6 image files" in caplog.text and "background check" in caplog.text
    records = list((tmp_path / "cache" / "image_folders").glob("*.json"))
    assert len(records) == 1 and all(name in records[0].read_text() for name in BAD)

    caplog.clear()
    opened = count_calls(monkeypatch, Image, "open")
    with caplog.at_level(logging.WARNING, logger="trainer.data"):
        second = load(folder)
    assert second.verification is None and len(opened) == 1  # known: no check, only the first file read
    assert names(second, second.skipped) == list(BAD)
    assert "Skipping 3 of 6 image files" in caplog.text and "earlier check" in caplog.text
    items = [second[i]["x"] for i in range(len(second))]
    assert not {"b.png", "c.png", "e.png"} & {name for _, name in opened}
    assert all(torch.equal(x, first[i]["x"]) for i, x in enumerate(items))  # the same items as before


@pytest.mark.parametrize("change", ["touch", "add"])
def test_a_changed_folder_is_checked_again(tmp_path, change):
    folder = make_folder(tmp_path / "imgs")
    finished(load(folder))
    if change == "touch":
        st = os.stat(os.path.join(folder, "b.png"))
        os.utime(os.path.join(folder, "b.png"), ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    else:
        (tmp_path / "imgs" / "g.png").write_text("another bad file")
    again = load(folder)
    assert again.verification is not None
    finished(again)
    assert len(list((tmp_path / "cache" / "image_folders").glob("*.json"))) == 2
    assert len(again.skipped) == (3 if change == "touch" else 4)


def test_now_decodes_everything_and_leaves_the_bad_files_out(tmp_path):
    folder = make_folder(tmp_path / "imgs")
    ds = load(folder, verify="now")
    assert names(ds, ds.files) == list(GOOD) and names(ds, ds.skipped) == list(BAD)
    assert load(folder).verification is None  # recorded for the next start


@pytest.mark.parametrize("verify", ["background", "now", "off"])
def test_a_folder_of_unreadable_files_names_the_flag(tmp_path, verify):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.png").write_text("not a png")
    (folder / "b.png").write_bytes(truncated_png())
    with pytest.raises(DataError, match=r"none of the 2 image files in --train_data_dir .*bad could be read "
                                        r".*check that they are valid images"):
        load(str(folder), verify=verify)


def test_an_unknown_verify_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match="verify='later'.*background, now, off"):
        load(make_folder(tmp_path / "imgs"), verify="later")
