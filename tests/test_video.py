"""Clip datasets of pictures (trainer/data/video.py): the built-in moving shapes (determinism, smooth motion,
bouncing, whole-clip flips), folders of clips (GIFs, arrays in each layout and range, videos, windows with a
stride, the files skipped or refused), and the dataset contract both keep."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.data import video
from trainer.data.base import ClipData
from trainer.data.builtin import ShapesDataset, _rng
from trainer.data.images import preprocess_image
from trainer.data.video import (MovingShapesDataset, WindowIndex, is_clip_folder, load_clip_folder,
                                shape_coverage, visible_colour)
from trainer.errors import DataError


def load(folder, **kw):
    args = dict(frames=2, image_size=8, channels=3, progress=False)
    return load_clip_folder(str(folder), **{**args, **kw})


def expected_frames(frames: np.ndarray, image_size: int, channels: int) -> torch.Tensor:
    """uint8 frames [T, H, W] or [T, H, W, C] -> what the folder should give: [C, T, S, S]."""
    return torch.stack([preprocess_image(Image.fromarray(f), image_size, channels) for f in frames], dim=1)


def frame_ids(x: torch.Tensor) -> list[int]:
    """The frame numbers of a clip [C, F, S, S] whose frame t is flat at gray level 20 t."""
    return [round(v) for v in ((x[0, :, 0, 0] + 1) * 127.5 / 20).tolist()]


def numbered_clip(length: int, side: int = 6) -> np.ndarray:
    """uint8 [T, H, W], frame t flat at 20 t."""
    return np.broadcast_to((20 * np.arange(length, dtype=np.uint8))[:, None, None], (length, side, side)).copy()


def write_gif(path: Path, frames: np.ndarray) -> None:
    """uint8 gray frames [T, H, W] (each different from the last, or PIL merges them) as an animated GIF."""
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=40, loop=0)


# ----------------------------------------------------------------------------------------------
# Moving shapes


@pytest.mark.parametrize("channels, frames, size", [(3, 8, 32), (1, 5, 16)])
def test_moving_shapes_items(channels, frames, size):
    ds = MovingShapesDataset(image_size=size, channels=channels, frames=frames, length=20)
    assert len(ds) == 20 and ds.bounded and ds.frames == frames and ds.field_channels == 0
    for i in range(len(ds)):
        x = ds[i]["x"]
        assert x.shape == (channels, frames, size, size) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1
    assert torch.equal(ds[-1]["x"], ds[19]["x"])
    with pytest.raises(IndexError):
        ds[20]


def test_moving_shapes_deterministic_per_seed_and_index():
    a, b = MovingShapesDataset(length=50, seed=3), MovingShapesDataset(length=50, seed=3)
    later = [b[i]["x"] for i in (7, 2, 7)]  # another instance, another order
    assert torch.equal(a[7]["x"], later[0]) and torch.equal(a[2]["x"], later[1]) and torch.equal(later[0], later[2])
    assert not torch.equal(a[7]["x"], a[8]["x"])
    assert not torch.equal(a[7]["x"], MovingShapesDataset(length=50, seed=4)[7]["x"])


def test_motion_is_smooth():
    ds = MovingShapesDataset(image_size=32, frames=8, length=40)
    step_diffs, other_diffs = [], []
    for i in range(len(ds)):
        _, shapes = ds.scene(i)
        for s in shapes:  # a centre moves at most max_speed pixels along each axis per frame, and moves
            steps = np.abs(np.diff(s.centres, axis=0))
            assert steps.max() <= ds.max_speed + 1e-9 and np.hypot(*steps.T).min() > 0
        x = ds[i]["x"]
        consecutive = (x[:, 1:] - x[:, :-1]).abs().flatten(2).amax(-1)  # [C, F-1]
        assert (consecutive.amax(0) > 0).all()  # every frame differs from the one before
        step_diffs.append((x[:, 1:] - x[:, :-1]).abs().mean())
        other_diffs.append((x[:, 0] - ds[(i + 1) % len(ds)]["x"][:, 0]).abs().mean())
    assert torch.stack(step_diffs).mean() < 0.15 * torch.stack(other_diffs).mean()  # close to the last frame


def test_bouncing_keeps_shapes_inside_the_frame():
    size, frames = 24, 120  # long enough that every shape crosses the frame and comes back
    ds = MovingShapesDataset(image_size=size, channels=1, frames=frames, length=30)
    bounces, whole = 0, 0
    for i in range(len(ds)):
        background, shapes = ds.scene(i)
        for s in shapes:
            assert (s.centres >= s.extent - 1e-9).all() and (s.centres <= size - s.extent + 1e-9).all()
            velocity = np.diff(s.centres, axis=0)
            bounces += int((np.sign(velocity[1:]) != np.sign(velocity[:-1])).any())
        if len(shapes) == 1 and shapes[0].kind != video.TRIANGLE:
            # One circle or square: its area stays the same in every frame (an edge would cut 15% or more).
            s = shapes[0]
            area = ((ds[i]["x"][0] - background[0]).abs() / abs(s.colour[0] - background[0])).sum((-1, -2))
            assert (area - area.mean()).abs().max() < 0.04 * area.mean(), area  # antialiasing: about 2%
            whole += 1
    assert bounces > 10 and whole >= 3


def test_shapes_dataset_draws_through_shape_coverage():
    """Replaying ShapesDataset's draws through `shape_coverage` and `visible_colour` gives its images exactly,
    so ShapesDataset can call them."""
    ds = ShapesDataset(image_size=16, channels=3, length=10, seed=5)
    centres = np.arange(16, dtype=np.float32) + 0.5
    for i in range(10):
        rng = _rng(5, i)
        background = rng.uniform(-1.0, 1.0, 3).astype(np.float32)
        img = np.broadcast_to(background[:, None, None], (3, 16, 16)).copy()
        for _ in range(rng.integers(1, 4)):
            kind = rng.integers(3)
            radius = 16.0 * rng.uniform(0.12, 0.3)
            cy, cx = rng.uniform(radius * 0.5, 16.0 - radius * 0.5, 2)
            colour = visible_colour(rng.uniform(-1.0, 1.0, 3).astype(np.float32), background)
            angle = rng.uniform(0, 2 * np.pi) if kind == 2 else 0.0
            alpha = shape_coverage(kind, centres[:, None] - cy, centres[None, :] - cx, radius, angle)
            img += alpha * (colour[:, None, None] - img)
        assert torch.equal(torch.from_numpy(img), ds.image(i))


def test_augment_flips_whole_clips_about_half_the_time():
    ds = MovingShapesDataset(image_size=8, channels=3, frames=4, length=200)
    x = torch.stack([ds[i]["x"] for i in range(200)])  # [B, C, F, H, W]
    ds.random_flip = True
    out = ds.augment({"x": x}, torch.Generator().manual_seed(0))["x"]
    flipped = torch.tensor([torch.equal(o, c.flip(-1)) for o, c in zip(out, x)])
    kept = torch.tensor([torch.equal(o, c) for o, c in zip(out, x)])
    assert (flipped | kept).all()  # each clip is flipped whole, every frame the same way, or left as it is
    assert 70 <= int(flipped.sum()) <= 130
    again = ds.augment({"x": x}, torch.Generator().manual_seed(0))["x"]
    assert torch.equal(out, again)
    ds.random_flip = False
    assert torch.equal(ds.augment({"x": x}, torch.Generator().manual_seed(0))["x"], x)


# ----------------------------------------------------------------------------------------------
# Clip folders


def test_gif_frames_are_read_and_windowed(tmp_path):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (5, 10, 14), dtype=np.uint8)  # gray, so the GIF palette is exact
    (tmp_path / "sub").mkdir()  # any depth
    write_gif(tmp_path / "sub" / "a.gif", frames)
    ds = load(tmp_path, frames=3, image_size=8, channels=3)
    assert len(ds) == 3 and len(ds.files) == 1
    want = expected_frames(frames, 8, 3)  # [C, T, 8, 8]
    for start in range(3):
        assert torch.equal(ds[start]["x"], want[:, start: start + 3])


LAYOUTS = {  # name -> (uint8 [T, H, W, C] -> the array saved, channels C of the clip)
    "THW": (lambda u: u[..., 0], 1),
    "THWC1": (lambda u: u, 1),
    "THWC3": (lambda u: u, 3),
    "THWC4": (lambda u: u, 4),
    "TCHW1": (lambda u: u.transpose(0, 3, 1, 2), 1),
    "TCHW3": (lambda u: u.transpose(0, 3, 1, 2), 3),
    "TCHW4": (lambda u: u.transpose(0, 3, 1, 2), 4),
}
RANGES = {  # name -> uint8 -> the stored values
    "uint8": lambda u: u,
    "int64": lambda u: u.astype(np.int64),
    "float01": lambda u: u.astype(np.float32) / 255.0,
    "float11": lambda u: u.astype(np.float64) / 127.5 - 1.0,
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("value_range", RANGES)
def test_npy_layouts_and_ranges(tmp_path, layout, value_range):
    to_layout, c = LAYOUTS[layout]
    u = np.random.default_rng(1).integers(0, 256, (3, 10, 13, c), dtype=np.uint8)
    u[0, 0, 0] = 0  # some value below the middle, so the [-1, 1] clip has a negative value
    np.save(tmp_path / "clip.npy", RANGES[value_range](to_layout(u)))
    channels = 3 if c > 1 else 1
    ds = load(tmp_path, frames=3, image_size=8, channels=channels)
    assert len(ds) == 1
    want = expected_frames(u[..., 0] if c == 1 else u, 8, channels)
    assert torch.equal(ds[0]["x"], want)


def test_npz_clips(tmp_path):
    u = numbered_clip(4)
    np.savez(tmp_path / "named.npz", data=u, labels=np.arange(4))  # `data` among others
    np.savez_compressed(tmp_path / "only.npz", u[:3])  # the only array
    ds = load(tmp_path, frames=3, channels=1)
    assert [f.name for f in ds.files] == ["named.npz", "only.npz"] and len(ds) == 2 + 1
    assert frame_ids(ds[0]["x"]) == [0, 1, 2] and frame_ids(ds[2]["x"]) == [0, 1, 2]
    np.savez(tmp_path / "two.npz", a=u, b=u)
    with pytest.raises(DataError, match=r"two\.npz.*\['a', 'b'\]"):
        load(tmp_path, frames=3, channels=1)


@pytest.mark.parametrize("frames, ts", [(3, 2), (2, 3), (1, 1)])
def test_windows_start_at_every_frame_and_stride_by_ts(tmp_path, frames, ts):
    np.save(tmp_path / "a.npy", numbered_clip(9))
    np.save(tmp_path / "b.npy", numbered_clip(6))
    ds = load(tmp_path, frames=frames, ts=ts, channels=1)
    span = (frames - 1) * ts + 1
    assert len(ds) == (9 - span + 1) + (6 - span + 1)
    seen = [(ds.windows[i][0], frame_ids(ds[i]["x"])) for i in range(len(ds))]
    want = [(k, list(range(s, s + span, ts))) for k, n in enumerate((9, 6)) for s in range(n - span + 1)]
    assert seen == want


def test_window_index_with_empty_sequences():
    index = WindowIndex([2, 5, 1, 4], frames=2, ts=2)  # span 3: 0, 3, 0 and 2 windows
    assert len(index) == 5
    assert [index[i] for i in range(5)] == [(1, 0), (1, 1), (1, 2), (3, 0), (3, 1)]
    assert index.frame_slice(1) == slice(1, 4, 2) and index[-1] == (3, 1)


def test_short_clips_are_skipped_and_counted(tmp_path, caplog):
    for name, length in (("a", 2), ("b", 3), ("c", 8)):
        np.save(tmp_path / f"{name}.npy", numbered_clip(length))
    with caplog.at_level(logging.WARNING, logger="trainer.data.video"):
        ds = load(tmp_path, frames=4, channels=1)
    assert len(ds) == 5 and [f.name for f in ds.files] == ["c.npy"] and len(ds.skipped) == 2
    (message,) = [r.getMessage() for r in caplog.records]
    assert "Skipping 2 of 3 clips" in message and "a.npy (2 frames)" in message and "--frames 4" in message
    with pytest.raises(DataError, match=r"--train_data_dir .* no usable clip.*3 clip\(s\) shorter.*--frames 9"):
        load(tmp_path, frames=9, channels=1)


@pytest.mark.parametrize("array, words", [
    (np.zeros((5, 3, 8, 4), np.uint8), "ambiguous"),
    (np.zeros((5, 8, 8, 2), np.uint8), "not a clip"),
    (np.zeros((8, 8, 3), np.uint8), r"one \[H, W, C\] image"),
    (np.zeros((2, 5, 8, 8, 3), np.uint8), "not a clip"),
    (np.full((4, 8, 8), 200.0, np.float32), r"\[0, 1\] or \[-1, 1\].*save it as uint8"),
    (np.full((4, 8, 8), np.nan, np.float32), "NaN"),
    (np.full((4, 8, 8), 300, np.int32), "0..255"),
    (np.zeros((4, 8, 8), bool), "dtype bool"),
])
def test_arrays_breaking_the_rules_are_refused_naming_the_file(tmp_path, array, words):
    np.save(tmp_path / "good.npy", numbered_clip(4))
    np.save(tmp_path / "bad_one.npy", array)
    with pytest.raises(DataError, match=rf"bad_one\.npy.*{words}"):
        load(tmp_path, channels=1)


def test_folders_without_a_usable_clip_name_the_flag(tmp_path):
    with pytest.raises(DataError, match="--train_data_dir .* does not exist"):
        load(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("not a clip")
    with pytest.raises(DataError, match=r"--train_data_dir .* holds no clip files .*found 1 other file"):
        load(tmp_path)
    (tmp_path / "broken.gif").write_bytes(b"GIF89a not really")
    (tmp_path / "broken.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(DataError, match=r"--train_data_dir .* no usable clip.*2 file\(s\) that could not be read"):
        load(tmp_path)


def test_unreadable_files_are_skipped_with_a_warning(tmp_path, caplog):
    np.save(tmp_path / "good.npy", numbered_clip(4))
    (tmp_path / "broken.gif").write_bytes(b"GIF89a not really")
    with caplog.at_level(logging.WARNING, logger="trainer.data.video"):
        ds = load(tmp_path, channels=1)
    assert len(ds) == 3 and ds.skipped[0][0].endswith("broken.gif")
    assert any("Skipping 1 of 2 clip files" in r.getMessage() and "broken.gif" in r.getMessage()
               for r in caplog.records)


def test_videos_are_skipped_with_a_warning_without_a_decoder(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(video, "video_backend", lambda: None)
    (tmp_path / "fake.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not a real video")
    with pytest.raises(DataError, match=r"--train_data_dir .* 1 video file\(s\) skipped .*pip install av"):
        load(tmp_path)
    np.save(tmp_path / "good.npy", numbered_clip(4))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trainer.data.video"):
        ds = load(tmp_path, channels=1)
    assert len(ds) == 3 and ds.skipped == [(str(tmp_path / "fake.mp4"), "no video decoder")]
    (message,) = [r.getMessage() for r in caplog.records]
    assert "1 video file(s)" in message and "fake.mp4" in message and "pip install av" in message


@pytest.mark.parametrize("backend", ["av", "imageio_ffmpeg"])
def test_videos_are_decoded_where_a_decoder_is_installed(tmp_path, monkeypatch, backend):
    pytest.importorskip(backend)
    monkeypatch.setattr(video, "video_backend", lambda: backend)
    frames = np.broadcast_to((np.arange(6, dtype=np.uint8) * 40)[:, None, None, None], (6, 16, 24, 3)).copy()
    write_video(tmp_path / "clip.mp4", frames, backend)
    ds = load(tmp_path, frames=2, image_size=8, channels=3)
    assert ds.lengths == [6] and len(ds) == 5 and ds[0]["x"].shape == (3, 2, 8, 8)
    levels = ds.decoded(0)[:, :, 4, 4].astype(float).mean(1)  # lossy, but each frame near its gray level
    assert np.abs(levels - 40 * np.arange(6)).max() < 12


def write_video(path: Path, frames: np.ndarray, backend: str) -> None:
    """uint8 RGB frames [T, H, W, 3] as an MPEG-4 file, written with `backend`."""
    if backend == "av":
        import av

        with av.open(str(path), "w") as container:
            stream = container.add_stream("mpeg4", rate=10)
            stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
            for f in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        return
    import imageio_ffmpeg

    writer = imageio_ffmpeg.write_frames(str(path), (frames.shape[2], frames.shape[1]), codec="mpeg4",
                                         fps=10, macro_block_size=8, quality=10)
    writer.send(None)
    for f in frames:
        writer.send(np.ascontiguousarray(f))
    writer.close()


def test_clips_past_the_memory_budget_are_decoded_again_with_an_lru_cache(tmp_path):
    for k in range(3):
        np.save(tmp_path / f"{k}.npy", numbered_clip(3 + k))
    in_memory = load(tmp_path, channels=1)
    lazy = load(tmp_path, channels=1, keep_bytes=0, cache_clips=1)
    assert len(in_memory.resident) == 3 and not lazy.resident
    assert [torch.equal(in_memory[i]["x"], lazy[i]["x"]) for i in range(len(lazy))] == [True] * len(lazy)
    assert list(lazy._cache) == [2]  # the last clip read
    np.save(tmp_path / "2.npy", numbered_clip(2))  # changed under a running job
    lazy[0]  # evicts clip 2, so the next read of it decodes the file again
    assert list(lazy._cache) == [0]
    with pytest.raises(DataError, match=r"2\.npy changed .* had 5 frames, now 2"):
        lazy[len(lazy) - 1]


def test_is_clip_folder_looks_at_names(tmp_path):
    assert not is_clip_folder(str(tmp_path / "missing"))
    (tmp_path / "image.png").write_bytes(b"")
    (tmp_path / ".hidden.gif").write_bytes(b"")
    assert not is_clip_folder(str(tmp_path))
    (tmp_path / "deep" / "er").mkdir(parents=True)
    (tmp_path / "deep" / "er" / "clip.webm").write_bytes(b"")
    assert is_clip_folder(str(tmp_path))
    (tmp_path / "sim_000000.npz").write_bytes(b"")
    assert not is_clip_folder(str(tmp_path))


# ----------------------------------------------------------------------------------------------
# The dataset contract


def moving_shapes(tmp_path):
    return MovingShapesDataset(image_size=8, channels=3, frames=4, length=6)


def clip_folder(tmp_path):
    write_gif(tmp_path / "a.gif", numbered_clip(6, side=12))
    np.save(tmp_path / "b.npy", np.random.default_rng(0).random((5, 3, 9, 9)).astype(np.float32))
    return load(tmp_path, frames=4, image_size=8, channels=3)


@pytest.mark.parametrize("make", [moving_shapes, clip_folder])
def test_dataset_contract(tmp_path, make):
    ds = make(tmp_path)
    assert isinstance(ds, ClipData) and ds.bounded and ds.field_channels == 0
    assert (ds.channels, ds.frames, ds.image_size) == (3, 4, 8)
    for i in range(len(ds)):
        item = ds[i]
        assert set(item) == {"x"}
        x = item["x"]
        assert x.dtype == torch.float32 and x.shape == (3, 4, 8, 8) and x.min() >= -1 and x.max() <= 1
        assert torch.equal(x, ds[i]["x"]) and torch.equal(x, ds[i - len(ds)]["x"])
    with pytest.raises(IndexError):
        ds[len(ds)]


# ----------------------------------------------------------------------------------------------
# Training on clips of pictures


VIDEO = ["--model", "unet3d", "--frames", "4", "--cond_steps", "1", "--image_size", "8", "--channels", "3", "--dim", "8",
         "--dim_mults", "1", "2", "--train_num_steps", "2", "--save_and_sample_every", "2"]


def test_the_unet3d_trains_on_moving_shapes_and_on_a_folder_of_gifs(tmp_path):
    from PIL import Image

    from conftest import train

    run_dir = train(tmp_path / "shapes", *VIDEO, "--dataset", "moving_shapes")
    assert Image.open(run_dir / "samples" / "step-00000002.gif").n_frames == 4
    clips = tmp_path / "clips"
    clips.mkdir()
    for i in range(3):
        frames = [Image.new("RGB", (12, 12), (40 * i, 20 * f, 200)) for f in range(6)]
        frames[0].save(clips / f"clip{i}.gif", save_all=True, append_images=frames[1:])
    run_dir = train(tmp_path / "folder", *VIDEO, "--train_data_dir", str(clips))
    assert json.loads((run_dir / "config.json").read_text())["diffusion"]["clip_denoised"] is True
    assert (run_dir / "samples" / "data.gif").is_file()


def test_moving_shapes_needs_the_unet3d():
    from trainer.train import main

    assert main(["--dataset", "moving_shapes", "--frames", "1"]) == 2
