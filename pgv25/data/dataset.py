"""Image–caption datasets read through 🤗 `datasets`: a hub dataset, a local dataset folder, or an
image folder with `metadata.jsonl`/`metadata.csv` (the `imagefolder` builder)."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import torch

from ..errors import UserError
from ..models.loading import hub_unreachable_message
from .transforms import SDXLTransform

logger = logging.getLogger(__name__)


def load_source(dataset: str | None = None, data_dir: str | None = None, split: str = "train", key: str = "train_dataloader.dataset"):
    """`data_dir`: a local image folder; `dataset`: a hub id or a local dataset directory."""
    import datasets

    datasets.disable_progress_bars()
    try:
        if data_dir is not None:
            if not Path(data_dir).expanduser().is_dir():
                raise UserError(f"image folder {data_dir} does not exist ({key}.data_dir)")
            return datasets.load_dataset("imagefolder", data_dir=str(Path(data_dir).expanduser()), split=split)
        if dataset is None:
            raise UserError(f"set {key}.dataset (a hub id or local folder) or {key}.data_dir (an image folder)")
        if Path(dataset).expanduser().is_dir():
            return datasets.load_dataset(str(Path(dataset).expanduser()), split=split)
        return datasets.load_dataset(dataset, split=split)
    except UserError:
        raise
    except (ConnectionError, OSError) as error:
        if data_dir is None and not Path(dataset).expanduser().exists() and _looks_unreachable(error):
            raise UserError(hub_unreachable_message(dataset, "dataset", f"{key}.dataset")) from None
        raise UserError(f"cannot load dataset {data_dir or dataset}: {_first_line(error)}") from None
    except (ValueError, FileNotFoundError) as error:
        raise UserError(f"cannot load dataset {data_dir or dataset}: {_first_line(error)}") from None


def _looks_unreachable(error: Exception) -> bool:
    text = f"{type(error).__name__} {error}".lower()
    return any(word in text for word in ("connect", "offline", "resolve", "network", "timed out", "couldn't reach", "name or service"))


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class CaptionedImageDataset(torch.utils.data.Dataset):
    """Indexed by (epoch, index) pairs from `ResumableSampler`; each sample's randomness (crop,
    flip, caption choice, caption dropout) comes from a generator seeded by (seed, epoch, index).

    An image that cannot be decoded is skipped: the item is None, the collate drops it and the
    runner counts it, so one broken file never ends an epoch.
    """

    def __init__(self, source, transform: SDXLTransform, image_column: str = "image", caption_column: str = "text",
                 caption_dropout: float = 0.0, seed: int = 0):
        missing = [c for c in (image_column, caption_column) if c not in source.column_names]
        if missing:
            raise UserError(f"dataset has no column {', '.join(map(repr, missing))}; its columns are {source.column_names}")
        if len(source) == 0:
            raise UserError("dataset is empty")
        self.source, self.transform = source, transform
        self.image_column, self.caption_column = image_column, caption_column
        self.caption_dropout, self.seed = caption_dropout, seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        rng = random.Random(f"{self.seed}/{epoch}/{index}")
        try:
            row = self.source[index]
            pixels, time_ids = self.transform(row[self.image_column], rng)
        except (OSError, ValueError, SyntaxError) as error:  # PIL raises all three for broken files
            logger.warning("skipping sample %d: %s", index, _first_line(error))
            return None
        caption = row[self.caption_column]
        if isinstance(caption, (list, tuple)):
            caption = rng.choice(caption) if caption else ""
        return {
            "pixels": pixels,
            "time_ids": time_ids,
            "caption": caption if isinstance(caption, str) else "",
            "drop_caption": rng.random() < self.caption_dropout,
        }


def collate(items: list) -> dict | None:
    """Stack the good samples; `skipped` counts the ones that could not be read."""
    good = [item for item in items if item is not None]
    if not good:
        return {"skipped": len(items), "size": 0}
    return {
        "pixels": torch.stack([item["pixels"] for item in good]),
        "time_ids": torch.stack([item["time_ids"] for item in good]),
        "captions": [item["caption"] for item in good],
        "drop_caption": torch.tensor([item["drop_caption"] for item in good]),
        "skipped": len(items) - len(good),
        "size": len(good),
    }


def build_dataset(cfg: dict, seed: int) -> CaptionedImageDataset:
    """From the `train_dataloader.dataset` config dict."""
    source = load_source(cfg.get("dataset"), cfg.get("data_dir"), cfg.get("split", "train"))
    transform = SDXLTransform(cfg["resolution"], cfg.get("center_crop", False), cfg.get("random_flip", True))
    return CaptionedImageDataset(
        source, transform, cfg.get("image_column", "image"), cfg.get("caption_column", "text"),
        cfg.get("caption_dropout", 0.0), seed,
    )
