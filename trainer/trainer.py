"""The Trainer: one object that owns a run's diffusion model, optimizer, EMA, data and checkpoints.

The parallel mode (one process, DDP, FSDP2, DeepSpeed ZeRO) is a `Strategy` (trainer/parallel/) chosen
once from the launch: it wraps the network, owns the micro-batch boundary, backward, clipping, the
optimizer step and the full-state collectives. The Trainer talks to that interface alone.

Randomness is a pure function of (seed, step, micro-step, rank): every micro-step draws its noise,
timesteps and augmentation from a generator seeded by those numbers, and reseeds the global RNG
(dropout) the same way. With the data position stored as (epoch, offset) and the learning rate a
function of the step, a checkpoint needs no RNG state, and a resumed run repeats the uninterrupted
one bit for bit.

Per optimizer step the host reads one small tensor: the flag on which all ranks agree to skip a
non-finite step or to stop for preemption. Losses and norms stay on the device and are reduced
every `--log_every` steps.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import signal
import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from ema_pytorch import EMA
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from models import GaussianDiffusion
from models.compiled import compiled
from models.cond import cond_of
from trainer.checkpoint import Checkpoint, CheckpointManager
from trainer.config import Config, default_num_workers, uses_channels_last
from trainer.data.base import EddyData
from trainer.data.sampler import ResumableBatchSampler, mix_seed
from trainer.errors import ConfigError, EddyError
from trainer.faults import Faults
from trainer.monitor import NullMonitor
from trainer.parallel import Strategy, main_decides
from trainer.preview import Preview
from trainer.tracking import NullTracker

# The stream of the per-step seed that training draws from (trainer/preview.py has its own).
_TRAIN = 1


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
    best_metric: float | None = None  # the best evaluation so far (lower is better), saved in checkpoints/best
    best_step: int | None = None


class Trainer:
    accelerator: Accelerator
    strategy: Strategy              # the parallel mode: wraps, steps and gathers the network
    diffusion: GaussianDiffusion    # unwrapped; the strategy holds the wrapped one
    ema: EMA                        # of the network in fp32, on every rank (each rank's shard under FSDP)
    optimizer: torch.optim.Optimizer
    dataset: EddyData              # owns its augmentation
    sampler: ResumableBatchSampler  # the data position
    preview: Preview                # save-and-sample pictures
    checkpoints: CheckpointManager
    tracker: NullTracker            # a real one on the main process only
    state: TrainState

    def __init__(self, cfg: Config, accelerator: Accelerator, strategy: Strategy, diffusion: GaussianDiffusion,
                 dataset: EddyData, checkpoints: CheckpointManager, *, tracker: NullTracker | None = None,
                 resume_from: Checkpoint | None = None, run_id: str = "", faults: Faults | None = None,
                 monitor: NullMonitor | None = None):
        self.cfg, self.accelerator, self.strategy, self.diffusion = cfg, accelerator, strategy, diffusion
        self.dataset, self.checkpoints, self.run_dir = dataset, checkpoints, checkpoints.run_dir
        self.tracker, self.faults, self.monitor = tracker or NullTracker(), faults or Faults(), monitor or NullMonitor()
        self.device = accelerator.device
        t = cfg.train

        # Fused AdamW (one kernel for all parameters; on the CPU it takes 1.8 ms where the per-parameter
        # loop takes 8.3 ms at the tiny preset), except with the fp16 scaler: a fused step always "runs"
        # (it skips overflows inside the kernel), so the EMA could not tell an overflow step from a real one.
        self.fused = self.device.type in ("cuda", "cpu") and accelerator.mixed_precision != "fp16"
        strategy.wrap(diffusion, lambda params: torch.optim.AdamW(
            params, lr=t.lr, betas=tuple(t.adam_betas), weight_decay=t.weight_decay,
            **({"fused": True} if self.fused else {})))
        self.optimizer = strategy.optimizer
        self.ema = make_ema(strategy, cfg, self.device)

        if getattr(dataset, "streaming", False):  # no length: a stream keeps its own position (data/streaming.py)
            self.sampler = dataset.position(t.batch_size, accelerator.process_index, accelerator.num_processes, t.seed)
        else:
            self.sampler = ResumableBatchSampler(len(dataset), t.batch_size, accelerator.process_index,
                                                 accelerator.num_processes, t.seed)
        self.loader = make_loader(dataset, self.sampler, cfg.data.num_workers, self.device, accelerator.num_processes)
        self.preview = Preview(accelerator, diffusion, dataset, self.run_dir, cfg.train.seed)
        self.state = TrainState()
        self._channels_last = uses_channels_last(cfg)
        self._sampling_net = None  # the EMA network as sampling calls it: compiled with --compile
        self.last_samples: torch.Tensor | None = None  # of the last save-and-sample, on the main process
        self._consecutive_nonfinite, self._data_wait = 0, 0.0  # seconds spent waiting for batches
        self._stop = _StopSignal()
        self._stop_flag = torch.zeros((), device=self.device)
        if resume_from is not None:
            self.load(resume_from)
        self.state.tracker_run_id = run_id or self.state.tracker_run_id

    # ------------------------------------------------------------------------------------------
    # The loop

    def train(self) -> TrainState:
        """Train to `--train_num_steps`, saving and sampling on the way. Returns the final counters."""
        t = self.cfg.train
        batches = self._batches()
        bar = tqdm(total=t.train_num_steps, initial=self.state.step, disable=not self.accelerator.is_main_process,
                   desc="training", unit="step", dynamic_ncols=True)
        window = _LogWindow(self.device, self.state.images_seen, self._data_wait)
        self.preview.save_data(self.cfg.train.num_samples)

        with self._stop.installed():
            while self.state.step < t.train_num_steps:
                # LR is a function of the step, so resume needs no scheduler state.
                for group in self.optimizer.param_groups:
                    group["lr"] = lr_at(self.state.step, self.cfg)

                # Forward and backward over the accumulation micro-batches, then one optimizer step.
                loss, grad_norm = self.train_step(batches)
                skip, stop = self._agree(loss, grad_norm)
                if skip:
                    self.strategy.skip()
                    if self._on_nonfinite():  # rolled back to the last checkpoint: restart from there
                        batches, window = self._batches(), _LogWindow(self.device, self.state.images_seen, self._data_wait)
                        bar.reset(total=t.train_num_steps)
                        bar.update(self.state.step)
                        continue
                else:
                    self._consecutive_nonfinite = 0
                    if self.strategy.step():  # False after an fp16 overflow: no EMA update
                        self._update_ema()
                self.state.step += 1
                self.state.images_seen += self.sampler.global_batch * t.grad_accum
                window.add(loss, grad_norm, skip)
                bar.update(1)

                # Reduce and log every `log_every` steps, at the end and before a stop: the only
                # place losses reach the host.
                last = self.state.step == t.train_num_steps
                if self.state.step % t.log_every == 0 or last or stop:
                    metrics = window.flush(self.accelerator, self.state, lr_at(self.state.step - 1, self.cfg),
                                           self._data_wait)
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
                    self.tracker.log(metrics, self.state.step)

                # Evaluate, and keep the best checkpoint.
                if self.monitor.every and self.state.step % self.monitor.every == 0:
                    self.evaluate()

                # Save and sample.
                if self.state.step % t.save_and_sample_every == 0 or last:
                    self.save_and_sample()
                elif stop:
                    self.save()
                if stop:
                    self.accelerator.print(f"stop requested (signal): saved at step {self.state.step}; "
                                           f"resume with --resume {self.run_dir}")
                    break
        bar.close()
        self.check_replicas()
        return self.state

    def train_step(self, batches: Iterator[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward over `--grad_accum` micro-batches, then clipping. Returns (mean loss,
        gradient norm) on the device."""
        t = self.cfg.train
        total = torch.zeros((), device=self.device)
        for micro in range(t.grad_accum):
            waited = time.perf_counter()
            batch = next(batches)
            self._data_wait += time.perf_counter() - waited
            with self.strategy.micro_batch(last=micro == t.grad_accum - 1):
                seed = mix_seed(t.seed, _TRAIN, self.state.step, micro, self.accelerator.process_index,
                                self.state.rollbacks)
                torch.manual_seed(seed)  # dropout draws from the global RNG
                g = torch.Generator(device=self.device).manual_seed(seed)
                batch = self.dataset.augment(batch, g)
                loss = self.strategy.loss(batch["x"], cond=cond_of(batch), generator=g)
                if self.faults("nan_loss", self.state.step):
                    loss = loss * float("nan")
                self.strategy.backward(loss)
            total += loss.detach()
        grad_norm = self.strategy.clip(t.max_grad_norm if t.max_grad_norm > 0 else float("inf"))
        return total / t.grad_accum, grad_norm

    def _update_ema(self) -> None:
        """One EMA update; the strategy brings the fp32 weights up to date first when the EMA will read them."""
        e = self.ema
        if not e.initted.item() or int(e.step.item()) % e.update_every == 0:
            self.strategy.sync_online()
        e.update()

    def _batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Micro-batches on the device, forever; advances the data position as each one is consumed."""
        while True:
            for batch in self.loader:
                self.sampler.advance()
                yield {k: _to_device(v, self.device, self._channels_last) for k, v in batch.items()}

    # ------------------------------------------------------------------------------------------
    # Agreement between ranks: non-finite steps and preemption

    def _agree(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> tuple[bool, bool]:
        self._stop_flag.fill_(float(self._stop.requested))
        flags = torch.stack([self.strategy.nonfinite(loss, grad_norm).float(), self._stop_flag])
        if self.accelerator.num_processes > 1:
            flags = self.accelerator.reduce(flags, reduction="sum")
        skip, stop = flags.tolist()  # the one host read per optimizer step
        return skip > 0, stop > 0

    def _on_nonfinite(self) -> bool:
        """Count a skipped step; after `--max_nonfinite_steps` in a row, roll back. Returns whether it did."""
        t, say = self.cfg.train, self.accelerator.print
        self.state.nonfinite_skipped += 1
        self._consecutive_nonfinite += 1
        say(f"step {self.state.step}: non-finite loss or gradient norm; step skipped "
            f"({self.state.nonfinite_skipped} so far)")
        if self._consecutive_nonfinite < t.max_nonfinite_steps:
            return False
        if self.state.rollbacks >= t.max_rollbacks:
            raise EddyError(f"{self._consecutive_nonfinite} consecutive non-finite steps after {self.state.rollbacks} "
                            f"rollbacks (--max_rollbacks): the run keeps diverging. Lower --lr, check the data for "
                            f"NaN/inf, or resume from an earlier checkpoint in {self.run_dir / 'checkpoints'}.")
        found = self.checkpoints.latest_good()
        if found is None:
            raise EddyError(f"{self._consecutive_nonfinite} consecutive non-finite steps and no checkpoint to roll back "
                            f"to in {self.run_dir / 'checkpoints'}. Lower --lr or check the data for NaN/inf.")
        rollbacks, skipped, bad_step = self.state.rollbacks + 1, self.state.nonfinite_skipped, self.state.step
        self.load(found[1])
        self.state.rollbacks, self.state.nonfinite_skipped = rollbacks, skipped
        self._consecutive_nonfinite = 0
        say(f"rolled back from step {bad_step} to {found[0].name} after {t.max_nonfinite_steps} consecutive "
            f"non-finite steps (rollback {rollbacks} of at most {t.max_rollbacks}); the noise stream is reseeded")
        return True

    # ------------------------------------------------------------------------------------------
    # Sampling, saving, loading

    def sample(self, num_samples: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(EMA samples, the data they continue) on the main process, None elsewhere (trainer/preview.py)."""
        if self._sampling_net is None:
            self._sampling_net = self.ema.ema_model
            if self.cfg.train.compile and self.strategy.name != "fsdp":  # a sharded EMA runs its own hooks eagerly
                t = self.cfg.train
                self._sampling_net = compiled(self.ema.ema_model, name="the sampling network", mode=t.compile_mode,
                                              backend=t.compile_backend)
        return self.preview.sample(self._sampling_net, num_samples, self.state.step)

    def check_replicas(self) -> bool:
        """Whether every rank holds the same weights and EMA; writes `replicas.json` on the main process.
        Where ranks hold different parts by design (sharded), there is nothing to compare."""
        states = self.strategy.replica_state(self.ema.ema_model)
        if states is None:
            return True
        digests = gather_object([digest(states)])
        if self.accelerator.is_main_process:
            write_replicas(self.run_dir / "replicas.json", self.state.step, digests, self.accelerator.print)
        return len(set(digests)) == 1

    def evaluate(self) -> None:
        """Score the EMA network (trainer/monitor.py); a new best is saved as checkpoints/best."""
        metrics = self.monitor(self.ema.ema_model, self.state.step)
        if metrics is None:  # nothing to score with (the same on every rank)
            return
        self.tracker.log(metrics, self.state.step)
        value = main_decides(lambda: metrics[self.monitor.metric], self.accelerator.is_main_process)
        if self.state.best_metric is None or value < self.state.best_metric:
            self.state.best_metric, self.state.best_step = value, self.state.step
            self.accelerator.wait_for_everyone()
            self.checkpoints.save(self.state.step, self.checkpoint(), best=True)

    def save_and_sample(self) -> None:
        if self.cfg.train.num_samples > 0:
            out = self.sample(self.cfg.train.num_samples)
            self.last_samples = None if out is None else out[0]  # the main process's, for the end-of-run score
            path = self.preview.save(out, self.state.step)
            if path is not None:
                self.tracker.log_media("samples", path, self.state.step)
        self.save()

    def checkpoint(self) -> Checkpoint | None:
        """The full state to save: a collective that every rank calls; the main process gets it."""
        full = self.strategy.full_state(self.ema.ema_model)
        if full is None:
            return None
        state = dict(vars(self.state))
        state.update(
            data_epoch=self.sampler.epoch, data_offset=self.sampler.offset,
            ema_step=int(self.ema.step.item()), ema_initted=bool(self.ema.initted.item()),
            world_size=self.accelerator.num_processes, batch_size=self.cfg.train.batch_size,
            grad_accum=self.cfg.train.grad_accum, **self.strategy.tags(), config=self.cfg.to_dict(),
            torch_version=torch.__version__)
        return Checkpoint(*full, state=state)

    def save(self) -> bool:
        """Commit a checkpoint of the current step. A failed write keeps the previous checkpoints and
        training goes on; every rank learns the outcome. Returns whether the save succeeded."""
        self.accelerator.wait_for_everyone()
        return self.checkpoints.save(self.state.step, self.checkpoint())

    def load(self, ck: Checkpoint) -> None:
        """Restore model, EMA, optimizer and counters from a checkpoint (on every rank)."""
        self.strategy.load_state(ck.model, self.ema.ema_model, ck.ema, ck.optimizer)
        self.ema.step.fill_(ck.state.get("ema_step", 0))
        self.ema.initted.fill_(ck.state.get("ema_initted", True))
        for group in self.optimizer.param_groups:  # the saved groups carry the old hyperparameters
            group.update(betas=tuple(self.cfg.train.adam_betas), weight_decay=self.cfg.train.weight_decay)
            if "fused" in group:
                group["fused"] = self.fused or None
        s = ck.state
        self.state = TrainState(step=s["step"], images_seen=s["images_seen"],
                                nonfinite_skipped=s.get("nonfinite_skipped", 0), rollbacks=s.get("rollbacks", 0),
                                tracker_run_id=s.get("tracker_run_id", ""), best_metric=s.get("best_metric"),
                                best_step=s.get("best_step"))
        replay = self.sampler.set_position(s["data_epoch"], s["data_offset"])
        old = (s.get("world_size"), s.get("batch_size"), s.get("grad_accum"))
        new = (self.accelerator.num_processes, self.cfg.train.batch_size, self.cfg.train.grad_accum)
        if old != new:
            self.accelerator.print(layout_change_note(old, new, s["data_epoch"], replay))


def layout_change_note(old: tuple, new: tuple, epoch: int, replay: int) -> str:
    return (f"resuming with a different layout: (processes, --batch_size, --grad_accum) was {old}, now {new}. "
            f"The data continues at the same position of epoch {epoch}"
            + (f" ({replay} samples are seen again to align with the new global batch)." if replay else ".")
            + " The run is no longer bit-for-bit identical to one that kept the old layout.")


def _to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    if channels_last and x.ndim == 4:
        return x.to(device, non_blocking=True, memory_format=torch.channels_last)
    return x.to(device, non_blocking=True)


def make_ema(strategy: Strategy, cfg: Config, device: torch.device) -> EMA:
    """The EMA of the strategy's fp32 network, into the strategy's copy (sharded under FSDP) or a deep copy."""
    t = cfg.train
    ema = EMA(strategy.online, ema_model=strategy.ema_copy(), beta=t.ema_decay, update_every=t.ema_update_every,
              update_after_step=t.ema_update_after_step, include_online_model=False, use_foreach=True)
    # The EMA's counters stay on the CPU (ema-pytorch reads them with .item()); its weights go to the device.
    ema.ema_model.to(device).eval().requires_grad_(False)
    return ema


def make_loader(dataset: EddyData, sampler: ResumableBatchSampler, num_workers: int, device: torch.device,
                processes: int) -> DataLoader:
    """The DataLoader over `sampler`'s batches; `num_workers` -1 picks a count for the device. A stream's
    loader ends each epoch on every rank at once (trainer/data/streaming.py)."""
    if num_workers < 0:
        num_workers = default_num_workers(device.type == "cuda", int(os.environ.get("LOCAL_WORLD_SIZE", processes)))
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=device.type == "cuda",
                        persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers > 0 else None)
    return sampler.epochs(loader) if getattr(dataset, "streaming", False) else loader


def write_replicas(path, step: int, digests: list[str], say) -> None:
    """replicas.json: every rank's digest at the end of training, and whether they agree (warned if not)."""
    identical = len(set(digests)) == 1
    path.write_text(json.dumps({"step": step, "digests": digests, "identical": identical}, indent=2))
    if not identical:
        say(f"WARNING: the {len(digests)} processes hold different weights at the end of training; see {path}")


def digest(state_dicts: list[dict[str, torch.Tensor]]) -> str:
    """sha256 over the names and bytes of every tensor, in order."""
    h = hashlib.sha256()
    for sd in state_dicts:
        for name, tensor in sd.items():
            h.update(name.encode())
            h.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class _StopSignal:
    """SIGTERM and SIGUSR1 (a scheduler's preemption notice) only set a flag; the loop agrees on it across
    ranks, saves and stops."""

    requested = False

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        def request_stop(signum, frame):
            self.requested = True

        old = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            with contextlib.suppress(ValueError):  # not the main thread
                old[sig] = signal.signal(sig, request_stop)
        try:
            yield
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)


class _LogWindow:
    """Accumulates loss and gradient norm on the device between log points."""

    def __init__(self, device: torch.device, images_seen: int, data_wait: float):
        self.device = device
        self._reset(images_seen, data_wait)

    def _reset(self, images_seen: int, data_wait: float) -> None:
        self.loss = torch.zeros((), device=self.device)
        self.norm = torch.zeros((), device=self.device)
        self.count, self.skipped = 0, 0
        self.t0, self.images0, self.wait0 = time.perf_counter(), images_seen, data_wait

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor, skipped: bool) -> None:
        if skipped:
            self.skipped += 1
            return
        self.loss += loss
        self.norm += grad_norm
        self.count += 1

    def flush(self, acc: Accelerator, state: TrainState, lr: float, data_wait: float) -> dict[str, Any]:
        """The window's means (over ranks too); `data_wait` is the run's total seconds waiting for batches so
        far: its share of the window's time is reported, the largest over the ranks."""
        elapsed = time.perf_counter() - self.t0
        waited = torch.tensor((data_wait - self.wait0) / max(elapsed, 1e-9), device=self.device)
        sums = torch.stack([self.loss, self.norm]) / max(1, self.count)
        if acc.num_processes > 1:
            sums, waited = acc.reduce(sums, reduction="mean"), acc.reduce(waited[None], reduction="max")
        loss, norm = sums.tolist()
        metrics = {"loss": loss, "grad_norm": norm, "lr": lr,
                   "samples_per_s": (state.images_seen - self.images0) / max(elapsed, 1e-9),
                   "data_wait": float(waited.max()), "images_seen": state.images_seen,
                   "nonfinite_skipped": state.nonfinite_skipped}
        if self.device.type == "cuda":  # the peak since the last log point, then reset
            metrics["gpu_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.device)
        self._reset(state.images_seen, data_wait)
        return metrics
