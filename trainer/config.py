"""One typed config for a run, validated before anything heavy starts.

The config is a tree of dataclasses, one per concern. Every field carries its help text in
`metadata["help"]`; `train.py` turns the fields into argparse flags (flat names such as
`--batch_size`, as research users expect), and the README's flag reference is generated from the
same source. Precedence, lowest first: field defaults < preset < `--config file.yaml` < flags.

A preset fills in sizes that depend on the hardware: `tiny` trains a small model in a few CPU
minutes, `full` a real-size one; `auto` picks `full` when a GPU is present, else `tiny`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_type_hints

from models.compiled import COMPILE_BACKENDS, COMPILE_MODES
from models.diffusion import BETA_SCHEDULES, LOSS_TYPES, OBJECTIVES
from models.sampling import SAMPLER_NAMES, SPACINGS
from trainer.data.base import check_image_shape
from trainer.errors import ConfigError

MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
LR_SCHEDULES = ("constant", "cosine", "step")
REPORT_TO = ("wandb", "tensorboard", "none")
PRESETS = ("auto", "tiny", "full")


def _field(default: Any, help: str, *, choices: tuple | None = None, **kw) -> Any:
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: tuple(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


MODELS = ("unet", "unet3d")
UNET3D_KINDS = ("factorized", "conv3d")
NS_PRESETS = ("kolmogorov", "fno")
NS_CHANNELS = ("vorticity", "u", "v")
BURGERS_SETTINGS = ("full", "partial")
BURGERS_PARTS = ("joint", "control")


@dataclass
class ModelConfig:
    model: str = _field("unet", "Network: unet (2D: images, single frames) or unet3d (clips of --frames frames).",
                        choices=MODELS)
    unet3d_kind: str | None = _field(None, "Unet3D kind (--model unet3d only): factorized (per-frame 2D convolutions, "
                                     "spatial and temporal attention) or conv3d (3x3x3 convolutions throughout) "
                                     "(default: factorized).", choices=UNET3D_KINDS)
    dim: int = _field(64, "Base channel width of the Unet.")
    dim_mults: tuple[int, ...] = _field((1, 2, 4, 8), "Width multiplier per resolution level; "
                                        "the image is halved len(dim_mults)-1 times.")
    attn_heads: int = _field(4, "Attention heads.")
    attn_dim_head: int = _field(32, "Width of one attention head.")
    dropout: float = _field(0.0, "Dropout inside the ResnetBlocks.")
    self_condition: bool = _field(False, "Feed the model its own previous x0 estimate (Chen et al. 2022).")
    learned_sinusoidal_cond: bool = _field(False, "Learned Fourier features for the time embedding.")
    random_fourier_features: bool = _field(False, "Random (fixed) Fourier features for the time embedding.")


@dataclass
class DiffusionConfig:
    timesteps: int = _field(1000, "Diffusion steps T of the forward process.")
    sampler: str = _field("ddim", "Sampler of the save-and-sample grids and of trainer/sample.py: ddpm "
                          "(ancestral), ddim (deterministic at --ddim_eta 0), dpmpp_2m (DPM-Solver++ 2M, "
                          "good at 10-25 steps).", choices=SAMPLER_NAMES)
    sampling_timesteps: int = _field(250, "Network evaluations per sample, spread over --timesteps as "
                                     "--sampling_spacing says (at most --timesteps).")
    sampling_spacing: str = _field("auto", "Where the sampling steps lie: uniform in t, or logsnr (evenly in "
                                   "log(alpha/sigma), what DPM-Solver++'s steps assume); auto: logsnr for dpmpp_2m, "
                                   "uniform for ddpm and ddim.", choices=("auto", *SPACINGS))
    objective: str = _field("pred_v", "What the network predicts.", choices=OBJECTIVES)
    beta_schedule: str = _field("sigmoid", "Noise schedule.", choices=tuple(BETA_SCHEDULES))
    loss_type: str = _field("l2", "Regression loss on the objective.", choices=LOSS_TYPES)
    min_snr_loss_weight: bool = _field(False, "Min-SNR-gamma loss weighting (Hang et al. 2023).")
    min_snr_gamma: float = _field(5.0, "Gamma of the min-SNR weighting.")
    offset_noise_strength: float = _field(0.0, "Offset noise strength (0 disables; 0.1 is typical).")
    ddim_eta: float = _field(0.0, "DDIM eta (--sampler ddim only): 0 is deterministic, 1 is DDPM-like.")
    clip_denoised: bool | None = _field(None, "Clip predicted x0 to [-1, 1] while sampling "
                                        "(default: yes for images, no for physical fields).")


@dataclass
class DataConfig:
    dataset: str = _field("shapes", "A built-in dataset (images: shapes, two_modes; clips for --model unet3d: "
                          "moving_shapes, bouncing shapes; navier_stokes, fluid trajectories generated once, see "
                          "--ns_preset; burgers, 1D Burgers control problems, see --burgers_observe; ns_control, Kolmogorov "
                          "flow steered by its forcing amplitude, for --model unet3d), a Hugging Face Hub dataset name, or a folder saved with datasets' "
                          "save_to_disk.")
    train_data_dir: str | None = _field(None, "A folder of images (any depth) to train on, listed at start-up "
                                        "and checked in the background (unreadable files skipped, cached); of clips for --model unet3d (.gif; .npy/.npz arrays [T, H, W], "
                                        "[T, H, W, C] or [T, C, H, W]; videos where av or imageio-ffmpeg is "
                                        "installed); or of simulations, sim_XXXXXX.npz files each holding one "
                                        "[T, C, H, W] trajectory.")
    max_shapes: int = _field(3, "--dataset shapes: each image holds 1 to this many shapes.")
    shape_radius: tuple[float, ...] = _field((0.12, 0.3), "--dataset shapes: the range LO HI that each shape's "
                                             "radius is drawn from, as fractions of the image side.")
    image_column: str | None = _field(None, "Image column of a Hub dataset (default: the first image column).")
    split: str = _field("train", "Split of a Hub dataset.")
    streaming: bool = _field(False, "Stream the images as they are trained on, for data larger than a disk: "
                             "--dataset NAME of the Hub, or a local folder, file or glob of parquet or webdataset "
                             "(.tar) shards (also as --train_data_dir); split across processes, shuffled in a "
                             "buffer, its position saved in checkpoints.")
    shuffle_buffer: int = _field(1000, "Encoded images held in the shuffle buffer of --streaming, per process.")
    image_size: int = _field(32, "Side of the square training images, in pixels.")
    channels: int = _field(3, "Image channels: 3 for RGB, 1 for grayscale.")
    random_flip: bool = _field(True, "Random horizontal flips of images, drawn from the seeded step generator "
                               "(simulations are never flipped).")
    frames: int = _field(1, "Frames per clip (--model unet3d); 1 trains the 2D Unet on single frames.")
    cond_steps: int = _field(0, "Frames given at the start of every clip (forecasting): seen clean, never "
                             "generated; 0 generates whole clips.")
    ts: int = _field(1, "Stride, in frames, between the frames of one window (trajectories and clips).")
    traj_len: int | None = _field(None, "Frames of each trajectory that windows are cut from (default: all).")
    state_channels: int | None = _field(None, "Of a simulation folder's channels, the first this many are generated; "
                                        "the others go in as static fields (default: all are generated).")
    field_channels: int = _field(0, "Static field channels beside the generated ones; set from a simulation's data.")
    ns_preset: str = _field("kolmogorov", "Built-in Navier-Stokes data (--dataset navier_stokes): kolmogorov "
                            "(forcing sin 4y, drag 0.1, Re about 1000; CPU minutes) or fno (Li et al. 2021, "
                            "viscosity 1e-3, T = 50; a GPU job).", choices=NS_PRESETS)
    ns_channels: tuple[str, ...] = _field(("vorticity",), "Fields of the Navier-Stokes data, any of: vorticity u v.")
    ns_size: int | None = _field(None, "Frames of the Navier-Stokes data are ns_size x ns_size (default: the "
                                 "preset's 64); the solver's grid is as much finer as the preset's.")
    num_trajectories: int = _field(64, "Training trajectories of --dataset navier_stokes (fno's protocol: 1000) "
                                   "and of --dataset ns_control.")
    num_test_trajectories: int = _field(16, "Held-out trajectories of --dataset navier_stokes (fno's protocol: 200) "
                                        "and control problems of --dataset ns_control.")
    burgers_observe: str = _field("full", "Burgers control data (--dataset burgers): full observation, or partial "
                                  "(only the outer quarters of the domain; the rest of the state is not given).",
                                  choices=BURGERS_SETTINGS)
    burgers_control: str = _field("full", "Burgers control data: the control acts everywhere (full), or on the outer "
                                  "quarters only (partial).", choices=BURGERS_SETTINGS)
    burgers_part: str = _field("joint", "What a Burgers model generates: joint (state trajectory and control, "
                               "2 channels) or control (the control alone: the prior model of prior reweighting).",
                               choices=BURGERS_PARTS)
    burgers_trajectories: int = _field(2000, "Training trajectories of --dataset burgers (DiffPhyCon's: 90000).")
    burgers_test_trajectories: int = _field(50, "Held-out control problems of --dataset burgers (DiffPhyCon scores "
                                            "the first 50).")
    num_workers: int = _field(-1, "DataLoader workers per process; -1 picks 0 on CPU and "
                              "min(8, cores per process - 1) on GPU.")


@dataclass
class TrainConfig:
    batch_size: int = _field(16, "Batch size per device (per process).")
    grad_accum: int = _field(1, "Micro-batches accumulated per optimizer step.")
    train_num_steps: int = _field(100_000, "Optimizer steps to train for.")
    lr: float = _field(8e-5, "Peak learning rate of AdamW.")
    adam_betas: tuple[float, ...] = _field((0.9, 0.99), "AdamW betas.")
    weight_decay: float = _field(0.0, "AdamW weight decay.")
    max_grad_norm: float = _field(1.0, "Clip the gradient norm to this (0 disables clipping).")
    lr_warmup_steps: int = _field(0, "Linear learning-rate warm-up steps.")
    lr_schedule: str = _field("constant", "Learning rate after warm-up.", choices=LR_SCHEDULES)
    lr_decay_steps: tuple[int, ...] = _field((50_000, 150_000, 300_000),
                                             "Steps at which --lr_schedule step multiplies the LR by --lr_decay_factor.")
    lr_decay_factor: float = _field(0.1, "Factor of each step decay.")
    ema_decay: float = _field(0.995, "Largest EMA decay; ema-pytorch warms up to it as 1-(1+n)^(-2/3) over "
                              "EMA updates n.")
    ema_update_every: int = _field(10, "Update the EMA every this many optimizer steps.")
    ema_update_after_step: int = _field(100, "Copy the weights into the EMA until this step, then average.")
    save_and_sample_every: int = _field(1000, "Save a checkpoint and an EMA sample grid every this many steps.")
    num_samples: int = _field(16, "Samples per save-and-sample, split across processes.")
    log_every: int = _field(10, "Reduce and log loss, LR, gradient norm and throughput every this many steps.")
    eval_every: int = _field(0, "Evaluate every this many steps (0: never) and keep the best checkpoint in "
                             "checkpoints/best: forecasters are rolled out on held-out trajectories and judged by "
                             "the relative L2 of the predicted frames.")
    eval_trajectories: int = _field(4, "Held-out trajectories rolled out at each --eval_every.")
    fid_every: int = _field(0, "Image runs: score EMA samples by FID and KID against the training images every this "
                            "many steps (0: never), and keep the best by FID in checkpoints/best; needs --fid_weights.")
    fid_num_samples: int = _field(1000, "EMA samples per --fid_every, split across processes, and training images "
                                  "(or all, if fewer) whose features are computed once and cached in $EDDY_CACHE/fid.")
    fid_weights: str | None = _field(None, "The feature network of --fid_every, a local TorchScript file: NVlabs' "
                                     "inception-2015-12-05.pt (called as net(x, return_features=True)), or any network "
                                     "mapping images [N, 3, H, W] in [0, 255] to features [N, D] (called as net(x) "
                                     "where it takes no return_features). Without it the run says so and goes on "
                                     "unscored.")
    mixed_precision: str = _field("auto", "auto: bf16 on GPUs that support it, else no.", choices=MIXED_PRECISION)
    seed: int = _field(0, "Seed of the data order, the noise and the initial weights.")
    max_nonfinite_steps: int = _field(20, "Consecutive steps with a non-finite loss or gradient (each one "
                                      "skipped) before the run rolls back to its last checkpoint.")
    max_rollbacks: int = _field(3, "Rollbacks after which a run that keeps diverging stops with an error.")
    compile: bool = _field(False, "torch.compile the training loss with the network inside it as one graph "
                           "(fullgraph, no recompiles after the first steps), and the sampling network; where compiling "
                           "fails, a warning and eager execution. The first steps (one of each self-conditioning branch) "
                           "compile, and take minutes.")
    compile_mode: str = _field("default", "The mode of --compile: reduce-overhead adds CUDA graphs, max-autotune "
                               "searches kernels longer.", choices=COMPILE_MODES)
    compile_backend: str = _field("inductor", "The backend of --compile: inductor generates kernels; aot_eager only "
                                  "traces, a quick check that a model compiles.", choices=COMPILE_BACKENDS)
    channels_last: bool | None = _field(None, "Keep the 2D Unet's activations and weights channels-last (NHWC), "
                                        "which convolutions run faster in, on GPUs and CPUs (default: yes for "
                                        "--model unet; clips keep their layout).")
    grad_checkpointing: bool = _field(False, "Recompute each block's activations in backward instead of storing "
                                      "them: one more forward pass of each block per step for much less activation memory.")


@dataclass
class RunConfig:
    results_path: str = _field("results", "Folder that holds one subfolder per run.")
    run_name: str | None = _field(None, "Name of the run folder (default: the start time).")
    resume: str | None = _field(None, "latest: the newest run under --results_path; auto: the run --run_name "
                                "if it has a checkpoint, else start it (for restarted jobs); or a run folder "
                                "or checkpoint folder.")
    checkpoints_total_limit: int = _field(3, "Checkpoints kept per run (at least 2).")
    report_to: str = _field("wandb", "Experiment tracker. W&B goes offline by itself when no API key is set.",
                            choices=REPORT_TO)
    wandb_project: str = _field("eddy", "W&B project name.")
    wandb_checkpoints: str = _field("none", "Upload checkpoints to W&B as versions of the model artifact "
                                    "model-<run id>: none; best (checkpoints/best each time the evaluation metric "
                                    "improves, alias best); all (every checkpoint saved, aliases latest and step-N, "
                                    "and best). Offline runs keep them for `wandb sync`.",
                                    choices=("none", "best", "all"))
    preset: str = _field("auto", "Size preset: tiny (CPU minutes), full (GPU), auto (full if a GPU is present).",
                         choices=PRESETS)


def flatten(nested: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A config as saved (`{section: {flag: value}}`) -> `{flag: value}`; flag names are unique."""
    return {k: v for section in nested.values() for k, v in section.items()}


SECTIONS = {"model": ModelConfig, "diffusion": DiffusionConfig, "data": DataConfig,
            "train": TrainConfig, "run": RunConfig}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def flat(self) -> dict[str, Any]:
        return flatten(self.to_dict())

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")


# Presets: sizes that depend on the hardware. Only fields the user did not set are taken from here.
PRESET_VALUES = {
    "tiny": dict(dim=32, dim_mults=(1, 2, 2), attn_heads=2, attn_dim_head=16, image_size=16,
                 batch_size=16, train_num_steps=1000, lr=3e-3, lr_warmup_steps=50,
                 # lr 1e-3 -> 2e-3 -> 3e-3 on the default job: 64 samples of seeds 0 and 1 scored 0.25/0.29 -> 0.18/0.22
                 # -> 0.15/0.20 (one training run each, 2 CPU cores).
                 sampling_timesteps=50, save_and_sample_every=250, num_samples=16,
                 ema_update_after_step=50, ema_decay=0.99, ema_update_every=1, log_every=25, fid_num_samples=256,
                 # Measured on the default job (1000 steps of built-in shapes, 2 CPU cores): the share of sample
                 # pixels off their image's main colours fell from 0.76 to 0.41 (data 0.13, noise 1.0), 64 samples.
                 min_snr_loss_weight=True, ddim_eta=1.0,
                 # One large shape per image instead of up to three: 64 samples score 0.26 (data 0.03), each a
                 # single flat shape on its background, where three shapes in 1000 steps were mixed blobs.
                 max_shapes=1, shape_radius=(0.2, 0.35)),
    "full": dict(dim=64, dim_mults=(1, 2, 4, 8), image_size=32, batch_size=64, train_num_steps=100_000,
                 lr=8e-5, sampling_timesteps=250, save_and_sample_every=1000, num_samples=64),
}

# Fields that are not part of the model/data contract of a checkpoint: they may change on resume
# without being reported as a difference.
RESUME_FREE = {"resume", "run_name", "results_path", "train_num_steps", "save_and_sample_every", "eval_every",
               "eval_trajectories", "fid_every", "fid_num_samples", "fid_weights", "sampling_spacing",
               "num_samples", "log_every", "report_to", "wandb_project", "wandb_checkpoints", "num_workers",
               "checkpoints_total_limit", "preset", "max_nonfinite_steps", "max_rollbacks", "compile", "compile_mode",
               "compile_backend", "channels_last", "grad_checkpointing"}
# Fields that a simulation's data decides (trainer/build.py, fit_config_to_data).
DATA_DERIVED = ("channels", "image_size", "field_channels")
# Fields that change the numerics of the network or the process: a resume with a different value is refused.
RESUME_LOCKED = {f.name for f in fields(ModelConfig)} | {
    "timesteps", "objective", "beta_schedule", "image_size", "channels", "frames", "cond_steps", "state_channels",
    "field_channels", "ns_channels", "ns_preset", "ns_size", "burgers_observe", "burgers_control", "burgers_part"}


def field_specs() -> list[tuple[str, dataclasses.Field, type]]:
    """(section, field, type) for every config field, in declaration order."""
    out = []
    for section, cls in SECTIONS.items():
        hints = get_type_hints(cls)
        for f in fields(cls):
            out.append((section, f, hints[f.name]))
    names = [f.name for _, f, _ in out]
    assert len(names) == len(set(names)), "config field names must be unique across sections"
    return out


def build_config(explicit: dict[str, Any], *, has_gpu: bool) -> Config:
    """Resolve a Config from the values the user gave (flags and YAML, already merged)."""
    specs = {f.name: (section, typ) for section, f, typ in field_specs()}
    unknown = sorted(set(explicit) - set(specs))
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(unknown)}. "
                          f"Run `python trainer/train.py --help` for the list.")
    preset = explicit.get("preset", "auto")
    if preset not in PRESETS:
        raise ConfigError(f"--preset {preset!r} is not one of {', '.join(PRESETS)}.")
    resolved = "full" if preset == "auto" and has_gpu else ("tiny" if preset == "auto" else preset)
    values = {**PRESET_VALUES[resolved], **explicit}
    if "ddim_eta" not in explicit and values.get("sampler", DiffusionConfig.sampler) != "ddim":
        values.pop("ddim_eta", None)  # a preset's eta is for its DDIM sampling; another --sampler takes none
    per_section: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for name, value in values.items():
        section, typ = specs[name]
        per_section[section][name] = _coerce(name, value, typ)
    cfg = Config(**{s: SECTIONS[s](**kw) for s, kw in per_section.items()})
    cfg.run.preset = resolved
    return cfg


def _coerce(name: str, value: Any, typ: Any) -> Any:
    """A value from YAML or a saved config as the field's type (YAML reads `1e-4` as a string)."""
    args = [a for a in get_args(typ) if a is not type(None)]
    if value is None and type(None) in get_args(typ):
        return None
    try:
        if getattr(typ, "__origin__", None) is tuple:
            if not isinstance(value, (list, tuple)):
                value = [value]
            return tuple(get_args(typ)[0](v) for v in value)
        base = args[0] if args else typ
        if base is bool:
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            if not isinstance(value, bool):
                raise ValueError(value)
            return value
        if base is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return base(value)
    except (TypeError, ValueError):
        raise ConfigError(f"--{name} {value!r} is not a valid {getattr(typ, '__name__', str(typ))}.") from None


def validate(cfg: Config) -> None:
    """Check every value and every combination that can be checked without data or devices."""
    m, d, data, t, r = cfg.model, cfg.diffusion, cfg.data, cfg.train, cfg.run
    for section in SECTIONS:
        for f in fields(SECTIONS[section]):
            choices = f.metadata.get("choices")
            value = getattr(getattr(cfg, section), f.name)
            if choices and value is not None and value not in choices:
                raise ConfigError(f"--{f.name} {value!r} is not one of: {', '.join(choices)}.")
    positive = {"batch_size": t.batch_size, "grad_accum": t.grad_accum, "train_num_steps": t.train_num_steps,
                "save_and_sample_every": t.save_and_sample_every, "log_every": t.log_every,
                "image_size": data.image_size, "dim": m.dim, "timesteps": d.timesteps,
                "sampling_timesteps": d.sampling_timesteps, "attn_heads": m.attn_heads,
                "attn_dim_head": m.attn_dim_head, "ema_update_every": t.ema_update_every,
                "max_nonfinite_steps": t.max_nonfinite_steps}
    for name, value in positive.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"--{name} must be a whole number of at least 1, got {value!r}.")
    if t.eval_every < 0 or t.eval_trajectories < 1:
        raise ConfigError(f"--eval_every must be 0 or more and --eval_trajectories at least 1, got {t.eval_every} "
                          f"and {t.eval_trajectories}.")
    if t.fid_every < 0 or t.fid_num_samples < 2:
        raise ConfigError(f"--fid_every must be 0 or more and --fid_num_samples at least 2, got {t.fid_every} and "
                          f"{t.fid_num_samples}.")
    if t.fid_every and t.fid_weights is not None and not Path(t.fid_weights).is_file():
        raise ConfigError(f"--fid_weights {t.fid_weights} does not exist: pass a local copy of "
                          f"inception-2015-12-05.pt (README, Training), or drop --fid_weights.")
    if t.max_rollbacks < 0:
        raise ConfigError(f"--max_rollbacks must be 0 or more, got {t.max_rollbacks}.")
    if t.num_samples < 0:
        raise ConfigError(f"--num_samples must be 0 or more, got {t.num_samples}.")
    if t.lr <= 0:
        raise ConfigError(f"--lr must be positive, got {t.lr}.")
    if not 0.0 <= t.ema_decay < 1.0:
        raise ConfigError(f"--ema_decay must be in [0, 1), got {t.ema_decay}.")
    validate_clips(cfg)
    if not m.dim_mults or any(x < 1 for x in m.dim_mults):
        raise ConfigError(f"--dim_mults must be one or more positive numbers, got {list(m.dim_mults)}.")
    factor = 2 ** (len(m.dim_mults) - 1)
    if not is_simulation(cfg) and data.image_size % factor:  # a simulation's size is checked once it is read
        ok = [s for s in range(factor, 4 * data.image_size + factor, factor) if abs(s - data.image_size) <= factor]
        raise ConfigError(
            f"--image_size {data.image_size} is not divisible by 2^(levels-1) = {factor} for "
            f"--dim_mults {' '.join(map(str, m.dim_mults))} ({len(m.dim_mults)} levels). "
            f"Use an image size such as {' or '.join(map(str, ok))}, or fewer levels.")
    if d.beta_schedule == "linear" and d.timesteps <= 20:
        raise ConfigError(f"--beta_schedule linear needs --timesteps above 20 (its last beta is 20/T), "
                          f"got {d.timesteps}; use cosine or sigmoid for short schedules.")
    validate_sampling(d.sampler, d.sampling_timesteps, d.timesteps, d.ddim_eta)
    if m.dim % 8:
        raise ConfigError(f"--dim must be a multiple of 8 (GroupNorm groups), got {m.dim}.")
    if r.checkpoints_total_limit < 2:
        raise ConfigError(f"--checkpoints_total_limit must be at least 2 (one to fall back to), "
                          f"got {r.checkpoints_total_limit}.")
    if len(t.adam_betas) != 2 or not all(0 <= b < 1 for b in t.adam_betas):
        raise ConfigError(f"--adam_betas needs two numbers in [0, 1), got {list(t.adam_betas)}.")
    if t.lr_schedule == "step" and list(t.lr_decay_steps) != sorted(t.lr_decay_steps):
        raise ConfigError(f"--lr_decay_steps must be increasing, got {list(t.lr_decay_steps)}.")
    if r.wandb_checkpoints != "none" and r.report_to != "wandb":
        raise ConfigError(f"--wandb_checkpoints {r.wandb_checkpoints} uploads checkpoints to W&B, but --report_to is "
                          f"{r.report_to}. Use --report_to wandb, or drop --wandb_checkpoints.")
    if r.wandb_checkpoints == "best" and not (t.eval_every or t.fid_every):
        raise ConfigError("--wandb_checkpoints best uploads the best checkpoint by the evaluation metric, and this run "
                          "evaluates nothing. Add --fid_every N (images) or --eval_every N (forecasts), or use "
                          "--wandb_checkpoints all.")
    if r.report_to == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError("--report_to tensorboard needs the tensorboard package: "
                              "pip install tensorboard, or use --report_to wandb|none.") from None
    if t.channels_last and cfg.model.model != "unet":
        raise ConfigError("--channels_last true applies to the 2D Unet (--model unet); clips keep their layout. "
                          "Drop the flag.")
    if data.train_data_dir is not None and not Path(data.train_data_dir).exists():
        raise ConfigError(f"--train_data_dir {data.train_data_dir} does not exist. "
                          f"Pass a folder of images, or drop the flag to train on a built-in dataset.")
    validate_streaming(cfg)


def validate_streaming(cfg: Config) -> None:
    """--streaming takes a Hub dataset or local parquet / webdataset shards of pictures, nothing generated."""
    from trainer.data.builtin import BUILTIN_DATASETS
    from trainer.data.streaming import find_shards

    data = cfg.data
    if data.shuffle_buffer < 1:
        raise ConfigError(f"--shuffle_buffer must be at least 1, got {data.shuffle_buffer}.")
    if not data.streaming:
        return
    if cfg.model.model != "unet" or is_simulation(cfg):
        raise ConfigError("--streaming streams pictures for the 2D Unet; clips and simulations are read from disk "
                          "(built-in or --train_data_dir). Drop --streaming.")
    if data.train_data_dir is None and data.dataset in BUILTIN_DATASETS:
        raise ConfigError(f"--dataset {data.dataset} is built in (generated, nothing to stream): drop --streaming, or "
                          f"pass a Hub dataset name or parquet / webdataset shards as --dataset.")
    if cfg.train.fid_every:
        raise ConfigError("--fid_every compares samples with training images drawn by index, which a stream has "
                          "not: drop --fid_every or --streaming.")
    if data.train_data_dir is not None:
        find_shards(data.train_data_dir, "--train_data_dir")
    else:
        find_shards(data.dataset)  # a local path must hold shards; anything else names a Hub dataset


def uses_channels_last(cfg: Config) -> bool:
    """--channels_last, resolved: on by default for the 2D Unet."""
    return cfg.model.model == "unet" and cfg.train.channels_last is not False


def is_burgers(cfg: Config) -> bool:
    """Whether the run trains on the built-in Burgers control problems."""
    return cfg.data.dataset == "burgers" and cfg.data.train_data_dir is None


def is_flow_control(cfg: Config) -> bool:
    """Whether the run trains on the built-in fluid control data (trainer/data/ns_control.py)."""
    return cfg.data.dataset == "ns_control" and cfg.data.train_data_dir is None


def is_simulation(cfg: Config) -> bool:
    """Whether the run trains on physical fields (built-in Navier-Stokes or Burgers, or a folder of sim_*.npz
    files)."""
    from trainer.data.fluid import is_simulation_folder

    return cfg.data.dataset in ("navier_stokes", "burgers", "ns_control") or (
        cfg.data.train_data_dir is not None and is_simulation_folder(cfg.data.train_data_dir))


def is_video(cfg: Config) -> bool:
    """Whether the data are clips of pictures: --dataset moving_shapes or a --train_data_dir of clip files."""
    from trainer.data.video import is_clip_folder

    data = cfg.data
    if data.train_data_dir is None:
        return data.dataset == "moving_shapes"
    return not is_simulation(cfg) and is_clip_folder(data.train_data_dir)


def validate_clips(cfg: Config) -> None:
    """The model, clip and data-kind flags together."""
    m, data = cfg.model, cfg.data
    if not is_simulation(cfg):
        check_image_shape(data.image_size, data.channels)
    if m.model == "unet":
        if m.unet3d_kind is not None:
            raise ConfigError(f"--unet3d_kind {m.unet3d_kind} is a Unet3D flag; add --model unet3d, or drop it.")
        if data.frames != 1 or data.cond_steps:
            raise ConfigError(f"--frames {data.frames} --cond_steps {data.cond_steps}: the 2D Unet generates single "
                              f"frames; add --model unet3d for clips.")
    for name in ("frames", "ts"):
        if getattr(data, name) < 1:
            raise ConfigError(f"--{name} must be at least 1, got {getattr(data, name)}.")
    if data.cond_steps < 0 or (data.cond_steps and data.cond_steps >= data.frames):
        raise ConfigError(f"--cond_steps {data.cond_steps} must be below --frames {data.frames}: a clip needs at least "
                          f"one frame to generate.")
    unknown = [c for c in data.ns_channels if c not in NS_CHANNELS]
    if unknown or not data.ns_channels:
        raise ConfigError(f"--ns_channels {' '.join(data.ns_channels)}: the fields are {', '.join(NS_CHANNELS)}.")
    span = (data.frames - 1) * data.ts + 1
    if data.traj_len is not None and data.traj_len < span:
        raise ConfigError(f"--traj_len {data.traj_len} is shorter than one window: --frames {data.frames} with --ts "
                          f"{data.ts} spans {span} frames.")
    factor = 2 ** (len(m.dim_mults) - 1)
    size = data.ns_size or 64
    if data.dataset == "navier_stokes" and data.train_data_dir is None and size % factor:
        raise ConfigError(f"--ns_size {size} is not divisible by 2^(levels-1) = {factor} for --dim_mults "
                          f"{' '.join(map(str, m.dim_mults))}; use a multiple of {factor} or fewer levels.")
    if cfg.train.eval_every and (m.model != "unet3d" or not data.cond_steps or data.dataset != "navier_stokes"
                                 or data.train_data_dir):
        raise ConfigError("--eval_every evaluates forecasters on held-out data: --model unet3d --cond_steps k on "
                          "--dataset navier_stokes (whose test split it rolls out). For other runs use "
                          "trainer/evaluate.py or trainer/sample.py on the checkpoints, or drop --eval_every.")
    if cfg.train.fid_every and (m.model != "unet" or is_simulation(cfg)):
        raise ConfigError("--fid_every scores generated images against the training images: it applies to image "
                          "runs (--model unet on pictures), not to clips or simulations. Drop --fid_every.")
    if data.dataset == "burgers" and (m.model != "unet" or data.train_data_dir is not None):
        raise ConfigError("--dataset burgers trains the 2D Unet on (time x space) images of states and controls: drop "
                          "--model unet3d and --train_data_dir.")
    if data.dataset == "ns_control" and (m.model != "unet3d" or data.train_data_dir is not None or data.cond_steps):
        raise ConfigError("--dataset ns_control trains the Unet3D on clips of vorticity and forcing amplitude whose "
                          "first frame is given: use --model unet3d, without --train_data_dir and --cond_steps.")
    if data.dataset != "burgers" and (data.burgers_observe, data.burgers_control, data.burgers_part) != \
            ("full", "full", "joint"):
        raise ConfigError("--burgers_observe, --burgers_control and --burgers_part describe --dataset burgers; add it, "
                          "or drop them.")
    if data.burgers_trajectories < 1 or data.burgers_test_trajectories < 1:
        raise ConfigError("--burgers_trajectories and --burgers_test_trajectories must be at least 1.")
    if data.dataset == "moving_shapes" and data.train_data_dir is not None:
        raise ConfigError(f"--dataset moving_shapes and --train_data_dir {data.train_data_dir} both name the data; "
                          f"pass one.")
    if data.dataset == "moving_shapes" and m.model != "unet3d":
        raise ConfigError("--dataset moving_shapes gives clips: add --model unet3d and --frames F (e.g. 8).")
    if m.model == "unet3d" and not (is_simulation(cfg) or is_video(cfg)):
        raise ConfigError("--model unet3d trains on clips: use --dataset navier_stokes or moving_shapes, or a "
                          "--train_data_dir of clips (.gif, .npy, .npz, videos) or of sim_XXXXXX.npz trajectories.")


def validate_sampling(sampler: str, sampling_timesteps: int, timesteps: int, ddim_eta: float) -> None:
    """The one check of the sampling flags, for training and trainer/sample.py alike."""
    if sampler not in SAMPLER_NAMES:
        raise ConfigError(f"--sampler {sampler!r} is not one of: {', '.join(SAMPLER_NAMES)}.")
    if not isinstance(sampling_timesteps, int) or not 1 <= sampling_timesteps <= timesteps:
        raise ConfigError(f"--sampling_timesteps {sampling_timesteps} is not in [1, --timesteps {timesteps}]: "
                          f"the sampler evaluates the network at most once per diffusion step.")
    if not (math.isfinite(ddim_eta) and ddim_eta >= 0):
        raise ConfigError(f"--ddim_eta must be 0 or more, got {ddim_eta}.")
    if ddim_eta != 0 and sampler != "ddim":
        raise ConfigError(f"--ddim_eta {ddim_eta} applies to --sampler ddim only; --sampler {sampler} takes no eta. "
                          f"Drop --ddim_eta or use --sampler ddim.")


def show_value(value: Any) -> str:
    """A config value as it is written on the command line."""
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return str(value)


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Flat keys of `old` whose values differ in `new` (lists and tuples compare equal). A key that `old`
    lacks is a flag added since that run, whose default keeps what the run did: not a difference."""
    norm = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
    keys = sorted(old)
    return {k: (old.get(k), new.get(k)) for k in keys if norm(old.get(k)) != norm(new.get(k))}


def load_yaml(path: str) -> dict[str, Any]:
    """Read `--config file.yaml`: flat keys, or keys grouped by section (model:, train:, ...)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {path} does not exist.")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path} must hold a mapping of flag names to values.")
    flat: dict[str, Any] = {}
    for k, v in raw.items():
        if k in SECTIONS and isinstance(v, dict):
            flat.update(v)
        else:
            flat[k] = v
    return flat


def default_num_workers(has_gpu: bool, local_world_size: int) -> int:
    if not has_gpu:
        return 0
    return max(1, min(8, (os.cpu_count() or 1) // max(1, local_world_size) - 1))


# ----------------------------------------------------------------------------------------------
# The README's flag reference is generated from the fields above: `python -m trainer.config --update-readme`.

README_START, README_END = "<!-- flags:start -->", "<!-- flags:end -->"


def flags_markdown() -> str:
    """One table per section: flag, default, meaning."""
    out = []
    for section, f, typ in field_specs():
        if not out or out[-1][0] != section:
            out.append((section, []))
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        meaning = f.metadata["help"]
        if "choices" in f.metadata:
            meaning += " One of: " + ", ".join(f"`{c}`" for c in f.metadata["choices"]) + "."
        out[-1][1].append(f"| `--{f.name}` | {default_text(f.name, default, code=True)} | {meaning} |")
    blocks = [f"**{section}**\n\n| flag | default | meaning |\n|---|---|---|\n" + "\n".join(rows)
              for section, rows in out]
    return "\n\n".join(blocks)


def default_text(name: str, default: Any, *, code: bool = False) -> str:
    """The default of a flag, with the preset values where a preset sets it."""
    q = (lambda v: f"`{show_value(v)}`") if code else show_value  # noqa: E731
    per_preset = [f"{p}: {q(PRESET_VALUES[p][name])}" for p in ("tiny", "full") if name in PRESET_VALUES[p]]
    return q(default) + (f" ({'; '.join(per_preset)})" if per_preset else "")


def readme_with_flags(readme: str) -> str:
    head, _, rest = readme.partition(README_START)
    _, _, tail = rest.partition(README_END)
    return f"{head}{README_START}\n{flags_markdown()}\n{README_END}{tail}"


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--update-readme"]:
        readme = Path(__file__).resolve().parent.parent / "README.md"
        readme.write_text(readme_with_flags(readme.read_text()))
    else:
        print(flags_markdown())
