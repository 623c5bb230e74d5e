"""Two "machines" on this one: two `accelerate launch` processes, one CPU process each, that form one
world over 127.0.0.1 as `scripts/slurm.sbatch` starts one launch per node. They train and checkpoint
as one run; killed hard (a node lost, no notice) and relaunched with `--resume auto`, the run ends bit
for bit where an uninterrupted two-machine run ends.

Rendezvous: c10d, as on SLURM. On one host both launches find 127.0.0.1 to be their own address, so
both would try to host c10d's store; when the machine-rank-1 launch gets there first, the rank-0
launch then refuses the port as "in use" (seen here). `--rdzv_conf is_host=1|0` names the host, as
the script does from Slurm's node names. (`--rdzv_backend static` also works here, and honours
--machine_rank; c10d ignores it and numbers the ranks in order of arrival.)
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import REPO, TINY
from test_train import assert_same, final_weights
from trainer.checkpoint import list_checkpoints

pytestmark = pytest.mark.slow

STEPS, SAVE_EVERY = 30, 5
RUN = ["--run_name", "r", "--resume", "auto", "--train_num_steps", str(STEPS),
       "--save_and_sample_every", str(SAVE_EVERY)]
TIMEOUT = 240  # seconds for any one wait: a launch pair, or the first checkpoint


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TwoMachines:
    """Both launches of one two-machine job, started together; a context manager that leaves no
    process behind. Each launch is its own process group, and torch's launcher starts every worker in
    a session of its own, so a launch's group alone does not hold its workers: they are tracked too."""

    def __init__(self, results: Path, *args: str, logs: Path):
        self.results, self.logs = results, logs
        logs.mkdir(parents=True, exist_ok=True)
        port = free_port()
        env = {**os.environ, "ACCELERATE_USE_CPU": "true", "PYTHONUNBUFFERED": "1"}
        self.launchers: list[subprocess.Popen] = []
        self.seen: dict[int, psutil.Process] = {}
        for rank in (0, 1):
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
                   "--machine_rank", str(rank), "--num_processes", "2", "--main_process_ip", "127.0.0.1",
                   "--main_process_port", str(port), "--rdzv_backend", "c10d", "--rdzv_conf", f"is_host={1 - rank}",
                   "--mixed_precision", "no", "--dynamo_backend", "no",
                   "trainer/train.py", *TINY, "--results_path", str(results), *args]
            with open(logs / f"machine{rank}.log", "w") as out:
                self.launchers.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                                       start_new_session=True))

    def __enter__(self) -> TwoMachines:
        return self

    def __exit__(self, *exc) -> None:
        self.kill()

    def output(self, rank: int) -> str:
        return (self.logs / f"machine{rank}.log").read_text()

    def tails(self) -> str:
        return "\n".join(f"--- machine {r}:\n{self.output(r)[-2500:]}" for r in (0, 1))

    def track(self) -> None:
        """Remember every process of the job while its launchers still know them."""
        for launcher in self.launchers:
            try:
                for p in [psutil.Process(launcher.pid), *psutil.Process(launcher.pid).children(recursive=True)]:
                    self.seen.setdefault(p.pid, p)
            except psutil.NoSuchProcess:
                pass

    def wait(self, timeout: float = TIMEOUT) -> list[int]:
        deadline = time.time() + timeout
        while any(p.poll() is None for p in self.launchers):
            assert time.time() < deadline, f"the launches did not end within {timeout} s\n{self.tails()}"
            self.track()
            time.sleep(0.2)
        return [p.returncode for p in self.launchers]

    def wait_for(self, condition, what: str, timeout: float = TIMEOUT) -> None:
        deadline = time.time() + timeout
        while not condition():
            assert all(p.poll() is None for p in self.launchers), f"a launch ended before {what}\n{self.tails()}"
            assert time.time() < deadline, f"no {what} within {timeout} s\n{self.tails()}"
            self.track()
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL to the process group of every launch and every worker at once: a node lost."""
        self.track()
        own = os.getpgrp()
        for p in self.seen.values():
            try:
                if p.is_running() and (pgid := os.getpgid(p.pid)) == p.pid and pgid != own:
                    os.killpg(pgid, signal.SIGKILL)
                p.kill()
            except (psutil.NoSuchProcess, ProcessLookupError, PermissionError):
                pass
        # A worker born after the last look has no launcher left to find it by; its command line
        # holds this job's unique results folder.
        for p in psutil.process_iter(["cmdline"]):
            if p.pid != os.getpid() and str(self.results) in " ".join(p.info["cmdline"] or []):
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
        for launcher in self.launchers:
            launcher.wait(timeout=30)
        psutil.wait_procs(list(self.seen.values()), timeout=30)


def alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def committed_step(run_dir: Path) -> int:
    ckpts = list_checkpoints(run_dir)
    return json.loads((ckpts[-1] / "state.json").read_text())["step"] if ckpts else 0


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> tuple[Path, TwoMachines]:
    """An uninterrupted two-machine run of STEPS steps."""
    results = tmp_path_factory.mktemp("straight")
    with TwoMachines(results, *RUN, logs=results / "logs") as job:
        assert job.wait() == [0, 0], job.tails()
    return results / "r", job


def test_two_machines_form_one_world_that_trains_and_checkpoints(straight):
    run_dir, job = straight
    assert [p.name for p in run_dir.parent.iterdir() if p.name != "logs"] == ["r"]
    for rank in (0, 1):  # each machine's first process prints the world it joined
        assert "x 2 process(es)" in job.output(rank), job.tails()
    replicas = json.loads((run_dir / "replicas.json").read_text())
    assert replicas["step"] == STEPS and len(replicas["digests"]) == 2 and replicas["identical"]
    assert len(set(replicas["digests"])) == 1
    ckpts = list_checkpoints(run_dir)
    assert len(ckpts) >= 2 and ckpts[-1].name == f"step-{STEPS:08d}"
    state = json.loads((ckpts[-1] / "state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == STEPS and state["images_seen"] == STEPS * 2 * 4


def test_a_run_killed_on_both_machines_resumes_bit_for_bit(straight, tmp_path):
    run_dir = tmp_path / "r"
    with TwoMachines(tmp_path, *RUN, logs=tmp_path / "logs1") as job:
        job.wait_for(lambda: list_checkpoints(run_dir), "first checkpoint")
        job.kill()
        assert [p.returncode for p in job.launchers] == [-signal.SIGKILL] * 2
    killed_at = committed_step(run_dir)
    assert SAVE_EVERY <= killed_at < STEPS, "the kill must land before the run ends"
    assert not [p for p in job.seen.values() if alive(p)], "a process of the killed job survived"

    with TwoMachines(tmp_path, *RUN, logs=tmp_path / "logs2") as job:  # the same command: a requeue
        assert job.wait() == [0, 0], job.tails()
    assert "resuming" in job.output(0) + job.output(1), job.tails()
    state = json.loads((list_checkpoints(run_dir)[-1] / "state.json").read_text())
    assert state["step"] == STEPS and state["world_size"] == 2 and state["images_seen"] == STEPS * 2 * 4
    assert_same(final_weights(straight[0]), final_weights(run_dir))
