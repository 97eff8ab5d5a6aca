"""The generated shapes dataset: coloured circles, squares and triangles on flat backgrounds.

Written as an ordinary image folder with `metadata.jsonl`, so it is read by exactly the loader a
user's own folder goes through. Backgrounds include pure black and pure white: the extremes that
an EDM-trained model reaches and a DDPM-trained one tends to miss.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (255, 0, 0),
    "green": (0, 200, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 230, 0),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
SHAPES = ("circle", "square", "triangle")
SUPERSAMPLE = 4  # draw large, then downsample: anti-aliased edges like a real photo's


def caption(colour: str, shape: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def combinations() -> list[tuple[str, str, str]]:
    """Every (shape colour, shape, background) with the shape visible against its background."""
    return [(c, s, b) for c in COLOURS for s in SHAPES for b in COLOURS if c != b]


def draw(colour: str, shape: str, background: str, size: int, rng: random.Random) -> Image.Image:
    """One image: the shape at a random size and position, wholly inside the frame."""
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), COLOURS[background])
    extent = rng.uniform(0.4, 0.7) * big
    left, top = rng.uniform(0.05 * big, big - extent - 0.05 * big), rng.uniform(0.05 * big, big - extent - 0.05 * big)
    box = (left, top, left + extent, top + extent)
    pen = ImageDraw.Draw(image)
    if shape == "circle":
        pen.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        pen.rectangle(box, fill=COLOURS[colour])
    else:
        pen.polygon([(left + extent / 2, top), (left + extent, top + extent), (left, top + extent)], fill=COLOURS[colour])
    return image.resize((size, size), Image.LANCZOS)


def write_shapes_dataset(root: str | Path, size: int = 64, per_caption: int = 8, seed: int = 0) -> int:
    """Write `root/*.png` and `root/metadata.jsonl`; returns the number of images. Deterministic in `seed`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for colour, shape, background in combinations():
        for k in range(per_caption):
            name = f"{colour}_{shape}_on_{background}_{k}.png"
            draw(colour, shape, background, size, rng).save(root / name)
            rows.append({"file_name": name, "text": caption(colour, shape, background)})
    with open(root / "metadata.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return len(rows)
