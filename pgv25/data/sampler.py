"""An endless, seeded, resumable stream of per-rank batches, each drawn from one aspect-ratio bucket."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from .buckets import bucket_probabilities

CHUNK = 4096  # bucket choices drawn per RNG call


class BucketBatchSampler:
    """Step s: pick a bucket (seeded, weighted), take the next `batch_size × world_size` images of
    that bucket's own shuffled stream, hand this rank its slice.

    Everything is a function of (seed, s): every rank picks the same bucket at the same step
    (no rank waits for another that ran out), any loader worker count gives the same batches, and
    resuming at step s only replays the bucket choices (integers) to find each bucket's position.
    A bucket's stream is an endless series of permutations of its images, so no bucket runs dry.
    Keys are (step, slot, position): the dataset seeds each sample's augmentation from (step, slot).

    With `companion` (a mask over positions: DreamBooth's class images), those positions are never drawn on
    their own: every batch of a bucket also takes `batch_size` of them from the same bucket (slots after the
    batch's own), from that bucket's own stream of companions, the k-th with the k-th draw of the bucket, so a
    resume finds them from the same replayed bucket counts.
    """

    def __init__(self, buckets: np.ndarray, batch_size: int, weighting: float | str = 1.0, seed: int = 0,
                 rank: int = 0, world_size: int = 1, start: int = 0, companion: np.ndarray | None = None):
        buckets = np.asarray(buckets)
        companion = np.zeros(len(buckets), bool) if companion is None else np.asarray(companion, bool)
        drawn_alone = int((~companion).sum())
        if drawn_alone < batch_size * world_size:
            raise ValueError(f"{drawn_alone} usable images are fewer than one batch of {batch_size} × {world_size} processes")
        count = int(buckets.max()) + 1
        self.members = [np.flatnonzero((buckets == b) & ~companion) for b in range(count)]
        self.companions = [np.flatnonzero((buckets == b) & companion) for b in range(count)] if companion.any() else None
        if self.companions is not None:
            lacking = [b for b in range(count) if len(self.members[b]) and not len(self.companions[b])]
            if lacking:
                raise ValueError(f"{len(lacking)} bucket(s) have images but no class images to pair them with (class images "
                                 "drawn by pgv25 are sized after the instance buckets; with your own, add some of those "
                                 "sizes or set dataset.buckets.enabled=False)")
        self.counts = np.array([len(m) for m in self.members])
        self.probabilities = bucket_probabilities(self.counts, weighting)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.global_batch = batch_size * world_size
        self.start = start
        self._orders: dict[int, tuple[int, np.ndarray]] = {}

    @property
    def steps_per_epoch(self) -> int:
        """Steps in which, on average, as many images are drawn as there are."""
        return max(1, -(-int(self.counts.sum()) // self.global_batch))

    def choices(self, chunk: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 0x6275636B, chunk])
        return rng.choice(len(self.members), size=CHUNK, p=self.probabilities)

    def _batch(self, bucket: int, k: int, companions: bool = False) -> np.ndarray:
        """The bucket's k-th global batch: slices of a fresh permutation per pass over the bucket.

        Like drop_last, a pass ends before a batch would straddle two permutations (so no image
        appears twice in one batch); the few images left out differ from pass to pass. A bucket
        smaller than one global batch (only if `min_images` allows it) repeats its images.
        """
        members = (self.companions if companions else self.members)[bucket]
        size, key = len(members), (bucket, companions)
        per_pass = max(1, size // self.global_batch)
        epoch, offset = divmod(k, per_pass)
        if self._orders.get(key, (None,))[0] != epoch:  # one shuffle per pass, not per step
            rng = np.random.default_rng([self.seed, bucket, epoch] + ([0x636C6173] if companions else []))
            self._orders[key] = (epoch, members[rng.permutation(size)])
        order = self._orders[key][1]
        return np.resize(order, self.global_batch) if size < self.global_batch else order[offset * self.global_batch :][: self.global_batch]

    def drawn_before(self, step: int) -> np.ndarray:
        """How many global batches each bucket gave in steps [0, step)."""
        drawn = np.zeros(len(self.members), np.int64)
        for chunk in range(step // CHUNK):
            drawn += np.bincount(self.choices(chunk), minlength=len(self.members))
        drawn += np.bincount(self.choices(step // CHUNK)[: step % CHUNK], minlength=len(self.members))
        return drawn

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        step, drawn = self.start, self.drawn_before(self.start)
        choices, chunk = None, -1
        while True:
            if step // CHUNK != chunk:
                chunk = step // CHUNK
                choices = self.choices(chunk)
            bucket = int(choices[step % CHUNK])
            batch = self._batch(bucket, int(drawn[bucket]))
            drawn[bucket] += 1
            first = self.rank * self.batch_size
            keys = [(step, slot, int(batch[slot])) for slot in range(first, first + self.batch_size)]
            if self.companions is not None:  # the same bucket's class images, in slots after the whole global batch
                paired = self._batch(bucket, int(drawn[bucket]) - 1, companions=True)
                keys += [(step, self.global_batch + slot, int(paired[slot])) for slot in range(first, first + self.batch_size)]
            yield keys
            step += 1
