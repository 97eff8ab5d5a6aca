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
RING_HOLE = 0.55  # a ring's hole, as a share of its outer diameter
SUPERSAMPLE = 4  # draw large, then downsample: anti-aliased edges like a real photo's


# Kept out of the training set and asked for at evaluation (compositional generalisation): every
# shape twice, every colour once as shape and once as background, each seen in other combinations.
HELD_OUT = (
    ("red", "triangle", "blue"),
    ("green", "circle", "white"),
    ("blue", "square", "yellow"),
    ("yellow", "circle", "black"),
    ("white", "triangle", "green"),
    ("black", "square", "red"),
)
# Image sizes per aspect ratio, as multiples of the square side (all multiples of 16 at size 64, the
# tiny VAE + UNet's granularity); the area stays near size².
ASPECTS = {"1:1": (1.0, 1.0), "2:1": (1.5, 0.75), "1:2": (0.75, 1.5)}


def caption(colour: str, shape: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def parse_caption(text: str) -> tuple[str, str, str] | None:
    """(colour, shape, background) of a caption written by `caption`, else None."""
    words = text.split()
    if len(words) != 7 or words[0] != "a" or words[3:5] != ["on", "a"] or words[6] != "background":
        return None
    found = (words[1], words[2], words[5])
    return found if found[0] in COLOURS and found[1] in SHAPES and found[2] in COLOURS else None


def combinations(held_out: bool | None = None) -> list[tuple[str, str, str]]:
    """Every (shape colour, shape, background) with the shape visible against its background;
    `held_out=False`: only the trained ones, `True`: only the held-out ones, None: all."""
    every = [(c, s, b) for c in COLOURS for s in SHAPES for b in COLOURS if c != b]
    if held_out is None:
        return every
    return [combo for combo in every if (combo in HELD_OUT) == held_out]


def aspect_size(size: int, aspect: str) -> tuple[int, int]:
    """(width, height) of an image of this aspect ratio ('1:1', '2:1', '1:2') for square side `size`."""
    if aspect not in ASPECTS:
        raise ValueError(f"aspect must be one of {', '.join(ASPECTS)}, got {aspect!r}")
    fw, fh = ASPECTS[aspect]
    return round(size * fw), round(size * fh)


def _spread(rng: random.Random, low: float, high: float, spread: float) -> float:
    """Uniform on [low, high] narrowed about its middle to `spread` of its width (1: all of it, 0: the middle)."""
    middle = (low + high) / 2
    return middle + spread * (rng.uniform(low, high) - middle)


def draw(colour: str | tuple[int, int, int], shape: str, background: str, size: int | tuple[int, int], rng: random.Random,
         spread: float = 1.0) -> Image.Image:
    """One image (`size`: side, or (width, height)): the shape at a random size and position, wholly inside the frame.
    `colour`: a palette name, or (r, g, b) for a colour the dataset does not have (a new concept).

    `spread` narrows the size (40–70% of the shorter side) and position ranges about their middles:
    1 uses all of them, 0 draws every shape centred at 55%.
    """
    width, height = (size, size) if isinstance(size, int) else size
    big_w, big_h = width * SUPERSAMPLE, height * SUPERSAMPLE
    image = Image.new("RGB", (big_w, big_h), COLOURS[background])
    side = min(big_w, big_h)
    extent = _spread(rng, 0.4, 0.7, spread) * side
    margin = 0.05 * side
    left = _spread(rng, margin, big_w - extent - margin, spread)
    top = _spread(rng, margin, big_h - extent - margin, spread)
    box = (left, top, left + extent, top + extent)
    pen = ImageDraw.Draw(image)
    fill = COLOURS[colour] if isinstance(colour, str) else tuple(colour)
    if shape == "circle":
        pen.ellipse(box, fill=fill)
    elif shape == "ring":  # not in the dataset: the toy DreamBooth experiment's new concept, a circle with a hole
        pen.ellipse(box, fill=fill)
        inset = extent * (1 - RING_HOLE) / 2
        pen.ellipse((left + inset, top + inset, left + extent - inset, top + extent - inset), fill=COLOURS[background])
    elif shape == "square":
        pen.rectangle(box, fill=fill)
    else:
        pen.polygon([(left + extent / 2, top), (left + extent, top + extent), (left, top + extent)], fill=fill)
    return image.resize((width, height), Image.LANCZOS)


def aspect_plan(per_caption: int, aspects: dict[str, float]) -> list[str]:
    """The aspect ratio of each of a caption's images, in exact proportion to the shares in `aspects`."""
    names, shares = list(aspects), [float(v) for v in aspects.values()]
    if not names or min(shares) < 0 or sum(shares) <= 0:
        raise ValueError(f"aspects must map '1:1' / '2:1' / '1:2' to non-negative shares, got {aspects!r}")
    bounds, total = [], 0.0
    for share in shares:
        total += share / sum(shares)
        bounds.append(total)
    return [names[min(i for i, b in enumerate(bounds) if (k + 0.5) / per_caption <= b + 1e-9)] for k in range(per_caption)]


def write_shapes_dataset(root: str | Path, size: int = 64, per_caption: int = 8, seed: int = 0,
                         hold_out: bool = True, aspects: dict[str, float] | None = None, spread: float = 1.0) -> int:
    """Write `root/*.png` and `root/metadata.jsonl`; returns the number of images. Deterministic in `seed`.

    `hold_out`: leave the HELD_OUT combinations out; `aspects`: share of each aspect ratio (default all
    square); `spread`: how much of the size and position ranges the shapes use (see `draw`).
    """
    if not 0.0 <= spread <= 1.0:
        raise ValueError(f"spread must be between 0 and 1, got {spread!r}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    plan = aspect_plan(per_caption, aspects or {"1:1": 1.0})
    rows = []
    for colour, shape, background in combinations(held_out=False if hold_out else None):
        for k, aspect in enumerate(plan):
            tag = "" if aspect == "1:1" else "_" + aspect.replace(":", "x")
            name = f"{colour}_{shape}_on_{background}_{k}{tag}.png"
            draw(colour, shape, background, aspect_size(size, aspect), rng, spread).save(root / name)
            rows.append({"file_name": name, "text": caption(colour, shape, background)})
    with open(root / "metadata.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return len(rows)


def wrong_in_one_attribute(colour: str, shape: str, background: str, k: int) -> tuple[str, str, str]:
    """The same picture drawn wrong in one attribute: the shape's colour (even k) or the shape (odd k),
    cycling through the alternatives (a colour never that of the background, so the shape stays visible)."""
    if k % 2 == 0:
        others = [c for c in COLOURS if c not in (colour, background)]
        return others[(k // 2) % len(others)], shape, background
    others = [s for s in SHAPES if s != shape]
    return colour, others[(k // 2) % len(others)], background


def write_shapes_pairs(root: str | Path, size: int = 64, per_caption: int = 4, seed: int = 0, hold_out: bool = True,
                       spread: float = 1.0) -> int:
    """Preference pairs: per caption `per_caption` pairs of a right image (`chosen`) and one wrong in one
    attribute (`rejected`), drawn at the same size and position; `metadata.jsonl` with chosen/rejected/text.
    Returns the number of pairs. Deterministic in `seed`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"pairs/{seed}")
    rows = []
    for colour, shape, background in combinations(held_out=False if hold_out else None):
        for k in range(per_caption):
            state = rng.getstate()
            names = []
            for label, combo in (("chosen", (colour, shape, background)),
                                 ("rejected", wrong_in_one_attribute(colour, shape, background, k))):
                rng.setstate(state)  # the same size and position: the pair differs only in the attribute
                name = f"{colour}_{shape}_on_{background}_{k}_{label}.png"
                draw(*combo, size, rng, spread).save(root / name)
                names.append(name)
            rows.append({"chosen": names[0], "rejected": names[1], "text": caption(colour, shape, background)})
    with open(root / "metadata.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return len(rows)


# The toy where a caption leaves a choice open (docs/experiments §5): "a red circle" drawn evenly on each of these
# backgrounds, so that a model trained on it picks each about 1/k of the time, and preference alignment has a choice
# to move. Shape colours among them have no open caption (the shape must stay visible on every one).
OPEN_BACKGROUNDS = ("black", "white", "blue")


def open_caption(colour: str, shape: str) -> str:
    return f"a {colour} {shape}"


def parse_open_caption(text: str) -> tuple[str, str] | None:
    """(colour, shape) of a caption written by `open_caption`, else None."""
    words = text.split()
    if len(words) != 3 or words[0] != "a" or words[1] not in COLOURS or words[2] not in SHAPES:
        return None
    return words[1], words[2]


def open_combinations(backgrounds: tuple[str, ...] = OPEN_BACKGROUNDS) -> list[tuple[str, str]]:
    """Every (shape colour, shape) an open caption is written for: colours visible on all of `backgrounds`."""
    return [(c, s) for c in COLOURS if c not in backgrounds for s in SHAPES]


def write_open_dataset(root: str | Path, size: int = 64, per_caption: int = 6, seed: int = 0, spread: float = 1.0,
                       backgrounds: tuple[str, ...] = OPEN_BACKGROUNDS) -> int:
    """`root/*.png` and `metadata.jsonl` with captions that leave the background open: per caption `per_caption`
    images, the same number on each of `backgrounds`. Returns the number of images. Deterministic in `seed`."""
    backgrounds = tuple(backgrounds)
    if len(backgrounds) < 2 or any(b not in COLOURS for b in backgrounds) or len(set(backgrounds)) < len(backgrounds):
        raise ValueError(f"backgrounds must be two or more different colours of {', '.join(COLOURS)}, got {backgrounds!r}")
    if per_caption % len(backgrounds):
        raise ValueError(f"per_caption ({per_caption}) must be a multiple of the {len(backgrounds)} backgrounds, "
                         "so that each is drawn equally often")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"open/{seed}")
    rows = []
    for colour, shape in open_combinations(backgrounds):
        for k in range(per_caption):
            background = backgrounds[k % len(backgrounds)]
            name = f"{colour}_{shape}_open_{k}_on_{background}.png"
            draw(colour, shape, background, size, rng, spread).save(root / name)
            rows.append({"file_name": name, "text": open_caption(colour, shape), "background": background})
    with open(root / "metadata.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return len(rows)
