"""Fully sharded data parallel (FSDP2).

A launch with an FSDP accelerate config (`accelerate_configs/fsdp.yaml`) asks for it. Eddy shards the
network itself with `torch.distributed.fsdp.fully_shard` instead of handing it to Accelerate, so the
same code runs on GPUs (NCCL) and on CPU processes (gloo, where Accelerate would fall back to DDP):
the path the CPU tests cover is the path GPUs run. Accelerate still forms the process group and
provides autocast.

The units are the block classes the network declares in its `fsdp_units` attribute (the accelerate
config's `fsdp_transformer_layer_cls_to_wrap` overrides them by name). The EMA copy is sharded the
same way, so each rank averages its own shard.

Checkpoints hold full, unsharded state dicts in the layout a plain module and `optimizer.state_dict()`
use, gathered on the main process. A run can therefore move between one process, DDP and FSDP, and
between world sizes, and `trainer/sample.py` reads an FSDP checkpoint like any other.
"""
from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass
from typing import Any, Iterator, MutableMapping

import torch
import torch.distributed as dist
from torch import nn

from trainer.errors import ConfigError
from trainer.parallel.base import MakeOptimizer, Plan, Strategy

# No names from the launch: the network's own `fsdp_units` become the units.
DEFAULT_WRAP = None

_TRUE = ("1", "true", "yes")


@dataclass(frozen=True)
class FsdpPlan(Plan):
    """How to shard: which block classes are units, and whether to free gathered weights after forward."""

    name = "fsdp"
    wrap: tuple[str, ...] | None = DEFAULT_WRAP  # class names; None: the network's `fsdp_units`
    # True: ZeRO-3 (parameters gathered again for backward); False: ZeRO-2 (kept from forward to backward).
    reshard_after_forward: bool = True

    def describe(self, units: tuple[str, ...]) -> str:
        stage = "ZeRO-3, weights regathered for backward" if self.reshard_after_forward else \
            "ZeRO-2, weights kept from forward to backward"
        return f"FSDP2 over {', '.join(units) or 'the whole network'} ({stage})"

    def check_precision(self, mixed_precision: str) -> None:
        if mixed_precision == "fp16":
            raise ConfigError("--mixed_precision fp16 with FSDP: the fp16 gradient scaler would decide to skip a "
                              "step from this rank's shard alone, and the ranks would drift apart. Use bf16 (or no).")

    def strategy(self, accelerator, cfg) -> FsdpStrategy:
        return FsdpStrategy(accelerator, cfg, self)


class FsdpStrategy(Strategy):
    """The network and its EMA copy sharded with FSDP2; gradients reduce-scattered on the last micro-batch."""

    name = "fsdp"
    channels_last_weights = False  # FSDP2 shards contiguous parameters only; channels-last inputs suffice

    def __init__(self, accelerator, cfg, plan: FsdpPlan):
        super().__init__(accelerator, cfg)
        self.plan, self.units = plan, ()

    def describe(self) -> str:
        return self.plan.describe(self.units)

    def wrap(self, diffusion: nn.Module, make_optimizer: MakeOptimizer) -> None:
        diffusion.to(self.device)
        # FSDP's hooks run around each unit and cannot be traced into one graph: the units' own forwards
        # are compiled instead, on the trained network (the EMA copy samples eagerly).
        self.prepare_network(diffusion, compile_loss=False)
        self.net, self.model = diffusion.model, diffusion
        self._ema = copy.deepcopy(self.net).requires_grad_(False)
        if self.cfg.train.compile:
            compile_units(self.net, self.plan.wrap or tuple(c.__name__ for c in getattr(self.net, "fsdp_units", ())),
                          mode=self.cfg.train.compile_mode, backend=self.cfg.train.compile_backend)
        for module in (self.net, self._ema):
            self.units = shard(module, self.plan, self.device)
        self.optimizer = self.accelerator.prepare(make_optimizer(self.net.parameters()))  # not DDP: sharded already

    def ema_copy(self) -> nn.Module:
        return self._ema

    @contextlib.contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        self.net.set_requires_gradient_sync(last)
        with super().micro_batch(last):
            yield

    def clip(self, max_norm: float) -> torch.Tensor:
        return full_tensor(super().clip(max_norm))  # the norm of sharded gradients is a DTensor

    def replica_state(self, ema_model: nn.Module) -> None:
        return None  # each rank holds its own shard by design: nothing to compare

    def _full_module(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return full_model_state(module)

    def _full_optimizer(self) -> dict[str, Any]:
        return full_optimizer_state(self.net, self.optimizer.optimizer)

    def _load_module(self, module: nn.Module):
        return lambda sd: load_full_model_state(module, sd)

    def _load_optimizer(self, sd: dict[str, Any]) -> None:
        load_full_optimizer_state(self.net, self.optimizer.optimizer, sd)


def plan_from_env(environ: MutableMapping[str, str] = os.environ) -> FsdpPlan | None:
    """The FSDP plan that `accelerate launch` put into the environment, or None for no sharding.

    Removes `ACCELERATE_USE_FSDP` from `environ`: the Accelerator must not wrap the network a second time.
    Raises ConfigError, naming the accelerate config key, for settings Eddy does not support.
    """
    if environ.get("ACCELERATE_USE_FSDP", "").lower() not in _TRUE:
        return None
    environ.pop("ACCELERATE_USE_FSDP")
    if environ.get("FSDP_OFFLOAD_PARAMS", "false").lower() in _TRUE:
        raise ConfigError("the accelerate config sets fsdp_offload_params: true, which Eddy does not support "
                          "(the optimizer step and the EMA run on the GPU). Set it to false.")
    policy = environ.get("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP").upper()
    if policy not in ("TRANSFORMER_BASED_WRAP", "NO_WRAP", ""):
        raise ConfigError(f"the accelerate config sets fsdp_auto_wrap_policy: {policy}; Eddy shards by block "
                          f"class: use TRANSFORMER_BASED_WRAP, and fsdp_transformer_layer_cls_to_wrap to override "
                          f"the blocks the network declares (the Unet's: ResnetBlock,LinearAttention,Attention).")
    names = environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "")
    wrap = tuple(n.strip() for n in names.split(",") if n.strip()) or DEFAULT_WRAP
    if policy == "NO_WRAP":
        wrap = ()
    if environ.get("FSDP_VERSION", "2") == "1":
        strategy = environ.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD").upper()
        reshard = {"FULL_SHARD": True, "1": True, "SHARD_GRAD_OP": False, "2": False}.get(strategy)
        if reshard is None:
            raise ConfigError(f"the accelerate config sets fsdp_sharding_strategy: {strategy}; Eddy supports "
                              f"FULL_SHARD and SHARD_GRAD_OP (for no sharding use multi_gpu.yaml).")
    else:
        reshard = environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() in _TRUE
    return FsdpPlan(wrap=wrap, reshard_after_forward=reshard)


def shard(module: nn.Module, plan: FsdpPlan, device: torch.device) -> tuple[str, ...]:
    """Shard `module` in place over all processes: each block of a unit class, then the rest. Returns the
    unit class names."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    present = {type(m).__name__ for m in module.modules()}
    if plan.wrap is None:
        units = tuple(cls.__name__ for cls in getattr(module, "fsdp_units", ()))
    else:
        units = plan.wrap
        absent = [name for name in units if name not in present]
        if absent:
            raise ConfigError(f"fsdp_transformer_layer_cls_to_wrap names {', '.join(absent)}, which the network does "
                              f"not contain; it has {', '.join(sorted(present))}.")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    # Children before parents: a block nested in another wrapped block becomes its own unit first.
    for m in reversed(list(module.modules())):
        if m is not module and type(m).__name__ in units:
            fully_shard(m, mesh=mesh, reshard_after_forward=plan.reshard_after_forward)
    fully_shard(module, mesh=mesh, reshard_after_forward=plan.reshard_after_forward)
    return units


def compile_units(net: nn.Module, units: tuple[str, ...], *, mode: str, backend: str) -> int:
    """Compile the forward of every block of `net` whose class is named in `units`, in place, before sharding.
    Blocks of one class share their code, so dynamo keeps a graph per distinct block shape; its recompile limit
    is raised to fit them all. Returns the number of blocks."""
    import torch._dynamo

    from models.compiled import compiled

    blocks = [m for m in net.modules() if m is not net and type(m).__name__ in units]
    for m in blocks:
        m.forward = compiled(m.forward, name=f"the FSDP unit {type(m).__name__}", mode=mode, backend=backend)
    limit = 2 * len(blocks)  # with and without gradients (self-conditioning's first pass)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
    return len(blocks)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered into a plain tensor (a collective); a plain tensor as it is. (Imports
    torch.distributed.tensor, which takes half a second the first time: call it for sharded modules.)"""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


# Full state dicts. Each `full_*` function is a collective: every rank calls it, the main process gets
# the whole state on the CPU, the others an empty dict. Each `load_full_*` takes the whole state on
# every rank and keeps this rank's shard.

def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_model_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module, options=_options(cpu_offload=True))


def load_full_model_state(module: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(module, dict(sd), options=_options())  # it turns the dict's values into shards


def full_optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state as `optimizer.state_dict()` of the unsharded module would hold it."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    by_name = get_optimizer_state_dict(module, optimizer, options=_options(cpu_offload=True))
    if not by_name:
        return {}
    index = {name: i for i, (name, _) in enumerate(module.named_parameters())}
    return {"state": {index[name]: s for name, s in by_name["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]]}


def load_full_optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer, sd: dict[str, Any]) -> None:
    """Load a state in `optimizer.state_dict()` layout (parameters by index) into a sharded optimizer."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    names = [name for name, _ in module.named_parameters()]
    by_name = {"state": {names[i]: copy.deepcopy(s) for i, s in sd["state"].items()},
               "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]}
    set_optimizer_state_dict(module, optimizer, optim_state_dict=by_name, options=_options())
