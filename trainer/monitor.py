"""Evaluation during training, every `monitor.every` steps: what the run is judged by, and its best checkpoint.

A forecaster (`--model unet3d --cond_steps k`, on `--dataset navier_stokes`) is rolled out with the EMA
weights from the first k frames of `--eval_trajectories` held-out trajectories (the data's test split),
as trainer/evaluate.py does, and scored against the solver: the metric is the FNO paper's relative L2
of the whole block of predicted frames (lower is better), logged beside the per-frame mean, the time
until the correlation drops below 0.8 and the persistence baseline. Every rank rolls out the same
trajectories with the same noise, so a sharded EMA network works as well as a replicated one.

An image run with `--fid_every` is judged by the FID of EMA samples against its training data (trainer/fid.py).
"""

from __future__ import annotations

import torch
from torch.utils.data import default_collate

from models.cond import cond_of
from trainer.config import Config
from trainer.data.sampler import mix_seed

_EVAL = 4  # a stream of the per-step seed of its own


class NullMonitor:
    """No evaluation: `--eval_every 0` and `--fid_every 0`."""

    metric = None
    every = 0  # evaluate every this many steps; 0: never

    def __call__(self, model: torch.nn.Module, step: int) -> dict[str, float] | None:
        return None


class ForecastMonitor(NullMonitor):
    metric = "eval/fno_relative_l2"

    def __init__(self, cfg: Config, diffusion, dataset, device: torch.device, trajectories: int):
        self.cfg, self.diffusion, self.device = cfg, diffusion, device
        self.every = cfg.train.eval_every
        n = min(trajectories, len(dataset.trajectories))
        self.truth = default_collate([dataset.trajectory(i) for i in range(n)])  # {"x": [N, C, L, H, W], ...}
        self.normalization = dataset.normalization

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        from trainer.evaluate import diffusion_window, persistence, rollout, score

        d, k = self.cfg.diffusion, self.cfg.data.cond_steps
        x = self.truth["x"].to(self.device)
        fields = cond_of({k_: v.to(self.device) for k_, v in self.truth.items()})
        g = torch.Generator(device=self.device).manual_seed(mix_seed(self.cfg.train.seed, _EVAL, step))
        window = diffusion_window(self.diffusion, model, generator=g, sampler=d.sampler, steps=d.sampling_timesteps,
                                  eta=d.ddim_eta if d.sampler == "ddim" else 0.0)
        pred = rollout(window, x[:, :, :k], fields["fields"] if fields else None, frames=self.cfg.data.frames,
                       length=x.shape[2])
        physical = [self.normalization.invert(v.float().cpu(), channel_axis=1).numpy() for v in (pred, x)]
        model_scores = score(*physical, k)["summary"]
        baseline = score(persistence(physical[1], k), physical[1], k)["summary"]
        return {self.metric: model_scores["fno_relative_l2"], "eval/relative_l2_mean": model_scores["relative_l2_mean"],
                "eval/corr_time_frames": model_scores["corr_time_frames_mean"],
                "eval/persistence_fno_relative_l2": baseline["fno_relative_l2"]}


def make_monitor(cfg: Config, diffusion, device: torch.device, progress: bool = False, *, accelerator=None,
                 dataset=None) -> NullMonitor:
    """The run's monitor (trainer.config.validate has checked that --eval_every and --fid_every fit the run).
    FID needs the run's `accelerator` and takes the training `dataset` (built here when not given); without
    --fid_weights the main process says so once and the run goes on unscored."""
    if cfg.train.fid_every:
        from trainer.fid import WEIGHTS_MISSING, FidMonitor

        if cfg.train.fid_weights is None:
            if accelerator is None or accelerator.is_main_process:
                print(WEIGHTS_MISSING)
            return NullMonitor()
        if dataset is None:
            from trainer.build import build_dataset

            dataset = build_dataset(cfg, progress=progress)
        return FidMonitor(cfg, diffusion, dataset, accelerator, progress=progress)
    if not cfg.train.eval_every:
        return NullMonitor()
    from trainer.build import build_dataset

    return ForecastMonitor(cfg, diffusion, build_dataset(cfg, split="test", progress=progress), device,
                           cfg.train.eval_trajectories)
