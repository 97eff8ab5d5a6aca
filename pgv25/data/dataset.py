"""From the dataset config to batches: rows → scanned index → buckets → a per-sample dataset.

Each sample's randomness (crop, flip, caption choice, caption dropout) comes from a generator
seeded by (seed, step, slot), so the same step gives the same batch with any number of loader
workers and after a resume. A file that fails to decode is skipped: the item carries the reason,
the collate drops it and the runner counts and logs it, so one broken file never ends an epoch.
"""

from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import UserError
from .captions import CaptionOptions
from .buckets import bucket_sizes, merge_small, nearest_buckets
from .index import Index, describe_problems, scan
from .masks import has_mask, masked_sample
from .multi import ConcatRows, load_parts, positions_of_parts, prepare_rows, repeat_counts
from .rows import Rows
from .sources import load_rows
from .transforms import DEFAULT_MAX_PIXELS, BucketTransform, ImageProblem, cover_size, decode

logger = logging.getLogger("pgv25")


@dataclass
class DataPlan:
    """What will be trained on: usable rows, their sizes, and the bucket each one goes to."""

    rows: Rows
    index: Index
    sizes: list  # bucket (w, h)
    bucket_of: np.ndarray  # bucket of each index position
    weighting: float | str
    parts: list[dict] | None = None  # several datasets (data/multi.py): name, usable images, repeats of each
    companion: np.ndarray | None = None  # per position: a class image, only drawn beside a batch (prior preservation)
    captions: CaptionOptions | None = None  # the source's caption settings, parsed once (several datasets: rows.options)
    held_out: DataPlan | None = None  # rows split off for the validation loss (never trained on), in the same buckets

    def histogram(self) -> list[tuple[tuple[int, int], int]]:
        counts = np.bincount(self.bucket_of, minlength=len(self.sizes))
        return [(size, int(n)) for size, n in zip(self.sizes, counts)]


def plan_data(cfg: dict, global_batch: int = 1, key: str = "train_dataloader.dataset", holdout: float = 0.0) -> DataPlan:
    """Read and scan the source and assign buckets; every whole-dataset mistake raises here, before any model loads.

    `holdout`: the fraction of usable images split off for the validation loss (`plan.held_out`), chosen by a hash of
    each image's name, so the same images stay out whatever the seed, the process count or a resume."""
    parts = captions = None
    if cfg.get("parts"):  # several datasets: their rows as one, each with its own captions (data/multi.py)
        rows, parts = load_parts(cfg, key, load_rows)
    else:
        rows, captions = prepare_rows(cfg, key, load_rows)
    index = scan(rows, cfg.get("cache_dir"), int(cfg.get("max_image_pixels", DEFAULT_MAX_PIXELS)))
    if len(index) == 0:
        raise UserError(f"no usable images in {rows.name}{describe_problems(index.reasons(), ': excluded')}")
    held_index = None
    if holdout:
        out = np.array([held_out(rows.label(int(row)), holdout) for row in index.rows], bool)
        if parts is not None:  # a companion part (DreamBooth's class images) is never held out: it is not what is learnt
            companions = np.array([p["companion"] for p in parts], bool)
            out &= ~companions[positions_of_parts(rows, index.rows)]
        index, held_index = index.subset(~out), index.subset(out)
        if len(index) == 0 or len(held_index) == 0:
            raise UserError(f"validation.loss.split={holdout} leaves {len(index)} images to train on and {len(held_index)} to "
                            f"validate with, of {len(out)}; both need some (change the split, or give validation.loss.dataset)")
    companion = None
    if parts is not None:
        index, parts, companion = repeat_parts(index, rows, parts)
    resolution = int(cfg["resolution"])
    buckets = cfg.get("buckets") or {}
    try:
        sizes = bucket_sizes(resolution, buckets)
    except ValueError as error:
        raise UserError(f"{key}.buckets: {error}") from None
    if buckets.get("enabled", bool(buckets)):
        widths, heights = index.widths, index.heights
        if index.widths_2 is not None:  # a pair goes to one bucket: the nearest to its images' mean log aspect ratio
            widths, heights = np.sqrt(widths * index.widths_2.astype(np.float64)), np.sqrt(heights * index.heights_2.astype(np.float64))
        bucket_of = nearest_buckets(widths, heights, sizes)
        bucket_of = merge_small(bucket_of, sizes, int(buckets.get("min_images", global_batch)))
        weighting = buckets.get("weighting", 1.0)
    else:  # every image a square crop of resolution²
        bucket_of, weighting = np.zeros(len(index), np.int64), 1.0
    if rows.masked:
        describe_masks(rows, index)
    used = np.bincount(bucket_of, minlength=len(sizes)) > 0  # keep only buckets that have images
    renumber = np.cumsum(used) - 1
    sizes = [s for s, u in zip(sizes, used) if u]
    held = None
    if held_index is not None:  # each held-out image in the training bucket nearest its aspect ratio
        held = DataPlan(rows, held_index, sizes, nearest_buckets(held_index.widths, held_index.heights, sizes), 1.0,
                        captions=captions)
    return DataPlan(rows, index, sizes, renumber[bucket_of], weighting, parts, companion, captions, held)


def held_out(label: str, fraction: float) -> bool:
    """Whether the image named `label` is in the held-out `fraction`: a hash of its file name and folder (or its hub
    row), so that moving the dataset keeps the split."""
    name = "/".join(label.replace("\\", "/").split("/")[-2:])
    return int(hashlib.sha1(name.encode("utf-8", "surrogateescape")).hexdigest()[:12], 16) < fraction * 16**12


def describe_masks(rows, index: Index) -> None:
    """One line: how many usable images train with a mask (the others weigh 1 everywhere)."""
    usable = np.unique(index.rows).tolist()
    logger.info("masked loss: %d of %d usable images have a mask; the others weigh 1 everywhere",
                sum(has_mask(rows, row) for row in usable), len(usable))


def repeat_parts(index: Index, rows: ConcatRows, parts: list[dict]) -> tuple[Index, list[dict], np.ndarray | None]:
    """Each usable position of part d `repeats_d` times (a new position each: its own crop, its own draws); and,
    when a part is a companion (class images), which positions are."""
    part_of = positions_of_parts(rows, index.rows)
    usable = np.bincount(part_of, minlength=len(parts)).tolist()
    repeats = repeat_counts(parts, usable)
    take = np.repeat(np.arange(len(index)), np.asarray(repeats)[part_of])
    repeated = Index(index.rows[take], index.widths[take], index.heights[take], index.problems)
    flags = np.asarray([p.get("companion", False) for p in parts], bool)
    companion = flags[part_of[take]] if flags.any() else None
    return repeated, [{"name": p["cfg"]["name"], "usable": n, "repeats": r} for p, n, r in zip(parts, usable, repeats)], companion


def companion_flag(plan: DataPlan, position: int) -> dict:
    """{"prior": True/False} for a plan with class images (prior preservation reads it per sample), else {}."""
    return {} if plan.companion is None else {"prior": bool(plan.companion[position])}


class SameCaptions:
    """One dataset's caption options for every row (a class, not a lambda: loader workers pickle the dataset)."""

    def __init__(self, options: CaptionOptions):
        self.options = options

    def __call__(self, row: int) -> CaptionOptions:
        return self.options


class BucketedImageDataset(torch.utils.data.Dataset):
    """Item (step, slot, position) → pixels cropped to the position's bucket, time_ids, caption."""

    def __init__(self, plan: DataPlan, transform: BucketTransform, caption_dropout: float = 0.0, seed: int = 0,
                 max_pixels: int = DEFAULT_MAX_PIXELS, captions=None):
        self.plan, self.transform = plan, transform
        self.caption_dropout, self.seed, self.max_pixels = caption_dropout, seed, max_pixels
        # row → its per-step tag shuffling and dropout (the template is already in the rows)
        self.captions = captions or SameCaptions(CaptionOptions())

    def __len__(self) -> int:
        return len(self.plan.index)

    def __getitem__(self, key: tuple[int, int, int]) -> dict:
        step, slot, position = key
        rng = random.Random(f"{self.seed}/{step}/{slot}")
        plan = self.plan
        row = int(plan.index.rows[position])
        target = plan.sizes[plan.bucket_of[position]]
        masked = {}
        try:
            if plan.rows.pairs:
                pixels, time_ids = self._pair(row, position, target, rng)
            else:
                original = (int(plan.index.widths[position]), int(plan.index.heights[position]))
                image = decode(plan.rows.open(row), self.max_pixels, cover_size(*original, target))
                if plan.rows.masked:  # the loss weights follow the image's resize, crop and flip (data/masks.py)
                    pixels, time_ids, masked["loss_weights"] = masked_sample(self.transform, plan.rows, row, image, target, rng,
                                                                             original, self.max_pixels)
                else:
                    pixels, time_ids = self.transform(image, target, rng, original)
        except ImageProblem as problem:
            return {"problem": str(problem), "label": plan.rows.label(row)}
        caption = self.captions(row)(rng.choice(plan.rows.captions[row]), rng)
        return {"pixels": pixels, "time_ids": time_ids, "caption": caption, "drop_caption": rng.random() < self.caption_dropout,
                **companion_flag(plan, position), **masked}

    def _pair(self, row: int, position: int, target: tuple[int, int], rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
        """Winner and loser stacked ([2, C, H, W], [2, 6]): one bucket, the same relative crop and flip, and
        each image's own micro-conditioning."""
        index = self.plan.index
        crop, flip = (rng.random(), rng.random()), self.transform.random_flip and rng.random() < 0.5
        pixels, time_ids = [], []
        for loser, original in ((False, (index.widths[position], index.heights[position])),
                                (True, (index.widths_2[position], index.heights_2[position]))):
            original = (int(original[0]), int(original[1]))
            image = decode(self.plan.rows.open(row, loser), self.max_pixels, cover_size(*original, target))
            p, t = self.transform(image, target, rng, original, flip=flip, crop=crop)
            pixels.append(p)
            time_ids.append(t)
        return torch.stack(pixels), torch.stack(time_ids)


PAIRED = ("pixels", "latents", "time_ids")  # per image of a pair; everything else (the caption) is per pair


def collate(items: list[dict]) -> dict:
    """Stack the good samples' tensors (bools become a tensor, strings a list); `problems` lists
    (label, reason) of the ones that could not be read, `size` counts the good ones.

    Preference pairs (`pixels` or `latents` of [2, ...] per item) come out as one batch of 2B images, the
    B winners then their B losers, with the per-pair values (caption, drop flag, text embeddings)
    repeated to match: the layout the DPO objective reads.
    """
    good = [item for item in items if "problem" not in item]
    batch = {"problems": [(item["label"], item["problem"]) for item in items if "problem" in item], "size": len(good)}
    for key in good[0] if good else ():
        values = [item[key] for item in good]
        if isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        elif isinstance(values[0], bool):
            batch[key] = torch.tensor(values)
        else:
            batch[key] = values
    image = batch.get("pixels", batch.get("latents"))
    if image is not None and image.dim() == 5:
        for key, value in list(batch.items()):
            if key in PAIRED:
                batch[key] = value.transpose(0, 1).flatten(0, 1)
            elif isinstance(value, torch.Tensor):
                batch[key] = torch.cat([value, value])
            elif key not in ("problems", "size"):
                batch[key] = value + value
    return batch


def build_dataset(cfg: dict, plan: DataPlan, seed: int) -> BucketedImageDataset:
    """From the `train_dataloader.dataset` config dict and its plan."""
    transform = BucketTransform(cfg.get("center_crop", False), cfg.get("random_flip", True))
    captions = plan.rows.options_of if isinstance(plan.rows, ConcatRows) else SameCaptions(plan.captions)
    return BucketedImageDataset(plan, transform, cfg.get("caption_dropout", 0.0), seed,
                                int(cfg.get("max_image_pixels", DEFAULT_MAX_PIXELS)), captions)
