"""A scan of every row before training: caption present, file there, header readable, size sane.

Bucketing needs each image's size up front, and reading only the header costs a small fraction of
decoding. The same pass finds most bad rows (missing, empty, non-image, decompression-bomb-sized
files; missing, empty or non-UTF-8 captions) so they are excluded and counted before any model
loads; what only a full decode reveals (a truncated file) is skipped and counted during training.
The result is cached on disk under the rows' fingerprint, so a changed file or caption rescans.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .masks import probe_mask
from .rows import Rows
from .transforms import DEFAULT_MAX_PIXELS, header_size

logger = logging.getLogger("pgv25")
VERSION = 1  # bump when what the scan checks changes


@dataclass
class Index:
    rows: np.ndarray  # the usable row numbers
    widths: np.ndarray  # as the model will see them: after EXIF rotation
    heights: np.ndarray
    problems: list  # [(label, reason)] for every excluded row
    widths_2: np.ndarray | None = None  # of each pair's loser (pair datasets only)
    heights_2: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def reasons(self) -> Counter:
        return Counter(reason for _, reason in self.problems)

    def subset(self, keep: np.ndarray) -> Index:
        """The positions where `keep` is True (the problems stay: they describe the scan)."""
        pick = lambda a: None if a is None else a[keep]  # noqa: E731
        return Index(self.rows[keep], self.widths[keep], self.heights[keep], self.problems, pick(self.widths_2), pick(self.heights_2))


def probe(rows: Rows, i: int, max_pixels: int) -> tuple | str:
    """(width, height) of row i's image as displayed, or the reason the row cannot be used; for a pair,
    ((w, h), (w, h)) of winner and loser (a pair is usable only when both are)."""
    caption = rows.captions[i]
    if isinstance(caption, str):
        return caption
    first = probe_image(rows, i, max_pixels)
    if isinstance(first, str):
        return first
    if not rows.pairs:  # a masked row is usable only with a usable mask (data/masks.py)
        return (probe_mask(rows, i, first, max_pixels) if rows.masked else None) or first
    second = probe_image(rows, i, max_pixels, loser=True)
    return second if isinstance(second, str) else (first, second)


def probe_image(rows: Rows, i: int, max_pixels: int, loser: bool = False) -> tuple[int, int] | str:
    target = rows.open(i, loser)
    if isinstance(target, str):
        try:
            if os.path.getsize(target) == 0:
                return "empty file"
        except OSError:
            return "file not found"
    return header_size(target, max_pixels)


def scan(rows: Rows, cache_dir: str | Path | None = None, max_pixels: int = DEFAULT_MAX_PIXELS, threads: int = 16) -> Index:
    """The index of `rows`, read from `cache_dir` when an identical scan was done before."""
    key = hashlib.sha1(f"{VERSION}:{rows.fingerprint}:{max_pixels}".encode()).hexdigest()[:20]
    cached = Path(cache_dir).expanduser() / "index" / key if cache_dir else None
    if cached is not None and (cached / "index.npz").is_file():
        arrays = np.load(cached / "index.npz")
        problems = [tuple(p) for p in json.loads((cached / "problems.json").read_text())]
        return Index(arrays["rows"], arrays["widths"], arrays["heights"], problems,
                     arrays["widths_2"] if "widths_2" in arrays else None, arrays["heights_2"] if "heights_2" in arrays else None)
    start = time.time()
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max(max_pixels, limit or 0)  # our limit decides, PIL's must not fire first
    try:
        with ThreadPoolExecutor(threads) as pool:  # header reads wait on the disk, not the GIL
            results = list(pool.map(lambda i: probe(rows, i, max_pixels), range(len(rows)), chunksize=64))
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    kept = [i for i, r in enumerate(results) if not isinstance(r, str)]
    problems = [(rows.label(i), r) for i, r in enumerate(results) if isinstance(r, str)]
    sizes = [results[i] for i in kept]
    if rows.pairs:  # sizes of the winners, then of the losers
        index = Index(np.array(kept, dtype=np.int64), *_columns([s[0] for s in sizes]), problems, *_columns([s[1] for s in sizes]))
    else:
        index = Index(np.array(kept, dtype=np.int64), *_columns(sizes), problems)
    logger.info("scanned %d rows of %s in %.1f s: %d usable%s", len(rows), rows.name, time.time() - start, len(index),
                describe_problems(index.reasons(), "; excluded"))
    if cached is not None:
        tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        pairs = {"widths_2": index.widths_2, "heights_2": index.heights_2} if rows.pairs else {}
        np.savez(tmp / "index.npz", rows=index.rows, widths=index.widths, heights=index.heights, **pairs)
        (tmp / "problems.json").write_text(json.dumps(index.problems))
        try:
            tmp.rename(cached)
        except OSError:  # another process stored the same scan first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return index


def _columns(sizes: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    return np.array([w for w, _ in sizes], dtype=np.int32), np.array([h for _, h in sizes], dtype=np.int32)


def problem_lines(problems) -> str:
    """`reason<TAB>path` lines, the format of skipped_files.txt and excluded_rows.txt."""
    return "".join(f"{reason}\t{label}\n" for label, reason in problems)


def describe_problems(reasons: Counter, prefix: str) -> str:
    """'; excluded 3 (2 not an image, 1 empty caption)' or '' when there are none."""
    total = sum(reasons.values())
    if not total:
        return ""
    return f"{prefix} {total} ({', '.join(f'{n} {reason}' for reason, n in reasons.most_common())})"
