"""End-to-end training on one process: learning, run folder contents, resume, LR schedule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import train
from trainer.build import build_diffusion, build_network
from trainer.checkpoint import list_checkpoints
from trainer.config import build_config, flatten
from trainer.data import TwoModesDataset
from trainer.trainer import lr_at


def load_run_config(run_dir: Path):
    saved = json.loads((run_dir / "config.json").read_text())
    return build_config(flatten(saved), has_gpu=False)


def final_weights(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    last = list_checkpoints(run_dir)[-1]
    return {"model": load_file(str(last / "model.safetensors")), "ema": load_file(str(last / "ema.safetensors")),
            "optimizer": torch.load(last / "optimizer.pt", weights_only=True)["optimizer"]}


def assert_same(a, b, path="", atol: float | None = None) -> None:
    """Equality of nested dicts/lists of tensors and numbers: bit for bit, or tensors within `atol`
    (and a relative 1e-4) when given."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same(a[k], b[k], f"{path}/{k}", atol)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]", atol)
    elif isinstance(a, torch.Tensor) and atol is not None:
        assert a.shape == b.shape and a.dtype == b.dtype, path
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-4, msg=lambda m: f"{path}: {m}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{path} differs (max |diff| {(a.float() - b.float()).abs().max().item()})"
    else:
        assert a == b, path


def test_learns_both_modes_of_a_toy_dataset(tmp_path):
    """A tiny model trained for well under a minute of CPU samples both modes, each close to its template."""
    run_dir = train(tmp_path, "--dim", "16", "--timesteps", "100", "--sampling_timesteps", "20", "--batch_size", "32",
                    "--train_num_steps", "300", "--save_and_sample_every", "300", "--lr", "2e-3",
                    "--lr_warmup_steps", "20", "--ema_decay", "0.95", "--ema_update_after_step", "20",
                    "--no-random_flip", "--log_every", "50")
    cfg = load_run_config(run_dir)
    net = build_network(cfg)
    net.load_state_dict(final_weights(run_dir)["ema"])
    diffusion = build_diffusion(cfg, net).eval()
    x = diffusion.sample(32, generator=torch.Generator().manual_seed(0))

    templates = TwoModesDataset(image_size=8, channels=1).templates
    mse = ((x[:, None] - templates[None]) ** 2).mean(dim=(2, 3, 4))  # [32 samples, 2 modes]
    nearest, mode = mse.min(dim=1)
    assert nearest.max() < 0.1, f"a sample is far from both modes: mse {nearest.max():.3f}"
    assert mse.max(dim=1).values.min() > 0.5, "a sample sits between the modes"
    counts = mode.bincount(minlength=2)
    assert counts.min() >= 6, f"one mode is (nearly) missing: {counts.tolist()}"


def test_run_folder_holds_checkpoint_grids_config_and_wandb_run(tmp_path):
    run_dir = train(tmp_path, "--train_num_steps", "6", "--save_and_sample_every", "3", "--report_to", "wandb")
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-00000003", "step-00000006"]
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == [
        "data.png", "progress.gif", "step-00000003.png", "step-00000006.png"]
    from PIL import Image

    grid, gif = Image.open(run_dir / "samples" / "step-00000006.png"), Image.open(run_dir / "samples" / "progress.gif")
    assert gif.n_frames == 2 and gif.size == grid.size
    assert grid.size == (2 * (8 + 4) * 16, 1 * (8 + 4) * 16)  # 2 samples of 8 px, 2 px padding, scaled x16
    assert load_run_config(run_dir).train.train_num_steps == 6
    wandb_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 1 and any(wandb_runs[0].glob("*.wandb"))
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [2, 4, 6]
    assert all(m["loss"] > 0 and m["images_seen"] == 4 * m["step"] and 0 <= m["data_wait"] < 1 for m in metrics)
    state = json.loads((list_checkpoints(run_dir)[-1] / "state.json").read_text())
    assert state["step"] == 6 and state["images_seen"] == 24


def test_wandb_checkpoints_all_uploads_every_committed_checkpoint_as_a_model_artifact(tmp_path):
    """Offline, the artifact records wait in the run file for `wandb sync`; a resume adds versions to the same
    artifact of the same W&B run."""
    from wandb_records import artifacts

    run_dir = train(tmp_path, "--train_num_steps", "4", "--save_and_sample_every", "2", "--num_samples", "0",
                    "--report_to", "wandb", "--wandb_checkpoints", "all")
    train(tmp_path, "--resume", str(run_dir), "--train_num_steps", "6", "--report_to", "wandb")
    run_id = json.loads((list_checkpoints(run_dir)[-1] / "state.json").read_text())["tracker_run_id"]
    logged = artifacts(run_dir)
    assert [sorted(a["aliases"]) for a in logged] == [["latest", "step-2"], ["latest", "step-4"], ["latest", "step-6"]]
    assert {a["name"] for a in logged} == {f"model-{run_id}"} and {a["type"] for a in logged} == {"model"}
    on_disk = sorted(p.name for p in list_checkpoints(run_dir)[-1].iterdir())
    assert all(a["files"] == on_disk for a in logged) and "model.safetensors" in on_disk
    assert [json.loads(a["metadata"])["step"] for a in logged] == [2, 4, 6]


def test_a_failing_upload_after_a_save_keeps_the_checkpoint(tmp_path):
    from trainer.checkpoint import CheckpointManager
    from test_checkpoint import make_ckpt

    said = []

    def upload(folder, step, best):
        raise ConnectionError("W&B unreachable")

    manager = CheckpointManager(tmp_path, 2, is_main=True, say=said.append, after_commit=upload)
    assert manager.save(3, make_ckpt(3))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000003"]
    assert len(said) == 1 and "saved in" in said[0] and "ConnectionError: W&B unreachable" in said[0]


def test_tensorboard_run_holds_the_scalars_and_sample_grids_in_the_run_folder(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = train(tmp_path, "--train_num_steps", "4", "--save_and_sample_every", "2", "--report_to", "tensorboard")
    assert list(tmp_path.rglob("events.out.tfevents.*")) == list(run_dir.rglob("events.out.tfevents.*"))
    scalars = min(run_dir.rglob("events.out.tfevents.*"), key=lambda p: len(p.parts))  # hparams sit deeper
    acc = EventAccumulator(str(scalars.parent)).Reload()
    assert [e.step for e in acc.Scalars("loss")] == [2, 4]
    assert [e.step for e in acc.Images("samples")] == [2, 4]


def test_resume_latest_continues_exactly_like_an_uninterrupted_run(tmp_path):
    """Train N steps, stop, `--resume latest` to 2N: step, optimizer and EMA continue, bit for bit."""
    common = ["--grad_accum", "2", "--save_and_sample_every", "3", "--dropout", "0.1", "--self_condition"]
    straight = train(tmp_path / "a", *common, "--train_num_steps", "8")
    train(tmp_path / "b", *common, "--train_num_steps", "5")  # stops at 5 (saved at 3 and 5)
    resumed = train(tmp_path / "b", "--resume", "latest", "--train_num_steps", "8")
    state = json.loads((list_checkpoints(resumed)[-1] / "state.json").read_text())
    assert state["step"] == 8 and state["images_seen"] == 8 * 4 * 2
    assert state["ema_step"] == 8
    assert_same(final_weights(straight), final_weights(resumed))


def test_resume_keeps_the_run_config_and_reports_changes(tmp_path, capsys):
    run_dir = train(tmp_path, "--train_num_steps", "2", "--save_and_sample_every", "2", "--objective", "pred_noise")
    train(tmp_path, "--resume", str(run_dir), "--train_num_steps", "4", "--lr", "5e-4")
    out = capsys.readouterr().out
    assert "changed since: lr 0.001 -> 0.0005" in out
    cfg = load_run_config(run_dir)
    # The objective comes from the run (not the default pred_v), the learning rate from the new flag.
    assert cfg.diffusion.objective == "pred_noise" and cfg.train.lr == 5e-4


def test_resume_applies_new_optimizer_hyperparameters(tmp_path):
    """The saved optimizer state must not bring back the old betas or weight decay."""
    run_dir = train(tmp_path, "--train_num_steps", "2", "--save_and_sample_every", "2")
    train(tmp_path, "--resume", str(run_dir), "--train_num_steps", "3", "--save_and_sample_every", "3",
          "--weight_decay", "0.05", "--adam_betas", "0.8", "0.9")
    groups = final_weights(run_dir)["optimizer"]["param_groups"]
    assert all(g["weight_decay"] == 0.05 and tuple(g["betas"]) == (0.8, 0.9) for g in groups)


def test_resume_auto_starts_then_continues_the_named_run(tmp_path):
    first = train(tmp_path, "--resume", "auto", "--train_num_steps", "2", "--save_and_sample_every", "2")
    again = train(tmp_path, "--resume", "auto", "--train_num_steps", "4", "--save_and_sample_every", "2")
    assert first == again
    assert [p.name for p in list_checkpoints(again)] == ["step-00000002", "step-00000004"]


@pytest.mark.parametrize("schedule,expected", [
    ("constant", [0.5, 1.0, 1.0, 1.0, 1.0]),
    ("cosine", [0.5, 1.0, 0.5 * (1 + torch.cos(torch.tensor(torch.pi / 3)).item()),
                0.5 * (1 + torch.cos(torch.tensor(2 * torch.pi / 3)).item()), 0.0]),
    ("step", [0.5, 1.0, 0.1, 0.01, 0.01]),
])
def test_lr_schedule(schedule, expected):
    cfg = build_config({"lr": 1.0, "lr_warmup_steps": 2, "lr_schedule": schedule, "train_num_steps": 5,
                        "lr_decay_steps": (2, 4), "lr_decay_factor": 0.1, "preset": "tiny"}, has_gpu=False)
    got = [lr_at(step, cfg) for step in [0, 1, 3, 4, 5]]
    # cosine: progress (step - warmup) / (total - warmup) = 1/3, 2/3, 1 at steps 3, 4, 5
    assert got == pytest.approx(expected)


def test_dataloader_workers_keep_the_data_order_and_exact_resume(tmp_path):
    """Worker processes (persistent, prefetching) must not change which samples a step sees."""
    common = ["--save_and_sample_every", "3", "--num_workers", "2"]
    straight = train(tmp_path / "a", *common, "--train_num_steps", "6")
    no_workers = train(tmp_path / "c", "--save_and_sample_every", "3", "--num_workers", "0", "--train_num_steps", "6")
    train(tmp_path / "b", *common, "--train_num_steps", "4")
    resumed = train(tmp_path / "b", "--resume", "latest", "--train_num_steps", "6")
    assert_same(final_weights(straight), final_weights(resumed))
    assert_same(final_weights(straight), final_weights(no_workers))


def test_bf16_autocast_trains_on_cpu(tmp_path):
    run_dir = train(tmp_path, "--mixed_precision", "bf16", "--train_num_steps", "4", "--save_and_sample_every", "4")
    state = json.loads((list_checkpoints(run_dir)[-1] / "state.json").read_text())
    assert state["step"] == 4 and state["nonfinite_skipped"] == 0
    weights = final_weights(run_dir)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in weights["model"].values())


def test_a_finished_run_ends_with_a_summary_and_a_loss_curve(tmp_path, capsys):
    run_dir = train(tmp_path, "--train_num_steps", "4", "--save_and_sample_every", "4")
    out = capsys.readouterr().out
    assert "summary: 4 steps, 16 samples seen, 0 skipped step(s), 0 rollback(s)" in out
    assert f"newest checkpoint: {run_dir / 'checkpoints' / 'step-00000004'}" in out
    from PIL import Image

    assert Image.open(run_dir / "loss.png").size[0] > 300


def test_bf16_on_a_cpu_without_bf16_arithmetic_says_fp32_is_faster(tmp_path, capsys, monkeypatch):
    import trainer.train as train_module

    monkeypatch.setattr(train_module, "cpu_has_native_bf16", lambda: False)
    train(tmp_path, "--train_num_steps", "2", "--mixed_precision", "bf16", run_name="emulated")
    out = capsys.readouterr().out
    assert "mixed precision bf16" in out and "note: --mixed_precision bf16 on this CPU" in out
    assert "--mixed_precision no trains faster here" in out
    train(tmp_path, "--train_num_steps", "2", run_name="fp32")
    assert "note: --mixed_precision" not in capsys.readouterr().out
    monkeypatch.setattr(train_module, "cpu_has_native_bf16", lambda: True)
    assert train_module.cpu_bf16_note(torch.device("cpu"), "bf16") is None
    monkeypatch.setattr(train_module, "cpu_has_native_bf16", lambda: False)
    assert train_module.cpu_bf16_note(torch.device("cuda"), "bf16") is None


def test_the_loss_curve_draws_the_losses_where_a_log_axis_puts_them(tmp_path):
    import numpy as np
    from PIL import Image

    from trainer.tracking import log_ticks, nice_ticks, plot_loss_curve

    assert nice_ticks(25, 1000) == [200, 400, 600, 800, 1000]
    assert log_ticks(0.04, 6) == [0.05, 0.1, 0.2, 0.5, 1, 2, 5]
    assert log_ticks(1e-4, 10) == [1e-4, 1e-3, 1e-2, 1e-1, 1, 10]
    assert log_ticks(0.024, 0.21) == [0.03, 0.05, 0.1, 0.2]  # 3s too, under 1.5 decades
    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.parent.mkdir()
    # The loss falls a hundredfold, geometrically: on a log axis that is a straight line.
    rows = [{"step": s, "loss": 10 ** (-2 * s / 100)} for s in range(0, 101, 10)] + [{"step": 110, "loss": float("nan")}]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert plot_loss_curve(metrics, tmp_path / "loss.png") == tmp_path / "loss.png"
    pixels = np.asarray(Image.open(tmp_path / "loss.png").convert("RGB")).astype(int)
    curve = (np.abs(pixels - np.array([31, 119, 180])).sum(-1) < 60)  # the curve's colour
    ys, xs = np.nonzero(curve)
    assert xs.min() < 100 and xs.max() > 600  # from the first step to the last
    fit = np.polyfit(xs, ys, 1)  # pixel rows grow downwards: a falling loss is a rising row
    assert fit[0] > 0.3 and np.abs(ys - np.polyval(fit, xs)).max() < 8  # straight, within the dots' size
    (metrics.parent / "empty.jsonl").write_text('{"step": 1, "loss": 0}\n')
    assert plot_loss_curve(metrics.parent / "empty.jsonl", tmp_path / "none.png") is None


def test_save_and_sample_uses_the_sampler_the_flags_name(tmp_path, monkeypatch):
    import models.sampling as sampling

    calls = []
    real = sampling.SAMPLERS["dpmpp_2m"]

    def recording(denoise, x, grid, **kw):
        calls.append(len(grid.steps))
        return real(denoise, x, grid, **kw)

    monkeypatch.setitem(sampling.SAMPLERS, "dpmpp_2m", recording)
    train(tmp_path, "--sampler", "dpmpp_2m", "--sampling_timesteps", "3", "--train_num_steps", "2",
          "--save_and_sample_every", "2")
    assert calls == [3]


def test_a_run_on_built_in_shapes_ends_with_a_score_of_its_samples(tmp_path, capsys):
    run = train(tmp_path, "--dataset", "shapes", "--channels", "3", "--train_num_steps", "2",
                "--save_and_sample_every", "2", "--num_samples", "4")
    score = json.loads((run / "score.json").read_text())
    assert score["step"] == 2 and set(score) == {"step", "samples", "data", "noise"}
    assert score["data"] < score["noise"] and score["samples"] > score["data"]  # 2 steps: far from the data
    assert f"sample score:      {score['samples']:.3f}" in capsys.readouterr().out
