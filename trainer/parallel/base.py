"""The interface between the Trainer and a parallel mode, and the mode that replicates the weights.

A `Plan` is what the launch asked for, read from the environment before any Accelerate state exists
(`trainer.parallel.plan_from_env`); it refuses what its mode cannot do before heavy work starts. Its
`strategy()` builds the `Strategy` that trains: it wraps the network and the optimizer, owns the
micro-batch boundary, backward, clipping and the optimizer step, and gathers and restores the full
state for checkpoints. The Trainer talks to this interface alone.

Every method is called on every rank; the `full_*` and `sync_online` methods are collectives.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from torch import nn

from trainer.config import Config
from trainer.errors import EddyError

MakeOptimizer = Callable[[Any], torch.optim.Optimizer]  # parameters -> optimizer


def main_decides(decide: Callable[[], Any], is_main: bool) -> Any:
    """Run `decide` on the main process alone and return its result on every rank.

    A user error (EddyError) raised by `decide` is raised on every rank, with the same message.
    The result must pickle (paths, strings, numbers)."""
    box: list[Any] = [None, None]
    if is_main:
        try:
            box[0] = decide()
        except EddyError as e:
            box[1] = (type(e), str(e))
    broadcast_object_list(box)
    if box[1] is not None:
        kind, message = box[1]
        raise kind(message)
    return box[0]


class Plan:
    """A launch that replicates the weights: one process, or DDP over several."""

    name = "replicated"

    def check_precision(self, mixed_precision: str) -> None:
        """Raise ConfigError if this mode cannot train in `mixed_precision` (no, bf16, fp16)."""

    def strategy(self, accelerator: Accelerator, cfg: Config) -> Strategy:
        return Strategy(accelerator, cfg)


class Strategy:
    """One process or DDP: the Accelerator prepares the network and the optimizer.

    Subclasses override the hooks whose behaviour their mode changes; the Trainer sees only this API.
    """

    name = "replicated"
    channels_last_weights = True  # with --channels_last, the weights too (the inputs always are)
    model: nn.Module              # what a micro-batch calls: model(x0, cond=..., generator=...) -> loss
    net: nn.Module                # the denoising network as it trains (sharded, or in the training precision)
    optimizer: torch.optim.Optimizer

    def __init__(self, accelerator: Accelerator, cfg: Config):
        self.accelerator, self.cfg = accelerator, cfg
        self.device = accelerator.device

    def describe(self) -> str:
        return "weights replicated (DDP)" if self.accelerator.num_processes > 1 else "one process"

    def tags(self) -> dict[str, Any]:
        """What a checkpoint records of the mode that wrote it."""
        return {"parallel": self.name, "sharded": self.name == "fsdp", "deepspeed": self.name == "zero"}

    # Wrapping. The one place where a network is laid out, checkpointed and compiled, before it is wrapped.

    def prepare_network(self, diffusion: nn.Module, *, compile_loss: bool = True) -> None:
        """--channels_last, --grad_checkpointing and --compile (of the loss, network inside), applied to the
        unwrapped diffusion model."""
        from models.compiled import checkpoint_blocks
        from trainer.config import uses_channels_last

        t = self.cfg.train
        if uses_channels_last(self.cfg) and self.channels_last_weights:
            diffusion.model.to(memory_format=torch.channels_last)
        if t.grad_checkpointing:
            checkpoint_blocks(diffusion.model)
        if t.compile and compile_loss:
            diffusion.compile_loss(mode=t.compile_mode, backend=t.compile_backend)

    def wrap(self, diffusion: nn.Module, make_optimizer: MakeOptimizer) -> None:
        self.prepare_network(diffusion)
        self.net = diffusion.model
        self.model, self.optimizer = self.accelerator.prepare(diffusion, make_optimizer(self.net.parameters()))

    @property
    def online(self) -> nn.Module:
        """The network in fp32, as the EMA follows it and checkpoints hold it."""
        return self.net

    def ema_copy(self) -> nn.Module | None:
        """The module the EMA averages into, or None to let the EMA deep-copy `online`."""
        return None

    def sync_online(self) -> None:
        """Bring `online` up to date with the trained weights (a collective where they live elsewhere)."""

    # One optimizer step.

    @contextlib.contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        """Around one micro-batch's forward and backward: gradients are reduced on the `last` one only."""
        with self.accelerator.accumulate(self.model):
            yield

    def loss(self, x0: torch.Tensor, *, cond: dict | None, generator: torch.Generator) -> torch.Tensor:
        """The diffusion loss of one micro-batch, under the run's autocast."""
        with self.accelerator.autocast():
            return self.model(x0, cond=cond, generator=generator)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def clip(self, max_norm: float) -> torch.Tensor:
        """Clip the accumulated gradients to `max_norm` (inf: none) and return their norm (fp32, on device)."""
        return self.accelerator.clip_grad_norm_(self.net.parameters(), max_norm).detach().float()

    def nonfinite(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        """Whether this step must be skipped, as a device tensor (the fp16 scaler handles overflowing gradients)."""
        if self.accelerator.scaler is not None:
            return ~torch.isfinite(loss)
        return ~(torch.isfinite(loss) & torch.isfinite(grad_norm))

    def step(self) -> bool:
        """Apply the optimizer step. Returns False if it was skipped (an fp16 overflow): the EMA must not update."""
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return not self.accelerator.optimizer_step_was_skipped

    def skip(self) -> None:
        """Drop this step's gradients."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.accelerator.scaler is not None:  # clip_grad_norm_ unscaled the gradients: close that step
            self.accelerator.scaler.update()

    # Full state, in the layout of a plain module and `optimizer.state_dict()` in every mode.

    def full_state(self, ema_model: nn.Module) -> tuple[dict, dict, dict] | None:
        """(model, EMA, optimizer) state, whole, on the main process; None on the others."""
        self.sync_online()
        model, ema = self._full_module(self.online), self._full_module(ema_model)
        optimizer = {"optimizer": self._full_optimizer()}
        if not self.accelerator.is_main_process:
            return None
        if self.accelerator.scaler is not None:
            optimizer["scaler"] = self.accelerator.scaler.state_dict()
        return model, ema, optimizer

    def load_state(self, model: dict, ema_model: nn.Module, ema: dict, optimizer: dict) -> None:
        """Restore what `full_state` returned, on every rank. Raises CheckpointError naming what does not fit."""
        from trainer.checkpoint import load_weights_checked

        hint = "Resume with the model flags the run was started with."
        load_weights_checked(self.online, model, "model.safetensors", hint, load=self._load_module(self.online))
        load_weights_checked(ema_model, ema, "ema.safetensors", hint, load=self._load_module(ema_model))
        self._load_optimizer(optimizer["optimizer"])
        if self.accelerator.scaler is not None and "scaler" in optimizer:
            self.accelerator.scaler.load_state_dict(optimizer["scaler"])

    def replica_state(self, ema_model: nn.Module) -> list[dict[str, torch.Tensor]] | None:
        """The weights every rank must hold alike (to compare their digests), or None where ranks differ by design."""
        self.sync_online()
        return [self.online.state_dict(), ema_model.state_dict()]

    def _full_module(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return module.state_dict()

    def _full_optimizer(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def _load_module(self, module: nn.Module) -> Callable[[dict], Any] | None:
        """How to load a checked full state dict into `module` (None: `load_state_dict`)."""
        return None

    def _load_optimizer(self, sd: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(sd)
