"""Builders shared by training and sampling: config -> network, diffusion, dataset."""

from __future__ import annotations

import torch

from models import GaussianDiffusion, Unet
from trainer.config import Config


def build_network(cfg: Config) -> Unet:
    m = cfg.model
    return Unet(dim=m.dim, dim_mults=tuple(m.dim_mults), channels=cfg.data.channels,
                self_condition=m.self_condition, learned_sinusoidal_cond=m.learned_sinusoidal_cond,
                random_fourier_features=m.random_fourier_features, dropout=m.dropout,
                attn_heads=m.attn_heads, attn_dim_head=m.attn_dim_head)


def build_diffusion(cfg: Config, net: torch.nn.Module) -> GaussianDiffusion:
    d = cfg.diffusion
    return GaussianDiffusion(
        net, sample_shape=(cfg.data.channels, cfg.data.image_size, cfg.data.image_size),
        timesteps=d.timesteps, sampler=d.sampler, sampling_timesteps=d.sampling_timesteps, objective=d.objective,
        beta_schedule=d.beta_schedule, loss_type=d.loss_type, min_snr_loss_weight=d.min_snr_loss_weight,
        min_snr_gamma=d.min_snr_gamma, offset_noise_strength=d.offset_noise_strength, ddim_eta=d.ddim_eta,
        clip_denoised=d.clip_denoised)


def build_dataset(cfg: Config, *, progress: bool = True):
    from trainer.data import build_image_dataset

    data = cfg.data
    return build_image_dataset(dataset=data.dataset, train_data_dir=data.train_data_dir,
                               image_size=data.image_size, channels=data.channels, split=data.split,
                               image_column=data.image_column, seed=cfg.train.seed,
                               random_flip=data.random_flip, progress=progress)


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
