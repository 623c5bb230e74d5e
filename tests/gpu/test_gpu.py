"""Eddy on one GPU: the user's command at full size, each precision, the fp16 GradScaler across a resume,
bit-exact resume, and FSDP2 and DeepSpeed ZeRO-2 launched through their accelerate configs.

On the GPU the runs are the tiny preset's sizes (the full preset for ./launch.sh); the CPU dry run
(EDDY_GPU_TESTS_ON_CPU=1, see conftest.py) keeps conftest.TINY's and launches two gloo processes where the GPU
has one NCCL process. torch, safetensors and trainer are imported inside the helpers, so that a machine
without a GPU collects and skips this file without loading them.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
from pathlib import Path

import pytest

from conftest import TINY, config_launch, script, train

from .conftest import ON_CPU

pytestmark = pytest.mark.gpu

STEPS = 6 if ON_CPU else 40  # N of "N steps straight against N/2, then resumed to N"
HALF = STEPS // 2
# The tiny preset's sizes (trainer/config.py) on the built-in shapes, over conftest.TINY.
GPU_SIZES = ["--dataset", "shapes", "--channels", "3", "--image_size", "16", "--dim", "32", "--dim_mults", "1", "2",
             "2", "--attn_heads", "2", "--attn_dim_head", "16", "--timesteps", "1000", "--sampling_timesteps", "50",
             "--batch_size", "16", "--num_samples", "4", "--num_workers", "2"]
# A checkpoint at HALF and STEPS; gradient accumulation and dropout, where a resume is likeliest to slip.
COMMON = [*([] if ON_CPU else GPU_SIZES), "--save_and_sample_every", str(HALF), "--grad_accum", "2",
          "--dropout", "0.1"]


# ----------------------------------------------------------------------------------------------
# Helpers

def run(results: Path, *flags: str, run_name: str = "run") -> tuple[Path, str]:
    """conftest.train in this process on COMMON. Returns the run folder and what the run printed."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            run_dir = train(results, *COMMON, *flags, run_name=run_name)
    finally:
        print(out.getvalue())  # into the test's captured output, shown when it fails
    return run_dir, out.getvalue()


def launch(config: str, *flags: str) -> str:
    """trainer/train.py on COMMON through `accelerate launch --config_file accelerate_configs/CONFIG`: one process on
    the GPU; two CPU processes in the dry run, as one CPU process forms no process group and shards nothing.
    Returns what the launch printed."""
    on_gpu = {} if ON_CPU else dict(launcher_flags=("--num_processes", "1"), env={"ACCELERATE_USE_CPU": None})
    result = config_launch(config, *COMMON, *flags, **on_gpu)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def checkpoint(run_dir: Path, step: int) -> Path:
    from trainer.checkpoint import step_dir_name

    return run_dir / "checkpoints" / step_dir_name(step)


def assert_finite_loss(run_dir: Path) -> None:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert rows, f"no metrics in {run_dir}"
    assert math.isfinite(rows[-1]["loss"]) and math.isfinite(rows[-1]["grad_norm"]), rows[-1]


def assert_resume_is_bit_exact(straight: Path, resumed: Path) -> None:
    """`resumed`, stopped at HALF and resumed to STEPS, ends bit for bit where `straight` does. Both ran
    uninterrupted to HALF: a difference there is the kernels' own nondeterminism, not the resume's."""
    from safetensors.torch import load_file

    from test_train import assert_same, final_weights

    def weights(run_dir):
        return {name: load_file(str(checkpoint(run_dir, HALF) / f"{name}.safetensors")) for name in ("model", "ema")}

    assert_same(weights(straight), weights(resumed), f"uninterrupted to step {HALF}, nondeterministic kernels? ")
    assert_same(final_weights(straight), final_weights(resumed))


# ----------------------------------------------------------------------------------------------
# The user's command

LAUNCH_STEPS = 6 if ON_CPU else 300


def test_launch_sh_trains_the_default_preset_with_checkpoints_and_samples(tmp_path):
    """`./launch.sh` as a user types it: on one GPU the default (full) preset in bf16 through single_gpu.yaml;
    the dry run takes cpu.yaml and TINY. scripts/gpu_check.sh copies this run's metrics and samples out."""
    flags = [*TINY, "--report_to", "wandb"] if ON_CPU else []
    half = LAUNCH_STEPS // 2
    result = script("./launch.sh", *flags, "--train_num_steps", str(LAUNCH_STEPS), "--save_and_sample_every",
                    str(half), "--results_path", str(tmp_path / "launch_results"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert not re.search(r"launch\.sh: (creating|installing)", result.stderr), "launch.sh found packages missing"
    config, preset, precision = ("cpu.yaml", "tiny", "no") if ON_CPU else ("single_gpu.yaml", "full", "bf16")
    assert f"--config_file accelerate_configs/{config}" in result.stderr
    assert f"mixed precision {precision}" in result.stdout and f"preset {preset}" in result.stdout

    from trainer.checkpoint import verify

    (run_dir,) = (tmp_path / "launch_results").iterdir()
    assert_finite_loss(run_dir)
    for step in (half, LAUNCH_STEPS):
        verify(checkpoint(run_dir, step))
        assert (run_dir / "samples" / f"{checkpoint(run_dir, step).name}.png").is_file()
    assert json.loads((run_dir / "replicas.json").read_text())["identical"]
    assert list((run_dir / "wandb").glob("offline-run-*"))


# ----------------------------------------------------------------------------------------------
# Precision and resume on one device

@pytest.mark.parametrize("precision", ["fp16", "bf16", "no"])
def test_trains_with_a_finite_loss_in_each_precision(tmp_path, precision):
    run_dir, out = run(tmp_path, "--mixed_precision", precision, "--train_num_steps", str(STEPS))
    assert f"mixed precision {precision}" in out
    assert_finite_loss(run_dir)


def test_fp16_resume_continues_the_grad_scaler_state(tmp_path):
    """optimizer.pt holds the GradScaler's state, and a resume restores it. The growth tracker counts the steps
    since the scale last changed: restored, it goes on from the saved count (or the scale went down after an
    overflow); a fresh scaler would start again at 2**16 with the tracker at 0."""
    if ON_CPU:
        pytest.skip("no GradScaler on the CPU: fp16 autocast there runs unscaled")
    import torch

    run_dir, _ = run(tmp_path, "--mixed_precision", "fp16", "--train_num_steps", str(STEPS))
    _, out = run(tmp_path, "--resume", str(run_dir), "--train_num_steps", str(STEPS + HALF))
    assert f"from {checkpoint(run_dir, STEPS).name} (step {STEPS})" in out
    saved, after = (torch.load(checkpoint(run_dir, s) / "optimizer.pt", weights_only=True)["scaler"]
                    for s in (STEPS, STEPS + HALF))
    assert after["scale"] < saved["scale"] or (
        after["scale"] == saved["scale"] and after["_growth_tracker"] == saved["_growth_tracker"] + HALF), (
        f"scaler at step {STEPS}: {saved}; after resuming to {STEPS + HALF}: {after}")
    assert_finite_loss(run_dir)


def test_resume_is_bit_exact(tmp_path):
    straight, _ = run(tmp_path, "--train_num_steps", str(STEPS), run_name="straight")
    resumed, _ = run(tmp_path, "--train_num_steps", str(HALF), run_name="resumed")
    run(tmp_path, "--resume", str(resumed), "--train_num_steps", str(STEPS))
    assert_resume_is_bit_exact(straight, resumed)


# ----------------------------------------------------------------------------------------------
# Sharded launches
#
# That the diffusion schedule stays fp32 inside DeepSpeed's bf16 engine is device-independent and tested on
# the CPU (tests/test_deepspeed.py, with an engine that casts every buffer as older DeepSpeed versions do).

@pytest.mark.parametrize("config,marker,needs", [
    ("fsdp.yaml", "FSDP2 over", None),
    ("deepspeed_zero2.yaml", "DeepSpeed ZeRO-2", "deepspeed"),
])
def test_sharded_launch_resumes_bit_exactly_and_one_plain_process_continues_it(tmp_path, config, marker, needs):
    """Train STEPS straight, and HALF then resumed (sharded again) to STEPS: the same weights. A checkpoint holds the
    full state in every mode, so one plain process continues the sharded run."""
    if needs:
        pytest.importorskip(needs, reason=f"{config} needs {needs}, which is not installed")
    results = ["--results_path", str(tmp_path)]
    out = launch(config, *results, "--run_name", "straight", "--train_num_steps", str(STEPS))
    assert marker in out
    launch(config, *results, "--run_name", "resumed", "--train_num_steps", str(HALF))
    launch(config, *results, "--resume", str(tmp_path / "resumed"), "--train_num_steps", str(STEPS))
    straight = tmp_path / "straight"
    assert_finite_loss(straight)
    assert_resume_is_bit_exact(straight, tmp_path / "resumed")

    _, out = run(tmp_path, "--resume", str(straight), "--train_num_steps", str(STEPS + HALF))
    assert "one process" in out and checkpoint(straight, STEPS + HALF).is_dir()
    assert_finite_loss(straight)
