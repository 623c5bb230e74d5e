"""trainer/sample.py: sampling from a real (tiny) run, checkpoint resolution, outputs, determinism, errors."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from trainer.errors import CheckpointError
from trainer.sample import generate, main, resolve_checkpoint

REPO = Path(__file__).resolve().parent.parent
N_TIMESTEPS, N_SAMPLING = 30, 5


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4. The EMA averages from the first step, so its
    weights differ from the raw ones."""
    from trainer.train import build_parser, run

    results = tmp_path_factory.mktemp("results")
    args = build_parser().parse_args([
        "--dataset", "two_modes", "--channels", "1", "--image_size", "8", "--dim", "8", "--dim_mults", "1", "2",
        "--attn_heads", "1", "--attn_dim_head", "8", "--train_num_steps", "4", "--save_and_sample_every", "2",
        "--num_samples", "2", "--batch_size", "4", "--timesteps", str(N_TIMESTEPS),
        "--sampling_timesteps", str(N_SAMPLING), "--ema_update_after_step", "0", "--report_to", "none",
        "--results_path", str(results), "--run_name", "r"])
    path = run(vars(args))
    assert [p.name for p in (path / "checkpoints").iterdir()] and (path / "checkpoints" / "step-00000004").is_dir()
    return path


def quiet(**kw):
    return dict(progress=False, say=lambda m: None, **kw)


def npz(result):
    with np.load(result.out / "samples.npz") as f:
        return {k: f[k] for k in f.files}


def test_outputs_have_the_documented_files_shapes_and_dtypes(run_dir, tmp_path):
    res = generate(run_dir, num_samples=5, batch_size=2, save_individual=True, out=tmp_path / "o", **quiet())
    assert res.out == tmp_path / "o" and res.step == 4
    arrays = npz(res)
    assert set(arrays) == {"images", "samples"}  # no truth, no physical units: pictures, nothing given
    assert arrays["images"].dtype == np.uint8 and arrays["images"].shape == (5, 8, 8, 1)
    assert arrays["samples"].dtype == np.float16 and arrays["samples"].shape == (5, 1, 8, 8)
    assert np.abs(arrays["samples"]).max() <= 1.0
    # The uint8 images are the float samples mapped from [-1, 1] to [0, 255].
    expected = ((arrays["samples"].astype(np.float32).transpose(0, 2, 3, 1) + 1) * 127.5).round()
    assert np.abs(arrays["images"].astype(np.float32) - expected).max() <= 1.0
    # One PNG per sample, at the image size.
    pngs = sorted(p.name for p in res.out.glob("0*.png"))
    assert pngs == [f"{i:06d}.png" for i in range(5)]
    assert np.array_equal(np.asarray(Image.open(res.out / "000003.png")), arrays["images"][3, ..., 0])
    # The grid: 3x3 tiles of 8 + 2*2 padding pixels, enlarged 128 // 8 = 16 times.
    grid = Image.open(res.out / "grid.png")
    assert grid.size == (3 * 12 * 16, 2 * 12 * 16)
    info = json.loads((res.out / "info.json").read_text())
    assert info["checkpoint"] == str((run_dir / "checkpoints" / "step-00000004").resolve())
    assert (info["step"], info["seed"], info["weights"]) == (4, 0, "ema")
    # The run's sampling settings: the tiny preset samples with DDIM at eta 1.
    assert (info["sampling_timesteps"], info["eta"], info["sampler"]) == (N_SAMPLING, 1.0, "ddim")
    assert info["elapsed_s"] >= 0 and info["num_samples"] == 5
    assert (info["kind"], info["conditions"], info["bounded"], info["num_processes"]) == ("images", None, True, 1)


def test_default_out_is_a_new_timestamped_folder_in_the_run(run_dir):
    a = generate(run_dir, num_samples=1, **quiet())
    b = generate(run_dir, num_samples=1, **quiet())
    for res in (a, b):
        assert res.out.parent == run_dir / "generated" and (res.out / "grid.png").is_file()
        assert not list(res.out.glob("0*.png"))  # no individual files without --save_individual
    assert a.out != b.out


def test_same_seed_same_samples_other_seed_other_samples(run_dir, tmp_path):
    kw = dict(num_samples=3, batch_size=2)
    a = npz(generate(run_dir, seed=7, out=tmp_path / "a", **kw, **quiet()))
    b = npz(generate(run_dir, seed=7, out=tmp_path / "b", **kw, **quiet()))
    c = npz(generate(run_dir, seed=8, out=tmp_path / "c", **kw, **quiet()))
    assert all(np.array_equal(a[k], b[k]) for k in ("images", "samples"))
    assert not np.array_equal(a["samples"], c["samples"])


def test_model_weights_differ_from_ema(run_dir, tmp_path):
    ckpt = run_dir / "checkpoints" / "step-00000004"
    model, ema = load_file(str(ckpt / "model.safetensors")), load_file(str(ckpt / "ema.safetensors"))
    assert model.keys() == ema.keys()
    assert any(not torch.equal(model[k], ema[k]) for k in model)  # the fixture's EMA really averages
    e = generate(run_dir, num_samples=2, weights="ema", out=tmp_path / "e", **quiet())
    m = generate(run_dir, num_samples=2, weights="model", out=tmp_path / "m", **quiet())
    assert not torch.equal(e.samples, m.samples)
    assert json.loads((m.out / "info.json").read_text())["weights"] == "model"


def test_sampler_settings_and_bf16(run_dir, tmp_path):
    ddpm = generate(run_dir, num_samples=2, sampler="ddpm", sampling_timesteps=N_TIMESTEPS, out=tmp_path / "p",
                    **quiet())
    assert ddpm.info["sampler"] == "ddpm" and ddpm.info["sampling_timesteps"] == N_TIMESTEPS
    plain = generate(run_dir, num_samples=2, ddim_eta=0.0, out=tmp_path / "n", **quiet())
    noisy = generate(run_dir, num_samples=2, out=tmp_path / "d", **quiet())  # the run's eta: 1 (tiny preset)
    assert (plain.info["eta"], noisy.info["eta"]) == (0.0, 1.0) and not torch.equal(noisy.samples, plain.samples)
    half = generate(run_dir, num_samples=2, bf16=True, out=tmp_path / "h", **quiet())
    assert half.info["bf16"] and torch.isfinite(half.samples).all() and half.samples.dtype == torch.float32


def test_latest_run_folder_and_checkpoint_folder_resolve_to_the_same_checkpoint(run_dir, tmp_path):
    newest = run_dir / "checkpoints" / "step-00000004"
    forms = {"latest": "latest", "run": str(run_dir), "checkpoints/": str(run_dir / "checkpoints"),
             "checkpoint": str(newest)}
    for name, form in forms.items():
        assert resolve_checkpoint(form, run_dir.parent) == (run_dir, newest), name
    older = run_dir / "checkpoints" / "step-00000002"
    assert resolve_checkpoint(str(older)) == (run_dir, older)
    # And through generate: the same samples, whatever the form.
    outs = [generate(form, num_samples=2, results_path=run_dir.parent, out=tmp_path / name, **quiet())
            for name, form in forms.items()]
    assert all(o.checkpoint == newest and torch.equal(o.samples, outs[0].samples) for o in outs)
    assert generate(older, num_samples=1, out=tmp_path / "old", **quiet()).step == 2


def test_latest_takes_the_newest_run_and_damaged_checkpoints_are_skipped(run_dir, tmp_path):
    results = tmp_path / "results"
    old, new = results / "old", results / "new"
    shutil.copytree(run_dir / "checkpoints", old / "checkpoints")
    shutil.copytree(run_dir / "checkpoints", new / "checkpoints")
    for i, run in enumerate((old, new)):
        t = 1_700_000_000 + i * 100
        for ck in (run / "checkpoints").iterdir():
            os.utime(ck, (t, t))
    assert resolve_checkpoint("latest", results)[0] == new
    # A corrupted newest checkpoint: the run form falls back to the one before, with a warning ...
    with open(new / "checkpoints" / "step-00000004" / "ema.safetensors", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\xff\x00\xff")
    warnings = []
    assert resolve_checkpoint(str(new), warn=warnings.append) == (new, new / "checkpoints" / "step-00000002")
    assert len(warnings) == 1 and "step-00000004" in warnings[0]
    # ... and naming it explicitly is an error.
    with pytest.raises(CheckpointError, match="not intact"):
        resolve_checkpoint(str(new / "checkpoints" / "step-00000004"))
    # No intact checkpoint at all.
    with open(new / "checkpoints" / "step-00000002" / "model.safetensors", "ab") as f:
        f.write(b"junk")
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        resolve_checkpoint(str(new), warn=lambda m: None)


@pytest.mark.parametrize("argv, needle", [
    (["{tmp}/nowhere"], "nowhere"),
    (["{run}", "--num_samples", "0"], "--num_samples"),
    (["{run}", "--batch_size", "0"], "--batch_size"),
    (["{run}", "--sampling_timesteps", "1000"], "--sampling_timesteps"),
    (["{run}", "--ddim_eta", "-1"], "--ddim_eta"),
    (["{run}", "--device", "nonsense"], "--device"),
    (["{tmp}", "--num_samples", "1"], "no committed checkpoint"),
    (["latest", "--results_path", "{tmp}/none"], "--results_path"),
    (["{run}", "--out", "{run}"], "--out"),
    (["{run}", "--split", "test"], "drop --split"),
    (["{run}", "--seed", "-1"], "--seed"),
])
def test_user_errors_exit_2_with_one_message(run_dir, tmp_path, capsys, argv, needle):
    argv = [a.format(run=run_dir, tmp=tmp_path) for a in argv]
    before = sorted(run_dir.rglob("*"))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and "Traceback" not in err
    assert sorted(run_dir.rglob("*")) == before  # nothing written


def test_script_form_runs_from_the_repo_root(run_dir, tmp_path):
    """`python trainer/sample.py` (the sys.path guard): an error exits 2 without a traceback; a
    success writes the same samples as the in-process call."""
    env = {**os.environ, "PYTHONPATH": ""}
    cmd = [sys.executable, "trainer/sample.py"]
    bad = subprocess.run(cmd + [str(run_dir), "--sampling_timesteps", "1000"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2, bad.stderr
    assert "--sampling_timesteps" in bad.stderr and "Traceback" not in bad.stderr
    good = subprocess.run(cmd + ["latest", "--results_path", str(run_dir.parent), "--num_samples", "3",
                                 "--batch_size", "2", "--seed", "5", "--out", str(tmp_path / "s")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert good.returncode == 0, good.stderr
    assert str(tmp_path / "s") in good.stdout
    here = generate(run_dir, num_samples=3, batch_size=2, seed=5, out=tmp_path / "i", **quiet())
    with np.load(tmp_path / "s" / "samples.npz") as f:
        assert np.array_equal(f["samples"], here.samples.to(torch.float16).numpy())


def test_dpm_solver_from_the_command_line_names_its_folder_by_the_sampler(run_dir, capsys):
    from trainer.sample import main

    assert main([str(run_dir), "--sampler", "dpmpp_2m", "--sampling_timesteps", "3", "--num_samples", "2"]) == 0
    folders = sorted((run_dir / "generated").glob("*_dpmpp_2m_3"))
    assert folders and json.loads((folders[-1] / "info.json").read_text())["sampler"] == "dpmpp_2m"
    assert main([str(run_dir), "--sampler", "dpmpp_2m", "--ddim_eta", "0.5"]) == 2
    assert "--ddim_eta 0.5 applies to --sampler ddim only" in capsys.readouterr().err
