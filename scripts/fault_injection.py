"""Kill training with SIGKILL at random moments, resume after each kill, and prove nothing was lost.

    python scripts/fault_injection.py --kills 50

Runs one uninterrupted reference run, then the same run killed `--kills` times at random points
(during start-up, training steps, sampling or a save) and restarted each time with `--resume auto`,
as `accelerate launch --max_restarts` or a cluster requeue would. Prints, and returns as a Report:
kills survived, steps lost per kill (steps trained since the last committed checkpoint), checkpoints
found damaged after a kill (must be 0), and whether the final model, EMA, optimizer and data
position equal the reference bit for bit. tests/test_faults.py runs the same at a smaller count.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import psutil  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from trainer.checkpoint import list_checkpoints, verify  # noqa: E402
from trainer.errors import CheckpointError  # noqa: E402

# Small enough that a step takes milliseconds; enough steps and saves that kills land everywhere.
RUN = ["--dataset", "two_modes", "--channels", "1", "--image_size", "8", "--dim", "8", "--dim_mults", "1", "2",
       "--attn_heads", "1", "--attn_dim_head", "8", "--timesteps", "30", "--sampling_timesteps", "4",
       "--batch_size", "4", "--grad_accum", "2", "--num_samples", "2", "--log_every", "1", "--report_to", "none",
       "--ema_update_after_step", "2", "--ema_update_every", "1", "--lr", "1e-3", "--dropout", "0.1",
       "--preset", "tiny"]


@dataclass
class Report:
    kills: int = 0
    restarts: int = 0
    steps_lost: list[int] = field(default_factory=list)
    checkpoints_damaged: int = 0
    identical: bool = False
    differences: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def table(self) -> str:
        lost = self.steps_lost or [0]
        rows = [("kills (SIGKILL) survived", f"{self.kills}"),
                ("restarts", f"{self.restarts}"),
                ("steps lost per kill: mean / max", f"{statistics.mean(lost):.1f} / {max(lost)}"),
                ("checkpoints damaged after a kill", f"{self.checkpoints_damaged}"),
                ("final state equals the uninterrupted run bit for bit", "yes" if self.identical else "NO"),
                ("wall time", f"{self.seconds:.0f} s")]
        width = max(len(r[0]) for r in rows)
        return "\n".join(["| what | figure |", "|---|---|"] + [f"| {k:<{width}} | {v} |" for k, v in rows])


def train_command(results: Path, steps: int, save_every: int, *extra: str, processes: int = 1) -> list[str]:
    """The training command: one process, or `processes` CPU processes through accelerate launch."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", "0"] if processes > 1 else [sys.executable]
    return [*launch, str(REPO / "trainer" / "train.py"), *RUN, "--results_path", str(results),
            "--run_name", "run", "--train_num_steps", str(steps), "--save_and_sample_every", str(save_every), *extra]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
            "WANDB_MODE": "offline", "ACCELERATE_USE_CPU": "true", **extra}


def final_state(run_dir: Path) -> dict:
    last = list_checkpoints(run_dir)[-1]
    state = json.loads((last / "state.json").read_text())
    return {"model": load_file(str(last / "model.safetensors")), "ema": load_file(str(last / "ema.safetensors")),
            "optimizer": torch.load(last / "optimizer.pt", weights_only=True),
            "counters": {k: state[k] for k in ("step", "images_seen", "data_epoch", "data_offset", "ema_step")}}


def differences(a, b, path: str = "") -> list[str]:
    """Paths at which two nested structures of tensors and numbers differ (empty: bit-identical)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{path}: keys differ"]
        return [d for k in a for d in differences(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path}: lengths differ"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return [] if a.dtype == b.dtype and torch.equal(a, b) else [path]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def _logged_lines(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.is_file() else 0


def _committed_step(run_dir: Path) -> int:
    ckpts = list_checkpoints(run_dir)
    return int(ckpts[-1].name.split("-")[1]) if ckpts else 0


def _training_workers(launcher: subprocess.Popen) -> list[psutil.Process]:
    """The launcher's training processes (not its helpers, such as multiprocessing's resource tracker)."""
    found = []
    for p in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if any(arg.endswith("train.py") for arg in p.cmdline()):
                found.append(p)
        except psutil.Error:  # gone meanwhile
            pass
    return found


def run_reference(results: Path, steps: int, save_every: int, processes: int = 1) -> Path:
    """The uninterrupted run. Returns its folder."""
    proc = subprocess.run(train_command(results, steps, save_every, processes=processes), env=_env(), cwd=REPO,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"reference run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return results / "run"


def chaos(results: Path, reference: Path, *, kills: int, steps: int, save_every: int, seed: int = 0,
          processes: int = 1) -> Report:
    """Kill the run `kills` times, restarting it with --resume auto after each. With several
    processes one worker, drawn at random, is killed; the launcher then ends the others.

    Each kill strikes either during start-up (one in ten) or after the restarted process has trained
    a number of steps drawn uniformly from what is left, plus a random few milliseconds, so kills land
    in steps, sampling and saves alike, whatever the speed of the machine."""
    rng = random.Random(seed)
    report = Report()
    start = time.perf_counter()
    run_dir = results / "run"
    cmd = train_command(results, steps, save_every, "--resume", "auto", processes=processes)
    life_log = results / "life.log"  # the output of the current life, for the error below
    results.mkdir(parents=True, exist_ok=True)
    while True:
        lines_before, committed_before = _logged_lines(run_dir), _committed_step(run_dir)
        with open(life_log, "w") as out:
            proc = subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # its own process group, for killpg below
        if report.kills < kills:
            if rng.random() < 0.1:
                time.sleep(rng.uniform(0.0, 3.0))
            else:
                # Strike after this life has trained k steps (one metrics line each), k drawn from
                # what is left, keeping a few steps in hand so the run cannot finish first.
                k = rng.randint(1, max(1, steps - committed_before - 5))
                while proc.poll() is None and _logged_lines(run_dir) - lines_before < k:
                    time.sleep(0.002)
                time.sleep(rng.uniform(0.0, 0.05))
            workers = _training_workers(proc) if processes > 1 else []
            if proc.poll() is None:
                if workers:
                    try:
                        rng.choice(workers).kill()
                    except psutil.NoSuchProcess:
                        pass
                else:  # one process, or a launch still starting: the whole job dies, as with a lost node
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                report.kills += 1
                # Steps this life trained (one metrics line each) minus the steps it got committed.
                done = _logged_lines(run_dir) - lines_before
                report.steps_lost.append(max(0, done - (_committed_step(run_dir) - committed_before)))
                for ckpt in list_checkpoints(run_dir):
                    try:
                        verify(ckpt)
                    except CheckpointError:
                        report.checkpoints_damaged += 1
                report.restarts += 1
                continue
        if proc.wait() != 0:
            raise RuntimeError(f"a restarted run failed with exit status {proc.returncode} after {report.kills} "
                               f"kills:\n{life_log.read_text()[-3000:]}")
        break
    report.differences = differences(final_state(reference), final_state(run_dir))
    report.identical = not report.differences
    report.seconds = time.perf_counter() - start
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=50, help="SIGKILLs to survive (default 50)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of the run (default 300)")
    parser.add_argument("--save_every", type=int, default=10, help="steps between checkpoints (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    parser.add_argument("--workdir", default=None, help="where runs go (default: a temporary folder)")
    parser.add_argument("--processes", type=int, default=1,
                        help="CPU processes per run, through accelerate launch (default 1)")
    args = parser.parse_args()

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        print(f"reference run: {args.steps} steps ...", flush=True)
        reference = run_reference(work / "reference", args.steps, args.save_every, args.processes)
        print(f"chaos run: {args.kills} kills at random moments ...", flush=True)
        report = chaos(work / "chaos", reference, kills=args.kills, steps=args.steps, save_every=args.save_every,
                       seed=args.seed, processes=args.processes)
    print(report.table())
    for d in report.differences[:10]:
        print("differs:", d)
    return 0 if report.identical and report.checkpoints_damaged == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
