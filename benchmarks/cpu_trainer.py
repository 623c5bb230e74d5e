"""Eddy's whole training process against lucidrains' `Trainer`, on the CPU, at one tiny config.

A benchmark, not a test: it prints numbers and asserts nothing. It needs its own environment, kept
apart from `.venv` and from CI (the peer pulls torchvision; the issue pins torch 2.14.1 for both):

    python3 -m venv .venv-bench && .venv-bench/bin/pip install torch==2.14.1 torchvision==0.29.1 \\
        denoising-diffusion-pytorch && .venv-bench/bin/pip install -e .

What it does:

1. A folder of --n_images 16x16 RGB PNGs (default 10,000): coloured circles, boxes and triangles on
   a two-colour gradient with a little noise, drawn from --seed. Written once into --folder
   (default: a folder named by N and the seed in the system's temp dir) and reused while it exists.
2. --rounds rounds, each of one Eddy run and one lucidrains run (alternating: E, P, E, P, ...),
   each a fresh subprocess of --python on the same folder, timed by the wall clock from process
   start to exit:
   (a) Eddy: `trainer/train.py --train_data_dir FOLDER` with the flags in `eddy_command` below;
   (b) lucidrains: this file's `peer` subcommand, which builds `denoising_diffusion_pytorch.Unet`,
       `GaussianDiffusion` and `Trainer(FOLDER, ...)`, calls `train()`, then `save("final")`.
   Both get OMP_NUM_THREADS = MKL_NUM_THREADS = --threads, HF_DATASETS_OFFLINE=1, HF_HUB_OFFLINE=1,
   WANDB_MODE=offline and PYTHONUNBUFFERED=1, and run in a fresh temp folder. Each Eddy run gets an
   empty HF_DATASETS_CACHE and EDDY_CACHE (--caches fresh, the default), so every run starts on the
   folder as a first run does; with --caches shared the runs after the first find what the first
   cached (Eddy's record of the folder's unreadable files, `datasets`' Arrow files).
   The machine is shared: before each run the script waits (at most --quiet_wait seconds) until
   under --quiet_below of its cores are busy, and each run reports the share of the cores that
   other processes kept busy while it ran ("others' CPU"). A run beside other work is slower, so
   one where they used more than --max_others is "disturbed": kept in the JSON, left out of the
   medians, and run again (at most --retries times per round and program).
3. Per run: wall seconds, samples/s = steps x 16 / wall, CPU seconds of the process and its
   children, and where the time went:
   - start-up: process start to the first step (Eddy: its `device:` line, printed after data,
     model and optimizer are built; the peer: the end of `Trainer.__init__`);
   - steps: the training loop (Eddy: to the last write of metrics.jsonl, at the last step; the
     peer: to the EMA update of its last step);
   - final save: the checkpoint after the last step (Eddy: with its replica check; from the last
     metrics write to its `done:` line);
   - exit: the rest (Eddy: loss plot, summary, process-group teardown; both: interpreter exit).
   The steps-only rate is the median over windows of --log_every steps: Eddy's `samples_per_s` in
   results/<run>/metrics.jsonl, and the same windows of the peer's per-step times.
4. Medians over the rounds, min and max, and the ratios Eddy / lucidrains; a markdown table last;
   --json writes every run and the summary (rewritten after every run).

The two configs, matched to the peer's defaults where Eddy's tiny preset differs:

| | Eddy flag | lucidrains |
|---|---|---|
| network | `--dim 32 --dim_mults 1 2 2 --attn_heads 4 --attn_dim_head 32` (1.407M) | `Unet(dim=32, dim_mults=(1, 2, 2))` (1.413M) |
| diffusion | `--timesteps 1000 --objective pred_v --beta_schedule sigmoid` | `GaussianDiffusion(image_size=16, timesteps=1000, objective="pred_v", beta_schedule="sigmoid")` |
| data | `--image_size 16 --batch_size 16 --random_flip true`, decoded in the main process (0 workers on CPU) | `Trainer(train_batch_size=16, augment_horizontal_flip=True)`, 2 DataLoader workers (its `cpu_count()`) |
| optimizer | `--lr 1e-4 --lr_warmup_steps 0 --adam_betas 0.9 0.99 --max_grad_norm 1` (AdamW, weight decay 0) | `train_lr=1e-4, adam_betas=(0.9, 0.99), max_grad_norm=1.0` (Adam) |
| EMA | `--ema_decay 0.995 --ema_update_every 10 --ema_update_after_step 100` | `ema_decay=0.995, ema_update_every=10` (ema-pytorch's update_after_step 100) |
| saving | `--save_and_sample_every S+1 --num_samples 0`: one checkpoint at the last step, no samples | `save_and_sample_every=S+1`, then `save("final")`: one checkpoint, no samples |
| precision | `--mixed_precision no` (`bf16` with --precision bf16) | `amp=False` (`amp=True, mixed_precision_type="bf16"`) |
| other | `--report_to none --preset tiny` | `calculate_fid=False`, no tracker |

--eddy_flags appends flags to Eddy's command line (the last value of a flag wins). --eddy_ref REF
runs the committed tree REF (exported with `git archive` into a temp folder) instead of the working
tree, so the measurement holds still while others edit it.

    .venv-bench/bin/python benchmarks/cpu_trainer.py --json cpu_trainer.json      # 6 runs of about 50 s, when quiet
    .venv-bench/bin/python benchmarks/cpu_trainer.py --eddy_ref HEAD --steps 200 --rounds 3
    .venv-bench/bin/python benchmarks/cpu_trainer.py --n_images 200 --steps 20 --rounds 1   # checks the script
    .venv-bench/bin/python benchmarks/cpu_trainer.py --skip_peer --eddy_flags "--num_workers 2"
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
IMAGE_SIZE, BATCH, DIM, DIM_MULTS, TIMESTEPS, OBJECTIVE, SCHEDULE = 16, 16, 32, (1, 2, 2), 1000, "pred_v", "sigmoid"
LR, ADAM_BETAS, MAX_GRAD_NORM, EMA_DECAY, EMA_EVERY, EMA_AFTER = 1e-4, (0.9, 0.99), 1.0, 0.995, 10, 100
PEER_MARK = "cpu_trainer-peer: "  # the peer driver's one line of results on stdout


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="benchmarks/cpu_trainer.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Eddy's whole training process (trainer/train.py) against lucidrains' Trainer on a "
                    "folder of 16x16 PNGs, alternating runs; medians and the ratio.",
        epilog="`cpu_trainer.py peer --help` describes the lucidrains driver that each peer run starts.")
    p.add_argument("--n_images", type=int, default=10_000, help="PNGs in the data folder.")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps of every run (S).")
    p.add_argument("--rounds", type=int, default=3, help="rounds of one Eddy run and one peer run.")
    p.add_argument("--folder", type=Path, default=None,
                   help="data folder: used as it is when it holds PNGs, else written "
                        "(default: eddy-cpu-trainer-N-seedK in the system's temp dir).")
    p.add_argument("--json", type=Path, default=None, help="write the runs and the summary here as JSON.")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                   help="both programs: fp32, or bf16 autocast (Eddy --mixed_precision bf16; lucidrains amp=True, "
                        "mixed_precision_type='bf16'); bf16 pays on CPUs with AMX.")
    p.add_argument("--eddy_flags", default="", help='extra flags for Eddy, e.g. "--channels_last true".')
    p.add_argument("--eddy_ref", default=None,
                   help="a git commit or branch of this repository to run instead of the working tree.")
    p.add_argument("--skip_peer", action="store_true", help="run Eddy only.")
    p.add_argument("--python", default=sys.executable, help="the interpreter of both programs.")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="OMP_NUM_THREADS and MKL_NUM_THREADS of both programs.")
    p.add_argument("--caches", default="fresh", choices=("fresh", "shared"),
                   help="HF_DATASETS_CACHE and EDDY_CACHE of each Eddy run: empty (fresh) or one pair for all "
                        "runs (shared).")
    p.add_argument("--log_every", type=int, default=25, help="steps per window of the steps-only rate.")
    p.add_argument("--seed", type=int, default=0, help="seed of the images and of both runs.")
    p.add_argument("--timeout", type=float, default=1800, help="seconds before a run is killed.")
    p.add_argument("--quiet_below", type=float, default=0.15,
                   help="before each run, wait until under this share of all cores is busy (other users' work).")
    p.add_argument("--quiet_wait", type=float, default=600,
                   help="seconds to wait for that at most before running anyway (0: do not wait).")
    p.add_argument("--max_others", type=float, default=0.10,
                   help="a run during which other processes kept more than this share of the cores busy is "
                        "disturbed: left out of the medians (kept in the JSON) and run again.")
    p.add_argument("--retries", type=int, default=3, help="reruns of a disturbed run, per round and program.")
    p.add_argument("--keep", action="store_true", help="keep every run's folder (logs, checkpoints).")
    args = p.parse_args(argv)
    if args.n_images < 100:
        p.error("--n_images must be at least 100: the peer's Trainer refuses smaller folders.")
    if args.steps < 1 or args.rounds < 1 or args.log_every < 1:
        p.error("--steps, --rounds and --log_every must be at least 1.")
    return args


# ----------------------------------------------------------------------------------------------
# The data folder


def draw_image(rng, size: int = IMAGE_SIZE, scale: int = 4):
    """One RGB image: a gradient between two colours, 1 to 3 shapes, light noise. Drawn at
    `scale` times the size and reduced, so the edges are smooth."""
    import numpy as np
    from PIL import Image, ImageDraw

    big = size * scale
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    ramp = np.linspace(0.0, 1.0, big)[:, None, None]
    if rng.random() < 0.5:
        ramp = ramp.transpose(1, 0, 2)
    background = (c0 * (1 - ramp) + c1 * ramp).astype(np.uint8) * np.ones((big, big, 1), np.uint8)
    image = Image.fromarray(background, "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(1, 4)):
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        cx, cy = rng.integers(0, big, 2)
        r = int(rng.integers(big // 8, big // 3))
        kind = rng.integers(0, 3)
        if kind == 0:
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
        elif kind == 1:
            draw.rectangle((cx - r, cy - r // 2, cx + r, cy + r // 2), fill=colour)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    small = np.asarray(image.resize((size, size), Image.Resampling.BOX), dtype=np.int16)
    noisy = small + rng.integers(-8, 9, small.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


def ensure_folder(folder: Path, n: int, seed: int) -> int:
    """The number of PNGs in `folder`, after writing `n` of them if it holds none. Written into a
    sibling folder and renamed into place, so a folder that exists is complete."""
    import numpy as np

    if folder.is_dir():
        found = sum(1 for _ in folder.rglob("*.png"))
        if found:
            return found
    tmp = folder.with_name(folder.name + f".partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    start = time.perf_counter()
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        draw_image(rng).save(tmp / f"img_{i:05d}.png")
    if folder.exists():
        folder.rmdir()  # an empty folder given by --folder
    tmp.rename(folder)
    print(f"data: wrote {n} PNGs of {IMAGE_SIZE}x{IMAGE_SIZE} into {folder} in {time.perf_counter() - start:.1f} s",
          flush=True)
    return n


# ----------------------------------------------------------------------------------------------
# Running one program: wall clock, CPU time, and when each line of its output arrived


def cpu_ticks() -> tuple[int, int]:
    """(busy, all) clock ticks of every core since boot, from /proc/stat; (0, 0) where it is missing."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, idle, iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    except (OSError, ValueError):
        return 0, 0
    busy = user + nice + system + irq + softirq + steal
    return busy, busy + idle + iowait


def busy_share(seconds: float) -> float:
    """The share of all cores busy over the next `seconds`, whoever keeps them busy."""
    b0, a0 = cpu_ticks()
    time.sleep(seconds)
    b1, a1 = cpu_ticks()
    return (b1 - b0) / max(a1 - a0, 1)


def wait_until_quiet(below: float, patience: float) -> tuple[float, float]:
    """Wait until under `below` of the machine is busy (over 3 s), at most `patience` seconds.
    Returns (the last busy share seen, seconds waited)."""
    start = time.time()
    share = busy_share(3)
    while share >= below and time.time() - start < patience:
        print(f"  the machine is {100 * share:.0f}% busy; waiting for it to be under {100 * below:.0f}%", flush=True)
        time.sleep(12)
        share = busy_share(3)
    return share, time.time() - start


def run_timed(cmd: list[str], env: dict[str, str], cwd: Path, log: Path, timeout: float) -> dict[str, Any]:
    """Run `cmd`; stdout and stderr merged, split at newlines and carriage returns (progress bars),
    each piece stamped with time.time() as it arrives and written to `log`. CPU seconds are those of
    the process and every child it waited for (DataLoader workers); `others_cpu_share` is the share
    of all cores that other processes kept busy meanwhile."""
    lines: list[tuple[float, str]] = []

    def read(stream) -> None:
        pending = b""
        with open(log, "w") as out:
            while chunk := stream.read1(65536):
                now = time.time()
                *done, pending = re.split(rb"[\r\n]", pending + chunk)
                for raw in done:
                    if raw.strip():
                        lines.append((now, raw.decode(errors="replace")))
                        out.write(f"{now - t0:9.3f} {lines[-1][1]}\n")
            if pending.strip():
                lines.append((time.time(), pending.decode(errors="replace")))

    before, ticks0 = resource.getrusage(resource.RUSAGE_CHILDREN), cpu_ticks()
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    reader = threading.Thread(target=read, args=(proc.stdout,), daemon=True)
    reader.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    t_end = time.time()
    reader.join(timeout=10)
    after, ticks1 = resource.getrusage(resource.RUSAGE_CHILDREN), cpu_ticks()
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    busy_s = (ticks1[0] - ticks0[0]) / os.sysconf("SC_CLK_TCK")
    cores = os.cpu_count() or 1
    # Whatever else ran meanwhile (other users' work): the machine's busy seconds less the run's own.
    others = max(busy_s - cpu, 0.0)
    return {"t0": t0, "t_end": t_end, "wall_s": t_end - t0, "returncode": proc.returncode, "cpu_s": cpu,
            "others_cpu_share": others / max((t_end - t0) * cores, 1e-9), "lines": list(lines)}


def first_line(lines: list[tuple[float, str]], prefix: str) -> tuple[float, str] | None:
    return next(((t, s) for t, s in lines if s.startswith(prefix)), None)


def tail(lines: list[tuple[float, str]], n: int = 15) -> str:
    return "\n".join(s for _, s in lines[-n:])


def base_env(args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ)
    threads = str(args.threads)
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
               WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    return env


def window_rates(stamps: list[float], start: float, every: int, batch: int) -> list[float]:
    """samples/s of each complete window of `every` steps, from the time each step ended."""
    rates, prev = [], start
    for k in range(every - 1, len(stamps), every):
        rates.append(every * batch / max(stamps[k] - prev, 1e-9))
        prev = stamps[k]
    return rates


# ----------------------------------------------------------------------------------------------
# Eddy


def eddy_command(args: argparse.Namespace, root: Path, folder: Path, results: Path) -> list[str]:
    s = args.steps
    flags = ["--train_data_dir", str(folder), "--preset", "tiny", "--image_size", str(IMAGE_SIZE),
             "--channels", "3", "--dim", str(DIM), "--dim_mults", *map(str, DIM_MULTS), "--attn_heads", "4",
             "--attn_dim_head", "32", "--timesteps", str(TIMESTEPS), "--objective", OBJECTIVE,
             "--beta_schedule", SCHEDULE, "--batch_size", str(BATCH), "--grad_accum", "1",
             "--train_num_steps", str(s), "--lr", str(LR), "--lr_warmup_steps", "0",
             "--adam_betas", *map(str, ADAM_BETAS), "--max_grad_norm", str(MAX_GRAD_NORM),
             "--ema_decay", str(EMA_DECAY), "--ema_update_every", str(EMA_EVERY),
             "--ema_update_after_step", str(EMA_AFTER), "--random_flip", "true",
             "--save_and_sample_every", str(s + 1), "--num_samples", "0", "--log_every", str(args.log_every),
             "--mixed_precision", "no" if args.precision == "fp32" else "bf16", "--report_to", "none",
             "--results_path", str(results),
             "--run_name", "eddy", "--seed", str(args.seed)]
    return [args.python, str(root / "trainer" / "train.py"), *flags, *shlex.split(args.eddy_flags)]


def run_eddy(args: argparse.Namespace, root: Path, folder: Path, work: Path, shared: Path) -> dict[str, Any]:
    env = base_env(args)
    caches = shared if args.caches == "shared" else work / "caches"
    env.update(HF_DATASETS_CACHE=str(caches / "hf_datasets"), EDDY_CACHE=str(caches / "eddy"))
    run_dir = work / "results" / "eddy"
    r = run_timed(eddy_command(args, root, folder, work / "results"), env, work, work / "eddy.log", args.timeout)
    row = {"program": "eddy", "wall_s": r["wall_s"], "cpu_s": r["cpu_s"],
           "others_cpu_share": r["others_cpu_share"], "returncode": r["returncode"],
           "samples_per_s": args.steps * BATCH / r["wall_s"]}
    metrics_file = run_dir / "metrics.jsonl"
    device, done = first_line(r["lines"], "device:"), first_line(r["lines"], "done: step")
    model = first_line(r["lines"], "model:")
    if r["returncode"] != 0 or not (device and done and metrics_file.is_file()):
        row["error"] = f"exit status {r['returncode']}; last output:\n{tail(r['lines'])}"
        return row
    metrics = [json.loads(x) for x in metrics_file.read_text().splitlines() if x.strip()]
    t_last_log = metrics_file.stat().st_mtime
    rates = [m["samples_per_s"] for m in metrics if "samples_per_s" in m]
    full = [m["samples_per_s"] for m, prev in zip(metrics, [{"step": 0}] + metrics)
            if m["step"] - prev["step"] == args.log_every]  # complete windows only
    params = re.search(r"([\d.]+)M parameters", model[1]) if model else None
    row.update(startup_s=device[0] - r["t0"], steps_s=t_last_log - device[0], save_s=done[0] - t_last_log,
               exit_s=r["t_end"] - done[0], window_samples_per_s=full or rates,
               steps_samples_per_s=statistics.median(full or rates),
               loop_samples_per_s=args.steps * BATCH / max(t_last_log - device[0], 1e-9),
               final_loss=metrics[-1].get("loss"), params_m=float(params.group(1)) if params else None,
               checkpoint=bool(list((run_dir / "checkpoints").glob(f"step-*{args.steps}"))))
    return row


# ----------------------------------------------------------------------------------------------
# lucidrains: the driver (the `peer` subcommand, run in its own process) and the run of it


def peer_main(argv: list[str]) -> int:
    """Train lucidrains' Trainer on a folder and print one line of timings as JSON."""
    t_start = time.time()
    p = argparse.ArgumentParser(prog="benchmarks/cpu_trainer.py peer",
                                description="lucidrains' Trainer on --folder for --steps steps, then save('final'); "
                                            "prints one line of timings as JSON.")
    p.add_argument("--folder", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--results", required=True, help="the Trainer's results_folder (its parent must exist).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    a = p.parse_args(argv)

    import torch
    from denoising_diffusion_pytorch import GaussianDiffusion, Trainer, Unet

    t_imported = time.time()
    torch.manual_seed(a.seed)
    net = Unet(dim=DIM, dim_mults=DIM_MULTS, channels=3, flash_attn=False)
    diffusion = GaussianDiffusion(net, image_size=IMAGE_SIZE, timesteps=TIMESTEPS, objective=OBJECTIVE,
                                  beta_schedule=SCHEDULE)
    # save_and_sample_every beyond the last step: no sampling; one checkpoint, written after train().
    trainer = Trainer(diffusion, a.folder, train_batch_size=BATCH, gradient_accumulate_every=1,
                      augment_horizontal_flip=True, train_lr=LR, train_num_steps=a.steps, ema_update_every=EMA_EVERY,
                      ema_decay=EMA_DECAY, adam_betas=ADAM_BETAS, save_and_sample_every=a.steps + 1,
                      results_folder=a.results, amp=a.precision == "bf16", mixed_precision_type="bf16",
                      calculate_fid=False, max_grad_norm=MAX_GRAD_NORM)
    stamps: list[float] = []
    update = trainer.ema.update

    def update_and_stamp() -> None:  # called once per step, after the optimizer step
        update()
        stamps.append(time.time())

    trainer.ema.update = update_and_stamp
    t_train = time.time()
    trainer.train()
    t_trained = time.time()
    trainer.save("final")
    t_saved = time.time()
    print(PEER_MARK + json.dumps({
        "t_start": t_start, "t_imported": t_imported, "t_train": t_train, "t_trained": t_trained, "t_saved": t_saved,
        "stamps": stamps, "params": sum(x.numel() for x in net.parameters()), "dataset_len": len(trainer.ds)}),
        flush=True)
    return 0


def run_peer(args: argparse.Namespace, folder: Path, work: Path) -> dict[str, Any]:
    results = work / "peer_results"
    cmd = [args.python, str(Path(__file__).resolve()), "peer", "--folder", str(folder), "--steps", str(args.steps),
           "--results", str(results), "--seed", str(args.seed), "--precision", args.precision]
    r = run_timed(cmd, base_env(args), work, work / "peer.log", args.timeout)
    row = {"program": "lucidrains", "wall_s": r["wall_s"], "cpu_s": r["cpu_s"],
           "others_cpu_share": r["others_cpu_share"], "returncode": r["returncode"],
           "samples_per_s": args.steps * BATCH / r["wall_s"]}
    found = first_line(r["lines"], PEER_MARK)
    if r["returncode"] != 0 or not found:
        row["error"] = f"exit status {r['returncode']}; last output:\n{tail(r['lines'])}"
        return row
    d = json.loads(found[1][len(PEER_MARK):])
    stamps = d["stamps"]
    rates = window_rates(stamps, d["t_train"], args.log_every, BATCH)
    rates = rates or window_rates(stamps, d["t_train"], len(stamps), BATCH)  # fewer steps than one window
    row.update(startup_s=d["t_train"] - r["t0"], steps_s=stamps[-1] - d["t_train"], save_s=d["t_saved"] - stamps[-1],
               exit_s=r["t_end"] - d["t_saved"], window_samples_per_s=rates,
               steps_samples_per_s=statistics.median(rates),
               loop_samples_per_s=args.steps * BATCH / max(stamps[-1] - d["t_train"], 1e-9),
               python_start_s=d["t_start"] - r["t0"], import_s=d["t_imported"] - d["t_start"],
               params_m=d["params"] / 1e6, dataset_len=d["dataset_len"],
               checkpoint=(results / "model-final.pt").is_file())
    return row


# ----------------------------------------------------------------------------------------------
# Summary and report

FIELDS = ("wall_s", "samples_per_s", "steps_samples_per_s", "startup_s", "steps_s", "save_s", "exit_s", "cpu_s",
          "others_cpu_share")


def summarize(runs: list[dict[str, Any]], max_others: float) -> dict[str, Any]:
    """Per program: median, min and max of each field over its successful runs that other work did not
    disturb (others' share of the cores at most `max_others`); and the ratios."""
    out: dict[str, Any] = {}
    for program in ("eddy", "lucidrains"):
        mine = [r for r in runs if r["program"] == program]
        ok = [r for r in mine if "error" not in r and r["others_cpu_share"] <= max_others]
        if not ok:
            continue
        out[program] = {"runs": len(ok), "disturbed": sum(1 for r in mine if r["others_cpu_share"] > max_others)}
        for f in FIELDS:
            values = [r[f] for r in ok if r.get(f) is not None]
            if values:
                out[program][f] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    if "eddy" in out and "lucidrains" in out:
        e, p = out["eddy"], out["lucidrains"]
        out["ratio"] = {f: e[f]["median"] / p[f]["median"] for f in ("samples_per_s", "steps_samples_per_s")
                        if f in e and f in p}
    return out


def cell(stats: dict[str, Any] | None, spec: str) -> str:
    if not stats:
        return "-"
    return f"{format(stats['median'], spec)} ({format(stats['min'], spec)}-{format(stats['max'], spec)})"


def percent(stats: dict[str, Any] | None) -> dict[str, Any] | None:
    return {k: 100 * v for k, v in stats.items()} if stats else None


def markdown(summary: dict[str, Any], args: argparse.Namespace) -> str:
    counts = ", ".join(f"{summary[p]['runs']} {p} run(s) ({summary[p]['disturbed']} disturbed left out)"
                       for p in ("eddy", "lucidrains") if p in summary)
    lines = [f"Medians (min-max) over {counts}, alternating, {args.rounds} round(s); {args.steps} steps of batch "
             f"{BATCH}, {args.n_images} PNGs of {IMAGE_SIZE}x{IMAGE_SIZE}, {args.threads} threads.", "",
             "| program | wall s | samples/s, whole process | samples/s, steps only | start-up s | steps s | "
             "final save s | exit s | CPU s | others' CPU |", "|---|---|---|---|---|---|---|---|---|---|"]
    for program in ("eddy", "lucidrains"):
        s = summary.get(program)
        if not s:
            continue
        lines.append(f"| {program} | {cell(s.get('wall_s'), '.1f')} | {cell(s.get('samples_per_s'), '.1f')} | "
                     f"{cell(s.get('steps_samples_per_s'), '.1f')} | {cell(s.get('startup_s'), '.1f')} | "
                     f"{cell(s.get('steps_s'), '.1f')} | {cell(s.get('save_s'), '.2f')} | "
                     f"{cell(s.get('exit_s'), '.2f')} | {cell(s.get('cpu_s'), '.0f')} | "
                     f"{cell(percent(s.get('others_cpu_share')), '.0f')}% |")
    ratio = summary.get("ratio")
    if ratio:
        whole, steps = ratio.get("samples_per_s"), ratio.get("steps_samples_per_s")
        lines.append(f"| Eddy / lucidrains | | **{whole:.2f}x** (target 1.5x) | "
                     f"{f'{steps:.2f}x' if steps else '-'} | | | | | | |")
    return "\n".join(lines)


def git_state(ref: str | None) -> dict[str, Any]:
    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", ref or "HEAD")
    return {"commit": commit or None, "tree": f"{ref} (git archive)" if ref else "working tree",
            "dirty": None if ref else bool(git("status", "--porcelain", "--untracked-files=no"))}


def environment(args: argparse.Namespace) -> dict[str, Any]:
    return {"python": platform.python_version(), "interpreter": args.python, "cpu_count": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(), "threads": args.threads, "precision": args.precision,
            **package_versions(args.python), "eddy": git_state(args.eddy_ref)}


def package_versions(python: str) -> dict[str, str | None]:
    """Versions of the packages both programs import, as `python` (the programs' interpreter) sees them."""
    names = ("torch", "torchvision", "denoising-diffusion-pytorch", "accelerate", "ema-pytorch", "datasets")
    code = ("import importlib.metadata as m, json, sys; "
            "print(json.dumps({n: next((d.version for d in m.distributions(name=n)), None) for n in sys.argv[1:]}))")
    done = subprocess.run([python, "-c", code, *names], capture_output=True, text=True)
    return json.loads(done.stdout) if done.returncode == 0 else dict.fromkeys(names)


def export_ref(ref: str, into: Path) -> Path:
    """The committed tree `ref` of this repository, as files under `into`."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def run_once(args: argparse.Namespace, program: str, k: int, root: Path, folder: Path, work: Path) -> dict[str, Any]:
    """One timed run of `program` in the fresh folder `work`, once the machine is quiet."""
    work.mkdir()
    busy, waited = wait_until_quiet(args.quiet_below, args.quiet_wait) if args.quiet_wait > 0 else (None, 0.0)
    print(f"round {k + 1}/{args.rounds}, {program}"
          + (f" (machine {100 * busy:.0f}% busy before it)" if busy is not None else "") + " ...", flush=True)
    row = (run_eddy(args, root, folder, work, work.parent / "shared_caches") if program == "eddy"
           else run_peer(args, folder, work))
    row.update(round=k, busy_before=busy, waited_s=waited)
    print(f"  {describe(row)}", flush=True)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return row


def describe(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"FAILED after {row['wall_s']:.1f} s: {row['error']}"
    return (f"{row['wall_s']:.1f} s, {row['samples_per_s']:.1f} samples/s whole process, "
            f"{row['steps_samples_per_s']:.1f} samples/s in steps; start-up {row['startup_s']:.1f} s, "
            f"steps {row['steps_s']:.1f} s, final save {row['save_s']:.2f} s, exit {row['exit_s']:.2f} s; "
            f"CPU {row['cpu_s']:.0f} s, others' {100 * row['others_cpu_share']:.0f}% of the cores; "
            f"{row['params_m']:.3f}M parameters; checkpoint {'written' if row['checkpoint'] else 'MISSING'}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["peer"]:
        return peer_main(argv[1:])
    args = parse_args(argv)
    folder = args.folder or Path(tempfile.gettempdir()) / f"eddy-cpu-trainer-{args.n_images}-seed{args.seed}"
    found = ensure_folder(folder.resolve(), args.n_images, args.seed)
    if found != args.n_images:
        print(f"data: {folder} holds {found} PNGs (not --n_images {args.n_images}); using them as they are", flush=True)
    results: dict[str, Any] = {"environment": environment(args),
                               "config": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                                          "folder": str(folder), "images": found},
                               "runs": [], "summary": {}}

    def save() -> None:
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=2) + "\n")

    print(f"environment: {json.dumps(results['environment'])}", flush=True)
    scratch = Path(tempfile.mkdtemp(prefix="eddy-cpu-trainer-"))
    try:
        root = export_ref(args.eddy_ref, scratch / "eddy") if args.eddy_ref else REPO
        # Byte-compile Eddy's sources once, so the first timed run does not pay for it alone.
        subprocess.run([args.python, "-m", "compileall", "-q", str(root / "trainer"), str(root / "models")],
                       check=False)
        print(f"eddy: {shlex.join(eddy_command(args, root, folder, Path('RUN')))}", flush=True)
        programs = ["eddy"] if args.skip_peer else ["eddy", "lucidrains"]
        for k in range(args.rounds):
            for program in programs:
                for attempt in range(args.retries + 1):
                    row = run_once(args, program, k, root, folder, scratch / f"round{k}-{program}-{attempt}")
                    row["disturbed"] = row["others_cpu_share"] > args.max_others
                    results["runs"].append(row)
                    results["summary"] = summarize(results["runs"], args.max_others)
                    save()
                    if not row["disturbed"]:
                        break
                    print(f"  disturbed: other processes kept {100 * row['others_cpu_share']:.0f}% of the cores busy "
                          f"(over --max_others {100 * args.max_others:.0f}%); left out of the medians"
                          + ("; running it again" if attempt < args.retries else "; no retries left"), flush=True)
    finally:
        if args.keep:
            print(f"run folders kept in {scratch}", flush=True)
        else:
            shutil.rmtree(scratch, ignore_errors=True)

    print()
    print(markdown(results["summary"], args), flush=True)
    save()
    return 0 if all("error" not in r for r in results["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
