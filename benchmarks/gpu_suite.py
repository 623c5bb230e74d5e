"""Every configuration of shared/BENCHMARKS.md in one call: `benchmarks/train_step.py --suite`.

Rows run in this order, the most important first, each only if its estimated seconds fit in what is left of
--budget_s (counted from process start; default 280, so that a 5-minute call ends with its tables). A row that
would overrun is skipped with a note (and later, smaller rows still run). A compiled row, a compiled sampling row or
a Trainer row that takes more than twice its estimate is stopped with a note and the suite goes on; any row still
running at the deadline is stopped, and the tables are printed with what was measured. The estimates are fixed
guesses per kind of row until one of that kind has run, then its measured time. The JSON is rewritten after every
row.

 1. CIFAR size (3x32x32, batch 128; Unet dim 128, mults 1 2 2 2), bf16: eager for Eddy, lucidrains and diffusers
    (DDPM-CIFAR layout), then compiled for Eddy (its compile_loss) and diffusers (channels-last + torch.compile).
 2. Unet3D (3x16x64x64, batch 8; dim 64, mults 1 2 4 8), bf16 eager: Eddy's factorized Unet3D and
    video-diffusion-pytorch.
 3. Sampling, 256 CIFAR-size samples: Eddy DDIM and DPM-Solver++(2M) at 20 and 50 steps, lucidrains DDIM at 20 and
    50, diffusers DPM-Solver++ at 20; each with its error against the 1000-step fp32 DDIM of the same network and
    noise, and its bf16-fp32 difference.
 4. The rest: Eddy captured (CUDA graphs) at CIFAR size; the Trainer end to end for Eddy (trainer/train.py on
    --dataset shapes: data, EMA, clipping, logging) and for lucidrains (its Trainer on a folder of PNGs); 128 px
    (3x128x128, batch 32; dim 64, mults 1 2 4 8) eager for Eddy and lucidrains; Eddy's Unet3D compiled; compiled
    sampling (Eddy DPM-Solver++ 20, diffusers DPM-Solver++ 20); fp32 eager at CIFAR size for the three; Eddy
    DDPM 250; Eddy 128 px compiled; Eddy's Trainer with --compile; lucidrains compiled (BENCHMARKS.md saw it fail).

On the CPU (--device cpu, with --tiny every configuration shrunk) the bf16 rows run in fp32, the fp32 repeats and
the captured mode are left out, and the compiled rows use --compile_backend (aot_eager with --tiny).

The Trainer rows read `samples_per_s` from the run's metrics.jsonl (Eddy) or from the time of each step (lucidrains,
stamped at its EMA update): the median of the windows of --trainer_log_every steps after the first, which holds
start-up and any compile. The lucidrains Trainer is this file's `lucidrains-trainer` subcommand, run in its own
process like Eddy's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import train_step as ts  # benchmarks/ is on sys.path: this file runs from train_step.py or as a script beside it

LUCIDRAINS_MARK = "gpu_suite-lucidrains: "  # the lucidrains Trainer driver's one line of results on stdout


class BudgetExceeded(BaseException):
    """Raised by the alarm at the deadline; a BaseException, so that no `except Exception` (a compile's fallback
    above all) swallows it."""


def setups(tiny: bool) -> dict[str, ts.Setup]:
    """BENCHMARKS.md's three configurations, or (tiny) the same shapes shrunk to run in seconds on a CPU."""
    if tiny:
        return {"cifar": ts.Setup("cifar", 32, (1, 2, 2), 16, 16),  # lucidrains' Trainer wants batches of 16
                "128px": ts.Setup("128px", 16, (1, 2, 2, 2), 32, 4),
                "unet3d": ts.Setup("unet3d", 16, (1, 2, 2), 16, 2, frames=4)}
    return {"cifar": ts.Setup("cifar", 128, (1, 2, 2, 2), 32, 128),
            "128px": ts.Setup("128px", 64, (1, 2, 4, 8), 128, 32),
            "unet3d": ts.Setup("unet3d", 64, (1, 2, 4, 8), 64, 8, frames=16)}


# Estimated seconds of each kind of row, before one like it has run (then its measured time is used):
# on an H200 (from BENCHMARKS.md's step and compile times, plus building, counting, gating and warm-up),
# and on the 2-core development CPU at --tiny.
ESTIMATE = {
    "cuda": {"eager:cifar": 8, "eager:128px": 10, "eager:unet3d": 14, "compile:cifar": 80, "compile:128px": 90,
             "compile:unet3d": 110, "sample:eddy": 28, "sample:lucidrains": 18, "sample:diffusers": 13,
             "sample-ddpm:eddy": 30, "sample-compiled": 45, "trainer": 35, "trainer-compile": 120,
             "lucidrains-trainer": 45},
    "cpu": {"eager:cifar": 4, "eager:128px": 5, "eager:unet3d": 5, "compile:cifar": 30, "compile:128px": 30,
            "compile:unet3d": 30, "sample:eddy": 20, "sample:lucidrains": 12, "sample:diffusers": 8,
            "sample-ddpm:eddy": 15, "sample-compiled": 25, "trainer": 15, "trainer-compile": 40,
            "lucidrains-trainer": 25},
}


@dataclass
class Item:
    """One planned row (or, for sampling, one subject's rows): what it is, its estimate's key, how to run it."""

    label: str
    kind: str  # "train", "sample" or "trainer": where a skipped row is recorded
    estimate_key: str
    run: Callable[[], None]
    skip_row: dict[str, Any]
    capped: bool = False  # stopped at CAP x its estimate (a compile that runs away), and the suite goes on


CAP = 2.0  # a capped row may take this many times its estimate


def run_suite(args: argparse.Namespace) -> int:
    deadline = ts.T_START + args.budget_s
    device = args.device
    p = "bf16" if device == "cuda" else "fp32"  # the precision of the main rows
    peaks = {"datasheet": args.peak_flops, "measured": ts.measure_matmul_peak(device)}
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    config["setups"] = {k: asdict(v) for k, v in setups(args.tiny).items()}
    results = ts.Results(args, ts.environment(args, peaks), config)
    print(f"environment: {results.data['environment']}", flush=True)
    print(ts.describe_peaks(peaks), flush=True)
    print(f"suite: budget {args.budget_s:.0f} s from process start ({time.monotonic() - ts.T_START:.0f} s gone), "
          f"warm-up {args.warmup}, timed {args.steps} steps, {args.num_samples} samples per sampling call", flush=True)
    if args.checkpoint:
        results.note(f"Eddy's sampling rows sample the EMA weights of {args.checkpoint}; every other network is "
                     "randomly initialized (the timings and the solver errors hold, its samples are no images)")
    else:
        results.note("every network is randomly initialized: the timings and the solver errors hold, the samples "
                     "are no images")
    if args.ref_samples:
        results.note(ts.reference_note(args))
    if device == "cuda" and args.steps < 20:
        results.note(f"--steps {args.steps}: fewer than the 20 timed steps BENCHMARKS.md asks for")

    # The subjects at each configuration; a missing package is one note, and its rows are left out.
    S = setups(args.tiny)
    subjects: dict[tuple[str, str], ts.Subject] = {}
    missing: set[str] = set()
    for setup_name, names in (("cifar", ("eddy", "lucidrains", "diffusers")), ("128px", ("eddy", "lucidrains")),
                              ("unet3d", ("eddy", "video"))):
        for name in names:
            subject, why = ts.make_subject(name, S[setup_name], args)
            if subject is not None:
                subjects[(name, setup_name)] = subject
            elif name not in missing:
                missing.add(name)
                results.note(why)
    flops: dict[tuple[str, str], float] = {}
    references: dict[Any, Any] = {}
    items = plan(args, p, subjects, flops, peaks, references, results)
    interrupted = run_within_budget(items, deadline, args, results)

    print(f"\nsuite: {time.monotonic() - ts.T_START:.0f} s from process start\n", flush=True)
    print(ts.markdown(results.data), flush=True)
    results.save()
    if interrupted:  # whatever a stopped row left running (a compile's workers, a half-recorded graph) ends here
        sys.stdout.flush()
        os._exit(0)
    return 0


def prior_estimate(device: str, key: str) -> float:
    """ESTIMATE of `key` ("kind:config:subject"), else of its kind and config, else 30 s."""
    table = ESTIMATE[device]
    return table.get(key) or table.get(key.rsplit(":", 1)[0]) or 30.0


def run_within_budget(items: list[Item], deadline: float, args: argparse.Namespace, results: ts.Results) -> bool:
    """Run the items in order: one whose estimate does not fit in what is left is skipped; the alarm stops one that
    is still running at the deadline (then the rest are left) or, if capped, past CAP x its estimate. Returns
    whether a row was stopped."""
    device = args.device
    measured: dict[str, float] = {}

    def alarm(signum, frame):
        raise BudgetExceeded()

    previous = signal.signal(signal.SIGALRM, alarm)
    interrupted = False
    try:
        for item in items:
            left = deadline - time.monotonic()
            estimate = measured.get(item.estimate_key) or prior_estimate(device, item.estimate_key)
            kind = item.kind if item.kind != "trainer" else "train"
            if estimate > left - 2:
                why = f"would need about {estimate:.0f} s, {max(left, 0):.0f} s left of --budget_s {args.budget_s:.0f}"
                results.note(f"{item.label} skipped: {why}")
                results.add(kind, {**item.skip_row, "skipped": why})
                continue
            limit = min(left, CAP * estimate) if item.capped else left
            signal.setitimer(signal.ITIMER_REAL, max(limit, 0.1))
            t0 = time.monotonic()
            try:
                item.run()
            except BudgetExceeded:
                interrupted = True
                took = time.monotonic() - t0
                signal.setitimer(signal.ITIMER_REAL, 0)
                if limit < left - 1:  # its cap, not the deadline: the suite goes on without it
                    why = f"stopped after {took:.0f} s, {CAP:g}x its estimate of {estimate:.0f} s"
                    results.note(f"{item.label} {why}")
                    results.add(kind, {**item.skip_row, "skipped": why})
                    measured[item.estimate_key] = took
                    with contextlib.suppress(Exception):
                        ts.free_device(device, compiled=True)
                    continue
                results.note(f"{item.label} stopped at the deadline of --budget_s {args.budget_s:.0f}, after "
                             f"{took:.0f} s; the rows after it did not run")
                results.add(kind, {**item.skip_row, "skipped": "stopped at the deadline"})
                break
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            measured[item.estimate_key] = max(measured.get(item.estimate_key, 0.0), time.monotonic() - t0)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return interrupted


def plan(args: argparse.Namespace, p: str, subjects: dict[tuple[str, str], ts.Subject],
         flops: dict[tuple[str, str], float], peaks: dict[str, float | None], references: dict[Any, Any],
         results: ts.Results) -> list[Item]:
    """The rows in the order of the module doc, for the subjects that could be imported."""
    cuda = args.device == "cuda"
    items: list[Item] = []

    def train(name: str, setup: str, mode: str, precision: str) -> None:
        subject = subjects.get((name, setup))
        if subject is None:
            return
        key = f"eager:{setup}:{name}" if mode == "eager" else f"compile:{setup}:{name}"  # captured: as compiled
        items.append(Item(f"{setup} {name} {mode} {precision}", "train", key,
                          lambda: ts.run_training_row(subject, mode, precision, args, flops, peaks, results),
                          {"config": setup, "model": name, "mode": mode, "precision": precision},
                          capped=mode == "compiled"))

    def sample(name: str, runs: list[tuple[str, int, bool]]) -> None:
        subject = subjects.get((name, "cifar"))
        if subject is None:
            return
        compiled = any(c for _, _, c in runs)
        label = f"sampling {name} " + ", ".join(f"{s} {n}{' compiled' if c else ''}" for s, n, c in runs)
        kind = "sample-compiled" if compiled else ("sample-ddpm" if runs[0][0] == "ddpm" else "sample")
        items.append(Item(label, "sample", f"{kind}:{name}",
                          lambda: ts.run_sampling(subject, runs, args, results, references),
                          {"model": name, "sampler": ", ".join(f"{s} {n}" for s, n, _ in runs), "steps": "-",
                           "mode": "compiled" if compiled else "eager"}, capped=compiled))

    def trainer(which: str, compile_: bool = False) -> None:
        if which == "lucidrains" and ("lucidrains", "cifar") not in subjects:
            return
        key = "lucidrains-trainer" if which == "lucidrains" else ("trainer-compile" if compile_ else "trainer")
        label = f"Trainer end to end: {which}{' --compile' if compile_ else ''}"
        items.append(Item(label, "trainer", key,
                          lambda: run_trainer_row(which, compile_, p, args, flops, peaks, results),
                          {"config": "cifar", "model": which, "mode": trainer_mode(compile_), "precision": p,
                           "compile": compile_}, capped=True))

    # 1. CIFAR size, eager then compiled.
    for name in ("eddy", "lucidrains", "diffusers"):
        train(name, "cifar", "eager", p)
    train("eddy", "cifar", "compiled", p)
    train("diffusers", "cifar", "compiled", p)
    # 2. Unet3D.
    train("eddy", "unet3d", "eager", p)
    train("video", "unet3d", "eager", p)
    # 3. Sampling.
    sample("eddy", [("ddim", 20, False), ("ddim", 50, False), ("dpmpp_2m", 20, False), ("dpmpp_2m", 50, False)])
    sample("lucidrains", [("ddim", 20, False), ("ddim", 50, False)])
    sample("diffusers", [("dpmpp_2m", 20, False)])
    # 4. The rest.
    if cuda:
        train("eddy", "cifar", "captured", p)
    else:
        results.note("captured (CUDA graphs) rows left out: they need a CUDA device")
    trainer("eddy")
    trainer("lucidrains")
    train("eddy", "128px", "eager", p)
    train("lucidrains", "128px", "eager", p)
    train("eddy", "unet3d", "compiled", p)
    sample("eddy", [("dpmpp_2m", 20, True)])
    sample("diffusers", [("dpmpp_2m", 20, True)])
    if cuda:
        for name in ("eddy", "lucidrains", "diffusers"):
            train(name, "cifar", "eager", "fp32")
    sample("eddy", [("ddpm", 250, False)])
    train("eddy", "128px", "compiled", p)
    trainer("eddy", compile_=True)
    train("lucidrains", "cifar", "compiled", p)
    return items


# ----------------------------------------------------------------------------------------------
# The Trainer end to end


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(TQDM_DISABLE="1", WANDB_MODE="offline", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(x for x in (env.get("PYTHONPATH"), str(ts.ROOT)) if x)
    return env


def trainer_mode(compile_: bool) -> str:
    return "Trainer --compile" if compile_ else "Trainer"


def window_median(rates: list[float]) -> tuple[float, list[float]]:
    """The median of the windows after the first (which holds start-up and any compile), and those windows."""
    kept = rates[1:] or rates
    return statistics.median(kept), kept


def trainer_row(which: str, compile_: bool, precision: str, setup: ts.Setup, rates: list[float],
                flops: dict[tuple[str, str], float], peaks: dict[str, float | None], **extra: Any) -> dict[str, Any]:
    sps, kept = window_median(rates)
    row = {"config": setup.name, "model": which, "mode": trainer_mode(compile_), "precision": precision,
           "compile": compile_, "batch": setup.batch_size, "samples_per_s": sps, "step_ms": setup.batch_size / sps * 1e3,
           "step_ms_min": setup.batch_size / max(kept) * 1e3, "step_ms_max": setup.batch_size / min(kept) * 1e3,
           "windows_samples_per_s": rates}
    key = ("eddy" if which == "eddy" else "lucidrains", setup.name)
    row["gflop_per_sample"] = flops[key] / 1e9 if key in flops else None
    row.update(ts.mfu_metrics(flops.get(key), sps, peaks))
    row.update(extra)
    return row


def run_trainer_row(which: str, compile_: bool, precision: str, args: argparse.Namespace,
                    flops: dict[tuple[str, str], float], peaks: dict[str, float | None], results: ts.Results) -> None:
    setup = setups(args.tiny)["cifar"]
    print(f"{ts.stamp()} Trainer end to end: {which}{' --compile' if compile_ else ''} ...", flush=True)
    work = Path(tempfile.mkdtemp(prefix=f"eddy_bench_{which}_"))
    try:
        run = run_eddy_trainer if which == "eddy" else run_lucidrains_trainer
        row = run(setup, compile_, precision, args, work, flops, peaks)
    except Exception as e:  # BudgetExceeded is no Exception: it stops the suite, and subprocess.run kills the child
        traceback.print_exc()
        row = {"config": setup.name, "model": which, "mode": trainer_mode(compile_), "precision": precision,
               "compile": compile_, "error": f"{type(e).__name__}: {ts.first_line(e)}"}
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the run's checkpoint, logs and metrics: read by now
    if "error" in row:
        print(f"  FAILED: {row['error']}", flush=True)
    else:
        print(f"  {row['samples_per_s']:.0f} samples/s (median of the windows after the first; "
              f"{len(row['windows_samples_per_s'])} windows), {row['wall_s']:.0f} s from process start to exit",
              flush=True)
    results.add("train", row)


def run_child(cmd: list[str], work: Path) -> tuple[int, str, float]:
    """(exit status, the output, wall seconds) of `cmd` in `work`, its output also in work/log.txt."""
    t0 = time.monotonic()
    with open(work / "log.txt", "w") as log:
        proc = subprocess.run(cmd, cwd=work, env=child_env(), stdout=log, stderr=subprocess.STDOUT, check=False)
    return proc.returncode, (work / "log.txt").read_text(errors="replace"), time.monotonic() - t0


def tail(text: str, n: int = 12) -> str:
    return "\n".join(text.splitlines()[-n:])


def run_eddy_trainer(setup: ts.Setup, compile_: bool, precision: str, args: argparse.Namespace, work: Path,
                     flops: dict[tuple[str, str], float], peaks: dict[str, float | None]) -> dict[str, Any]:
    """trainer/train.py on the built-in shapes at the CIFAR-size config, as a fresh process."""
    name = "eddy-compile" if compile_ else "eddy"
    cmd = [sys.executable, str(ts.ROOT / "trainer" / "train.py"), "--dataset", "shapes",
           "--image_size", str(setup.image_size), "--dim", str(setup.dim), "--dim_mults", *map(str, setup.dim_mults),
           "--attn_heads", "4", "--attn_dim_head", "32", "--objective", args.objective,
           "--batch_size", str(setup.batch_size), "--train_num_steps", str(args.trainer_steps),
           "--save_and_sample_every", str(10**9), "--num_samples", "0", "--log_every", str(args.trainer_log_every),
           "--report_to", "none", "--results_path", str(work), "--run_name", name, "--seed", str(args.seed)]
    if compile_:
        cmd += ["--compile", "--compile_backend", args.compile_backend]
    code, out, wall = run_child(cmd, work)
    metrics_file = work / name / "metrics.jsonl"
    if code != 0 or not metrics_file.is_file():
        return {"config": setup.name, "model": "eddy", "mode": trainer_mode(compile_), "precision": precision,
                "compile": compile_, "error": f"exit status {code}: {tail(out, 3)}"}
    metrics = [json.loads(x) for x in metrics_file.read_text().splitlines() if x.strip()]
    rates = [m["samples_per_s"] for m in metrics if "samples_per_s" in m]
    peak = [m["gpu_memory_gib"] for m in metrics[1:] if "gpu_memory_gib" in m]
    fallback = [line for line in out.splitlines() if "runs eagerly instead" in line]
    return trainer_row("eddy", compile_, precision, setup, rates, flops, peaks, wall_s=wall,
                       peak_gib=max(peak) if peak else None, final_loss=metrics[-1].get("loss"),
                       fallback=fallback[:1], command=" ".join(cmd[1:]))


def write_png_folder(setup: ts.Setup, n: int, seed: int) -> Path:
    """A folder of `n` PNGs of Eddy's built-in shapes at the config's size, written once and reused."""
    from PIL import Image

    from trainer.data.builtin import ShapesDataset

    folder = Path(tempfile.gettempdir()) / f"eddy_bench_shapes_{setup.image_size}px_{n}_{seed}"
    if len(list(folder.glob("*.png"))) == n:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    data = ShapesDataset(image_size=setup.image_size, channels=setup.channels, length=n, seed=seed)
    for i in range(n):
        pixels = ((data.image(i) + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(folder / f"{i:05d}.png")
    return folder


def run_lucidrains_trainer(setup: ts.Setup, compile_: bool, precision: str, args: argparse.Namespace, work: Path,
                           flops: dict[tuple[str, str], float], peaks: dict[str, float | None]) -> dict[str, Any]:
    """lucidrains' Trainer (this file's `lucidrains-trainer` subcommand) on a PNG folder, as a fresh process."""
    folder = write_png_folder(setup, 1024, args.seed)
    cmd = [sys.executable, str(Path(__file__).resolve()), "lucidrains-trainer", "--folder", str(folder),
           "--steps", str(args.trainer_steps), "--batch_size", str(setup.batch_size), "--dim", str(setup.dim),
           "--dim_mults", *map(str, setup.dim_mults), "--image_size", str(setup.image_size),
           "--objective", args.objective, "--precision", precision, "--results", str(work / "results"),
           "--seed", str(args.seed)]
    code, out, wall = run_child(cmd, work)
    found = [line for line in out.splitlines() if line.startswith(LUCIDRAINS_MARK)]
    if code != 0 or not found:
        return {"config": setup.name, "model": "lucidrains", "mode": "Trainer", "precision": precision,
                "compile": False, "error": f"exit status {code}: {tail(out, 3)}"}
    d = json.loads(found[-1][len(LUCIDRAINS_MARK):])
    stamps, every, batch = d["stamps"], args.trainer_log_every, setup.batch_size
    rates, prev = [], d["t_train"]
    for k in range(every - 1, len(stamps), every):
        rates.append(every * batch / max(stamps[k] - prev, 1e-9))
        prev = stamps[k]
    return trainer_row("lucidrains", False, precision, setup, rates, flops, peaks, wall_s=wall,
                       peak_gib=d.get("peak_gib"), workers=d.get("workers"))


def lucidrains_trainer_main(argv: list[str]) -> int:
    """Train lucidrains' Trainer on --folder for --steps steps; print one line of timings as JSON."""
    p = argparse.ArgumentParser(prog="benchmarks/gpu_suite.py lucidrains-trainer",
                                description="lucidrains' Trainer (EMA, clipping, its DataLoader) on a folder of "
                                            "images; prints one line of per-step times as JSON.")
    p.add_argument("--folder", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch_size", type=int, required=True)
    p.add_argument("--dim", type=int, required=True)
    p.add_argument("--dim_mults", type=int, nargs="+", required=True)
    p.add_argument("--image_size", type=int, required=True)
    p.add_argument("--objective", default="pred_noise")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--results", required=True, help="the Trainer's results_folder.")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    import torch
    from denoising_diffusion_pytorch import GaussianDiffusion, Trainer, Unet

    torch.manual_seed(a.seed)
    net = Unet(dim=a.dim, dim_mults=tuple(a.dim_mults), channels=3, attn_heads=4, attn_dim_head=32, flash_attn=False)
    diffusion = GaussianDiffusion(net, image_size=a.image_size, timesteps=ts.TIMESTEPS, objective=a.objective,
                                  beta_schedule="sigmoid")
    # save_and_sample_every beyond the last step: no sampling and no checkpoint inside train().
    trainer = Trainer(diffusion, a.folder, train_batch_size=a.batch_size, train_lr=1e-4, train_num_steps=a.steps,
                      save_and_sample_every=a.steps + 1, results_folder=a.results, amp=a.precision == "bf16",
                      mixed_precision_type="bf16", calculate_fid=False, max_grad_norm=1.0)
    stamps: list[float] = []
    update = trainer.ema.update

    def update_and_stamp() -> None:  # called once per step, after the optimizer step
        update()
        stamps.append(time.monotonic())

    trainer.ema.update = update_and_stamp
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t_train = time.monotonic()
    trainer.train()
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    print(LUCIDRAINS_MARK + json.dumps({"t_train": t_train, "stamps": stamps, "peak_gib": peak,
                                        "workers": os.cpu_count()}), flush=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["lucidrains-trainer"]:
        sys.exit(lucidrains_trainer_main(sys.argv[2:]))
    sys.exit(f"usage: {sys.argv[0]} lucidrains-trainer ...  (the suite itself: benchmarks/train_step.py --suite)")
