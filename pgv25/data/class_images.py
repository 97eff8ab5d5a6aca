"""DreamBooth's class images: what the base model draws for the class prompt, generated once before training.

Prior preservation trains on them beside the instance images so the class ("a photo of a dog") keeps
looking like the base model's dogs while the instance ("a photo of TOK dog") is learned. The folder is a
plain dataset that stays on disk: images already there (generated earlier, or the user's own) count, and
only the missing ones are drawn, so an interrupted generation resumes and a second run reuses them.

Image i is `class_{i:05d}.png`, drawn from its own seed (seed + i) at its own size: the sizes follow the
instance images' buckets in proportion, so every step can pair instance and class images of one bucket.
Each file is written under a temporary name and renamed, so a kill leaves no half-written image. With
several processes each draws every world_size-th missing image.
"""

from __future__ import annotations

import logging
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .rows import IMAGE_SUFFIXES

logger = logging.getLogger("pgv25")


@dataclass
class ClassImages:
    prompt: str
    folder: Path
    count: int  # images the folder should hold
    negative_prompt: str | None = None
    steps: int = 25
    guidance_scale: float = 3.0
    batch_size: int = 4
    seed: int = 0

    def __post_init__(self):
        self.folder = Path(self.folder).expanduser()
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise UserError(f"class_prompt must be a non-empty string, got {self.prompt!r}")
        if not isinstance(self.count, int) or self.count < 1:
            raise UserError(f"num_class_images must be an integer ≥ 1, got {self.count!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise UserError(f"class image batch_size must be an integer ≥ 1, got {self.batch_size!r}")


def file_name(i: int) -> str:
    return f"class_{i:05d}.png"


def present(folder: Path) -> list[Path]:
    """The images in the folder, any name (the user's own class images count too)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.name.startswith("."))


def assign_sizes(count: int, bucket_counts: list[tuple[tuple[int, int], int]]) -> list[tuple[int, int]]:
    """A (width, height) for each of `count` class images, in proportion to the instance images per bucket:
    one per bucket first while count allows, the rest by largest remainder; the largest share first."""
    buckets = [(size, n) for size, n in bucket_counts if n > 0]
    if not buckets:
        raise UserError("no instance images to size the class images after")
    numbers = [1 if count >= len(buckets) else 0 for _ in buckets]
    rest, total = count - sum(numbers), sum(n for _, n in buckets)
    quotas = [rest * n / total for _, n in buckets]
    numbers = [k + int(q) for k, q in zip(numbers, quotas)]
    by_remainder = sorted(range(len(buckets)), key=lambda b: (-(quotas[b] - int(quotas[b])), b))
    for b in by_remainder[: count - sum(numbers)]:
        numbers[b] += 1
    sizes = []
    for b in sorted(range(len(buckets)), key=lambda b: (-numbers[b], b)):
        sizes += [buckets[b][0]] * numbers[b]
    return sizes


def missing_indices(options: ClassImages) -> list[int]:
    """Indices of the class images still to draw: as many as the folder lacks, the lowest free names."""
    have = present(options.folder)
    lacking = options.count - len(have)
    names = {p.name for p in have}
    free = (i for i in range(options.count + len(have)) if file_name(i) not in names)
    return [next(free) for _ in range(max(0, lacking))]


def generate_class_images(options: ClassImages, sizes: list[tuple[int, int]], load_pipe, todo: list[int] | None = None,
                          rank: int = 0, world_size: int = 1) -> int:
    """Draw this process's share of the missing class images; returns how many it wrote. With several processes
    `todo` is the one list of missing indices they all share (taken before any of them writes: rank 0's, broadcast).
    `load_pipe()` is only called when there is something to draw (a second run loads no pipeline)."""
    import torch

    todo = missing_indices(options) if todo is None else todo
    mine = todo[rank::world_size]
    if not mine:
        if rank == 0:
            logger.info("class images: %d in %s, none to generate", len(present(options.folder)), options.folder)
        return 0
    options.folder.mkdir(parents=True, exist_ok=True)
    by_size = defaultdict(list)
    for i in mine:
        by_size[sizes[i % len(sizes)]].append(i)
    logger.info("class images: generating %d of %d missing for '%s' in %s (batch %d, %d steps)", len(mine), len(todo),
                options.prompt, options.folder, options.batch_size, options.steps)
    pipe, done, start = load_pipe(), 0, time.time()
    for (width, height), indices in sorted(by_size.items()):
        for first in range(0, len(indices), options.batch_size):
            batch = indices[first : first + options.batch_size]
            images = pipe([options.prompt] * len(batch), negative_prompt=[options.negative_prompt] * len(batch)
                          if options.negative_prompt else None, num_inference_steps=options.steps,
                          guidance_scale=options.guidance_scale, width=width, height=height,
                          generator=[torch.Generator("cpu").manual_seed(options.seed + i) for i in batch]).images
            for i, image in zip(batch, images):
                final = options.folder / file_name(i)
                temp = final.with_name(f".{final.name}.tmp{os.getpid()}")
                image.save(temp, format="PNG")
                os.replace(temp, final)  # never a half-written image under the final name
            done += len(batch)
            logger.info("class images: %d/%d (%.1f s per image)", done, len(mine), (time.time() - start) / done)
    del pipe
    return done
