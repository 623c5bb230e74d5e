"""Shared fixtures: offline environment, a fresh Accelerate state per test, tiny training runs."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

REPO = Path(__file__).resolve().parent.parent

# A model and process small enough that a step takes milliseconds on one CPU core.
TINY = ["--dataset", "two_modes", "--channels", "1", "--image_size", "8", "--dim", "8", "--dim_mults", "1", "2",
        "--attn_heads", "1", "--attn_dim_head", "8", "--timesteps", "30", "--sampling_timesteps", "4",
        "--batch_size", "4", "--num_samples", "2", "--log_every", "2", "--report_to", "none",
        "--ema_update_after_step", "2", "--ema_update_every", "1", "--lr", "1e-3", "--preset", "tiny"]


@contextlib.contextmanager
def single_thread():
    """One intra-op thread: tensors in tests are tiny, and two threads fight over a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    with single_thread():
        yield


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; each in-process run needs them reset."""
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def train(results: Path, *extra: str, run_name: str = "run") -> Path:
    """Run trainer/train.py in this process on the tiny config. Returns the run folder."""
    from trainer.train import build_parser, run

    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    args = [*TINY, "--results_path", str(results), "--run_name", run_name, *extra]
    return run(vars(build_parser().parse_args(args)))


def script(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a command from the repository root, as a user types it."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env = {k: v for k, v in full_env.items() if v is not None}  # None removes a variable
    return subprocess.run(list(args), cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def python(*args: str, **kw) -> subprocess.CompletedProcess:
    return script(sys.executable, *args, **kw)


def config_launch(config: str, *args: str, launcher_flags: tuple[str, ...] = (),
                  env: dict | None = None) -> subprocess.CompletedProcess:
    """trainer/train.py on the tiny config in two CPU processes launched with accelerate_configs/CONFIG,
    as a user launches it on GPUs."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", f"accelerate_configs/{config}",
                "--num_processes", "2", "--main_process_port", "0", *launcher_flags]
    return script(*launcher, "trainer/train.py", *TINY, *args, env={"ACCELERATE_USE_CPU": "true", **(env or {})})


def accelerate_launch(*args: str, num_processes: int = 2, **kw) -> subprocess.CompletedProcess:
    """Two CPU processes that form one gloo world (the launch recipe from the README)."""
    env = {"ACCELERATE_USE_CPU": "true", **kw.pop("env", {})}
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                str(num_processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", "0"]
    return script(*launcher, *args, env=env, **kw)
