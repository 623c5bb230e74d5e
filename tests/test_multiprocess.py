"""Two real processes on the CPU through `accelerate launch` (gloo): replicas, resume, preemption."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import REPO, TINY, accelerate_launch
from trainer.checkpoint import list_checkpoints

pytestmark = pytest.mark.slow


def launch_ok(*args: str, **kw) -> subprocess.CompletedProcess:
    result = accelerate_launch("trainer/train.py", *TINY, *args, **kw)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_two_processes_train_one_run_with_identical_replicas(tmp_path):
    launch_ok("--results_path", str(tmp_path), "--run_name", "r", "--train_num_steps", "6",
              "--save_and_sample_every", "3", "--num_samples", "3", "--report_to", "wandb")
    assert [p.name for p in tmp_path.iterdir()] == ["r"]
    run_dir = tmp_path / "r"
    replicas = json.loads((run_dir / "replicas.json").read_text())
    assert len(replicas["digests"]) == 2 and replicas["identical"]
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-00000003", "step-00000006"]
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1
    state = json.loads((list_checkpoints(run_dir)[-1] / "state.json").read_text())
    assert state["world_size"] == 2 and state["images_seen"] == 6 * 2 * 4



def _start_long_run(results: Path) -> subprocess.Popen:
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           "trainer/train.py", *TINY, "--results_path", str(results), "--run_name", "r",
           "--train_num_steps", "100000", "--save_and_sample_every", "100000"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (results / "r" / "metrics.jsonl").is_file() or not (results / "r" / "metrics.jsonl").read_text():
        assert proc.poll() is None and time.time() < deadline, "training did not start"
        time.sleep(0.2)
    return proc


@pytest.mark.parametrize("target,sig", [("workers", signal.SIGTERM), ("workers", signal.SIGUSR1),
                                        ("launcher", signal.SIGTERM)])
def test_a_preemption_signal_makes_both_ranks_save_and_exit(tmp_path, target, sig):
    """A scheduler's SIGTERM or SIGUSR1 (to the workers, or SIGTERM to `accelerate launch`, which
    forwards it) makes both ranks save at once."""
    proc = _start_long_run(tmp_path)
    workers = psutil.Process(proc.pid).children(recursive=True)
    signalled = time.time()
    if target == "workers":
        for w in workers:
            w.send_signal(sig)
    else:
        proc.send_signal(sig)
    out, _ = proc.communicate(timeout=60)
    assert time.time() - signalled < 30, "must finish within the launcher's grace period"
    assert out.count("stop requested (signal): saved at step") == 1, out[-3000:]
    assert "trainer/train.py\", line" not in out and "[rank0]: Traceback" not in out, out[-3000:]
    if target == "workers":  # the launcher itself was not signalled: the job ends successfully
        assert proc.returncode == 0, out[-3000:]
    ckpts = list_checkpoints(tmp_path / "r")
    assert len(ckpts) == 1
    state = json.loads((ckpts[0] / "state.json").read_text())
    assert state["step"] >= 1 and state["world_size"] == 2


def test_launch_sh_turns_a_preemption_signal_into_a_clean_save_and_exit_0(tmp_path):
    """SIGTERM to `./launch.sh` reaches both training processes, which save; the job exits 0."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "PYTHONUNBUFFERED": "1",
           "ACCELERATE_CONFIG": "accelerate_configs/cpu_2proc.yaml"}
    proc = subprocess.Popen(["./launch.sh", *TINY, "--results_path", str(tmp_path), "--run_name", "r",
                             "--train_num_steps", "100000", "--save_and_sample_every", "100000"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "r" / "metrics.jsonl").is_file() or not (tmp_path / "r" / "metrics.jsonl").read_text():
        assert proc.poll() is None and time.time() < deadline, "training did not start"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-3000:]
    assert out.count("stop requested (signal): saved at step") == 1
    assert len(list_checkpoints(tmp_path / "r")) == 1

