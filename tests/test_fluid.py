"""Trajectory data: the research code's folder layout, windows with a stride, normalization, the built-in
Navier-Stokes cache, clip training end to end (learning, exact resume with one and two processes), and
the messages for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import accelerate_launch, train
from test_train import assert_same, final_weights
from trainer.data.fluid import Normalization, TrajectoryWindows, load_simulation_folder
from trainer.errors import ConfigError, DataError

# A Unet3D forecaster on tiny Navier-Stokes data: 4 training trajectories of 8 frames of 16x16.
NS = ["--model", "unet3d", "--dataset", "navier_stokes", "--ns_size", "16", "--traj_len", "8", "--frames", "4",
      "--cond_steps", "1", "--num_trajectories", "4", "--num_test_trajectories", "2", "--dim", "8", "--dim_mults",
      "1", "2", "--attn_heads", "1", "--attn_dim_head", "8", "--timesteps", "50", "--sampling_timesteps", "3",
      "--batch_size", "4", "--num_samples", "2", "--log_every", "2", "--report_to", "none", "--preset", "tiny",
      "--ema_update_after_step", "2", "--ema_update_every", "1", "--lr", "1e-3"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    """One generated data cache for the whole module, outside the user's home."""
    monkeypatch.setenv("EDDY_CACHE", str(tmp_path_factory.getbasetemp() / "eddy-cache"))


def write_sims(folder: Path, n=3, shape=(6, 3, 8, 8), fields=False, seed=0) -> list[np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        data = rng.standard_normal(shape).astype(np.float32) + np.arange(shape[1])[None, :, None, None]
        arrays = {"data": data}
        if fields:
            arrays["fields"] = rng.standard_normal((2, *shape[2:])).astype(np.float32)
        np.savez(folder / f"sim_{i:06d}.npz", **arrays)
        out.append(data)
    return out


# ----------------------------------------------------------------------------------------------
# Windows


@pytest.mark.parametrize("frames, ts", [(2, 1), (3, 2), (2, 5), (1, 1)])
def test_windows_start_at_every_frame_and_stride_by_ts(frames, ts):
    trajectories = [np.arange(7 * 2, dtype=np.float32).reshape(7, 2, 1, 1) * (i + 1) for i in range(2)]
    norm = Normalization(mean=(0.0, 0.0), std=(1.0, 1.0))
    ds = TrajectoryWindows(trajectories, frames=frames, ts=ts, normalization=norm)
    per = 7 - (frames - 1) * ts
    assert len(ds) == 2 * per and ds.windows_per_trajectory == per
    seen = set()
    for i in range(len(ds)):
        trajectory, start = ds.window(i)
        seen.add((trajectory, start))
        x = ds[i]["x"]  # [C, F, H, W]
        expected = trajectories[trajectory][start: start + (frames - 1) * ts + 1: ts]  # [F, C, 1, 1]
        assert x.shape == (2, frames, 1, 1)
        assert torch.equal(x, torch.from_numpy(expected).permute(1, 0, 2, 3))
    assert seen == {(t, s) for t in range(2) for s in range(per)}  # none skipped


def test_the_research_layout_loads_with_state_channels_fields_and_its_normalization(tmp_path):
    sims = write_sims(tmp_path, fields=True)
    ds = load_simulation_folder(str(tmp_path), frames=3, ts=2, state_channels=2)
    assert len(ds) == 3 * (6 - 2 * 2) and (ds.channels, ds.field_channels) == (2, 1 + 2)
    item = ds[ds.windows_per_trajectory + 1]  # trajectory 1, start 1: frames 1, 3, 5
    assert item["x"].shape == (2, 3, 8, 8) and item["fields"].shape == (3, 3, 8, 8)
    mean, std = np.asarray(ds.normalization.mean), np.asarray(ds.normalization.std)
    stacked = np.stack(sims)  # [N, T, C, H, W]
    np.testing.assert_allclose(mean, stacked.mean(axis=(0, 1, 3, 4)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(std, stacked.std(axis=(0, 1, 3, 4)), rtol=1e-4)
    raw = sims[1][[1, 3, 5]]  # [F, C, H, W]
    standardized = (raw - mean[None, :, None, None]) / std[None, :, None, None]
    np.testing.assert_allclose(item["x"].numpy(), standardized[:, :2].transpose(1, 0, 2, 3), atol=1e-5)
    np.testing.assert_allclose(item["fields"][0].numpy(), standardized[:, 2], atol=1e-5)
    np.testing.assert_allclose(item["fields"][1:].numpy(),
                               np.load(tmp_path / "sim_000001.npz")["fields"][:, None].repeat(3, 1), atol=0)


@pytest.mark.parametrize("damage, message", [
    (lambda d: np.savez(d / "sim_000001.npz", data=np.zeros((6, 3, 4, 8), np.float32)), "sim_000001.npz has shape"),
    (lambda d: np.savez(d / "sim_000002.npz", data=np.full((6, 3, 8, 8), np.nan, np.float32)),
     "sim_000002.npz holds NaN"),
    (lambda d: np.savez(d / "sim_000000.npz", data=np.zeros((6, 8, 8), np.float32)), r"a trajectory is \[T, C, H, W\]"),
    (lambda d: (d / "sim_000001.npz").write_bytes(b"not a zip"), "sim_000001.npz is not a readable"),
])
def test_bad_simulation_files_are_named(tmp_path, damage, message):
    write_sims(tmp_path)
    damage(tmp_path)
    with pytest.raises(DataError, match=message):
        load_simulation_folder(str(tmp_path), frames=2)


def test_window_and_channel_flags_are_checked_against_the_data(tmp_path):
    write_sims(tmp_path)
    with pytest.raises(ConfigError, match="--traj_len 3 is shorter than one window"):
        load_simulation_folder(str(tmp_path), frames=2, ts=3, traj_len=3)
    with pytest.raises(ConfigError, match="--traj_len 9 exceeds the 6 frames"):
        load_simulation_folder(str(tmp_path), frames=2, traj_len=9)
    with pytest.raises(ConfigError, match="--state_channels 4"):
        load_simulation_folder(str(tmp_path), frames=2, state_channels=4)
    with pytest.raises(DataError, match="no sim_XXXXXX.npz"):
        load_simulation_folder(str(tmp_path / "nowhere"), frames=2)


@pytest.mark.parametrize("argv, needle", [
    (["--frames", "4", "--cond_steps", "4"], "--cond_steps 4 must be below --frames 4"),
    (["--frames", "4", "--traj_len", "3"], "--traj_len 3 is shorter than one window"),
    (["--ns_channels", "vorticity", "pressure"], "--ns_channels vorticity pressure: the fields are vorticity, u, v"),
    (["--model", "unet", "--frames", "4", "--cond_steps", "1"], "the 2D Unet generates single frames"),
    (["--model", "unet", "--frames", "1", "--cond_steps", "0", "--unet3d_kind", "conv3d"],
     "--unet3d_kind conv3d is a Unet3D flag"),
    (["--ns_size", "18", "--dim_mults", "1", "2", "2"], "--ns_size 18 is not divisible by 2^(levels-1) = 4"),
])
def test_bad_clip_flags_stop_before_training_with_the_flag_named(tmp_path, capsys, argv, needle):
    from trainer.train import main

    assert main([*NS, "--train_num_steps", "1", *argv, "--results_path", str(tmp_path), "--run_name", "r"]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err, err
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_a_bad_file_in_a_simulation_folder_stops_the_run_naming_it(tmp_path, capsys):
    from trainer.train import main

    write_sims(tmp_path / "sims", shape=(6, 3, 8, 8))
    np.savez(tmp_path / "sims" / "sim_000001.npz", data=np.ones((6, 3, 8, 8), np.float32) * np.inf)
    argv = [a for a in NS if a not in ("navier_stokes",)]
    argv[argv.index("--dataset")] = "--train_data_dir"
    argv.insert(argv.index("--train_data_dir") + 1, str(tmp_path / "sims"))
    assert main([*argv, "--results_path", str(tmp_path), "--run_name", "r"]) == 2
    assert "sim_000001.npz holds NaN or infinite values" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Training on clips


def test_a_forecaster_learns_on_tiny_navier_stokes_and_shows_samples_beside_the_truth(tmp_path):
    run_dir = train(tmp_path, *NS, "--train_num_steps", "150", "--save_and_sample_every", "150", "--log_every", "25",
                    "--lr", "3e-3")
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.7 * losses[0] and losses[-1] < losses[len(losses) // 2] < losses[0], losses
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["data"]["channels"] == 1 and cfg["data"]["image_size"] == 16 and cfg["diffusion"]["clip_denoised"] is False
    assert (run_dir / "normalization.json").is_file()
    from PIL import Image

    gif, data = (Image.open(run_dir / "samples" / name) for name in ("step-00000150.gif", "data.gif"))
    assert gif.n_frames == data.n_frames == 4  # one GIF frame per clip frame
    assert gif.size == (2 * data.size[0], data.size[1])  # each sample beside its truth


def test_the_2d_unet_trains_on_single_frames_of_the_same_data(tmp_path):
    argv = [a for a in NS]
    for flag, value in (("--model", "unet"), ("--frames", "1"), ("--cond_steps", "0")):
        argv[argv.index(flag) + 1] = value
    run_dir = train(tmp_path, *argv, "--train_num_steps", "2", "--save_and_sample_every", "2")
    assert (run_dir / "samples" / "step-00000002.png").is_file()


@pytest.mark.slow
def test_clip_training_resumes_bit_exactly_with_one_and_two_processes(tmp_path):
    common = [*NS, "--grad_accum", "2", "--save_and_sample_every", "3", "--dropout", "0.1", "--self_condition"]
    straight = train(tmp_path / "a", *common, "--train_num_steps", "6")
    train(tmp_path / "b", *common, "--train_num_steps", "3")
    resumed = train(tmp_path / "b", *common, "--resume", "latest", "--train_num_steps", "6")
    assert_same(final_weights(straight), final_weights(resumed))

    def launch(results, *args):
        result = accelerate_launch("trainer/train.py", *common, "--results_path", str(results), *args,
                                   env={"EDDY_CACHE": str(tmp_path / "cache")})
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    launch(tmp_path / "c", "--run_name", "r", "--train_num_steps", "6")
    launch(tmp_path / "d", "--run_name", "r", "--train_num_steps", "3")
    launch(tmp_path / "d", "--resume", "latest", "--train_num_steps", "6")
    assert_same(final_weights(tmp_path / "c" / "r"), final_weights(tmp_path / "d" / "r"))


def test_evaluation_during_training_keeps_the_best_checkpoint_beside_the_pruned_ones(tmp_path, capsys):
    run_dir = train(tmp_path, *NS, "--train_num_steps", "8", "--save_and_sample_every", "2", "--eval_every", "2",
                    "--eval_trajectories", "2", "--checkpoints_total_limit", "2", "--num_samples", "0")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    scored = [r for r in rows if "eval/fno_relative_l2" in r]
    assert [r["step"] for r in scored] == [2, 4, 6, 8]
    assert all(0 < r["eval/fno_relative_l2"] < 10 and r["eval/persistence_fno_relative_l2"] > 0 for r in scored)
    evals = [(r["step"], r["eval/fno_relative_l2"]) for r in scored]
    best_step, best = min(evals, key=lambda e: e[1])
    best_state = json.loads((run_dir / "checkpoints" / "best" / "state.json").read_text())
    assert best_state["step"] == best_step and best_state["best_metric"] == pytest.approx(best)
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["best", "step-00000006", "step-00000008"]  # pruned to 2, best kept
    assert f"best checkpoint:   {run_dir / 'checkpoints' / 'best'}" in capsys.readouterr().out


def test_eval_every_is_for_forecasters(tmp_path, capsys):
    from trainer.train import main

    assert main(["--eval_every", "10", "--results_path", str(tmp_path)]) == 2
    assert "--eval_every evaluates forecasters" in capsys.readouterr().err
