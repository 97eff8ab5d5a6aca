"""What every data source is reduced to: `Rows`, and the caption problems a row can have.

Row i has an image (a file path, or bytes held by a 🤗 dataset) and a list of candidate captions (or
the reason it has none). The sources (sources.py, pairs.py) make Rows; the scan (index.py), masks and
datasets read them. This module imports nothing of pgv25, so every one of them can import it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
# Caption problems a row can have; the scan skips and counts such rows.
NO_CAPTION, EMPTY_CAPTION, NOT_UTF8 = "missing caption", "empty caption", "caption not UTF-8"
CAPTION_PROBLEMS = (NO_CAPTION, EMPTY_CAPTION, NOT_UTF8)  # what a fixed caption (dataset.caption) makes good
BAD_LINE = "\0line"  # marks a manifest line that could not be parsed


@dataclass
class Rows:
    """Row i: `images[i]` (a path str, a row number into `hub`, or (row number, column)), `captions[i]` (list of
    str, or a problem str); for preference pairs (data/pairs.py) `images[i]` is the winner, `losers[i]` the loser."""

    name: str
    images: list
    captions: list
    fingerprint: str
    hub: object = None  # a datasets.Dataset whose image column is not decoded
    image_column: str = "image"
    losers: list | None = None  # None: not a pair dataset
    mask: object = None  # masks.MaskOptions when the loss is masked
    masks: list | None = None  # each row's mask: a path, a (row, column) hub cell, or None (data/masks.py)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def pairs(self) -> bool:
        return self.losers is not None

    def label(self, i: int) -> str:
        image = self.images[i]
        if isinstance(image, str):
            return image
        return f"{self.name}[{image[0] if isinstance(image, tuple) else image}]"

    @property
    def masked(self) -> bool:
        return self.mask is not None

    def mask_of(self, i: int) -> tuple:
        """(mask options or None, row i's mask reference or None)."""
        return self.mask, None if self.masks is None else self.masks[i]

    def open_mask(self, i: int):
        return self._open(self.masks[i])

    def open(self, i: int, loser: bool = False):
        """A file-like object or path for PIL.Image.open (of the pair's loser with `loser=True`)."""
        return self._open((self.losers if loser else self.images)[i])

    def _open(self, image):
        if isinstance(image, str):
            return image
        row, column = image if isinstance(image, tuple) else (image, self.image_column)
        value = self.hub[row][column]
        if isinstance(value, (bytes, bytearray)):  # a binary column (Pick-a-Pic's jpg_0 / jpg_1)
            return io.BytesIO(value)
        if isinstance(value, str):
            return value
        if value is None:
            return f"{self.name}[{row}]:<no {column}>"  # a path that does not exist: counted as 'file not found'
        if value.get("bytes") is not None:
            return io.BytesIO(value["bytes"])
        return value["path"]


def parse_captions(value) -> list[str] | str:
    """A caption cell → a non-empty list of candidate captions, or the reason the row has none."""
    if value is None or (isinstance(value, float) and value != value):  # missing cell (None, NaN)
        return NO_CAPTION
    candidates = value if isinstance(value, (list, tuple)) else [value]
    candidates = [c for c in candidates if isinstance(c, str)]
    if any(_has_surrogates(c) for c in candidates):
        return NOT_UTF8
    candidates = [c.strip() for c in candidates if c.strip()]
    return candidates or EMPTY_CAPTION


def _has_surrogates(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def rows_fingerprint(images: list[str], captions: list) -> str:
    """Changes when any file's path, size or modification time, or any caption, changes."""
    digest = hashlib.sha1()
    for path, caption in zip(images, captions):
        try:
            stat = os.stat(path)
            digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode(errors="surrogateescape"))
        except OSError:
            digest.update(f"{path}\0missing\0".encode(errors="surrogateescape"))
        digest.update(json.dumps(caption).encode() + b"\n")
    return digest.hexdigest()


