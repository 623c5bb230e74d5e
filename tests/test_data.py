"""Tests of trainer.data: built-in datasets, preprocessing, image folders, saved and Hub datasets."""

import io
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.data import (BUILTIN_DATASETS, ImageDataset, ShapesDataset, TwoModesDataset,
                          build_image_dataset, load_image_folder, preprocess_image)
from trainer.errors import ConfigError, DataError

RED = (255, 0, 0)
BLUE = (0, 0, 255)


@pytest.fixture(autouse=True)
def _private_caches(tmp_path_factory, monkeypatch):
    """Keep the Arrow files that `datasets` writes and the records of image folder checks out of the
    user's caches."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf_cache")))
    monkeypatch.setenv("EDDY_CACHE", str(tmp_path_factory.mktemp("eddy_cache")))  # image folder checks


def check_contract(ds, n_check=4):
    """The trainer's contract: items {"x": float32 [C, H, W] in [-1, 1]}, the same tensor for the same index."""
    assert len(ds) > 0
    for i in range(min(n_check, len(ds))):
        x = ds[i]["x"]
        assert isinstance(x, torch.Tensor)
        assert x.dtype == torch.float32
        assert x.shape == (ds.channels, ds.image_size, ds.image_size)
        assert x.min() >= -1.0 and x.max() <= 1.0
        assert torch.isfinite(x).all()
        assert torch.equal(x, ds[i]["x"])


def stripes(size, horizontal, middle=RED, edge=BLUE):
    """A 3:1 image whose middle half (along its long side) is `middle` and the rest `edge`."""
    long, short = 3 * size, size
    arr = np.empty((short, long, 3), np.uint8)
    arr[:] = edge
    arr[:, long // 4: long - long // 4] = middle
    if not horizontal:
        arr = arr.transpose(1, 0, 2)
    return Image.fromarray(arr)


def jpeg_bytes(image, **kwargs):
    buf = io.BytesIO()
    image.save(buf, format="JPEG", **kwargs)
    return buf.getvalue()


def write_good_images(folder):
    """Four readable files of different sizes, formats and modes, one in a class subfolder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cats").mkdir(exist_ok=True)
    rgba = Image.new("RGBA", (40, 30), (0, 255, 0, 255))
    rgba.save(folder / "rgba.png")
    Image.fromarray(np.tile(np.arange(50, dtype=np.uint8)[:, None] * 5, (1, 20)), "L").save(folder / "gray.jpg")
    Image.new("RGB", (64, 64), (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE).save(
        folder / "cats" / "palette.png")
    stripes(32, horizontal=True).save(folder / "wide.png")


# ----------------------------------------------------------------------------------------------
# Built-in datasets


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("image_size", [8, 32])
def test_shapes_contract(channels, image_size):
    ds = ShapesDataset(image_size=image_size, channels=channels, length=50, seed=3)
    assert len(ds) == 50 and ds.channels == channels and ds.image_size == image_size
    check_contract(ds)


def test_shapes_deterministic_per_index_and_seed():
    a, b = ShapesDataset(length=20, seed=1), ShapesDataset(length=20, seed=1)
    assert all(torch.equal(a[i]["x"], b[i]["x"]) for i in range(20))
    # Order of access does not matter: the item depends on (seed, index) only.
    assert torch.equal(a[7]["x"], ShapesDataset(length=20, seed=1)[7]["x"])
    assert not torch.equal(a[0]["x"], a[1]["x"])
    assert not torch.equal(a[0]["x"], ShapesDataset(length=20, seed=2)[0]["x"])
    assert torch.equal(a[-1]["x"], a[19]["x"])
    with pytest.raises(IndexError):
        a[20]


def test_shapes_are_structured():
    """Each image is a background plus shapes: mostly a few flat colours, not noise, not constant."""
    ds = ShapesDataset(image_size=32, channels=3, length=64)
    for i in range(16):
        x = ds[i]["x"]
        assert x.std() > 0.02  # a shape is visible
        # Most pixels equal the background colour or a shape colour exactly (only edges blend).
        colours, counts = torch.unique(x.reshape(3, -1).T, dim=0, return_counts=True)
        assert counts.topk(min(4, len(counts))).values.sum() > 0.7 * 32 * 32


def test_shapes_count_and_radius_follow_the_options():
    """max_shapes=1: a background and one shape, so two colours cover all but the antialiased edge; a radius
    range pins the area a lone circle covers."""
    ds = ShapesDataset(image_size=32, channels=3, length=64, max_shapes=1, radius=(0.2, 0.35))
    for i in range(16):
        colours, counts = torch.unique(ds[i]["x"].reshape(3, -1).T, dim=0, return_counts=True)
        top = counts.topk(min(3, len(counts))).values
        assert top[:2].sum() > 0.85 * 32 * 32 and (len(top) < 3 or top[2] < 0.05 * 32 * 32)
    # The same (seed, index) draws the same layout; only the radius range scales it.
    small = ShapesDataset(image_size=64, channels=1, length=8, max_shapes=1, radius=(0.1, 0.1))
    large = ShapesDataset(image_size=64, channels=1, length=8, max_shapes=1, radius=(0.3, 0.3))
    area = [[(d[i]["x"] != d[i]["x"][0, 0, 0]).float().sum().item() for i in range(8)] for d in (small, large)]
    assert all(a_large > 4 * a_small for a_small, a_large in zip(*area))


@pytest.mark.parametrize("kwargs,flag", [(dict(max_shapes=0), "--max_shapes"), (dict(radius=(0.3, 0.2)), "--shape_radius"),
                                         (dict(radius=(0.1, 0.6)), "--shape_radius"), (dict(radius=(0.2,)), "--shape_radius")])
def test_shapes_options_are_checked(kwargs, flag):
    with pytest.raises(ConfigError, match=flag):
        ShapesDataset(length=4, **kwargs)


def test_the_tiny_preset_draws_one_large_shape_and_full_keeps_three():
    from trainer.config import build_config

    tiny = build_config({"preset": "tiny"}, has_gpu=False).data
    full = build_config({"preset": "full"}, has_gpu=True).data
    assert (tiny.max_shapes, tuple(tiny.shape_radius)) == (1, (0.2, 0.35))
    assert (full.max_shapes, tuple(full.shape_radius)) == (3, (0.12, 0.3))
    assert build_config({"preset": "tiny", "max_shapes": 2}, has_gpu=False).data.max_shapes == 2
    ds = build_image_dataset(dataset="shapes", train_data_dir=None, image_size=16, channels=3, num_builtin=4,
                             max_shapes=tiny.max_shapes, shape_radius=tiny.shape_radius)
    assert (ds.max_shapes, ds.radius) == (1, (0.2, 0.35))


@pytest.mark.parametrize("channels", [1, 3])
def test_two_modes_near_templates(channels):
    ds = TwoModesDataset(image_size=8, channels=channels, length=40, seed=0, noise=0.05)
    check_contract(ds)
    t = ds.templates
    assert t.shape == (2, channels, 8, 8) and t.dtype == torch.float32
    assert t.abs().max() == pytest.approx(0.8)
    assert (t[0] - t[1]).abs().mean() > 0.5  # clearly different modes
    for i in range(40):
        x = ds[i]["x"]
        own, other = (x - t[i % 2]).norm(), (x - t[1 - i % 2]).norm()
        assert own < 0.05 * 4 * x.numel() ** 0.5  # noise of std 0.05
        assert own < 0.3 * other
    # Left-bright/right-dark and top-bright/bottom-dark.
    assert (t[0][..., :4] > 0).all() and (t[0][..., 4:] < 0).all()
    assert (t[1][..., :4, :] > 0).all() and (t[1][..., 4:, :] < 0).all()


def test_two_modes_noise_free_and_deterministic():
    ds = TwoModesDataset(image_size=6, channels=3, length=4, noise=0.0)
    assert torch.equal(ds[0]["x"], ds.templates[0]) and torch.equal(ds[3]["x"], ds.templates[1])
    noisy = TwoModesDataset(length=4, seed=5)
    assert torch.equal(noisy[2]["x"], TwoModesDataset(length=4, seed=5)[2]["x"])
    assert not torch.equal(noisy[0]["x"], TwoModesDataset(length=4, seed=6)[0]["x"])


# ----------------------------------------------------------------------------------------------
# Preprocessing


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("make", [
    lambda: Image.new("RGBA", (30, 20), (255, 0, 0, 128)),
    lambda: Image.new("LA", (20, 30), (100, 255)),
    lambda: Image.new("L", (17, 23), 77),
    lambda: Image.new("1", (16, 16), 1),
    lambda: Image.new("RGB", (50, 10), RED).convert("P"),
    lambda: Image.new("CMYK", (12, 12), (0, 255, 255, 0)),
    lambda: Image.fromarray(np.full((9, 40), 40000, np.uint16)),  # 16-bit gray
    lambda: Image.fromarray(np.full((9, 9), 0.5, np.float32)),
    lambda: Image.open(io.BytesIO(jpeg_bytes(Image.new("RGB", (400, 300), BLUE)))),
], ids=["RGBA", "LA", "L", "1", "P", "CMYK", "I;16", "F", "JPEG"])
def test_preprocess_any_mode(make, channels):
    x = preprocess_image(make(), 16, channels)
    assert x.shape == (channels, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1.0 and x.max() <= 1.0


def test_preprocess_values():
    # Colours map linearly to [-1, 1].
    x = preprocess_image(Image.new("RGB", (8, 8), (0, 255, 51)), 8, 3)
    assert torch.allclose(x[:, 0, 0], torch.tensor([-1.0, 1.0, 51 / 127.5 - 1]))
    # 16-bit gray keeps its level instead of clipping to white.
    x = preprocess_image(Image.fromarray(np.full((8, 8), 32768, np.uint16)), 8, 1)
    assert x.mean().item() == pytest.approx(0.0, abs=0.01)
    # Fully transparent pixels become white; opaque ones keep their colour.
    x = preprocess_image(Image.new("RGBA", (8, 8), (255, 0, 0, 0)), 8, 3)
    assert torch.allclose(x, torch.ones_like(x))
    x = preprocess_image(Image.new("RGBA", (8, 8), (255, 0, 0, 255)), 8, 1)
    assert x.mean().item() == pytest.approx(0.299 * 255 / 127.5 - 1, abs=0.01)


@pytest.mark.parametrize("horizontal", [True, False])
def test_preprocess_center_crop(horizontal):
    """Of a 3:1 image whose middle half is red, only red remains after the centre crop."""
    x = preprocess_image(stripes(32, horizontal), 16, 3)
    red = torch.tensor([1.0, -1.0, -1.0])[:, None, None]
    assert (x - red).abs().max() < 0.02
    # Without the crop the blue edges would show: check the source really has them.
    assert preprocess_image(stripes(32, horizontal).resize((16, 16)), 16, 3)[2].max() > 0.5


def test_preprocess_large_jpeg_uses_less_than_full_decode_but_keeps_content():
    image = Image.open(io.BytesIO(jpeg_bytes(stripes(512, horizontal=False), quality=95)))
    x = preprocess_image(image, 32, 3)
    assert x.shape == (3, 32, 32)
    assert (x - torch.tensor([1.0, -1.0, -1.0])[:, None, None]).abs().max() < 0.1


# ----------------------------------------------------------------------------------------------
# Image folders


@pytest.mark.parametrize("channels", [1, 3])
def test_image_folder(tmp_path, channels):
    write_good_images(tmp_path / "imgs")
    ds = build_image_dataset(dataset="shapes", train_data_dir=str(tmp_path / "imgs"), image_size=16,
                             channels=channels, progress=False)
    assert isinstance(ds, ImageDataset)
    assert len(ds) == 4 and ds.skipped == []
    assert ds.channels == channels and ds.image_size == 16
    check_contract(ds, n_check=4)

    # The wide image shows only its red middle after the centre crop.
    paths = ds.files
    wide = ds[[os.path.basename(p) for p in paths].index("wide.png")]["x"]
    if channels == 3:
        assert (wide - torch.tensor([1.0, -1.0, -1.0])[:, None, None]).abs().max() < 0.02
    else:
        assert (wide - (0.299 * 255 / 127.5 - 1)).abs().max() < 0.02
    # The opaque RGBA image keeps its colour.
    green = ds[[os.path.basename(p) for p in paths].index("rgba.png")]["x"]
    if channels == 3:
        assert torch.allclose(green[:, 0, 0], torch.tensor([-1.0, 1.0, -1.0]))


def test_image_folder_skips_corrupt_files(tmp_path, caplog):
    folder = tmp_path / "imgs"
    write_good_images(folder)
    data = jpeg_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)))
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "cats" / "notes.png").write_text("this is not an image")

    with caplog.at_level(logging.WARNING, logger="trainer.data"):
        ds = load_image_folder(str(folder), image_size=8, channels=3, progress=False, verify="now")
    assert len(ds) == 4
    assert sorted(os.path.basename(p) for p in ds.skipped) == ["notes.png", "truncated.jpg"]
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "Skipping 2 of 6" in warning and "truncated.jpg" in warning and "notes.png" in warning
    check_contract(ds, n_check=4)


def test_image_folder_all_corrupt(tmp_path):
    (tmp_path / "a.png").write_text("not a png")
    (tmp_path / "b.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(DataError, match="none of the 2 image files in --train_data_dir"):
        build_image_dataset(dataset="shapes", train_data_dir=str(tmp_path), image_size=8, channels=3,
                            progress=False)


def test_image_folder_bad_paths(tmp_path):
    kwargs = dict(dataset="shapes", image_size=8, channels=3, progress=False)
    with pytest.raises(DataError, match="--train_data_dir .* does not exist"):
        build_image_dataset(train_data_dir=str(tmp_path / "missing"), **kwargs)

    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(DataError, match="--train_data_dir .* not a folder"):
        build_image_dataset(train_data_dir=str(tmp_path / "file.png"), **kwargs)

    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "readme.txt").write_text("no images here")
    (empty / ".hidden.png").write_bytes(b"")
    with pytest.raises(DataError, match="--train_data_dir .* holds no image files .*\\.png"):
        build_image_dataset(train_data_dir=str(empty), **kwargs)


# ----------------------------------------------------------------------------------------------
# Saved and Hub datasets


def save_image_dataset(path, n=5, column="img", splits=None):
    import datasets

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (20 + 4 * i, 30, 3), np.uint8)) for i in range(n)]
    features = datasets.Features({"label": datasets.Value("int64"), column: datasets.Image()})
    table = datasets.Dataset.from_dict({"label": list(range(n)), column: images}, features=features)
    if splits:
        table = datasets.DatasetDict({s: table for s in splits})
    table.save_to_disk(str(path))
    return images


@pytest.mark.parametrize("channels", [1, 3])
def test_saved_dataset_through_hub_name(tmp_path, channels):
    images = save_image_dataset(tmp_path / "saved")
    ds = build_image_dataset(dataset=str(tmp_path / "saved"), train_data_dir=None, image_size=16,
                             channels=channels)
    assert isinstance(ds, ImageDataset) and len(ds) == 5 and ds.column == "img"
    check_contract(ds, n_check=5)
    assert torch.allclose(ds[2]["x"], preprocess_image(images[2], 16, channels))


def test_saved_dataset_dict_split_and_columns(tmp_path):
    save_image_dataset(tmp_path / "dd", n=3, column="picture", splits=["train", "test"])
    kwargs = dict(dataset=str(tmp_path / "dd"), train_data_dir=None, image_size=8, channels=3)
    assert len(build_image_dataset(split="test", image_column="picture", **kwargs)) == 3
    with pytest.raises(DataError, match="no split 'val'"):
        build_image_dataset(split="val", **kwargs)
    with pytest.raises(DataError, match="--image_column 'photo' is not a column.*picture"):
        build_image_dataset(image_column="photo", **kwargs)
    with pytest.raises(DataError, match="--image_column 'label' .* does not hold images"):
        build_image_dataset(image_column="label", **kwargs)


def test_saved_dataset_without_image_column(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"x": [1, 2], "y": ["a", "b"]}).save_to_disk(str(tmp_path / "plain"))
    with pytest.raises(DataError, match="no column of image type.*'x', 'y'.*--image_column"):
        build_image_dataset(dataset=str(tmp_path / "plain"), train_data_dir=None, image_size=8, channels=3)


def test_unknown_hub_name_offline_fails_fast(monkeypatch):
    import datasets
    import huggingface_hub

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as info:
        build_image_dataset(dataset="eddy-tests/no-such-dataset", train_data_dir=None, image_size=8,
                            channels=3)
    message = str(info.value)
    assert "could not be loaded" in message and "'eddy-tests/no-such-dataset'" in message
    assert "HF_HUB_OFFLINE=1" in message and "HF_DATASETS_OFFLINE=1" in message
    assert "--train_data_dir" in message
    assert all(name in message for name in BUILTIN_DATASETS)


# ----------------------------------------------------------------------------------------------
# Dispatch


def test_dispatch_builtin():
    ds = build_image_dataset(dataset="shapes", train_data_dir=None, image_size=12, channels=1,
                             seed=4, num_builtin=33)
    assert isinstance(ds, ShapesDataset) and len(ds) == 33
    assert torch.equal(ds[5]["x"], ShapesDataset(image_size=12, channels=1, length=33, seed=4)[5]["x"])
    ds = build_image_dataset(dataset="two_modes", train_data_dir=None, image_size=8, channels=3, num_builtin=10)
    assert isinstance(ds, TwoModesDataset) and len(ds) == 10 and ds.templates.shape == (2, 3, 8, 8)
    assert set(BUILTIN_DATASETS) == {"shapes", "two_modes"}
    assert all(isinstance(v, str) and v for v in BUILTIN_DATASETS.values())


def test_dispatch_folder_wins_over_default_and_hub_name(tmp_path):
    write_good_images(tmp_path)
    for name in ["shapes", "someone/some-dataset"]:
        ds = build_image_dataset(dataset=name, train_data_dir=str(tmp_path), image_size=8, channels=3,
                                 progress=False)
        assert isinstance(ds, ImageDataset) and len(ds) == 4


def test_dispatch_conflicts_and_bad_values(tmp_path):
    with pytest.raises(ConfigError, match="--dataset two_modes .*--train_data_dir.*one or the other"):
        build_image_dataset(dataset="two_modes", train_data_dir=str(tmp_path), image_size=8, channels=3)
    with pytest.raises(ConfigError, match="--channels"):
        build_image_dataset(dataset="shapes", train_data_dir=None, image_size=8, channels=2)
    with pytest.raises(ConfigError, match="--image_size"):
        build_image_dataset(dataset="shapes", train_data_dir=None, image_size=0, channels=3)


def test_augment_flips_each_image_of_a_batch_from_the_generator():
    ds = build_image_dataset(dataset="shapes", train_data_dir=None, image_size=8, channels=3, random_flip=True)
    x = torch.stack([ds[i]["x"] for i in range(64)])
    out = ds.augment({"x": x, "params": torch.ones(64, 2)}, torch.Generator().manual_seed(0))["x"]
    flipped = torch.tensor([torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x)])
    kept = torch.tensor([torch.equal(o, xi) for o, xi in zip(out, x)])
    assert bool((flipped | kept).all()) and 16 < int(flipped.sum()) < 48  # about half, each one or the other
    again = ds.augment({"x": x}, torch.Generator().manual_seed(0))["x"]
    assert torch.equal(out, again)  # a pure function of the generator
    ds.random_flip = False
    assert torch.equal(ds.augment({"x": x}, torch.Generator().manual_seed(0))["x"], x)


def test_the_shapes_score_tells_crisp_shapes_from_blur_and_noise():
    from trainer.data.builtin import ShapesDataset, off_palette

    ds = ShapesDataset(image_size=16, channels=3)
    x = torch.stack([ds.image(i) for i in range(32)])
    blurred = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    data, blur, noise = (float(off_palette(v).mean()) for v in (x, blurred, torch.rand_like(x) * 2 - 1))
    assert data < 0.2 and blur > 1.5 * data and noise > 0.95
    score = ds.score(x[:8])
    assert score["samples"] == pytest.approx(score["data"]) and score["noise"] > 0.95
