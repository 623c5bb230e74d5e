"""DeepSpeed ZeRO stages 1 and 2 for the Trainer.

A launch with a DeepSpeed accelerate config (`accelerate_configs/deepspeed_zero2.yaml`) asks for it.
As with FSDP (trainer/parallel/fsdp.py), Eddy takes the request away from Accelerate and builds the engine
itself with `deepspeed.initialize` over the process group that Accelerate formed. Accelerate would
count a DeepSpeed world on CPU processes as one process; this way the gloo path that CI tests is the
code the GPUs run, and Accelerate's DeepSpeed plugin (which needs `transformers`) is never loaded.

The engine keeps the network's weights in the training precision (bf16 under bf16) and the fp32
master weights, with the AdamW moments, in partitions across the ranks. The EMA averages the fp32
masters, gathered into an fp32 copy of the network ("the master copy") when it updates. Checkpoints
hold the full fp32 weights and the optimizer state in `optimizer.state_dict()` layout, like every
other mode, so a run moves freely between one process, DDP, FSDP and DeepSpeed.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, MutableMapping

import torch
from torch import nn

from trainer.config import Config
from trainer.errors import ConfigError
from trainer.parallel.base import MakeOptimizer, Plan, Strategy

_TRUE = ("1", "true", "yes")
# Each step's numbers go to Eddy's log; DeepSpeed's own line every N steps would repeat them.
_QUIET_STEPS = 2**62


@dataclass(frozen=True)
class ZeroPlan(Plan):
    """What the launch asked of DeepSpeed: the ZeRO stage, and the values it pins that Eddy's flags also set."""

    name = "zero"
    stage: int = 2
    source: str = "the accelerate config"           # where the settings come from, for messages
    user_config: dict[str, Any] = field(default_factory=dict)  # a DeepSpeed JSON config, when one is named
    pinned: dict[str, Any] = field(default_factory=dict)       # DeepSpeed key -> value the launch fixes

    def describe(self) -> str:
        what = "optimizer state and gradients" if self.stage == 2 else "optimizer state"
        return f"DeepSpeed ZeRO-{self.stage} ({what} sharded, fp32 master weights)"

    def check_precision(self, mixed_precision: str) -> None:
        if mixed_precision == "fp16":
            raise ConfigError("--mixed_precision fp16 with DeepSpeed: Eddy trains DeepSpeed in bf16 or fp32, where no "
                              "loss scaler skips steps behind the EMA's back. Use bf16 (or no).")

    def strategy(self, accelerator, cfg: Config) -> ZeroStrategy:
        # The launch's settings against the flags, before any heavy work.
        self.config(cfg, accelerator.num_processes, bf16=accelerator.mixed_precision == "bf16")
        return ZeroStrategy(accelerator, cfg, self)

    def config(self, cfg: Config, world_size: int, bf16: bool) -> dict[str, Any]:
        """The DeepSpeed config for this run. Raises ConfigError where the launch contradicts a flag."""
        t = cfg.train
        wanted = {"train_micro_batch_size_per_gpu": (t.batch_size, "--batch_size"),
                  "gradient_accumulation_steps": (t.grad_accum, "--grad_accum"),
                  "train_batch_size": (t.batch_size * t.grad_accum * world_size,
                                       "--batch_size x --grad_accum x processes"),
                  "gradient_clipping": (float(t.max_grad_norm), "--max_grad_norm")}
        for key, (value, flag) in wanted.items():
            pinned = self.pinned.get(key, "auto")
            if pinned != "auto" and float(pinned) != float(value):
                raise ConfigError(f"{self.source} sets {key}: {pinned}, but {flag} gives {value}. Eddy takes it from "
                                  f"its flags: remove {key} from {self.source} (or set it to auto).")
        ds = {k: v for k, v in self.user_config.items() if k not in wanted}
        ds.update({k: v for k, (v, _) in wanted.items()})
        zero = dict(ds.get("zero_optimization", {}))
        zero["stage"] = self.stage
        ds["zero_optimization"] = zero
        ds["bf16"] = {**ds.get("bf16", {}), "enabled": bf16}
        ds["fp16"] = {"enabled": False}
        ds["zero_allow_untested_optimizer"] = True  # torch's AdamW, which Eddy builds from its flags
        ds.setdefault("steps_per_print", _QUIET_STEPS)
        return ds


def plan_from_env(environ: MutableMapping[str, str] = os.environ) -> ZeroPlan | None:
    """The DeepSpeed plan that `accelerate launch` put into the environment, or None for no DeepSpeed.

    Removes the launch's DeepSpeed settings from `environ`, so that the Accelerator forms a plain process
    group and leaves the network to Eddy. Raises ConfigError, naming the setting, for what Eddy does not
    support, and when DeepSpeed is not installed.
    """
    if environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() not in _TRUE:
        return None
    taken = {k: environ.pop(k) for k in list(environ)
             if k.startswith("ACCELERATE_DEEPSPEED_") or k in (
                 "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "ACCELERATE_GRADIENT_CLIPPING",
                 "ACCELERATE_CONFIG_DS_FIELDS")}
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("the launch asks for DeepSpeed, which is not installed. Install it with "
                          "`pip install -e '.[deepspeed]'` (or use accelerate_configs/fsdp.yaml, which needs nothing more).")
    user: dict[str, Any] = {}
    path = taken.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
    if path and path.lower() != "none":
        try:
            user = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"deepspeed_config_file {path}: cannot read it as JSON ({e}).") from e
        source = f"the DeepSpeed config {path}"
        zero = user.get("zero_optimization", {})
        stage = zero.get("stage", 0)
        offload = [f"zero_optimization.{k}" for k in ("offload_optimizer", "offload_param")
                   if str(zero.get(k, {}).get("device", "none")).lower() != "none"]
        for key in ("optimizer", "scheduler"):
            if key in user:
                raise ConfigError(f"{source} defines `{key}`; Eddy builds AdamW and its learning-rate schedule "
                                  f"from its flags (--lr, --lr_schedule, ...). Remove `{key}` from the file.")
        if user.get("fp16", {}).get("enabled") in (True, "true"):
            raise ConfigError(f"{source} enables fp16; under DeepSpeed Eddy trains in bf16 or fp32. "
                              f"Set fp16.enabled to false and pass --mixed_precision bf16.")
        pinned = {k: user[k] for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                                       "train_batch_size", "gradient_clipping") if k in user}
    else:
        source = "the accelerate config"
        stage = int(taken.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))
        offload = [f"{k.removeprefix('ACCELERATE_DEEPSPEED_').lower()}_device" for k in (
            "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE")
            if taken.get(k, "none").lower() != "none"]
        pinned = {}
        if "ACCELERATE_GRADIENT_ACCUMULATION_STEPS" in taken:
            pinned["gradient_accumulation_steps"] = taken["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"]
        if "ACCELERATE_GRADIENT_CLIPPING" in taken:
            pinned["gradient_clipping"] = taken["ACCELERATE_GRADIENT_CLIPPING"]
    stage = int(stage)
    if stage not in (1, 2):
        alternative = ("accelerate_configs/fsdp.yaml, which shards the weights too (ZeRO-3)" if stage == 3
                       else "accelerate_configs/multi_gpu.yaml")
        raise ConfigError(f"{source} asks for ZeRO stage {stage}; Eddy runs DeepSpeed ZeRO stages 1 and 2. "
                          f"For stage {stage} use {alternative}.")
    if offload:
        raise ConfigError(f"{source} sets {', '.join(offload)} to offload to the CPU, which Eddy does not support "
                          f"(the optimizer step and the EMA run on the GPU). Set them to none.")
    return ZeroPlan(stage=stage, source=source, user_config=user, pinned=pinned)


class _Autocast(torch.nn.Module):
    """Runs `module` under bf16 autocast. DeepSpeed switches an outer autocast off inside its engine, and
    the engine's bf16 weights meet fp32 inputs (noise, time embeddings) in every block."""

    def __init__(self, module: torch.nn.Module, device_type: str, enabled: bool):
        super().__init__()
        self.module, self.device_type, self.enabled = module, device_type, enabled

    def forward(self, *args, **kwargs):
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.enabled):
            return self.module(*args, **kwargs)


def initialize(diffusion: torch.nn.Module, optimizer: torch.optim.Optimizer, plan: ZeroPlan, cfg: Config,
               world_size: int, bf16: bool, device: torch.device):
    """The DeepSpeed engine over `diffusion` (called as the engine is called, under autocast for bf16) and
    its ZeRO optimizer, wrapping `optimizer`."""
    import logging
    import warnings

    import deepspeed
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    # DeepSpeed's INFO lines repeat what Eddy prints; its warnings still show.
    deepspeed.utils.logger.setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r"`torch.distributed.all_gather_into_tensor` is deprecated")
    engine, zero_optimizer, _, _ = deepspeed.initialize(model=_Autocast(diffusion, device.type, bf16),
                                                        optimizer=optimizer, config=plan.config(cfg, world_size, bf16))
    if not isinstance(zero_optimizer, DeepSpeedZeroOptimizer):
        raise ConfigError(f"{plan.source}: DeepSpeed made a {type(zero_optimizer).__name__} where Eddy needs its ZeRO "
                          f"optimizer (stages 1 and 2).")
    return engine, zero_optimizer


class ZeroStrategy(Strategy):
    """A DeepSpeed engine trains the network in the training precision over fp32 master partitions; the
    EMA and checkpoints read the masters, gathered into an fp32 copy of the network."""

    name = "zero"
    channels_last_weights = False  # the engine broadcasts its parameters as flat bytes: contiguous ones only

    def __init__(self, accelerator, cfg: Config, plan: ZeroPlan):
        super().__init__(accelerator, cfg)
        self.plan = plan

    def describe(self) -> str:
        return self.plan.describe()

    def wrap(self, diffusion: nn.Module, make_optimizer: MakeOptimizer) -> None:
        self.prepare_network(diffusion)
        self.net = diffusion.model
        self.master = copy.deepcopy(self.net).requires_grad_(False).to(self.device)
        self.model, self.optimizer = initialize(diffusion, make_optimizer(self.net.parameters()), self.plan, self.cfg,
                                                self.accelerator.num_processes,
                                                bf16=self.accelerator.mixed_precision == "bf16", device=self.device)
        diffusion.keep_schedule_fp32()  # some DeepSpeed versions cast every buffer to the training precision

    @property
    def online(self) -> nn.Module:
        return self.master

    def sync_online(self) -> None:
        gather_masters(self.net, self.master)

    @contextlib.contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        self.model.set_gradient_accumulation_boundary(last)  # the engine accumulates by itself
        yield

    def loss(self, x0: torch.Tensor, *, cond: dict | None, generator: torch.Generator) -> torch.Tensor:
        return self.model(x0, cond=cond, generator=generator)  # the engine's module autocasts (_Autocast)

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss)  # scaled by 1/grad_accum inside

    def clip(self, max_norm: float) -> torch.Tensor:
        """The engine reduces, clips (its gradient_clipping is --max_grad_norm) and steps here; it skips a step
        whose gradient is not finite itself, and its norm is then infinite."""
        self.model.step()
        norm = self.model.get_global_grad_norm()
        return torch.as_tensor(float("inf") if norm is None else norm, dtype=torch.float32, device=self.device)

    def step(self) -> bool:
        return True  # the engine has stepped in clip()

    def _full_optimizer(self) -> dict[str, Any]:
        return full_optimizer_state(self.net, self.optimizer)

    def _load_optimizer(self, sd: dict[str, Any]) -> None:
        load_full_optimizer_state(self.net, self.optimizer, sd)
        load_masters(self.net, self.master, self.optimizer)


# The master weights and optimizer state, whole. Each `gather_*`/`full_*` function is a collective:
# every rank calls it. Each `load_*` takes the whole state on every rank and keeps this rank's part.

@torch.no_grad()
def gather_masters(net: torch.nn.Module, master: torch.nn.Module) -> None:
    """Copy the fp32 master weights of the engine's `net` into `master`, an fp32 module of the same layout."""
    from deepspeed.utils import safe_get_full_fp32_param

    for p, m in zip(net.parameters(), master.parameters(), strict=True):
        m.copy_(safe_get_full_fp32_param(p))


@torch.no_grad()
def load_masters(net: torch.nn.Module, master: torch.nn.Module, zero_optimizer) -> None:
    """Make `master`'s weights the engine's fp32 masters, and the training-precision weights their rounding."""
    from deepspeed.utils import safe_set_full_fp32_param

    for p, m in zip(net.parameters(), master.parameters(), strict=True):
        safe_set_full_fp32_param(p, m.detach().to(p.device, torch.float32))
    zero_optimizer.update_lp_params()


def _flat_states(zero_optimizer) -> list[dict[str, Any]]:
    """AdamW's state of this rank's flat fp32 partitions, one per parameter group (empty before the first step)."""
    inner = zero_optimizer.optimizer
    return [inner.state[p] for g in inner.param_groups for p in g["params"] if p in inner.state]


def full_optimizer_state(net: torch.nn.Module, zero_optimizer) -> dict[str, Any]:
    """The optimizer state as `optimizer.state_dict()` of AdamW over `net.parameters()` would hold it, on the CPU."""
    from deepspeed.utils import safe_get_full_optimizer_state

    inner = zero_optimizer.optimizer
    params = list(net.parameters())
    if len(inner.param_groups) != 1:
        raise ConfigError("Eddy's DeepSpeed checkpoints expect one parameter group.")
    groups = [{**{k: v for k, v in inner.param_groups[0].items() if k != "params"},
               "params": list(range(len(params)))}]
    flats = _flat_states(zero_optimizer)
    state: dict[int, dict[str, torch.Tensor]] = {}
    if flats:  # a rank whose state exists implies all do: they step together
        step = flats[0]["step"]
        step = step.detach().to("cpu", torch.float32).clone() if torch.is_tensor(step) else torch.tensor(float(step))
        for i, p in enumerate(params):
            state[i] = {"step": step.clone(),
                        "exp_avg": safe_get_full_optimizer_state(p, "exp_avg").detach().cpu(),
                        "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq").detach().cpu()}
    return {"state": state, "param_groups": groups}


@torch.no_grad()
def load_full_optimizer_state(net: torch.nn.Module, zero_optimizer, sd: dict[str, Any]) -> None:
    """Load a state in `optimizer.state_dict()` layout (parameters by index) into the ZeRO optimizer's partitions."""
    from deepspeed.utils import safe_set_full_optimizer_state

    inner = zero_optimizer.optimizer
    saved = sd.get("state", {})
    step = next(iter(saved.values()))["step"] if saved else torch.tensor(0.0)
    step = float(step.item() if torch.is_tensor(step) else step)
    for group in inner.param_groups:
        for flat in group["params"]:
            st = inner.state[flat]
            if not st:  # before the first step AdamW has no state: make it as AdamW would
                on_device = group.get("fused") or group.get("capturable")
                st["step"] = torch.zeros((), dtype=torch.float32, device=flat.device if on_device else "cpu")
                st["exp_avg"] = torch.zeros_like(flat, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(flat, memory_format=torch.preserve_format)
            st["step"].fill_(step)
            if not saved:  # a checkpoint from before the first step: a fresh optimizer
                st["exp_avg"].zero_()
                st["exp_avg_sq"].zero_()
    if not saved:
        return
    # Link each parameter to its fragment of the flat state (DeepSpeed does this after its first step).
    zero_optimizer._lazy_init_hp_params_optimizer_state()
    for i, p in enumerate(net.parameters()):
        if i not in saved:  # a parameter that never had a gradient: AdamW kept no state for it
            continue
        for key in ("exp_avg", "exp_avg_sq"):
            safe_set_full_optimizer_state(p, saved[i][key].to(p.device, torch.float32), key)
