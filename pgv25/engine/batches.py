"""The stream of batches a run trains on: the loader over the bucket sampler (or a streaming dataset),
endless, with every unreadable image counted by reason and its path logged."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.dataset import collate
from ..data.index import problem_lines
from ..data.sampler import BucketBatchSampler
from ..errors import UserError

logger = logging.getLogger("pgv25")


@dataclass
class Batches:
    """Endless batches from the loader; unreadable images are counted, by reason, and their paths logged.

    A batch whose every image was unreadable is skipped whole and the next one taken.
    """

    loader: torch.utils.data.DataLoader
    consumed: int = 0  # batches taken from the sampler stream (this rank's data position)
    skipped: int = 0  # unreadable samples so far
    log_path: Path | None = None  # every rank appends `reason<TAB>path` lines here
    recent: Counter = field(default_factory=Counter)  # reasons since the last epoch summary
    stream: dict = field(default_factory=dict)  # streaming: loader worker → (epoch, rows read) of its latest batch

    def __post_init__(self):
        self._iterator = iter(self.loader)

    def __next__(self) -> dict:
        while True:
            batch = next(self._iterator)
            self.consumed += 1
            if "stream_position" in batch:
                worker, epoch, read = batch.pop("stream_position")
                self.stream[str(worker)] = (epoch, read)
            if batch["problems"]:
                self._record(batch["problems"])
            if batch["size"]:
                return batch

    def _record(self, problems: list[tuple[str, str]]) -> None:
        self.skipped += len(problems)
        self.recent.update(reason for _, reason in problems)
        for label, reason in problems:
            logger.warning("skipped %s: %s", label, reason)
        if self.log_path is not None:  # short lines in append mode: concurrent ranks do not interleave
            with open(self.log_path, "a") as f:
                f.write(problem_lines(problems))


def make_loader(data, workers: int, seed: int, rank: int, world_size: int, start_batches: int, pin: bool,
                stream_resume: dict | None = None):
    """(DataLoader, sampler) over `data` (engine.build.DataParts) from this rank's `start_batches`-th batch; the
    sampler is None for a streaming dataset, which resumes from `stream_resume` (per worker: epoch, rows read)."""
    if data.streaming:
        data.dataset.resume = stream_resume or {}
        return torch.utils.data.DataLoader(data.dataset, batch_size=None, num_workers=workers,
                                           pin_memory=pin, persistent_workers=workers > 0), None
    try:
        sampler = BucketBatchSampler(data.plan.bucket_of, data.batch_size, data.plan.weighting, seed, rank, world_size,
                                     start_batches, companion=data.plan.companion)
    except ValueError as error:
        raise UserError(f"train_dataloader: {error}") from None
    return torch.utils.data.DataLoader(data.dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate,
                                       pin_memory=pin, persistent_workers=workers > 0), sampler
