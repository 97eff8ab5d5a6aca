"""Several datasets in one run: `train_dataloader.datasets=[dict(...), ...]`.

Each entry is a source of its own (type, path, columns, captions, filters, ...) laid over the shared
`train_dataloader.dataset` (resolution, buckets, crops, cache), with either `repeats` (integer
oversampling: each usable image appears that many times per pass) or `weight` (its share of the draws,
realised as integer repeats: rᵢ ∝ weightᵢ / imagesᵢ, the smallest 1). The rows are concatenated into one
scan and one bucket plan, so a batch still comes from one bucket; `pgv25 data inspect` shows each
dataset's share of the draws.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import UserError
from .captions import CaptionOptions, caption_options
from .rows import EMPTY_CAPTION, NO_CAPTION, Rows

KEY = "train_dataloader.datasets"
SHARED = ("resolution", "buckets", "center_crop", "random_flip", "caption_dropout", "max_image_pixels", "cache", "cache_dir")


def dataset_config(loader_cfg) -> dict:
    """`train_dataloader.dataset`, with the entries of `train_dataloader.datasets` under `parts` when there are some."""
    data_cfg = loader_cfg.dataset
    parts = loader_cfg.get("datasets")
    if not parts:
        return data_cfg
    if not isinstance(parts, (list, tuple)) or not all(isinstance(p, dict) for p in parts):
        raise UserError(f"{KEY} must be a list of dicts (type, path, repeats or weight, ...)")
    combined = {**dict(data_cfg), "parts": [dict(p) for p in parts]}
    part_configs(combined)  # every mistake in the list now, before the loader branches on streaming
    return combined


def part_configs(data_cfg: dict) -> list[dict]:
    """Each entry over the shared settings; every mistake in the list is one line, before any data is read."""
    parts = data_cfg["parts"]
    if not isinstance(parts, (list, tuple)) or not all(isinstance(p, dict) for p in parts):
        raise UserError(f"{KEY} must be a list of dicts (type, path, repeats or weight, ...)")
    if data_cfg.get("streaming") or any(p.get("streaming") for p in parts):
        raise UserError(f"{KEY}: streaming datasets cannot be combined (each needs a scan); set streaming=False")
    if data_cfg.get("pairs") or any(p.get("pairs") for p in parts):
        raise UserError(f"{KEY}: preference pairs train from one dataset")
    out = []
    for i, part in enumerate(parts):
        shared = [k for k in SHARED if k in part]
        if shared:
            raise UserError(f"{KEY}[{i}] sets {', '.join(shared)}: one value for all datasets, set it in train_dataloader.dataset")
        if "repeats" in part and "weight" in part:
            raise UserError(f"{KEY}[{i}]: give repeats or weight, not both")
        repeats = part.get("repeats", 1)
        if not isinstance(repeats, int) or repeats <= 0:
            raise UserError(f"{KEY}[{i}].repeats must be an integer ≥ 1, got {repeats!r}")
        if "weight" in part and not (isinstance(part["weight"], (int, float)) and part["weight"] >= 0):
            raise UserError(f"{KEY}[{i}].weight must be a number ≥ 0, got {part['weight']!r}")
        merged = {k: v for k, v in data_cfg.items() if k != "parts"}
        merged.update({k: v for k, v in part.items() if k not in ("repeats", "weight", "name", "companion")})
        if "path" not in part:
            raise UserError(f"{KEY}[{i}] needs a path (and a type: folder, manifest or hub)")
        merged["name"] = part.get("name") or f"{merged.get('type', 'folder')}:{part['path']}"
        # companion: drawn only beside the others' batches (DreamBooth's class images; data/sampler.py)
        out.append({"cfg": merged, "repeats": repeats, "weight": part.get("weight"), "companion": bool(part.get("companion"))})
    weights = [p["weight"] for p in out]
    if any(w is not None for w in weights):
        if any(w is None for w in weights):
            raise UserError(f"{KEY}: give every dataset a weight, or none (repeats then)")
        if sum(weights) <= 0:
            raise UserError(f"{KEY}: the weights sum to {sum(weights)}; at least one must be > 0")
    return out


@dataclass
class ConcatRows:
    """The rows of several sources as one (the interface of sources.Rows); row i belongs to part `part_of[i]`."""

    parts: list[Rows]
    names: list[str]
    options: list[CaptionOptions]
    offsets: np.ndarray = field(init=False)
    captions: list = field(init=False)
    losers: None = None
    hub: None = None

    def __post_init__(self):
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])
        self.captions = [c for p in self.parts for c in p.captions]

    @property
    def name(self) -> str:
        return " + ".join(self.names)

    @property
    def fingerprint(self) -> str:
        return "+".join(p.fingerprint for p in self.parts)

    @property
    def pairs(self) -> bool:
        return False

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def part_of(self, i: int) -> int:
        return int(np.searchsorted(self.offsets, i, side="right") - 1)

    def _local(self, i: int) -> tuple[Rows, int]:
        d = self.part_of(i)
        return self.parts[d], i - int(self.offsets[d])

    def label(self, i: int) -> str:
        rows, j = self._local(i)
        return rows.label(j)

    def open(self, i: int, loser: bool = False):
        rows, j = self._local(i)
        return rows.open(j, loser)

    @property
    def masked(self) -> bool:
        return any(p.masked for p in self.parts)

    def mask_of(self, i: int) -> tuple:
        rows, j = self._local(i)
        return rows.mask_of(j)

    def open_mask(self, i: int):
        rows, j = self._local(i)
        return rows.open_mask(j)

    def options_of(self, i: int) -> CaptionOptions:
        return self.options[self.part_of(i)]


def prepare_rows(cfg: dict, key: str, load_rows) -> tuple[Rows, CaptionOptions]:
    """One source's rows with its caption settings applied once: uncaptioned rows kept as unconditional when asked,
    the template on every caption (so the cache, inspect and the scan see the final captions); and its options."""
    captions = caption_options(cfg, f"{key}.captions")
    rows = load_rows(cfg, key)
    if cfg.get("keep_uncaptioned"):  # train such images as unconditional instead of skipping them
        rows.captions = [[""] if c in (NO_CAPTION, EMPTY_CAPTION) else c for c in rows.captions]
    if not captions.default:
        rows.captions = [[captions.fixed(c) for c in cs] if isinstance(cs, list) else cs for cs in rows.captions]
    return rows, captions


def load_parts(data_cfg: dict, key: str, load_rows) -> tuple[ConcatRows, list[dict]]:
    """The parts' rows (each with its own captions) as one ConcatRows, and the parts' configs."""
    parts = part_configs(data_cfg)
    prepared = [prepare_rows(part["cfg"], f"{KEY}[{i}]", load_rows) for i, part in enumerate(parts)]
    return ConcatRows([rows for rows, _ in prepared], [p["cfg"]["name"] for p in parts], [o for _, o in prepared]), parts


def repeat_counts(parts: list[dict], usable: list[int]) -> list[int]:
    """Each part's repeats: as given, or from the weights (rᵢ ∝ wᵢ/nᵢ, rounded, the smallest non-zero 1)."""
    for part, n in zip(parts, usable):
        if n == 0:
            raise UserError(f"{KEY}: {part['cfg']['name']} has no usable image")
    if parts[0]["weight"] is None:
        return [p["repeats"] for p in parts]
    per_image = [p["weight"] / n for p, n in zip(parts, usable)]
    smallest = min(x for x in per_image if x > 0)
    return [int(round(x / smallest)) for x in per_image]


def positions_of_parts(rows: ConcatRows, index_rows: np.ndarray) -> np.ndarray:
    """The part of each index position."""
    return np.searchsorted(rows.offsets, index_rows, side="right") - 1
