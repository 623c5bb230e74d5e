"""Train a diffusion model: `accelerate launch trainer/train.py [flags]` or `python trainer/train.py [flags]`.

Flags come from the typed config (trainer/config.py); `--config run.yaml` supplies the same keys and
flags win. Everything is validated before data or devices are touched; a user error prints one
message naming the flag or file and exits with status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script, Python puts trainer/ first on sys.path, where trainer/trainer.py would shadow
    # the package `trainer`. Put the repository root there instead.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from typing import Any, get_args  # noqa: E402

import torch  # noqa: E402

from trainer import checkpoint as ckpt_io  # noqa: E402
from trainer.config import (  # noqa: E402
    RESUME_FREE, RESUME_LOCKED, SECTIONS, Config, build_config, config_diff, default_text, field_specs, flatten,
    load_yaml, show_value, validate)
from trainer.errors import CheckpointError, ConfigError, EddyError, user_message  # noqa: E402

EXAMPLES = """\
examples:
  python trainer/train.py                              tiny model on built-in shapes (CPU minutes)
  accelerate launch trainer/train.py --train_data_dir ~/images --image_size 64
  accelerate launch --config_file accelerate_configs/multi_gpu.yaml trainer/train.py --batch_size 64
  python trainer/train.py --resume latest              continue the newest run under --results_path
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trainer/train.py", description="Train a denoising diffusion model with Eddy.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file with any of the flags below; flags win.")
    groups = {name: parser.add_argument_group(f"{name} options") for name in SECTIONS}
    for section, f, typ in field_specs():
        groups[section].add_argument(f"--{f.name}", **_argparse_kwargs(f, typ))
    return parser


def _argparse_kwargs(f, typ) -> dict[str, Any]:
    default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
    help_text = f"{f.metadata['help']} (default: {default_text(f.name, default)})"
    kw: dict[str, Any] = {"help": help_text}
    args = [a for a in get_args(typ) if a is not type(None)]
    base = args[0] if args else typ
    if typ is bool:
        kw["action"] = argparse.BooleanOptionalAction
    elif getattr(typ, "__origin__", None) is tuple:
        kw.update(nargs="+", type=get_args(typ)[0], metavar="N")
    else:
        kw["type"] = base
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
    return kw


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    try:
        run(args)
    except EddyError as e:
        print(f"error: {user_message(e)}", file=sys.stderr)
        return 2
    return 0


def resolve_config(args: dict[str, Any]) -> tuple[Config, Path | None, Path | None]:
    """Flags (+ YAML) -> validated Config. On resume the run's own config is the base, so only the
    flags given now change anything. Returns (config, run folder to resume, explicit checkpoint)."""
    explicit = load_yaml(args.pop("config")) if "config" in args else {}
    explicit.update(args)
    run_dir = ckpt_dir = None
    base: dict[str, Any] = {}
    resume = explicit.get("resume")
    results_path = Path(explicit.get("results_path", "results"))
    if resume == "auto":
        # For restarts (accelerate launch --max_restarts, cluster requeues): the same command resumes
        # the named run when it has a checkpoint, and starts it otherwise.
        if not explicit.get("run_name"):
            raise ConfigError("--resume auto needs --run_name, so that a restarted job finds its own run.")
        if not ckpt_io.list_checkpoints(results_path / explicit["run_name"]):
            resume = None
    if resume:
        run_dir, ckpt_dir = ckpt_io.find_run_to_resume(
            str(results_path / explicit["run_name"]) if resume == "auto" else resume, results_path)
        saved = run_dir / "config.json"
        if saved.is_file():
            base = flatten(json.loads(saved.read_text()))
            base.pop("resume", None)
    cfg = build_config({**base, **explicit}, has_gpu=torch.cuda.is_available())
    validate(cfg)
    if base:
        changed = config_diff(base, cfg.flat())
        locked = {k: v for k, v in changed.items() if k in RESUME_LOCKED}
        if locked:
            raise CheckpointError(
                f"--resume {explicit['resume']}: the run in {run_dir} was trained with different values of "
                + "; ".join(f"--{k} ({show_value(old)} then, {show_value(new)} now)" for k, (old, new) in locked.items())
                + ". Drop these flags to continue the run as it was, or start a new run.")
    return cfg, run_dir, ckpt_dir


def run(args: dict[str, Any]) -> Path:
    """Everything `train.py` does after parsing. Returns the run folder."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list, parse_flag_from_env

    from trainer.build import build_dataset, build_diffusion, build_network, count_parameters
    from trainer.sharding import plan_from_env as fsdp_plan_from_env
    from trainer.trainer import Trainer, make_accelerator
    from trainer.tracking import make_tracker, resolve_wandb_mode
    from trainer.zero import plan_from_env as zero_plan_from_env

    # Taken before any Accelerate state exists, which would otherwise wrap the network itself.
    fsdp, zero_plan = fsdp_plan_from_env(), zero_plan_from_env()
    # `--resume latest` names a run by the age of its files: the main process chooses, so that every
    # rank reads the same run's config even while checkpoints are being written.
    world = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # the Accelerator below reuses it
    if args.get("resume") == "latest" and world.num_processes > 1:
        chosen = [None]
        if world.is_main_process:
            newest = ckpt_io.newest_run(Path(args.get("results_path", "results")))
            chosen = [newest and str(newest)]
        broadcast_object_list(chosen)
        if chosen[0]:
            args = {**args, "resume": chosen[0]}

    cfg, run_dir, ckpt_dir = resolve_config(args)
    wandb_note = resolve_wandb_mode()[1] if cfg.run.report_to == "wandb" else None
    accelerator = make_accelerator(cfg, fsdp, zero_plan)
    if not torch.distributed.is_initialized():
        fsdp = zero_plan = None  # one process launched without a process group: nothing to shard
    if zero_plan is not None:  # the launch's DeepSpeed settings against the flags, before any heavy work
        zero_plan.config(cfg, accelerator.num_processes, bf16=accelerator.mixed_precision == "bf16")
    main_proc = accelerator.is_main_process
    say = accelerator.print

    # The run folder, and the checkpoint to resume: decided on the main process, then broadcast.
    decision: list[Any] = [None, None, None]  # run folder, checkpoint folder or None, error message
    resume_from = None  # the main process has read the checkpoint while deciding; the others read it below
    if main_proc:
        try:
            run_dir, ckpt_dir, resume_from = _decide_run(cfg, run_dir, ckpt_dir, say)
            decision[:2] = str(run_dir), ckpt_dir and str(ckpt_dir)
        except EddyError as e:
            decision[2] = str(e)
    broadcast_object_list(decision)
    if decision[2]:
        raise CheckpointError(decision[2])
    run_dir = Path(decision[0])
    ckpt_dir = Path(decision[1]) if decision[1] else None
    if ckpt_dir is not None and resume_from is None:
        resume_from = ckpt_io.read_checkpoint(ckpt_dir)
    if resume_from is not None:
        old = flatten(resume_from.state["config"])
        changed = {k: v for k, v in config_diff(old, cfg.flat()).items() if k not in RESUME_FREE}
        changes = ", ".join(f"{k} {show_value(a)} -> {show_value(b)}" for k, (a, b) in changed.items())
        say(f"resuming {run_dir} from {ckpt_dir.name} (step {resume_from.state['step']})"
            + (f"; changed since: {changes}" if changes else ""))

    # Data, then the model: both before any training step, so bad input fails early.
    with accelerator.main_process_first():
        dataset = build_dataset(cfg, progress=main_proc)
    torch.manual_seed(cfg.train.seed)
    net = build_network(cfg)
    diffusion = build_diffusion(cfg, net)

    if main_proc:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / "config.json")
    run_id = [resume_from.state.get("tracker_run_id") if resume_from else uuid.uuid4().hex[:12]]
    broadcast_object_list(run_id)
    tracker = make_tracker(accelerator, cfg.run.report_to, run_dir, cfg.run.wandb_project, cfg.to_dict(),
                           run_id[0]) if main_proc else None

    t = cfg.train
    world = accelerator.num_processes
    plan = fsdp or zero_plan
    say(f"device: {accelerator.device} x {world} process(es), mixed precision {accelerator.mixed_precision}, "
        f"{plan.describe() if plan else 'weights replicated (DDP)' if world > 1 else 'one process'}\n"
        f"batch: {t.batch_size} per device x {world} x {t.grad_accum} accumulation = "
        f"{t.batch_size * world * t.grad_accum} per optimizer step\n"
        f"model: Unet dim {cfg.model.dim} mults {list(cfg.model.dim_mults)}, "
        f"{count_parameters(net) / 1e6:.2f}M parameters, preset {cfg.run.preset}\n"
        f"data: {len(dataset)} images of {cfg.data.channels}x{cfg.data.image_size}x{cfg.data.image_size}\n"
        f"run folder: {run_dir}")
    if wandb_note and main_proc:
        say(f"W&B: {wandb_note}")

    trainer = Trainer(cfg, accelerator, diffusion, dataset, run_dir, tracker=tracker, resume_from=resume_from,
                      run_id=run_id[0], fsdp=fsdp, zero_plan=zero_plan)
    start = time.perf_counter()
    try:
        state = trainer.train()
    finally:
        if tracker is not None:
            tracker.finish()
    say(f"done: step {state.step} in {time.perf_counter() - start:.0f} s; "
        f"checkpoints in {run_dir / 'checkpoints'}, samples in {run_dir / 'samples'}")
    if tracker is not None and cfg.run.report_to == "wandb":
        import os

        if os.environ.get("WANDB_MODE") == "offline":
            say(f"W&B run saved offline in {tracker.location}; upload it with: wandb sync {tracker.location}")
    # Free the wrapped network, its optimizer and their pending collective work while the interpreter is
    # whole, then close the process group: a gloo work object destroyed during interpreter shutdown
    # aborts the process ("terminate called without an active exception") after a finished run.
    del trainer
    accelerator.free_memory()
    gc.collect()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return run_dir


def _decide_run(cfg: Config, run_dir: Path | None, ckpt_dir: Path | None,
                say) -> tuple[Path, Path | None, ckpt_io.Checkpoint | None]:
    """(run folder, checkpoint folder to resume, its contents); no checkpoint for a new run. Main process only."""
    if run_dir is None:
        name = cfg.run.run_name or time.strftime("%Y%m%d-%H%M%S")
        run_dir = Path(cfg.run.results_path) / name
        if ckpt_io.list_checkpoints(run_dir):
            raise ConfigError(f"run folder {run_dir} already holds checkpoints: pass --resume {run_dir} to "
                              f"continue it, or another --run_name.")
        return run_dir, None, None
    for p in ckpt_io.clean_leftovers(run_dir):
        say(f"removed an incomplete checkpoint left by a crash: {p}")
    if ckpt_dir is not None:
        return run_dir, ckpt_dir, ckpt_io.read_checkpoint(ckpt_dir)
    found = ckpt_io.load_latest_good(run_dir, warn=lambda m: say(f"WARNING: {m}"))
    if found is None:
        raise CheckpointError(f"--resume: no intact checkpoint in {run_dir / 'checkpoints'}.")
    return run_dir, *found


if __name__ == "__main__":
    sys.exit(main())
