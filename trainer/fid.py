"""FID and KID of EMA samples against the training images, every `--fid_every` steps of an image run.

Features come from a local TorchScript network, `--fid_weights`: NVlabs' `inception-2015-12-05.pt` (the
detector of StyleGAN2-ADA, StyleGAN3 and clean-fid: float images in [0, 255], resized to 299 inside, 2048
pool features from `net(x, return_features=True)`), or any TorchScript network mapping [N, 3, H, W] in
[0, 255] to [N, D]. Images go in as the 8-bit pixels they would be saved as; grayscale is repeated to 3
channels. torchmetrics' `FrechetInceptionDistance` and `KernelInceptionDistance` do the statistics, from
features handed to them.

Each evaluation: every rank draws its share of `--fid_num_samples` EMA samples (its own seed of
(seed, step, rank)) with the run's sampler and extracts their features; the features of all ranks are
gathered, scored on the main process and broadcast, so every rank returns the same numbers. torchmetrics
could sync its own states, but its KID draws its subsets from each rank's global RNG, and a rank without
data gathers a 1-D empty tensor against 2-D ones; an explicit gather avoids both.

The data side: features of `--fid_num_samples` training images (or all, if fewer) in a seeded order,
computed once into `$EDDY_CACHE/fid/<key>.npz`, the key covering the data's source and size, the image
size and channels, the sample count, the seed and the sha256 of the feature network's file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import default_collate
from tqdm.auto import tqdm

from trainer.config import Config
from trainer.data.sampler import mix_seed
from trainer.errors import ConfigError, DataError
from trainer.monitor import NullMonitor
from trainer.parallel import main_decides

WEIGHTS_MISSING = ("FID/KID need local Inception weights: pass --fid_weights PATH to inception-2015-12-05.pt; "
                   "the run goes on without them")
# Streams of the per-step seed (trainer.py: 1, preview.py: 2 and 3, monitor.py: 4).
_SAMPLE, _ORDER, _SUBSETS = 5, 6, 7
FEATURE_BATCH = 64   # images per call of the feature network
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000  # StyleGAN's protocol


def to_pixels(x: torch.Tensor) -> torch.Tensor:
    """Images [N, C, H, W] in [-1, 1] -> float [N, 3, H, W] of whole numbers in [0, 255], as 8-bit files hold
    them; one channel is repeated to three."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round()
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


class FeatureNet(torch.nn.Module):
    """The network of `--fid_weights` on images in [-1, 1]: [N, C, H, W] -> features [N, D] (float32)."""

    def __init__(self, path: str, device: torch.device, image_size: int):
        super().__init__()
        self.path, self.device = Path(path), device
        if not self.path.is_file():
            raise ConfigError(f"--fid_weights {path} does not exist: pass a local copy of inception-2015-12-05.pt "
                              f"(README, Training) or drop --fid_weights.")
        try:
            self.net = torch.jit.load(str(self.path), map_location=device).eval()
        except Exception as e:  # torch.jit.load raises RuntimeError, ValueError or pickle errors by file kind
            raise ConfigError(f"--fid_weights {path} is not a TorchScript file ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]}). Use inception-2015-12-05.pt, not the .pkl.") from None
        for param in self.net.parameters():
            param.requires_grad_(False)
        self.keyword = True  # called as net(x, return_features=True); False: net(x)
        probe = torch.full((2, 3, image_size, image_size), 128.0, device=device)
        try:
            with torch.no_grad():
                out = self._call(probe)
        except RuntimeError:
            self.keyword = False
            try:
                with torch.no_grad():
                    out = self._call(probe)
            except RuntimeError as e:
                raise ConfigError(f"--fid_weights {path}: the network does not take images [2, 3, {image_size}, "
                                  f"{image_size}] in [0, 255] ({str(e).splitlines()[0][:200]}).") from None
        if out.ndim != 2 or out.shape[0] != 2:
            raise ConfigError(f"--fid_weights {path}: the network returns {list(out.shape)} for 2 images; features "
                              f"must be [N, D].")
        self.num_features = out.shape[1]

    def _call(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(pixels, return_features=True) if self.keyword else self.net(pixels)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._call(to_pixels(x)).float().reshape(x.shape[0], -1)

    def digest(self) -> str:
        """sha256 of the weights file."""
        h = hashlib.sha256()
        with open(self.path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()


class _Given(torch.nn.Module):
    """The torchmetrics objects' feature network: features arrive already extracted, so it passes them on."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


class FidMonitor(NullMonitor):
    """FID (the metric, lower is better) and KID of `--fid_num_samples` EMA samples against the training images,
    every `--fid_every` steps. The data's features are read or computed when it is built (main process)."""

    metric = "eval/fid"

    def __init__(self, cfg: Config, diffusion, dataset, accelerator: Accelerator, *, progress: bool = False):
        t = cfg.train
        self.diffusion, self.accelerator = diffusion, accelerator
        self.every, self.num_samples, self.seed = t.fid_every, t.fid_num_samples, t.seed
        self.batch = 2 * t.batch_size  # sampling keeps no activations for a backward pass
        self.features = FeatureNet(t.fid_weights, accelerator.device, cfg.data.image_size)
        if len(dataset) < 2:
            raise DataError(f"--fid_every needs at least 2 training images, the data has {len(dataset)}.")
        self.fid = self.kid = None
        if accelerator.is_main_process:  # only the main process scores
            real = torch.from_numpy(data_features(cfg, dataset, self.features, self.num_samples, progress=progress))
            self.fid, self.kid = self._metrics(real)

    def _metrics(self, real: torch.Tensor):
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance

        device = self.accelerator.device
        size = min(KID_SUBSET_SIZE, len(real), self.num_samples)
        # When a subset is the whole of both sets, every subset gives the same value.
        subsets = 1 if size == len(real) == self.num_samples else KID_SUBSETS
        given = _Given(real.shape[1])
        fid = FrechetInceptionDistance(feature=given, reset_real_features=False, sync_on_compute=False).to(device)
        with warnings.catch_warnings():  # that KID keeps the features: it needs them for its subsets
            warnings.filterwarnings("ignore", message=".*will save all extracted features")
            kid = KernelInceptionDistance(feature=given, subsets=subsets, subset_size=size, reset_real_features=False,
                                          sync_on_compute=False).to(device)
        real = real.to(device, torch.float64)
        for metric in (fid, kid):
            metric.update(real, real=True)
        return fid, kid

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        acc = self.accelerator
        per_rank = math.ceil(self.num_samples / acc.num_processes)  # the same on every rank: FSDP samples together
        g = torch.Generator(device=acc.device).manual_seed(mix_seed(self.seed, _SAMPLE, step, acc.process_index))
        bar = tqdm(total=per_rank, desc=f"FID/KID: samples ({per_rank} per process)", unit="sample", leave=False,
                   disable=not acc.is_main_process, dynamic_ncols=True)
        out = []
        for start in range(0, per_rank, self.batch):
            with acc.autocast():
                x = self.diffusion.sample(min(self.batch, per_rank - start), model=model, generator=g)
            out.append(self.features(x))  # [b, D]
            bar.update(len(x))
        bar.close()
        fake = acc.gather(torch.cat(out).contiguous())[:self.num_samples]  # rank 0's rows first
        return main_decides(lambda: self.score(fake, step), acc.is_main_process)

    def score(self, fake: torch.Tensor, step: int) -> dict[str, float]:
        """FID and KID of `fake` features [N, D] against the data's (main process)."""
        fake = fake.to(self.accelerator.device, torch.float64)
        for metric in (self.fid, self.kid):
            metric.reset()  # the fake side only
            metric.update(fake, real=False)
        with torch.random.fork_rng(devices=[]):  # KID draws its subsets from the global RNG
            torch.manual_seed(mix_seed(self.seed, _SUBSETS, step))
            kid_mean, kid_std = self.kid.compute()
        return {self.metric: float(self.fid.compute()), "eval/kid_mean": float(kid_mean),
                "eval/kid_std": float(kid_std)}


def data_features(cfg: Config, dataset, features: FeatureNet, num_samples: int, *,
                  progress: bool = False) -> np.ndarray:
    """Features [n, D] of the first n = min(num_samples, len(dataset)) training images in a seeded order (no
    augmentation), read from `$EDDY_CACHE/fid/` when a run computed them before."""
    from trainer.data.fluid import cache_root

    data, n = cfg.data, min(num_samples, len(dataset))
    source = (f"folder {Path(data.train_data_dir).resolve()}" if data.train_data_dir else
              f"dataset {data.dataset} split {data.split} column {data.image_column}")
    key = {"source": source, "images": len(dataset), "image_size": data.image_size, "channels": data.channels,
           "samples": n, "seed": cfg.train.seed, "weights": features.digest()}
    path = cache_root() / "fid" / f"{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]}.npz"
    if path.is_file():
        with np.load(path) as cached:
            return cached["features"]
    g = torch.Generator().manual_seed(mix_seed(cfg.train.seed, _ORDER))
    order = torch.randperm(len(dataset), generator=g)[:n].tolist()
    out = []
    bar = tqdm(total=n, desc="FID/KID: features of the training images", unit="image", leave=False,
               disable=not progress, dynamic_ncols=True)
    for start in range(0, n, FEATURE_BATCH):
        batch = default_collate([dataset[i] for i in order[start:start + FEATURE_BATCH]])["x"]
        out.append(features(batch.to(features.device)).cpu())
        bar.update(len(batch))
    bar.close()
    result = torch.cat(out).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, features=result, key=json.dumps(key))
    os.replace(tmp, path)  # whole or absent: a concurrent reader never sees half a file
    return result
