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
import os  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from typing import Any, get_args  # noqa: E402

import torch  # noqa: E402

from trainer import checkpoint as ckpt_io  # noqa: E402
from trainer.config import (  # noqa: E402
    DATA_DERIVED, RESUME_FREE, RESUME_LOCKED, SECTIONS, Config, build_config, config_diff, default_text, field_specs,
    flatten, is_simulation, load_yaml, show_value, validate)
from trainer.errors import CheckpointError, ConfigError, EddyError, user_message  # noqa: E402
from trainer.build import sample_shape  # noqa: E402

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
    if base is bool:
        kw["action"] = BoolFlag
    elif getattr(typ, "__origin__", None) is tuple:
        kw.update(nargs="+", type=get_args(typ)[0], metavar="N")
    else:
        kw["type"] = base
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
    return kw


class BoolFlag(argparse.BooleanOptionalAction):
    """`--flag` / `--no-flag`, and the forms users of other training scripts type: `--flag false`,
    `--flag=true` (true/false, yes/no, 1/0)."""

    WORDS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}

    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest, **kw)
        self.nargs, self.metavar = "?", "true|false"

    def __call__(self, parser, namespace, values, option_string=None):
        if values is None:
            return super().__call__(parser, namespace, values, option_string)
        if option_string.startswith("--no-"):
            parser.error(f"{option_string} takes no value; write {option_string} alone, or "
                         f"{option_string.replace('--no-', '--', 1)} {values}.")
        word = str(values).lower()
        if word not in self.WORDS:
            flag = option_string
            parser.error(f"{flag} {values}: write {flag} or {flag} true to switch it on, --no-{flag[2:]} or "
                         f"{flag} false to switch it off.")
        setattr(namespace, self.dest, self.WORDS[word])


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
    merged = {**base, **explicit}
    if base and is_simulation(build_config(merged, has_gpu=False)):
        # A simulation's channel counts and frame size are the data's (fit_config_to_data), not flags.
        merged.update({k: base[k] for k in DATA_DERIVED if k in base})
    cfg = build_config(merged, has_gpu=torch.cuda.is_available())
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
    from accelerate.utils import parse_flag_from_env

    from trainer import parallel
    from trainer.build import build_dataset, build_diffusion, build_network, count_parameters, fit_config_to_data
    from trainer.faults import Faults
    from trainer.monitor import make_monitor
    from trainer.trainer import Trainer
    from trainer.tracking import make_tracker, plot_loss_curve, resolve_wandb_mode

    # Taken before any Accelerate state exists, which would otherwise wrap the network itself.
    plan = parallel.plan_from_env()
    # `--resume latest` names a run by the age of its files: the main process chooses, so that every
    # rank reads the same run's config even while checkpoints are being written.
    world = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # the Accelerator below reuses it
    if args.get("resume") == "latest" and world.num_processes > 1:
        newest = parallel.main_decides(lambda: _str(ckpt_io.newest_run(Path(args.get("results_path", "results")))),
                                       world.is_main_process)
        if newest:
            args = {**args, "resume": newest}

    cfg, run_dir, ckpt_dir = resolve_config(args)
    wandb_note = resolve_wandb_mode()[1] if cfg.run.report_to == "wandb" else None
    accelerator = parallel.make_accelerator(cfg, plan)
    strategy = parallel.for_world(plan).strategy(accelerator, cfg)  # checks the launch against the flags
    main_proc, say = accelerator.is_main_process, accelerator.print

    # The run folder, and the checkpoint to resume: decided on the main process, read on every rank.
    resuming = run_dir is not None
    run_dir, ckpt_dir = (Path(p) if p else None for p in parallel.main_decides(
        lambda: tuple(map(_str, _decide_run(cfg, run_dir, ckpt_dir, say))), main_proc))
    faults = Faults.from_env()
    checkpoints = ckpt_io.CheckpointManager(run_dir, cfg.run.checkpoints_total_limit, is_main=main_proc, say=say,
                                            before_commit=faults.save_hook)
    resume_from = None
    if resuming:
        found = (ckpt_dir, checkpoints.load(ckpt_dir)) if ckpt_dir else checkpoints.latest_good()
        if found is None:
            raise CheckpointError(f"--resume: no intact checkpoint in {run_dir / 'checkpoints'}.")
        ckpt_dir, resume_from = found
        old = flatten(resume_from.state["config"])
        changed = {k: v for k, v in config_diff(old, cfg.flat()).items() if k not in RESUME_FREE}
        changes = ", ".join(f"{k} {show_value(a)} -> {show_value(b)}" for k, (a, b) in changed.items())
        say(f"resuming {run_dir} from {ckpt_dir.name} (step {resume_from.state['step']})"
            + (f"; changed since: {changes}" if changes else ""))

    # Data, then the model: both before any training step, so bad input fails early.
    with accelerator.main_process_first():
        dataset = build_dataset(cfg, progress=main_proc)
    fit_config_to_data(cfg, dataset)
    torch.manual_seed(cfg.train.seed)
    net = build_network(cfg)
    diffusion = build_diffusion(cfg, net)
    with accelerator.main_process_first():
        monitor = make_monitor(cfg, diffusion, accelerator.device, progress=main_proc, accelerator=accelerator,
                               dataset=dataset)

    if main_proc:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / "config.json")
        if getattr(dataset, "normalization", None) is not None:  # to put samples back in physical units
            dataset.normalization.save(run_dir / "normalization.json")
    run_id = parallel.main_decides(
        lambda: resume_from.state.get("tracker_run_id") if resume_from else uuid.uuid4().hex[:12], main_proc)
    tracker = make_tracker(accelerator, cfg.run.report_to, run_dir, cfg.run.wandb_project, cfg.to_dict(), run_id)
    upload = cfg.run.wandb_checkpoints
    if upload != "none":
        checkpoints.after_commit = lambda folder, step, best: (
            tracker.log_checkpoint(folder, step, best=best) if best or upload == "all" else None)
    trainer = Trainer(cfg, accelerator, strategy, diffusion, dataset, checkpoints, tracker=tracker,
                      resume_from=resume_from, run_id=run_id, faults=faults, monitor=monitor)

    t, d = cfg.train, cfg.diffusion
    processes = accelerator.num_processes
    say(f"device: {accelerator.device} x {processes} process(es), mixed precision {accelerator.mixed_precision}, "
        f"{strategy.describe()}\n"
        f"batch: {t.batch_size} per device x {processes} x {t.grad_accum} accumulation = "
        f"{t.batch_size * processes * t.grad_accum} per optimizer step\n"
        f"model: {type(net).__name__} dim {cfg.model.dim} mults {list(cfg.model.dim_mults)}, "
        f"{count_parameters(net) / 1e6:.2f}M parameters, preset {cfg.run.preset}; "
        f"sampling: {d.sampler} {d.sampling_timesteps} steps\n"
        f"data: {describe_data(cfg, dataset)}\n"
        f"run folder: {run_dir}")
    if wandb_note and main_proc:
        say(f"W&B: {wandb_note}")
    slow_bf16 = cpu_bf16_note(accelerator.device, accelerator.mixed_precision)
    if slow_bf16:
        say(slow_bf16)

    start = time.perf_counter()
    try:
        state = trainer.train()
    finally:
        tracker.finish()
    say(f"done: step {state.step} in {time.perf_counter() - start:.0f} s; "
        f"checkpoints in {run_dir / 'checkpoints'}, samples in {run_dir / 'samples'}")
    if main_proc:
        curve = plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss.png")
        say(run_summary(run_dir, state, curve))
        if trainer.last_samples is not None and hasattr(dataset, "score"):  # built-in data that can judge samples
            score = {"step": state.step, **dataset.score(trainer.last_samples.float().cpu())}
            (run_dir / "score.json").write_text(json.dumps(score, indent=2) + "\n")
            say(f"  sample score:      {score['samples']:.3f} of the last samples' pixels are off their main flat "
                f"colours (training images {score['data']:.3f}, noise {score['noise']:.3f}; lower is crisper)")
    if main_proc and cfg.run.report_to == "wandb" and os.environ.get("WANDB_MODE") == "offline":
        say(f"W&B run saved offline in {tracker.location}; upload it with: wandb sync {tracker.location}")
    # Free the wrapped network, its optimizer and their pending collective work while the interpreter is
    # whole, then close the process group: a gloo work object destroyed during interpreter shutdown
    # aborts the process ("terminate called without an active exception") after a finished run.
    del trainer, strategy
    accelerator.free_memory()
    gc.collect()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return run_dir


def run_summary(run_dir: Path, state, curve: Path | None) -> str:
    """The few lines a finished run ends with: what was done and where everything is."""
    checkpoints = ckpt_io.list_checkpoints(run_dir)
    samples = sorted((run_dir / "samples").glob("step-*"))
    lines = [f"summary: {state.step} steps, {state.images_seen} samples seen, {state.nonfinite_skipped} skipped "
             f"step(s), {state.rollbacks} rollback(s)",
             f"  newest checkpoint: {checkpoints[-1] if checkpoints else 'none'}",
             f"  newest samples:    {samples[-1] if samples else 'none'}"]
    if state.best_metric is not None:
        lines.append(f"  best checkpoint:   {run_dir / 'checkpoints' / ckpt_io.BEST} (evaluation {state.best_metric:.4g} "
                     f"at step {state.best_step})")
    if curve is not None:
        lines.append(f"  loss curve:        {curve}")
    return "\n".join(lines)


def describe_data(cfg: Config, dataset) -> str:
    data = cfg.data
    shape = "x".join(map(str, sample_shape(cfg)))
    if getattr(dataset, "streaming", False):  # of unknown length
        return f"a stream of images of {shape} from {dataset.source} (shuffle buffer {data.shuffle_buffer})"
    if not dataset.frames:
        return f"{len(dataset)} images of {shape}"
    given = f", the first {data.cond_steps} given" if data.cond_steps else ""
    fields = f", {data.field_channels} static field channel(s)" if data.field_channels else ""
    return f"{len(dataset)} windows of {shape} (C, F, H, W; every {data.ts} frame(s){given}{fields})"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (AMX tiles or AVX-512 BF16); without either, torch emulates
    bf16 through fp32 conversions."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(check() for check in checks if check is not None)


def cpu_bf16_note(device: torch.device, mixed_precision: str) -> str | None:
    """A word for bf16 autocast on a CPU that has no bf16 arithmetic: there it is several times slower than fp32
    (benchmarks/cpu_step.py on an AVX2 machine: 6-7x)."""
    if device.type != "cpu" or mixed_precision != "bf16" or cpu_has_native_bf16():
        return None
    return ("note: --mixed_precision bf16 on this CPU (no AMX or AVX-512 BF16) is emulated and several times "
            "slower than fp32; --mixed_precision no trains faster here.")


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _decide_run(cfg: Config, run_dir: Path | None, ckpt_dir: Path | None, say) -> tuple[Path, Path | None]:
    """(run folder, the checkpoint folder named to resume or None). A new run's folder must hold no
    checkpoints; a resumed one is cleaned of what a crash left. Main process only."""
    if run_dir is None:
        name = cfg.run.run_name or time.strftime("%Y%m%d-%H%M%S")
        run_dir = Path(cfg.run.results_path) / name
        if ckpt_io.list_checkpoints(run_dir):
            raise ConfigError(f"run folder {run_dir} already holds checkpoints: pass --resume {run_dir} to "
                              f"continue it, or another --run_name.")
        return run_dir, None
    for p in ckpt_io.clean_leftovers(run_dir):
        say(f"removed an incomplete checkpoint left by a crash: {p}")
    return run_dir, ckpt_dir


if __name__ == "__main__":
    sys.exit(main())
