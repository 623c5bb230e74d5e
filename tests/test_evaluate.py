"""trainer/evaluate.py: the rollout against oracles, the metrics against their formulas, a tiny forecaster
end to end."""

import json
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from models import GaussianDiffusion
from conftest import python, single_thread, train
from trainer import evaluate as ev
from trainer.data.fluid import cache_root
from trainer.evaluate import (block_relative_l2, correlation, diffusion_window, evaluate, frames_above, main,
                              persistence, relative_l2, rollout, score, window_starts)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ----------------------------------------------------------------------------------------------
# 1. The rollout against a known answer

C, H, W = 2, 6, 6


def advance(frames: list[torch.Tensor], k: int, g: torch.Tensor) -> torch.Tensor:
    """The test's dynamics, of the last k frames and the field g at the new frame (all [B, C, H, W])."""
    return 0.6 * frames[-1].roll(1, -1) + 0.6 * frames[-k].roll(1, -2) + g


def trajectories(n: int, length: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(x [n, C, length, H, W] following `advance`, fields [n, C, length, H, W] that differ at every frame)."""
    g = torch.Generator().manual_seed(seed)
    fields = 0.3 * torch.randn(n, C, length, H, W, generator=g)
    frames = [torch.randn(n, C, H, W, generator=g) for _ in range(k)]
    while len(frames) < length:
        frames.append(advance(frames, k, fields[:, :, len(frames)]))
    return torch.stack(frames, 2), fields


class Oracle(nn.Module):
    """A pred_x0 network that returns the exact window: its given frames continued by `advance` (or, with
    `persist`, the last given frame repeated). It reads only the clean given frames of x_t."""

    def __init__(self, k: int, persist: bool = False):
        super().__init__()
        self.channels, self.self_condition, self.k, self.persist = C, False, k, persist
        self.unused = nn.Parameter(torch.zeros(()))

    def forward(self, x, t, *, cond=None, x_self_cond=None):
        frames = [x[:, :, j] for j in range(self.k)]
        for j in range(self.k, x.shape[2]):
            frames.append(frames[self.k - 1] if self.persist else advance(frames, self.k, cond["fields"][:, :, j]))
        return torch.stack(frames, 2)


def oracle_window(frames: int, k: int, persist: bool = False):
    net = Oracle(k, persist)
    diffusion = GaussianDiffusion(net, sample_shape=(C, frames, H, W), timesteps=10, sampling_timesteps=3,
                                  objective="pred_x0", clip_denoised=False, cond_steps=k)
    return diffusion_window(diffusion, net, generator=torch.Generator().manual_seed(0), sampler="ddim", steps=3,
                            eta=0.0)


@pytest.mark.parametrize("frames, k, length", [(4, 1, 8), (5, 2, 10), (4, 1, 4)])
def test_the_oracle_rollout_reproduces_the_truth_and_persistence_does_not(frames, k, length):
    truth, fields = trajectories(3, length, k)
    pred = rollout(oracle_window(frames, k), truth[:, :, :k], fields, frames=frames, length=length)
    assert pred.shape == truth.shape
    torch.testing.assert_close(pred, truth, rtol=0, atol=1e-5)
    model = score(pred.numpy(), truth.numpy(), k)
    base = score(persistence(truth, k).numpy(), truth.numpy(), k)
    assert model["summary"]["fno_relative_l2"] < 1e-5 and np.all(model["per_frame"]["relative_l2_mean"] < 1e-5)
    assert np.allclose(model["per_frame"]["correlation_mean"], 1.0, atol=1e-6)
    assert base["summary"]["fno_relative_l2"] > 0.3
    assert model["summary"]["corr_time_frames_mean"] == length - k and model["summary"]["never_below_threshold"] == 3


def test_an_oracle_of_persistence_scores_as_persistence():
    frames, k, length = 4, 1, 9
    truth, fields = trajectories(2, length, k, seed=1)
    pred = rollout(oracle_window(frames, k, persist=True), truth[:, :, :k], fields, frames=frames, length=length)
    torch.testing.assert_close(pred, persistence(truth, k), rtol=0, atol=0)
    model = score(pred.numpy(), truth.numpy(), k, frame_dt=0.5)
    base = score(persistence(truth, k).numpy(), truth.numpy(), k, frame_dt=0.5)
    assert model["summary"] == base["summary"]
    for key in model["per_frame"]:
        np.testing.assert_array_equal(model["per_frame"][key], base["per_frame"][key])


@pytest.mark.parametrize("frames, k, length, starts", [
    (4, 1, 8, [0, 3, 6]),      # 7 new frames, 3 per window: the last window makes 1 of its 3
    (5, 2, 10, [0, 3, 6]),     # 8 new frames, 3 per window: the last makes 2
    (4, 2, 8, [0, 2, 4]),      # a multiple: every window is whole
    (6, 3, 5, [0]),            # one cut window
])
def test_windows_are_stitched_from_the_previous_windows_last_frames(frames, k, length, starts):
    """Each window gets the k frames before its first new one, and the fields at its own frames (the last
    frame's past the end); each window's new frames land at their place, the last window's cut."""
    assert window_starts(length, frames, k) == starts
    truth, fields = trajectories(2, length, k, seed=2)
    calls = []
    counter = types.SimpleNamespace(n=0, update=lambda m: setattr(counter, "n", counter.n + m))

    def sample_window(x_known, cond):
        calls.append((x_known[:, :, :k].clone(), cond["fields"].clone()))
        s = starts[len(calls) - 1]
        out = torch.full_like(x_known, float("nan"))  # frames past the end must be dropped
        out[:, :, :k] = x_known[:, :, :k]
        out[:, :, k:] = 100.0 * len(calls) + torch.arange(s + k, s + frames).view(1, 1, -1, 1, 1).float()
        return out

    pred = rollout(sample_window, truth[:, :, :k], fields, frames=frames, length=length, progress=counter)
    assert len(calls) == len(starts) == counter.n
    torch.testing.assert_close(pred[:, :, :k], truth[:, :, :k], rtol=0, atol=0)
    for w, s in enumerate(starts):
        new = range(s + k, min(s + frames, length))
        for t in new:  # written by window w, tagged with its number and the frame
            assert torch.all(pred[:, :, t] == 100.0 * (w + 1) + t)
        given, seen_fields = calls[w]
        torch.testing.assert_close(given, pred[:, :, s: s + k], rtol=0, atol=0)
        at = [min(t, length - 1) for t in range(s, s + frames)]
        torch.testing.assert_close(seen_fields, fields[:, :, at], rtol=0, atol=0)
    assert torch.isfinite(pred).all()


# ----------------------------------------------------------------------------------------------
# 2. The metrics against their formulas


def test_relative_l2_and_correlation_match_their_formulas():
    g = np.random.default_rng(0)
    true = g.normal(size=(3, 2, 4, 5, 5))
    pred = true + 0.3 * g.normal(size=true.shape)
    rel, corr = relative_l2(pred, true), correlation(pred, true)
    assert rel.shape == corr.shape == (3, 4)
    for n in range(3):
        for t in range(4):
            p, q = pred[n, :, t].ravel(), true[n, :, t].ravel()
            assert rel[n, t] == pytest.approx(np.linalg.norm(p - q) / np.linalg.norm(q), rel=1e-12)
            assert corr[n, t] == pytest.approx(np.corrcoef(p, q)[0, 1], rel=1e-12)
    np.testing.assert_allclose(correlation(2 * true + 3, true), 1.0, atol=1e-12)
    np.testing.assert_allclose(correlation(-true, true), -1.0, atol=1e-12)
    np.testing.assert_allclose(relative_l2(true, true), 0.0, atol=0)
    np.testing.assert_allclose(relative_l2(np.zeros_like(true), true), 1.0, atol=1e-12)


def test_frames_above_counts_frames_before_the_first_drop_and_the_full_horizon_when_none():
    corr = np.array([[0.9, 0.85, 0.7, 0.9],      # drops at the third predicted frame: 2 frames above
                     [0.95, 0.9, 0.9, 0.81],     # never drops: the full horizon, 4
                     [0.5, 0.9, 0.9, 0.9],       # drops at once: 0
                     [0.9, np.nan, 0.9, 0.9],    # NaN (a constant frame) is a drop: 1
                     [0.8, 0.8, 0.8, 0.79]])     # 0.8 itself is not below
    frames, never = frames_above(corr, 0.8)
    assert frames.tolist() == [2, 4, 0, 1, 3] and never.tolist() == [False, True, False, False, False]
    k = 2
    true = np.random.default_rng(1).normal(size=(1, 1, k + 4, 4, 4))
    s = score(true.copy(), true, k, frame_dt=0.25)["summary"]  # a perfect forecast never drops
    assert (s["corr_time_frames_mean"], s["corr_time_mean"], s["never_below_threshold"]) == (4, 1.0, 1)
    assert score(true.copy(), true, k)["summary"]["corr_time_mean"] is None  # no time unit known


def test_the_fno_block_metric_weighs_frames_by_their_norm_unlike_the_per_frame_mean():
    true = np.ones((1, 1, 2, 2, 2))
    true[:, :, 1] *= 10.0  # the second frame's norm is 10 times the first's
    pred = true.copy()
    pred[0, 0, :, 0, 0] += 0.2  # the same absolute error in both frames
    per_frame = relative_l2(pred, true)[0]
    np.testing.assert_allclose(per_frame, [0.1, 0.01])
    block = block_relative_l2(pred, true)[0]
    assert block == pytest.approx(np.sqrt(2 * 0.2**2) / np.sqrt(4 * 1 + 4 * 100))
    assert abs(block - per_frame.mean()) > 0.03
    # Equal norms and equal relative errors per frame: the two agree.
    true2 = np.ones((1, 1, 3, 2, 2))
    pred2 = true2 * 1.1
    assert block_relative_l2(pred2, true2)[0] == pytest.approx(relative_l2(pred2, true2).mean())
    s = score(np.concatenate([true, pred], 2), np.concatenate([true, true], 2), cond_steps=2)["summary"]
    assert s["fno_relative_l2"] == pytest.approx(block) and s["relative_l2_mean"] == pytest.approx(per_frame.mean())


def test_persistence_repeats_the_last_given_frame():
    true = torch.arange(2 * 1 * 5 * 1 * 1, dtype=torch.float32).view(2, 1, 5, 1, 1)
    p = persistence(true, 2)
    assert p[0, 0, :, 0, 0].tolist() == [0, 1, 1, 1, 1] and p[1, 0, :, 0, 0].tolist() == [5, 6, 6, 6, 6]
    assert true[0, 0, 2, 0, 0] == 2  # the input is left alone


def test_the_fno_anchors_appear_only_for_li_et_al_s_protocol():
    from trainer.config import build_config

    def cfg(**kw):
        return build_config({"model": "unet3d", "dataset": "navier_stokes", "frames": 12, **kw}, has_gpu=False)

    ref, note = ev._reference(cfg(ns_preset="fno", cond_steps=10, ns_size=64, num_trajectories=1000), 50, True)
    assert ref["fno_relative_l2"] == {"FNO-3D": 0.0086, "FNO-2D": 0.0128, "U-Net": 0.0245}
    assert ref["deviations"] == [] and "follows it" in note
    ref, note = ev._reference(cfg(ns_preset="fno", cond_steps=10, ns_size=32, num_trajectories=64), 30, True)
    assert ref["deviations"] == ["--rollout_frames 30 (protocol: 50)", "--ns_size 32 (protocol: 64)",
                                 "--num_trajectories 64 (protocol: 1000)"] and "deviates" in note
    for c, builtin in ((cfg(ns_preset="fno", cond_steps=5), True), (cfg(ns_preset="kolmogorov", cond_steps=10), True),
                       (cfg(ns_preset="fno", cond_steps=10), False)):
        ref, note = ev._reference(c, 50, builtin)
        assert ref is None and "protocol differs" in note


# ----------------------------------------------------------------------------------------------
# 3. End to end on a tiny forecaster

FORECASTER = ["--model", "unet3d", "--dataset", "navier_stokes", "--ns_size", "16", "--traj_len", "8", "--frames", "4",
              "--cond_steps", "1", "--num_trajectories", "4", "--num_test_trajectories", "2", "--dim", "8",
              "--dim_mults", "1", "2", "--attn_heads", "1", "--attn_dim_head", "8", "--timesteps", "50",
              "--sampling_timesteps", "3", "--train_num_steps", "4", "--save_and_sample_every", "4",
              "--num_samples", "2", "--batch_size", "4", "--report_to", "none"]
REPORT_KEYS = {"checkpoint", "run", "step", "weights", "settings", "frames", "times", "per_frame", "summary",
               "corr_threshold", "notes", "reference", "reference_note", "rollout_s", "elapsed_s", "created",
               "torch_version"}
SUMMARY_KEYS = {"fno_relative_l2", "fno_relative_l2_std", "relative_l2_mean", "corr_time_frames_mean",
                "corr_time_frames_median", "corr_time_mean", "corr_time_median", "never_below_threshold"}
PER_FRAME_KEYS = {"relative_l2_mean", "relative_l2_std", "correlation_mean", "correlation_std"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(the forecaster's run folder, a 2D Unet run's), with the Navier-Stokes cache in a tmp folder."""
    results = tmp_path_factory.mktemp("results")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDDY_CACHE", str(tmp_path_factory.mktemp("cache")))
        with single_thread():
            forecaster = train(results, *FORECASTER, run_name="forecaster")
            images = train(results, "--train_num_steps", "2", "--save_and_sample_every", "2", run_name="images")
        yield forecaster, images


def quiet(**kw):
    return dict(progress=False, say=lambda m: None, **kw)


def test_evaluate_writes_the_documented_files_and_is_reproducible(runs, tmp_path):
    forecaster, _ = runs
    a = evaluate(forecaster, out=tmp_path / "a", batch_size=1, **quiet())
    report = json.loads((a.out / "report.json").read_text())
    assert set(report) == REPORT_KEYS and report["step"] == 4 and report["weights"] == "ema"
    settings = report["settings"]
    assert (settings["rollout_frames"], settings["cond_steps"], settings["frames"], settings["windows"]) == (8, 1, 4, 3)
    assert (settings["num_trajectories"], settings["sampler"], settings["sampling_timesteps"]) == (2, "ddim", 3)
    assert report["frames"] == list(range(1, 8))
    assert report["times"] == pytest.approx([0.5 * i for i in range(1, 8)])  # kolmogorov: t_every 0.5, --ts 1
    for who in ("model", "persistence"):
        assert set(report["summary"][who]) == SUMMARY_KEYS and set(report["per_frame"][who]) == PER_FRAME_KEYS
        assert all(isinstance(v, (int, float)) and np.isfinite(v) for v in report["summary"][who].values())
        assert all(len(v) == 7 and np.all(np.isfinite(v)) for v in report["per_frame"][who].values())
    assert report["reference"] is None and "protocol differs" in report["reference_note"]
    with np.load(a.out / "rollout.npz") as z:
        assert z["prediction"].dtype == np.float32 and z["prediction"].shape == z["truth"].shape == (2, 1, 8, 16, 16)
        np.testing.assert_array_equal(z["prediction"][:, :, :1], z["truth"][:, :, :1])  # the given frame
        assert z["model_relative_l2"].shape == (2, 7)
        # Physical units: the truth is the test split of the cache as generated, not standardized.
        (cached,) = cache_root().glob("navier_stokes/*/test.npy")
        raw = np.load(cached).transpose(0, 2, 1, 3, 4)  # [N, T, C, H, W] -> [N, C, T, H, W]
        np.testing.assert_allclose(z["truth"], raw[:, :, :8], rtol=1e-5, atol=1e-5)
    assert (a.out / "rollout.png").stat().st_size > 0 and (a.out / "rollout.gif").stat().st_size > 0
    # Same seed and batch size: the same numbers; another seed: others.
    b = evaluate(forecaster, out=tmp_path / "b", batch_size=1, **quiet())
    assert json.loads((b.out / "report.json").read_text())["summary"] == report["summary"]
    torch.testing.assert_close(a.prediction, b.prediction, rtol=0, atol=0)
    c = evaluate(forecaster, out=tmp_path / "c", batch_size=1, seed=1, **quiet())
    assert not torch.equal(a.prediction, c.prediction)
    assert c.report["summary"]["persistence"] == report["summary"]["persistence"]


def test_the_cli_prints_a_summary_and_defaults_to_a_folder_in_the_run(runs, capsys):
    forecaster, _ = runs
    assert main([str(forecaster), "--rollout_frames", "6", "--sampler", "dpmpp_2m", "--sampling_timesteps", "2"]) == 0
    printed = capsys.readouterr().out
    assert "relative L2 of frames 2-6" in printed and "frames to corr < 0.8" in printed
    (folder,) = (forecaster / "evaluation").iterdir()
    assert folder.name.endswith("_dpmpp_2m_2") and (folder / "report.json").is_file()
    assert json.loads((folder / "report.json").read_text())["frames"] == [1, 2, 3, 4, 5]


def test_a_held_out_folder_gives_the_numbers_of_the_same_trajectories(runs, tmp_path, monkeypatch):
    """--data_dir with the test split written as sim_*.npz files: standardized with the run's statistics, the
    same rollout and metrics as the built-in split (only the time unit is unknown)."""
    forecaster, _ = runs
    config = json.loads((forecaster / "config.json").read_text())
    assert config["data"]["traj_len"] == 8
    builtin = evaluate(forecaster, out=tmp_path / "builtin", **quiet())
    truth = builtin.truth.numpy()
    folder = tmp_path / "sims"
    folder.mkdir()
    for i, traj in enumerate(truth.transpose(0, 2, 1, 3, 4)):  # [T, C, H, W] each
        np.savez(folder / f"sim_{i:06d}.npz", data=traj)
    held = evaluate(forecaster, data_dir=str(folder), out=tmp_path / "held", **quiet())
    torch.testing.assert_close(held.truth, builtin.truth, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(held.prediction, builtin.prediction, rtol=1e-4, atol=1e-4)
    assert held.report["summary"]["model"]["fno_relative_l2"] == pytest.approx(
        builtin.report["summary"]["model"]["fno_relative_l2"], rel=1e-4)
    assert held.report["times"] is None and held.report["summary"]["model"]["corr_time_mean"] is None


def error_of(capsys, *argv) -> str:
    assert main([*map(str, argv)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_user_errors_exit_2_naming_the_flag(runs, capsys, monkeypatch, tmp_path):
    forecaster, images = runs
    err = error_of(capsys, images)
    assert "not a forecaster" in err and "--model unet3d" in err and "--cond_steps" in err
    assert "--rollout_frames 1" in error_of(capsys, forecaster, "--rollout_frames", "1")
    assert "--rollout_frames 9" in error_of(capsys, forecaster, "--rollout_frames", "9")
    assert "--sampling_timesteps" in error_of(capsys, forecaster, "--sampling_timesteps", "51")
    assert "--ddim_eta" in error_of(capsys, forecaster, "--sampler", "ddpm", "--ddim_eta", "0.5")
    assert "--num_trajectories 3" in error_of(capsys, forecaster, "--num_trajectories", "3")
    assert "--data_dir" in error_of(capsys, forecaster, "--data_dir", tmp_path)  # holds no sim files
    assert not (forecaster / "evaluation").exists() or all(
        (f / "report.json").is_file() for f in (forecaster / "evaluation").iterdir())  # nothing half-written

    # A run trained on a simulation folder needs --data_dir.
    real = ev.checkpoint_config

    def on_a_folder(*a, **kw):
        cfg, state = real(*a, **kw)
        cfg.data.dataset, cfg.data.train_data_dir = "shapes", "/gone/sims"
        return cfg, state

    monkeypatch.setattr(ev, "checkpoint_config", on_a_folder)
    err = error_of(capsys, forecaster)
    assert "--data_dir" in err and "/gone/sims" in err


def test_the_script_reports_a_user_error_in_one_line(runs):
    _, images = runs
    res = python("trainer/evaluate.py", str(images), timeout=120)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().startswith("error: ") and "not a forecaster" in res.stderr


def test_a_wandb_run_gets_the_summary_and_the_plot_at_the_checkpoint_step(runs, tmp_path, monkeypatch):
    """With a fake `wandb`: the run's id, resumed, the summary numbers against eval/step, and the plot."""
    forecaster, _ = runs
    calls = {}

    class Run:
        def define_metric(self, name, **kw):
            calls.setdefault("metrics", []).append((name, kw))

        def log(self, row, **kw):
            calls["log"] = (row, kw)

        def finish(self):
            calls["finished"] = True

    fake = types.SimpleNamespace(init=lambda **kw: calls.update(init=kw) or Run(), Image=lambda p: ("image", p))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_MODE", "offline")
    real = ev.checkpoint_config

    def tracked(*a, **kw):
        cfg, state = real(*a, **kw)
        cfg.run.report_to = "wandb"
        return cfg, {**state, "tracker_run_id": "abc123"}

    monkeypatch.setattr(ev, "checkpoint_config", tracked)
    res = evaluate(forecaster, out=tmp_path / "w", **quiet())
    assert calls["init"] == dict(project="eddy", id="abc123", resume="allow", dir=str(forecaster.resolve()))
    row, kw = calls["log"]
    assert kw == {} and row["eval/step"] == 4 and ("eval/*", {"step_metric": "eval/step"}) in calls["metrics"]
    assert row["eval/model/fno_relative_l2"] == res.report["summary"]["model"]["fno_relative_l2"]
    assert row["eval/rollout"] == ("image", str(res.out / "rollout.png")) and calls["finished"]
    calls.clear()
    evaluate(forecaster, out=tmp_path / "n", log_wandb=False, **quiet())
    assert "init" not in calls
