"""What a run shows of itself: EMA samples at each save, beside the data they are compared with.

Conditions (a forecast's given frames, static fields) come from one seeded random draw of the data,
fixed for the whole run, so successive previews continue the same clips; `samples/data.png` (or
`.gif` for clips) shows the same draw. Images are PNG grids with a `progress.gif` of all grids so
far; clips are GIFs with the truth beside each sample (trainer/tracking.py).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import default_collate

from models import GaussianDiffusion
from models.cond import cond_of
from trainer.data.base import EddyData
from trainer.data.sampler import mix_seed
from trainer.tracking import save_media

# Streams of the per-step seed (trainer.py's training stream is 1), so that previews never share its draws.
_SAMPLE, _DRAW = 2, 3
MAX_PREVIEW = 64


class Preview:
    def __init__(self, accelerator: Accelerator, diffusion: GaussianDiffusion, dataset: EddyData, run_dir: Path,
                 seed: int):
        if getattr(dataset, "streaming", False):  # a stream has no index: draw from its first items, held
            dataset = dataset.head(MAX_PREVIEW, seed)
        self.accelerator, self.diffusion, self.dataset, self.seed = accelerator, diffusion, dataset, seed
        self.folder = run_dir / "samples"
        g = torch.Generator().manual_seed(mix_seed(seed, _DRAW))
        self.order = torch.randperm(len(dataset), generator=g)[:MAX_PREVIEW].tolist()
        # Samples continue the data's given entries (a forecast's first frames, a control problem's states).
        self._given = bool(diffusion.cond_steps) or diffusion.known_default is not None

    @torch.no_grad()
    def sample(self, model: torch.nn.Module, num_samples: int, step: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(samples, the data they continue), split across ranks with the diffusion's configured sampler;
        the main process gets all of them, the others None."""
        acc = self.accelerator
        per_rank = math.ceil(num_samples / acc.num_processes)
        batch = self._batch(acc.process_index * per_rank, per_rank)
        g = torch.Generator(device=acc.device).manual_seed(mix_seed(self.seed, _SAMPLE, step, acc.process_index))
        with acc.autocast():
            x = self.diffusion.sample(per_rank, model=model, cond=cond_of(batch),
                                      x_known=batch["x"] if self._given else None, generator=g,
                                      progress=acc.is_main_process and sys.stderr.isatty())
        x, truth = acc.gather(x.float().contiguous()), acc.gather(batch["x"].contiguous())
        return (x[:num_samples], truth[:num_samples]) if acc.is_main_process else None

    def save(self, out: tuple[torch.Tensor, torch.Tensor] | None, step: int) -> Path | None:
        """Write the samples of `step` (main process); returns the file, None elsewhere."""
        if out is None:
            return None
        samples, truth = out
        return save_media(samples, self.folder / f"step-{step:08d}", truth=truth if self._given else None,
                          bounded=self.dataset.bounded)

    def save_data(self, num_samples: int) -> None:
        """samples/data.png (or .gif): the draw the samples are compared with, once per run folder."""
        n = min(num_samples, len(self.order))
        if self.accelerator.is_main_process and n > 0 and not list(self.folder.glob("data.*")):
            save_media(self._batch(0, n)["x"].cpu(), self.folder / "data", bounded=self.dataset.bounded)

    def _batch(self, start: int, n: int) -> dict[str, torch.Tensor]:
        items = [self.dataset[self.order[(start + i) % len(self.order)]] for i in range(n)]
        return {k: v.to(self.accelerator.device) for k, v in default_collate(items).items()}
