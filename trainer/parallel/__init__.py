"""Parallel strategies: one object per way of spreading a run over processes, chosen once from the launch.

    Strategy       one process, or DDP through Accelerate (parallel/base.py)
    FsdpStrategy   FSDP2: the network and its EMA sharded with fully_shard (parallel/fsdp.py)
    ZeroStrategy   DeepSpeed ZeRO-1/2: an engine over fp32 master partitions (parallel/zero.py)

`plan_from_env()` reads what `accelerate launch` asked for, before any Accelerate state exists, and takes
FSDP and DeepSpeed requests away from Accelerate, which would otherwise wrap the network itself;
`plan.strategy(accelerator, cfg)` builds the strategy. The Trainer talks to the `Strategy` interface
alone and never asks which mode it is in.
"""

from __future__ import annotations

import os
import warnings
from typing import MutableMapping

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

from trainer.config import Config
from trainer.errors import ConfigError
from trainer.parallel import fsdp, zero
from trainer.parallel.base import Plan, Strategy, main_decides

__all__ = ["Plan", "Strategy", "for_world", "main_decides", "make_accelerator", "plan_from_env"]


def plan_from_env(environ: MutableMapping[str, str] = os.environ) -> Plan:
    """The launch's parallel mode: FSDP, DeepSpeed, or replicated weights (one process or DDP)."""
    return fsdp.plan_from_env(environ) or zero.plan_from_env(environ) or Plan()


def for_world(plan: Plan) -> Plan:
    """`plan`, or the replicated one when no process group was formed (one process: nothing to shard)."""
    return plan if torch.distributed.is_initialized() else Plan()


def make_accelerator(cfg: Config, plan: Plan) -> Accelerator:
    """The Accelerator for `cfg`, after checking that `plan` can train in the run's precision and that
    the launch really formed the world it claims. FSDP and DeepSpeed plans wrap the network themselves,
    so the Accelerator is made as for DDP."""
    mp = cfg.train.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    plan.check_precision(mp)
    # Our only buffers are the diffusion schedule, equal on every rank: DDP need not sync them.
    warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated")
    accelerator = Accelerator(
        mixed_precision=mp,
        log_with=None if cfg.run.report_to == "none" else cfg.run.report_to,
        # TensorBoard needs a logging folder when the Accelerator is made; the tracker moves it into
        # the run folder once that is decided.
        project_config=ProjectConfiguration(project_dir=cfg.run.results_path, logging_dir=cfg.run.results_path),
        gradient_accumulation_steps=cfg.train.grad_accum,
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise ConfigError(
            f"accelerate launch started {launched} processes (WORLD_SIZE={launched}), but each one sees a "
            f"world of {accelerator.num_processes}: they would train as independent runs that all think they "
            f"are the main process. This happens with --multi_gpu on a machine without GPUs. For several CPU "
            f"processes use `ACCELERATE_USE_CPU=true accelerate launch --multi_gpu ...` or "
            f"--config_file accelerate_configs/cpu_2proc.yaml; otherwise drop --multi_gpu.")
    return accelerator
