"""An endless, seeded, resumable stream of sample indices, sharded across processes."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler):
    """Yields (epoch, index) forever: a fresh seeded permutation per epoch, this rank's share of it.

    The epoch travels with the index so the dataset can derive each sample's augmentation RNG from
    (seed, epoch, index): the same sample gets the same crop/flip/dropout however many loader
    workers there are and whether or not the run was resumed. `start` is how many samples this
    rank has already consumed, which is all a checkpoint needs to store about the data position.
    """

    def __init__(self, size: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1, start: int = 0):
        if size < world_size:
            raise ValueError(f"dataset of {size} samples is smaller than the {world_size} processes reading it")
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.rank, self.world_size, self.start = rank, world_size, start
        self.per_rank = size // world_size  # every rank sees the same count, so ranks stay in step

    def epoch_indices(self, epoch: int) -> list[int]:
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        else:
            order = torch.arange(self.size)
        return order[self.rank : self.per_rank * self.world_size : self.world_size].tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, position = divmod(self.start, self.per_rank)
        while True:
            for index in self.epoch_indices(epoch)[position:]:
                yield epoch, index
            epoch, position = epoch + 1, 0

    def __len__(self) -> int:
        return self.per_rank
