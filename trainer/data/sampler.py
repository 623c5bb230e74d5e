"""A batch sampler whose position in the data is two numbers, so a run resumes exactly where it stopped.

Each epoch is a permutation of the dataset drawn from (seed, epoch). The permutation is cut into
global micro-batches of `world_size * batch_size` samples (the tail that does not fill one is
dropped); rank r takes its `batch_size` slice of each. The position is (epoch, offset), the offset
counted in samples, so a resume with another world size or batch size continues from the same
place in the same permutation.
"""

from __future__ import annotations

import numpy as np
import torch

from trainer.errors import ConfigError


def mix_seed(*parts: int) -> int:
    """A well-mixed seed in [0, 2**63) from integers: the same parts give the same seed on every machine."""
    entropy = [int(p) % (1 << 64) for p in parts]  # SeedSequence takes any non-negative int, whole
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]) >> 1


class ResumableBatchSampler:
    def __init__(self, num_samples: int, batch_size: int, rank: int, world_size: int, seed: int):
        self.num_samples, self.batch_size = num_samples, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.global_batch = batch_size * world_size
        self.batches_per_epoch = num_samples // self.global_batch
        if self.batches_per_epoch < 1:
            raise ConfigError(
                f"the dataset has {num_samples} samples, fewer than one global batch of {self.global_batch} "
                f"(--batch_size {batch_size} x {world_size} processes). Lower --batch_size or add data.")
        self.epoch, self.offset = 0, 0

    @property
    def samples_per_epoch(self) -> int:
        return self.batches_per_epoch * self.global_batch

    def set_position(self, epoch: int, offset: int) -> int:
        """Continue at `offset` samples into `epoch`. Returns how many samples before it are replayed
        because the offset is not a whole number of this layout's global batches."""
        replay = offset % self.global_batch
        self.epoch, self.offset = epoch, offset - replay
        if self.offset >= self.samples_per_epoch:  # the rest of that epoch is a dropped tail now
            self.epoch, self.offset, replay = epoch + 1, 0, 0
        return replay

    def advance(self) -> None:
        """Record that one global micro-batch was consumed."""
        self.offset += self.global_batch
        if self.offset >= self.samples_per_epoch:
            self.epoch, self.offset = self.epoch + 1, 0

    def permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 0x5A3D))
        return torch.randperm(self.num_samples, generator=g)

    def __len__(self) -> int:
        return (self.samples_per_epoch - self.offset) // self.global_batch

    def __iter__(self):
        # Iterates the current epoch from the current offset; the caller advances the position as it
        # consumes batches, and iterates again for the next epoch.
        perm = self.permutation(self.epoch)
        for start in range(self.offset, self.samples_per_epoch, self.global_batch):
            lo = start + self.rank * self.batch_size
            yield perm[lo:lo + self.batch_size].tolist()
