"""trainer/sample.py on clips: an unconditional Unet3D on moving shapes, a Navier-Stokes forecaster whose
given frames come from the data, two processes through `accelerate launch`, and the messages for bad flags."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import accelerate_launch, single_thread, train
from test_fluid import NS, write_sims
from test_video import VIDEO
from trainer.sample import generate, main

# 4 frames of 8x8 RGB, nothing given; the EMA averages from the first step, so its weights differ from the raw ones.
SHAPES = [*VIDEO, "--dataset", "moving_shapes", "--cond_steps", "0", "--ema_update_after_step", "0"]


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
    """One generated Navier-Stokes cache for the module (test_fluid.py's), outside the user's home; for
    subprocesses too, which inherit the environment."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDDY_CACHE", str(tmp_path_factory.getbasetemp() / "eddy-cache"))
        yield


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory):
    return train(tmp_path_factory.mktemp("shapes"), *SHAPES)


@pytest.fixture(scope="module")
def forecaster(tmp_path_factory):
    """Given 1 frame, forecast 3: clips of 1 x 4 x 16 x 16 vorticity; 2 test trajectories of 5 windows each."""
    return train(tmp_path_factory.mktemp("ns"), *NS, "--train_num_steps", "2", "--save_and_sample_every", "2")


def quiet(**kw):
    return dict(progress=False, say=lambda m: None, **kw)


def npz(folder: Path) -> dict[str, np.ndarray]:
    with np.load(folder / "samples.npz") as f:
        return {k: f[k] for k in f.files}


def same_files(a: Path, b: Path) -> None:
    """The same arrays and the same GIF; info.json differs only in times and the process count."""
    x, y = npz(a), npz(b)
    assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x), sorted(x)
    assert (a / "samples.gif").read_bytes() == (b / "samples.gif").read_bytes()
    skip = {"elapsed_s", "created", "num_processes"}
    info_a, info_b = (json.loads((f / "info.json").read_text()) for f in (a, b))
    assert {k: v for k, v in info_a.items() if k not in skip} == {k: v for k, v in info_b.items() if k not in skip}


def test_unconditional_clips_are_a_gif_and_float32_clips(shapes_run, tmp_path):
    res = generate(shapes_run, num_samples=3, batch_size=2, save_individual=True, out=tmp_path / "a", **quiet())
    arrays = npz(res.out)
    assert set(arrays) == {"samples"}  # no truth, no physical units: pictures, nothing given
    assert arrays["samples"].dtype == np.float32 and arrays["samples"].shape == (3, 3, 4, 8, 8)
    assert np.abs(arrays["samples"]).max() <= 1.0 and torch.equal(res.samples, torch.from_numpy(arrays["samples"]))
    gif = Image.open(res.out / "samples.gif")
    assert gif.n_frames == 4 and gif.size == (12 * 12, 3 * 12 * 12)  # one 8 + 2 * 2 px RGB tile a row, 12x zoom
    assert sorted(p.name for p in res.out.glob("0*.gif")) == ["000000.gif", "000001.gif", "000002.gif"]
    assert not (res.out / "grid.png").exists()
    info = json.loads((res.out / "info.json").read_text())
    assert (info["kind"], info["conditions"], info["bounded"], info["normalization"]) == ("clips", None, True, None)
    assert info["shape"] == [3, 4, 8, 8] and info["num_processes"] == 1 and info["weights"] == "ema"
    # Same seed, same files; EMA and raw weights differ.
    again = generate(shapes_run, num_samples=3, batch_size=2, save_individual=True, out=tmp_path / "b", **quiet())
    same_files(res.out, again.out)
    raw = generate(shapes_run, num_samples=3, batch_size=2, weights="model", out=tmp_path / "m", **quiet())
    assert not torch.equal(raw.samples, res.samples)


def test_a_forecaster_continues_test_windows_in_a_seeded_order(forecaster, tmp_path):
    from trainer.build import build_dataset
    from trainer.data.fluid import Normalization
    from trainer.sample import checkpoint_config, resolve_checkpoint

    res = generate(forecaster, num_samples=3, batch_size=2, seed=1, out=tmp_path / "a", **quiet())
    a = npz(res.out)
    assert set(a) == {"samples", "physical", "truth", "truth_physical", "indices"}
    for key in ("samples", "physical", "truth", "truth_physical"):
        assert a[key].dtype == np.float32 and a[key].shape == (3, 1, 4, 16, 16), key
    # The given frame comes out exactly as the data's; the forecast frames are generated.
    assert np.array_equal(a["samples"][:, :, :1], a["truth"][:, :, :1])
    assert not np.array_equal(a["samples"][:, :, 1:], a["truth"][:, :, 1:])
    # Physical units through the run's normalization.json.
    norm = Normalization.load(forecaster / "normalization.json")
    assert np.allclose(a["physical"], a["samples"] * norm.std[0] + norm.mean[0], atol=1e-5)
    assert np.allclose(a["truth_physical"], a["truth"] * norm.std[0] + norm.mean[0], atol=1e-5)
    # The truth is the test windows named by `indices`, standardized as in training.
    cfg = checkpoint_config(resolve_checkpoint(str(forecaster))[1], forecaster, has_gpu=False)[0]
    test = build_dataset(cfg, split="test", progress=False)
    assert len(test) == 10 and len(set(a["indices"])) == 3
    assert all(np.array_equal(a["truth"][i], test[int(j)]["x"].numpy()) for i, j in enumerate(a["indices"]))
    info = json.loads((res.out / "info.json").read_text())
    assert info["kind"] == "clips" and info["bounded"] is False and info["normalization"].endswith("normalization.json")
    c = info["conditions"]
    assert (c["split"], c["items"], c["cond_steps"], c["repeated"]) == ("test", 10, 1, False)
    assert "navier_stokes" in c["data"] and "(test)" in c["data"]
    # Each sample beside its truth, coloured: 2 tiles of 16 + 2 * 2 px per row, 6x zoom.
    gif = Image.open(res.out / "samples.gif")
    assert gif.n_frames == 4 and gif.size == (2 * 20 * 6, 3 * 20 * 6)
    # Same seed, same files; another seed draws other windows; the train split, training windows.
    same_files(res.out, generate(forecaster, num_samples=3, batch_size=2, seed=1, out=tmp_path / "b", **quiet()).out)
    other = npz(generate(forecaster, num_samples=3, batch_size=2, seed=2, out=tmp_path / "c", **quiet()).out)
    assert not np.array_equal(other["indices"], a["indices"])
    train_res = generate(forecaster, num_samples=12, batch_size=12, split="train", out=tmp_path / "t", **quiet())
    c = train_res.info["conditions"]
    assert (c["split"], c["items"], c["repeated"]) == ("train", 20, False) and "(train)" in c["data"]


def test_more_samples_than_windows_cycle_through_them(forecaster, tmp_path):
    res = generate(forecaster, num_samples=12, batch_size=12, sampling_timesteps=1, out=tmp_path / "a", **quiet())
    a = npz(res.out)
    assert sorted(a["indices"][:10]) == list(range(10)) and np.array_equal(a["indices"][10:], a["indices"][:2])
    assert res.info["conditions"]["repeated"] is True
    assert np.array_equal(a["samples"][:, :, :1], a["truth"][:, :, :1])


def test_a_run_on_a_simulation_folder_takes_conditions_from_held_out_trajectories(tmp_path, capsys):
    """Static fields beside the state as well as a given frame: both come from --data_dir (or --split train,
    the training folder itself); without either the run says what to pass."""
    write_sims(tmp_path / "train", n=3, shape=(6, 2, 8, 8), fields=True)
    write_sims(tmp_path / "held_out", n=2, shape=(6, 2, 8, 8), fields=True, seed=1)
    argv = list(NS)
    argv[argv.index("--dataset"): argv.index("--dataset") + 2] = ["--train_data_dir", str(tmp_path / "train")]
    argv[argv.index("--traj_len") + 1] = "6"
    run_dir = train(tmp_path / "results", *argv, "--train_num_steps", "2", "--save_and_sample_every", "2")
    res = generate(run_dir, num_samples=3, data_dir=tmp_path / "held_out", out=tmp_path / "a", **quiet())
    a = npz(res.out)
    assert a["samples"].shape == a["truth"].shape == (3, 2, 4, 8, 8)
    assert np.array_equal(a["samples"][:, :, :1], a["truth"][:, :, :1])
    c = res.info["conditions"]
    assert (c["split"], c["data_dir"], c["items"], c["field_channels"]) == (None, str(tmp_path / "held_out"), 6, 2)
    own = generate(run_dir, num_samples=1, split="train", out=tmp_path / "t", **quiet())  # the training folder
    assert own.info["conditions"]["items"] == 9
    assert main([str(run_dir), "--num_samples", "1"]) == 2
    assert "pass --data_dir, a folder of sim_XXXXXX.npz trajectories" in capsys.readouterr().err


def test_a_run_on_a_folder_of_clips_continues_clips_of_a_folder(tmp_path, capsys):
    clips = tmp_path / "clips"
    clips.mkdir()
    for i in range(2):
        frames = [Image.new("RGB", (8, 8), (40 * i, 20 * f, 200)) for f in range(5)]
        frames[0].save(clips / f"clip{i}.gif", save_all=True, append_images=frames[1:])
    run_dir = train(tmp_path / "results", *VIDEO, "--train_data_dir", str(clips))  # 1 frame given of 4
    res = generate(run_dir, num_samples=2, data_dir=clips, out=tmp_path / "a", **quiet())
    a = npz(res.out)
    assert set(a) == {"samples", "truth", "indices"} and a["samples"].shape == (2, 3, 4, 8, 8)
    assert np.array_equal(a["samples"][:, :, :1], a["truth"][:, :, :1]) and res.info["bounded"] is True
    assert Image.open(res.out / "samples.gif").size == (2 * 12 * 12, 2 * 12 * 12)  # sample beside truth
    own = npz(generate(run_dir, num_samples=2, split="train", out=tmp_path / "t", **quiet()).out)  # the same folder
    assert all(np.array_equal(a[k], own[k]) for k in a)
    write_sims(tmp_path / "sims", n=1)
    assert main([str(run_dir), "--data_dir", str(tmp_path / "sims")]) == 2
    assert "holds no clips" in capsys.readouterr().err


def test_images_of_physical_fields_keep_their_values_and_units(tmp_path):
    """A 2D Unet on single Navier-Stokes frames: the samples are not clamped to [-1, 1], and come in physical
    units too."""
    argv = list(NS)
    for flag, value in (("--model", "unet"), ("--frames", "1"), ("--cond_steps", "0")):
        argv[argv.index(flag) + 1] = value
    run_dir = train(tmp_path, *argv, "--train_num_steps", "2", "--save_and_sample_every", "2")
    res = generate(run_dir, num_samples=2, out=tmp_path / "a", **quiet())
    a = npz(res.out)
    assert set(a) == {"images", "samples", "physical"} and (res.out / "grid.png").is_file()
    assert a["samples"].shape == a["physical"].shape == (2, 1, 16, 16) and a["physical"].dtype == np.float32
    assert res.info["kind"] == "images" and res.info["bounded"] is False and res.info["conditions"] is None
    assert np.abs(res.samples).max() > 1  # standardized fields after 2 steps of training: not clamped
    norm = json.loads((run_dir / "normalization.json").read_text())
    assert np.allclose(a["physical"], res.samples.numpy() * norm["std"][0] + norm["mean"][0], atol=1e-5)


@pytest.mark.slow
def test_two_processes_write_the_same_files_as_one(forecaster, tmp_path):
    """Batch b's noise is seeded by (seed, b), whichever process samples it: the files do not depend on the
    number of processes. Both sides on one thread, as the launched processes are."""
    args = ["--num_samples", "3", "--batch_size", "1", "--seed", "4"]
    result = accelerate_launch("trainer/sample.py", str(forecaster), *args, "--out", str(tmp_path / "two"),
                               env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("wrote 3 samples") == 1  # the main process alone writes and reports
    with single_thread():
        assert main([str(forecaster), *args, "--out", str(tmp_path / "one")]) == 0
    same_files(tmp_path / "one", tmp_path / "two")
    assert json.loads((tmp_path / "two" / "info.json").read_text())["num_processes"] == 2


@pytest.mark.parametrize("run, argv, needle", [
    ("shapes", ["--split", "test"], "drop --split"),
    ("shapes", ["--data_dir", "{tmp}"], "drop --data_dir"),
    ("ns", ["--split", "train", "--data_dir", "{tmp}"], "both name"),
    ("ns", ["--data_dir", "{tmp}/nowhere"], "--data_dir"),
    ("ns", ["--data_dir", "{tmp}"], "holds no sim_XXXXXX.npz"),
    ("ns-without-normalization", [], "normalization.json does not exist"),
])
def test_user_errors_exit_2_with_one_message(shapes_run, forecaster, tmp_path, capsys, run, argv, needle):
    runs = {"shapes": shapes_run, "ns": forecaster}
    if run == "ns-without-normalization":
        runs[run] = tmp_path / "copy"
        shutil.copytree(forecaster, runs[run], ignore=shutil.ignore_patterns("generated"))
        (runs[run] / "normalization.json").unlink()
    folder = runs[run]
    before = sorted(folder.rglob("*"))
    assert main([str(folder), *[a.format(tmp=tmp_path) for a in argv], "--num_samples", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("error: ") == 1 and needle in err and "Traceback" not in err, err
    assert sorted(folder.rglob("*")) == before  # nothing written


def test_a_bad_split_is_refused_by_the_parser(forecaster, capsys):
    with pytest.raises(SystemExit) as e:
        main([str(forecaster), "--split", "validation"])
    assert e.value.code == 2 and "--split" in capsys.readouterr().err
