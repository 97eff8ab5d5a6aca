"""Aspect-ratio buckets (Playground v2.5 report, §3.2): sizes of about one area, every batch from one.

Training every image as a centre-cropped square teaches the model to cut heads off portraits; a
batch must share one shape, so images are grouped by aspect ratio into buckets of (nearly) equal
pixel count, each image resized to cover its bucket and cropped. Which bucket a step draws from is
the sampler's business (`sampler.py`), weighted so rare aspect ratios are not starved.
"""

from __future__ import annotations

import logging
import math

import numpy as np

logger = logging.getLogger("pgv25")


def make_buckets(resolution: int, step: int = 64, max_ratio: float = 4.0) -> list[tuple[int, int]]:
    """(w, h) sizes, multiples of `step`, of area ≤ resolution², aspect ratios from 1:max_ratio to max_ratio:1.

    Only maximal sizes are kept (neither side can grow by a step within the area), so every bucket
    has close to the pixel count (and cost) of the square one and the set is symmetric; resolution
    1024 gives 1024×1024, 1152×896, 896×1152, ... 2048×512 and 512×2048.
    """
    if resolution % step:
        raise ValueError(f"resolution {resolution} is not a multiple of the bucket step {step}")
    area = resolution * resolution
    sizes = set()
    for width in range(step, area // step + 1, step):
        height = area // width // step * step
        maximal = (width + step) * height > area
        if height >= step and maximal and 1 / max_ratio <= width / height <= max_ratio:
            sizes.add((width, height))
    return sorted(sizes, key=lambda s: s[0] / s[1])


def bucket_sizes(resolution: int, buckets: dict) -> list[tuple[int, int]]:
    """The configured buckets: `buckets.sizes` ([[w, h], ...], e.g. exactly 2:1 and 1:2 beside the square)
    when given, else `make_buckets(resolution, step, max_ratio)`; disabled: one resolution² square."""
    if not buckets.get("enabled", bool(buckets)):
        return [(resolution, resolution)]
    step = int(buckets.get("step", 64))
    if buckets.get("sizes"):
        try:
            sizes = sorted({(int(w), int(h)) for w, h in buckets["sizes"]}, key=lambda s: s[0] / s[1])
        except (TypeError, ValueError):
            raise ValueError(f"sizes must be a list of [width, height] pairs, got {buckets['sizes']!r}") from None
        bad = [f"{w}x{h}" for w, h in sizes if w <= 0 or h <= 0 or w % step or h % step]
        if bad:
            raise ValueError(f"sizes {', '.join(bad)} are not positive multiples of the bucket step {step}")
        return sizes
    return make_buckets(resolution, step, float(buckets.get("max_ratio", 4.0)))


def nearest_buckets(widths: np.ndarray, heights: np.ndarray, sizes: list[tuple[int, int]]) -> np.ndarray:
    """The bucket whose aspect ratio is nearest each image's, measured in log ratio (2:1 is as far from 1:1 as 1:2)."""
    log_ratio = np.log(np.asarray(widths, np.float64) / np.asarray(heights, np.float64))
    bucket_log_ratio = np.log([w / h for w, h in sizes])
    return np.abs(log_ratio[:, None] - bucket_log_ratio[None, :]).argmin(axis=1)


def merge_small(assignment: np.ndarray, sizes: list[tuple[int, int]], min_count: int) -> np.ndarray:
    """Move the images of buckets with fewer than `min_count` into the nearest bucket that has enough.

    A bucket smaller than one global batch would repeat its images inside a batch; its images are
    better cropped a little more into a neighbouring shape. If no bucket is big enough, all go to
    the largest.
    """
    counts = np.bincount(assignment, minlength=len(sizes))
    big = np.flatnonzero(counts >= min_count)
    if len(big) == len(np.flatnonzero(counts)):
        return assignment
    if len(big) == 0:
        big = np.array([counts.argmax()])
    log_ratio = np.log([w / h for w, h in sizes])
    target = big[np.abs(log_ratio[:, None] - log_ratio[None, big]).argmin(axis=1)]
    merged = np.where(counts[assignment] >= min_count, assignment, target[assignment])
    moved = int((merged != assignment).sum())
    if moved:
        logger.info("%d images from buckets with fewer than %d images moved to the nearest bigger bucket", moved, min_count)
    return merged


def bucket_probabilities(counts: np.ndarray, weighting: float | str) -> np.ndarray:
    """P(bucket) ∝ count^τ: τ = 1 'proportional' (every image equally often), τ = 0 'uniform' over buckets."""
    tau = {"proportional": 1.0, "uniform": 0.0}.get(weighting, weighting)
    try:
        tau = float(tau)
    except (TypeError, ValueError):
        raise ValueError(f"bucket weighting must be 'proportional', 'uniform' or a number in [0, 1], got {weighting!r}") from None
    if not 0 <= tau <= 1 or math.isnan(tau):
        raise ValueError(f"bucket weighting must be in [0, 1] (1 proportional, 0 uniform), got {tau}")
    counts = np.asarray(counts, np.float64)
    weights = np.where(counts > 0, counts ** tau, 0.0)
    return weights / weights.sum()
