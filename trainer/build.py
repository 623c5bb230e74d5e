"""Builders shared by training, sampling and evaluation: config -> dataset, network, diffusion."""

from __future__ import annotations

import torch

from models import GaussianDiffusion
from trainer.config import Config, is_burgers, is_flow_control, is_simulation, is_video
from trainer.errors import ConfigError


def network_spec(cfg: Config) -> tuple[str, dict]:
    """(class name in `models`, constructor keyword arguments) of the run's network."""
    m, data = cfg.model, cfg.data
    kwargs = dict(dim=m.dim, dim_mults=list(m.dim_mults), channels=data.channels, cond_channels=data.field_channels,
                  self_condition=m.self_condition, learned_sinusoidal_cond=m.learned_sinusoidal_cond,
                  random_fourier_features=m.random_fourier_features, dropout=m.dropout,
                  attn_heads=m.attn_heads, attn_dim_head=m.attn_dim_head)
    if m.model == "unet3d":
        return "Unet3D", {**kwargs, "kind": m.unet3d_kind or "factorized"}
    return "Unet", kwargs


def diffusion_spec(cfg: Config) -> dict:
    """The `GaussianDiffusion` keyword arguments of the run, but the network."""
    d = cfg.diffusion
    known = {}
    if is_burgers(cfg):
        known = {"known": burgers_known(cfg).tolist()}
    elif is_flow_control(cfg):
        from trainer.data.ns_control import known_mask

        known = {"known": known_mask().tolist()}
    return dict(sample_shape=list(sample_shape(cfg)), timesteps=d.timesteps, sampler=d.sampler,
                sampling_timesteps=d.sampling_timesteps, sampling_spacing=d.sampling_spacing, objective=d.objective,
                beta_schedule=d.beta_schedule,
                loss_type=d.loss_type, min_snr_loss_weight=d.min_snr_loss_weight, min_snr_gamma=d.min_snr_gamma,
                offset_noise_strength=d.offset_noise_strength, ddim_eta=d.ddim_eta,
                clip_denoised=d.clip_denoised if d.clip_denoised is not None else not is_simulation(cfg),
                cond_steps=cfg.data.cond_steps, **known)


def burgers_known(cfg: Config) -> torch.Tensor:
    """The given entries of a Burgers sample (trainer/data/burgers.py), of the channels --burgers_part generates."""
    from trainer.data import burgers

    data = cfg.data
    return burgers.known_mask(data.burgers_observe, data.burgers_control)[list(burgers_channels(cfg))]


def burgers_channels(cfg: Config) -> tuple[int, ...]:
    """The channels of the Burgers layout a run generates: (0, 1) for joint models, (1,) for control priors."""
    return (0, 1) if cfg.data.burgers_part == "joint" else (1,)


def build_network(cfg: Config) -> torch.nn.Module:
    import models

    name, kwargs = network_spec(cfg)
    return getattr(models, name)(**{**kwargs, "dim_mults": tuple(kwargs["dim_mults"])})


def sample_shape(cfg: Config) -> tuple[int, ...]:
    """One sample's shape: (C, H, W) for the 2D Unet, (C, F, H, W) for clips."""
    data = cfg.data
    if is_burgers(cfg):
        from trainer.data.burgers import HEIGHT, N_POINTS

        return (len(burgers_channels(cfg)), HEIGHT, N_POINTS)
    if is_flow_control(cfg):
        from trainer.data.ns_control import CONTROL_STEPS, SIZE

        return (2, CONTROL_STEPS + 1, SIZE, SIZE)
    frames = (data.frames,) if cfg.model.model == "unet3d" else ()
    return (data.channels, *frames, data.image_size, data.image_size)


def build_diffusion(cfg: Config, net: torch.nn.Module) -> GaussianDiffusion:
    return GaussianDiffusion(net, **diffusion_spec(cfg))


def build_dataset(cfg: Config, *, split: str | None = None, progress: bool = True):
    """The dataset the flags name; `split` overrides --split (evaluation reads "test")."""
    data = cfg.data
    split = split or data.split
    if is_burgers(cfg):
        from trainer.data.burgers import ChannelSubset, burgers_dataset

        dataset = burgers_dataset(split=split, observe=data.burgers_observe, control=data.burgers_control,
                                  num_train=data.burgers_trajectories, num_test=data.burgers_test_trajectories,
                                  seed=cfg.train.seed, progress=progress)
        return dataset if data.burgers_part == "joint" else ChannelSubset(dataset, burgers_channels(cfg))
    if is_flow_control(cfg):
        from trainer.data.ns_control import controlled_flow_dataset

        return controlled_flow_dataset(split=split, num_train=data.num_trajectories, num_test=data.num_test_trajectories,
                                       seed=cfg.train.seed, progress=progress)
    if is_simulation(cfg):
        from trainer.data.fluid import load_simulation_folder, navier_stokes_dataset

        windows = dict(frames=data.frames, ts=data.ts, traj_len=data.traj_len,
                       squeeze_frames=cfg.model.model == "unet")
        if data.dataset == "navier_stokes" and data.train_data_dir is None:
            return navier_stokes_dataset(preset=data.ns_preset, split=split, num_train=data.num_trajectories,
                                         num_test=data.num_test_trajectories, channels=tuple(data.ns_channels),
                                         seed=cfg.train.seed, size=data.ns_size, n_frames=data.traj_len,
                                         progress=progress, **windows)
        return load_simulation_folder(data.train_data_dir, state_channels=data.state_channels, **windows)
    if cfg.model.model == "unet3d" and is_video(cfg):
        from trainer.data.video import MovingShapesDataset, load_clip_folder

        if data.train_data_dir is None:
            dataset = MovingShapesDataset(image_size=data.image_size, channels=data.channels, frames=data.frames,
                                          seed=cfg.train.seed)
        else:
            dataset = load_clip_folder(data.train_data_dir, frames=data.frames, ts=data.ts, image_size=data.image_size,
                                       channels=data.channels, progress=progress)
        dataset.random_flip = data.random_flip
        return dataset
    if data.streaming:
        from trainer.data.streaming import load_image_stream

        return load_image_stream(data.train_data_dir or data.dataset, split=split, image_column=data.image_column,
                                 image_size=data.image_size, channels=data.channels,
                                 shuffle_buffer=data.shuffle_buffer, random_flip=data.random_flip)
    from trainer.data import build_image_dataset

    return build_image_dataset(dataset=data.dataset, train_data_dir=data.train_data_dir,
                               image_size=data.image_size, channels=data.channels, split=split,
                               image_column=data.image_column, seed=cfg.train.seed,
                               random_flip=data.random_flip, progress=progress, max_shapes=data.max_shapes,
                               shape_radius=data.shape_radius)


def fit_config_to_data(cfg: Config, dataset) -> None:
    """Settle what the data decides before the config is saved: whether samples are clamped to [-1, 1]
    (images yes, physical fields no), and a simulation's channel counts and frame size, checked against
    the network's levels."""
    if cfg.diffusion.clip_denoised is None:
        cfg.diffusion.clip_denoised = dataset.bounded
    if is_burgers(cfg):
        cfg.data.channels, cfg.data.field_channels, cfg.data.image_size = dataset.channels, 0, dataset.image_size[1]
        return
    if is_flow_control(cfg):
        data = cfg.data
        data.channels, data.field_channels, data.image_size, data.frames = 2, 0, dataset.image_size, dataset.frames
        return
    if not is_simulation(cfg):
        return
    size = dataset.image_size
    if not isinstance(size, int):
        raise ConfigError(f"{dataset.source}: frames of {size[0]}x{size[1]}; Eddy's networks take square frames.")
    data = cfg.data
    data.channels, data.field_channels, data.image_size = dataset.channels, dataset.field_channels, size
    factor = 2 ** (len(cfg.model.dim_mults) - 1)
    if size % factor:
        raise ConfigError(f"{dataset.source}: frames of {size}x{size} are not divisible by 2^(levels-1) = {factor} "
                          f"for --dim_mults {' '.join(map(str, cfg.model.dim_mults))}; use fewer levels.")


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
