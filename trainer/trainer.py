"""The Trainer: one object that owns a run's Accelerator, diffusion model, optimizer, EMA and data.

Randomness is a pure function of (seed, step, micro-step, rank): every micro-step draws its noise,
timesteps and flips from a generator seeded by those numbers, and reseeds the global RNG (dropout)
the same way. With the data position stored as (epoch, offset) and the learning rate a function of
the step, a checkpoint needs no RNG state, and a resumed run repeats the uninterrupted one bit for
bit.

Per optimizer step the host reads one small tensor: the flag on which all ranks agree to skip a
non-finite step or to stop for preemption. Losses and norms stay on the device and are reduced
every `--log_every` steps.

Under an FSDP launch the network and its EMA are sharded (trainer/sharding.py) instead of wrapped
in DDP; under a DeepSpeed launch a ZeRO engine trains the network and the EMA follows its fp32
master weights (trainer/zero.py). Checkpoints hold the full state, in the same layout, in every mode.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import (DistributedDataParallelKwargs, ProjectConfiguration, broadcast_object_list,
                               gather_object)
from ema_pytorch import EMA
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from models import GaussianDiffusion
from trainer import checkpoint as ckpt_io
from trainer import sharding, zero
from trainer.config import Config, default_num_workers
from trainer.data.sampler import ResumableBatchSampler, mix_seed
from trainer.errors import ConfigError, EddyError
from trainer.faults import Faults
from trainer.sharding import FsdpPlan
from trainer.zero import ZeroPlan
from trainer.tracking import Tracker, save_image_grid, write_progress_gif

# Streams of the per-step seed, so that training, sampling and augmentation never share draws.
_TRAIN, _SAMPLE = 1, 2


def make_accelerator(cfg: Config, fsdp: FsdpPlan | None = None, zero_plan: ZeroPlan | None = None) -> Accelerator:
    """The Accelerator for `cfg`, after checking that the launch really formed the world it claims.

    `fsdp` and `zero_plan` are the launch's FSDP and DeepSpeed plans (`sharding.plan_from_env`,
    `zero.plan_from_env`, read before this is called): the Trainer shards the network or builds the
    DeepSpeed engine itself, so the Accelerator is made as for DDP.
    """
    mp = cfg.train.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    if fsdp is not None and mp == "fp16":
        raise ConfigError("--mixed_precision fp16 with FSDP: the fp16 gradient scaler would decide to skip a step "
                          "from this rank's shard alone, and the ranks would drift apart. Use bf16 (or no).")
    if zero_plan is not None and mp == "fp16":
        raise ConfigError("--mixed_precision fp16 with DeepSpeed: Eddy trains DeepSpeed in bf16 or fp32, where no "
                          "loss scaler skips steps behind the EMA's back. Use bf16 (or no).")
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


def lr_at(step: int, cfg: Config) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then constant, cosine or step decay."""
    t = cfg.train
    warm = min(1.0, (step + 1) / t.lr_warmup_steps) if t.lr_warmup_steps else 1.0
    if t.lr_schedule == "constant":
        decay = 1.0
    elif t.lr_schedule == "cosine":
        span = max(1, t.train_num_steps - t.lr_warmup_steps)
        progress = min(1.0, max(0, step - t.lr_warmup_steps) / span)
        decay = 0.5 * (1 + math.cos(math.pi * progress))
    elif t.lr_schedule == "step":
        decay = t.lr_decay_factor ** sum(step >= s for s in t.lr_decay_steps)
    else:
        raise ConfigError(f"--lr_schedule {t.lr_schedule!r} is not one of constant, cosine, step.")
    return t.lr * warm * decay


@dataclass
class TrainState:
    """The counters a checkpoint restores, beside the data position that the sampler keeps."""

    step: int = 0                 # optimizer steps taken
    images_seen: int = 0          # training images consumed, all ranks together
    nonfinite_skipped: int = 0    # steps skipped for a non-finite loss or gradient
    rollbacks: int = 0            # returns to the last checkpoint after a run of non-finite steps
    tracker_run_id: str = ""      # the W&B run that a resume continues


class Trainer:
    accelerator: Accelerator
    diffusion: GaussianDiffusion   # unwrapped; `self.model` is the prepared (DDP) one, this one under FSDP, or the
                                   # DeepSpeed engine
    ema: EMA                       # of the network, on every rank (each rank's shard under FSDP)
    sharded: bool                  # the network and its EMA are sharded with FSDP2 (trainer/sharding.py)
    zero: bool                     # a DeepSpeed ZeRO engine trains the network (trainer/zero.py)
    master: torch.nn.Module | None  # under DeepSpeed, an fp32 copy of the network for the gathered master weights
    optimizer: torch.optim.Optimizer
    sampler: ResumableBatchSampler
    state: TrainState

    def __init__(self, cfg: Config, accelerator: Accelerator, diffusion: GaussianDiffusion, dataset: Dataset,
                 run_dir: Path, tracker: Tracker | None = None, resume_from: ckpt_io.Checkpoint | None = None,
                 run_id: str = "", fsdp: FsdpPlan | None = None, zero_plan: ZeroPlan | None = None):
        self.cfg, self.accelerator, self.run_dir = cfg, accelerator, run_dir
        self.tracker = tracker if accelerator.is_main_process else None
        self.device = accelerator.device
        t = cfg.train

        self.net = diffusion.model
        # The plans come only with a launch that formed a process group.
        self.sharded, self.zero = fsdp is not None, zero_plan is not None
        ema_net, self.master = None, None
        if self.sharded:
            # The EMA copy is sharded like the network, so each rank averages its own shard.
            diffusion.to(self.device)
            ema_net = copy.deepcopy(self.net).requires_grad_(False)
            for module in (self.net, ema_net):
                sharding.shard(module, fsdp, self.device)
        if self.zero:
            # The engine turns the network's weights into the training precision; the EMA follows the
            # fp32 masters, gathered into this copy.
            self.master = copy.deepcopy(self.net).requires_grad_(False).to(self.device)
        self.ema = EMA(self.online, ema_model=ema_net, beta=t.ema_decay, update_every=t.ema_update_every,
                       update_after_step=t.ema_update_after_step, include_online_model=False, use_foreach=True)
        # The EMA's counters stay on the CPU (ema-pytorch reads them with .item()); its weights go to the device.
        self.ema.ema_model.to(self.device).eval()
        self.ema.ema_model.requires_grad_(False)

        # Fused AdamW on CUDA, except with the fp16 scaler: a fused step always "runs" (it skips
        # overflows inside the kernel), so the EMA could not tell an overflow step from a real one.
        self.fused = self.device.type == "cuda" and accelerator.mixed_precision != "fp16"
        opt_kwargs: dict[str, Any] = {"fused": True} if self.fused else {}
        optimizer = torch.optim.AdamW(self.net.parameters(), lr=t.lr, betas=tuple(t.adam_betas),
                                      weight_decay=t.weight_decay, **opt_kwargs)
        if self.sharded:  # sharded above: Accelerate must not wrap it in DDP
            self.model, self.optimizer = diffusion, accelerator.prepare(optimizer)
        elif self.zero:  # the engine steps the ZeRO optimizer itself
            self.model, self.optimizer = zero.initialize(diffusion, optimizer, zero_plan, cfg, accelerator.num_processes,
                                                         bf16=accelerator.mixed_precision == "bf16", device=self.device)
        else:
            self.model, self.optimizer = accelerator.prepare(diffusion, optimizer)
        # Wrapped in place in every mode. (Not accelerator.unwrap_model, which imports DeepSpeed, when
        # installed, on every run.)
        self.diffusion = diffusion

        self.sampler = ResumableBatchSampler(len(dataset), t.batch_size, accelerator.process_index,
                                             accelerator.num_processes, t.seed)
        workers = cfg.data.num_workers
        if workers < 0:
            workers = default_num_workers(self.device.type == "cuda",
                                          int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes)))
        self.loader = DataLoader(dataset, batch_sampler=self.sampler, num_workers=workers,
                                 pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
                                 prefetch_factor=4 if workers > 0 else None)
        self.faults = Faults.from_env()
        self.state = TrainState()
        self._consecutive_nonfinite = 0
        self._stop_requested = False
        self._stop_flag = torch.zeros((), device=self.device)
        if resume_from is not None:
            self.load(resume_from)
        self.state.tracker_run_id = run_id or self.state.tracker_run_id

    # ------------------------------------------------------------------------------------------
    # The loop

    def train(self) -> TrainState:
        """Train to `--train_num_steps`, saving and sampling on the way. Returns the final counters."""
        t, acc = self.cfg.train, self.accelerator
        batches = self._batches()
        self._install_signal_handlers()
        bar = tqdm(total=t.train_num_steps, initial=self.state.step, disable=not acc.is_main_process,
                   desc="training", unit="step", dynamic_ncols=True)
        window = _LogWindow(self.device, self.state.images_seen)
        self._save_data_grid()

        while self.state.step < t.train_num_steps:
            # LR is a function of the step, so resume needs no scheduler state.
            for group in self.optimizer.param_groups:
                group["lr"] = lr_at(self.state.step, self.cfg)

            # Forward and backward over the accumulation micro-batches, then one optimizer step.
            loss, grad_norm = self.train_step(batches)
            skip, stop = self._agree(loss, grad_norm)
            if skip:
                self.optimizer.zero_grad(set_to_none=True)
                if acc.scaler is not None:  # clip_grad_norm_ unscaled the gradients: close that step
                    acc.scaler.update()
                if self._on_nonfinite():  # rolled back to the last checkpoint: restart from there
                    batches = self._batches()
                    window = _LogWindow(self.device, self.state.images_seen)
                    bar.reset(total=t.train_num_steps)
                    bar.update(self.state.step)
                    continue
            else:
                if not self.zero:  # the engine has stepped at the end of the last micro-batch
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                if not acc.optimizer_step_was_skipped:  # fp16 overflow (unfused AdamW): no EMA update
                    self._update_ema()
                self._consecutive_nonfinite = 0
            self.state.step += 1
            self.state.images_seen += self.sampler.global_batch * t.grad_accum
            window.add(loss, grad_norm, skip)
            bar.update(1)

            # Reduce and log every `log_every` steps: the only place losses reach the host.
            if self.state.step % t.log_every == 0 or self.state.step == t.train_num_steps:
                metrics = window.flush(acc, self.state, lr_at(self.state.step - 1, self.cfg))
                if acc.is_main_process:
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
                    if self.tracker:
                        self.tracker.log(metrics, self.state.step)

            # Save and sample.
            if self.state.step % t.save_and_sample_every == 0 or self.state.step == t.train_num_steps:
                self.save_and_sample()
            elif stop:
                self.save()
            if stop:
                acc.print(f"stop requested (signal): saved at step {self.state.step}; "
                          f"resume with --resume {self.run_dir}")
                break
        bar.close()
        self._restore_signal_handlers()
        self.check_replicas()
        return self.state

    def train_step(self, batches: Iterator[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward over `--grad_accum` micro-batches. Returns (mean loss, gradient norm) on device.

        Under DeepSpeed the engine also reduces, clips and steps after the last micro-batch, and skips
        the step itself when the gradient is not finite (the norm it returns is then infinite)."""
        acc, t = self.accelerator, self.cfg.train
        total = torch.zeros((), device=self.device)
        for micro in range(t.grad_accum):
            x = next(batches)
            last = micro == t.grad_accum - 1
            if self.sharded:  # reduce-scatter the gradients on the last micro-batch only
                self.net.set_requires_gradient_sync(last)
            if self.zero:
                self.model.set_gradient_accumulation_boundary(last)
            # The engine accumulates and autocasts by itself (zero.initialize); a prepared model
            # autocasts by itself too, and acc.autocast() covers the sharded one.
            with contextlib.nullcontext() if self.zero else acc.accumulate(self.model):
                seed = mix_seed(t.seed, _TRAIN, self.state.step, micro, acc.process_index, self.state.rollbacks)
                torch.manual_seed(seed)  # dropout draws from the global RNG
                g = torch.Generator(device=self.device).manual_seed(seed)
                x = self._augment(x, g)
                with contextlib.nullcontext() if self.zero else acc.autocast():
                    loss = self.model(x, generator=g)
                if self.faults("nan_loss", self.state.step):
                    loss = loss * float("nan")
                if self.zero:
                    self.model.backward(loss)  # scaled by 1/grad_accum inside
                else:
                    acc.backward(loss)
                total += loss.detach()
        if self.zero:
            self.model.step()
            norm = self.model.get_global_grad_norm()
            return total / t.grad_accum, torch.as_tensor(float("inf") if norm is None else norm,
                                                         dtype=torch.float32, device=self.device)
        max_norm = t.max_grad_norm if t.max_grad_norm > 0 else float("inf")
        grad_norm = acc.clip_grad_norm_(self.net.parameters(), max_norm)
        if self.sharded:  # the norm of sharded gradients is a DTensor
            grad_norm = sharding.full_tensor(grad_norm)
        return total / t.grad_accum, grad_norm.detach().float()

    def _update_ema(self) -> None:
        """One EMA update. Under DeepSpeed the EMA reads the fp32 masters: gathered first when it will read them."""
        if self.zero:
            e = self.ema
            step = int(e.step.item())
            if not e.initted.item() or step % e.update_every == 0:
                zero.gather_masters(self.net, self.master)
        self.ema.update()

    def _batches(self) -> Iterator[torch.Tensor]:
        """Micro-batches on the device, forever; advances the data position as each one is consumed."""
        while True:
            for batch in self.loader:
                self.sampler.advance()
                yield batch.to(self.device, non_blocking=True)

    def _augment(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        if not self.cfg.data.random_flip:
            return x
        flip = torch.rand(x.shape[0], device=x.device, generator=g) < 0.5
        return torch.where(flip.view(-1, *([1] * (x.ndim - 1))), x.flip(-1), x)

    # ------------------------------------------------------------------------------------------
    # Agreement between ranks: non-finite steps and preemption

    def _agree(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> tuple[bool, bool]:
        bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
        if self.accelerator.scaler is not None:
            bad = ~torch.isfinite(loss)  # fp16: overflowing gradients are the scaler's business
        self._stop_flag.fill_(float(self._stop_requested))
        flags = torch.stack([bad.float(), self._stop_flag])
        if self.accelerator.num_processes > 1:
            flags = self.accelerator.reduce(flags, reduction="sum")
        skip, stop = flags.tolist()  # the one host read per optimizer step
        return skip > 0, stop > 0

    def _on_nonfinite(self) -> bool:
        """Count a skipped step; after `--max_nonfinite_steps` in a row, roll back. Returns whether it did."""
        t = self.cfg.train
        self.state.nonfinite_skipped += 1
        self._consecutive_nonfinite += 1
        self.accelerator.print(f"step {self.state.step}: non-finite loss or gradient norm; step skipped "
                               f"({self.state.nonfinite_skipped} so far)")
        if self._consecutive_nonfinite < t.max_nonfinite_steps:
            return False
        if self.state.rollbacks >= t.max_rollbacks:
            raise EddyError(f"{self._consecutive_nonfinite} consecutive non-finite steps after {self.state.rollbacks} "
                            f"rollbacks (--max_rollbacks): the run keeps diverging. Lower --lr, check the data for "
                            f"NaN/inf, or resume from an earlier checkpoint in {self.run_dir / 'checkpoints'}.")
        found, good = [None], None
        if self.accelerator.is_main_process:
            good = ckpt_io.load_latest_good(self.run_dir, warn=lambda m: self.accelerator.print(f"WARNING: {m}"))
            found = [good and str(good[0])]
        broadcast_object_list(found)
        if found[0] is None:
            raise EddyError(f"{self._consecutive_nonfinite} consecutive non-finite steps and no checkpoint to roll back "
                            f"to in {self.run_dir / 'checkpoints'}. Lower --lr or check the data for NaN/inf.")
        rollbacks, skipped, bad_step = self.state.rollbacks + 1, self.state.nonfinite_skipped, self.state.step
        self.load(good[1] if good else ckpt_io.read_checkpoint(Path(found[0])))
        self.state.rollbacks, self.state.nonfinite_skipped = rollbacks, skipped
        self._consecutive_nonfinite = 0
        self.accelerator.print(f"rolled back from step {bad_step} to {Path(found[0]).name} after "
                               f"{t.max_nonfinite_steps} consecutive non-finite steps (rollback {rollbacks} of at most "
                               f"{t.max_rollbacks}); the noise stream is reseeded")
        return True

    def _install_signal_handlers(self) -> None:
        def request_stop(signum, frame):
            self._stop_requested = True

        self._old_handlers = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                self._old_handlers[sig] = signal.signal(sig, request_stop)
            except ValueError:  # not the main thread
                pass

    def _restore_signal_handlers(self) -> None:
        for sig, handler in getattr(self, "_old_handlers", {}).items():
            signal.signal(sig, handler)

    # ------------------------------------------------------------------------------------------
    # Sampling, saving, loading

    @torch.no_grad()
    def sample(self, num_samples: int) -> torch.Tensor | None:
        """EMA samples split across ranks; every rank samples, the main process gets all of them."""
        acc = self.accelerator
        per_rank = math.ceil(num_samples / acc.num_processes)
        g = torch.Generator(device=self.device).manual_seed(
            mix_seed(self.cfg.train.seed, _SAMPLE, self.state.step, acc.process_index))
        with acc.autocast():
            x = self.diffusion.sample(per_rank, model=self.ema.ema_model, generator=g,
                                      progress=acc.is_main_process and sys.stderr.isatty())
        x = acc.gather(x.float().contiguous())
        return x[:num_samples] if acc.is_main_process else None

    def _save_data_grid(self) -> None:
        """A grid of training images beside the sample grids, to compare at a glance."""
        n = min(self.cfg.train.num_samples, 64)
        path = self.run_dir / "samples" / "data.png"
        if self.accelerator.is_main_process and n > 0 and not path.exists():
            data = self.loader.dataset
            images = torch.stack([data[i] for i in range(min(n, len(data)))])
            save_image_grid(images, path, scale=max(1, 128 // images.shape[-1]))

    def check_replicas(self) -> bool:
        """Whether every rank holds the same weights and EMA; writes `replicas.json` on the main process.
        Sharded, each rank holds its own part by design and there is nothing to compare. Under DeepSpeed
        the gathered fp32 masters are compared."""
        if self.sharded:
            return True
        if self.zero:
            zero.gather_masters(self.net, self.master)
        h = hashlib.sha256()
        for sd in (self.online.state_dict(), self.ema.ema_model.state_dict()):
            for name, tensor in sd.items():
                h.update(name.encode())
                h.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        digests = gather_object([h.hexdigest()])
        identical = len(set(digests)) == 1
        if self.accelerator.is_main_process:
            (self.run_dir / "replicas.json").write_text(json.dumps(
                {"step": self.state.step, "digests": digests, "identical": identical}, indent=2))
            if not identical:
                self.accelerator.print(f"WARNING: the {len(digests)} processes hold different weights at the end "
                                       f"of training; see {self.run_dir / 'replicas.json'}")
        return identical

    def save_and_sample(self) -> None:
        if self.cfg.train.num_samples > 0:
            samples = self.sample(self.cfg.train.num_samples)
            if samples is not None:
                path = self.run_dir / "samples" / f"step-{self.state.step:08d}.png"
                save_image_grid(samples, path, scale=max(1, 128 // samples.shape[-1]))
                write_progress_gif(path.parent)
                if self.tracker:
                    self.tracker.log_images("samples", path, self.state.step)
        self.save()

    def checkpoint(self) -> ckpt_io.Checkpoint | None:
        """The full state to save. Sharded or under DeepSpeed (`self.collective_save`), a collective that every
        rank calls and the main process gets; otherwise the main process alone calls it."""
        state = dict(vars(self.state))
        state.update(
            data_epoch=self.sampler.epoch, data_offset=self.sampler.offset,
            ema_step=int(self.ema.step.item()), ema_initted=bool(self.ema.initted.item()),
            world_size=self.accelerator.num_processes, batch_size=self.cfg.train.batch_size,
            grad_accum=self.cfg.train.grad_accum, sharded=self.sharded, deepspeed=self.zero, config=self.cfg.to_dict(),
            torch_version=torch.__version__)
        if self.sharded:
            model = sharding.full_model_state(self.net)
            ema = sharding.full_model_state(self.ema.ema_model)
            optimizer = {"optimizer": sharding.full_optimizer_state(self.net, self.optimizer.optimizer)}
            if not self.accelerator.is_main_process:
                return None
        elif self.zero:
            zero.gather_masters(self.net, self.master)
            optimizer = {"optimizer": zero.full_optimizer_state(self.net, self.optimizer)}
            if not self.accelerator.is_main_process:
                return None
            model, ema = self.master.state_dict(), self.ema.ema_model.state_dict()
        else:
            model, ema = self.net.state_dict(), self.ema.ema_model.state_dict()
            optimizer = {"optimizer": self.optimizer.state_dict()}
        if self.accelerator.scaler is not None:
            optimizer["scaler"] = self.accelerator.scaler.state_dict()
        return ckpt_io.Checkpoint(model=model, ema=ema, optimizer=optimizer, state=state)

    @property
    def online(self) -> torch.nn.Module:
        """The network in fp32 as the EMA follows and checkpoints hold it: the master copy under DeepSpeed."""
        return self.master if self.master is not None else self.net

    @property
    def collective_save(self) -> bool:
        """Whether building a checkpoint gathers state from every rank."""
        return self.sharded or self.zero

    def save(self) -> bool:
        """Commit a checkpoint of the current step. A failed write keeps the previous checkpoints and
        training goes on; every rank learns the outcome. Returns whether the save succeeded."""
        acc = self.accelerator
        acc.wait_for_everyone()
        outcome = [None]
        ck = self.checkpoint() if self.collective_save or acc.is_main_process else None
        if acc.is_main_process:
            folder = self.run_dir / "checkpoints" / ckpt_io.step_dir_name(self.state.step)
            try:
                ckpt_io.write_checkpoint(folder, ck, before_commit=self.faults.save_hook(self.state.step))
                ckpt_io.prune(self.run_dir, self.cfg.run.checkpoints_total_limit)
            except OSError as e:
                kept = ckpt_io.list_checkpoints(self.run_dir)
                outcome = [f"saving the checkpoint of step {self.state.step} failed ({e}); "
                           f"{'the newest intact one is ' + kept[-1].name if kept else 'no earlier checkpoint exists'}. "
                           f"Training goes on and the next save tries again."]
        broadcast_object_list(outcome)
        if outcome[0] is not None:
            acc.print(f"WARNING: {outcome[0]}")
        return outcome[0] is None

    def load(self, ck: ckpt_io.Checkpoint) -> None:
        """Restore model, EMA, optimizer and counters from a checkpoint (on every rank)."""
        hint = "Resume with the model flags the run was started with."
        for module, sd, name in ((self.online, ck.model, "model.safetensors"),
                                 (self.ema.ema_model, ck.ema, "ema.safetensors")):
            load = (lambda sd, m=module: sharding.load_full_model_state(m, sd)) if self.sharded else None
            ckpt_io.load_weights_checked(module, sd, name, hint, load=load)
        self.ema.step.fill_(ck.state.get("ema_step", 0))
        self.ema.initted.fill_(ck.state.get("ema_initted", True))
        if self.sharded:
            sharding.load_full_optimizer_state(self.net, self.optimizer.optimizer, ck.optimizer["optimizer"])
        elif self.zero:
            zero.load_full_optimizer_state(self.net, self.optimizer, ck.optimizer["optimizer"])
            zero.load_masters(self.net, self.master, self.optimizer)
        else:
            self.optimizer.load_state_dict(ck.optimizer["optimizer"])
        for group in self.optimizer.param_groups:  # the saved groups carry the old hyperparameters
            group.update(betas=tuple(self.cfg.train.adam_betas), weight_decay=self.cfg.train.weight_decay)
            if "fused" in group:
                group["fused"] = self.fused or None
        if self.accelerator.scaler is not None and "scaler" in ck.optimizer:
            self.accelerator.scaler.load_state_dict(ck.optimizer["scaler"])
        s = ck.state
        self.state = TrainState(step=s["step"], images_seen=s["images_seen"],
                                nonfinite_skipped=s.get("nonfinite_skipped", 0), rollbacks=s.get("rollbacks", 0),
                                tracker_run_id=s.get("tracker_run_id", ""))
        replay = self.sampler.set_position(s["data_epoch"], s["data_offset"])
        layout_old = (s.get("world_size"), s.get("batch_size"), s.get("grad_accum"))
        layout_new = (self.accelerator.num_processes, self.cfg.train.batch_size, self.cfg.train.grad_accum)
        if layout_old != layout_new:
            self.accelerator.print(
                f"resuming with a different layout: (processes, --batch_size, --grad_accum) was {layout_old}, "
                f"now {layout_new}. The data continues at the same position of epoch {s['data_epoch']}"
                + (f" ({replay} samples are seen again to align with the new global batch)." if replay else ".")
                + " The run is no longer bit-for-bit identical to one that kept the old layout.")


class _LogWindow:
    """Accumulates loss and gradient norm on the device between log points."""

    def __init__(self, device: torch.device, images_seen: int):
        self.device = device
        self._reset(images_seen)

    def _reset(self, images_seen: int) -> None:
        self.loss = torch.zeros((), device=self.device)
        self.norm = torch.zeros((), device=self.device)
        self.count, self.skipped = 0, 0
        self.t0, self.images0 = time.perf_counter(), images_seen

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor, skipped: bool) -> None:
        if skipped:
            self.skipped += 1
            return
        self.loss += loss
        self.norm += grad_norm
        self.count += 1

    def flush(self, acc: Accelerator, state: TrainState, lr: float) -> dict[str, float]:
        sums = torch.stack([self.loss, self.norm]) / max(1, self.count)
        if acc.num_processes > 1:
            sums = acc.reduce(sums, reduction="mean")
        loss, norm = sums.tolist()
        elapsed = time.perf_counter() - self.t0
        metrics = {"loss": loss, "grad_norm": norm, "lr": lr,
                   "samples_per_s": (state.images_seen - self.images0) / max(elapsed, 1e-9),
                   "images_seen": state.images_seen, "nonfinite_skipped": state.nonfinite_skipped}
        self._reset(state.images_seen)
        return metrics
