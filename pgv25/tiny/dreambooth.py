"""Instance images for DreamBooth at tiny size, in a folder of their own (no captions: the instance prompt is every
image's caption): a few shapes images of one caption copied from the tiny dataset (the tiny config), or drawn as a
shape or colour the dataset never had (the toy experiment's new concept)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

from ..errors import UserError


def ensure_instance_images(source: str, caption: str, count: int, folder: str) -> Path:
    source, folder = Path(source).expanduser(), Path(folder).expanduser()
    if folder.is_dir() and len(list(folder.glob("*.png"))) == count:
        return folder
    rows = [json.loads(line) for line in (source / "metadata.jsonl").read_text().splitlines() if line.strip()]
    chosen = [row["file_name"] for row in rows if row.get("text") == caption][:count]
    if len(chosen) < count:
        raise UserError(f"tiny_dreambooth: {source} has {len(chosen)} images captioned {caption!r}, fewer than {count}")
    temp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir(parents=True)
    for name in chosen:
        shutil.copy(source / name, temp / Path(name).name)
    shutil.rmtree(folder, ignore_errors=True)
    temp.rename(folder)  # complete or absent, never half-copied
    return folder


def write_concept_images(folder: str | Path, colour: str | tuple[int, int, int], shape: str, background: str, count: int,
                         size: int = 64, seed: int = 0) -> Path:
    """`count` images of a `shape` ('ring' too) in `colour` (a name or (r, g, b)) on `background`, each at its own size
    and place; deterministic."""
    from .shapes import draw

    folder = Path(folder).expanduser()
    temp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir(parents=True)
    rng = random.Random(seed)
    for k in range(count):
        draw(colour, shape, background, size, rng).save(temp / f"concept_{k}.png")
    shutil.rmtree(folder, ignore_errors=True)
    temp.rename(folder)
    return folder
