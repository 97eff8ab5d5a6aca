"""Does the model draw what the prompt says? Plain image analysis of generated shapes images.

For "a {colour} {shape} on a {background} background" an image is read back as:
- background: the median colour of a thin border (the generator keeps shapes 5% away from the
  edges), named by the nearest palette colour; and its mean absolute RGB error (0–255) from the
  exact colour, which for pure black and pure white shows whether a model reaches the extremes;
- shape colour: the median of the pixels that differ clearly from the background, nearest palette
  colour other than the background;
- the shape: the largest 4-connected region of those pixels — a decoder's faint ring or a speck
  in a corner must not stretch the shape's bounding box;
- shape type: from the fill ratio of that region inside its bounding box — a square fills it
  (1.0), a circle π/4 (0.79), a triangle half (0.5).
No learned model is involved, so the evaluator itself can be checked: ≈100% on the dataset's own
images, chance on noise (tests/test_eval).

`rings=True` adds a shape the training set never had (the toy DreamBooth experiment's concept): a shape
whose region encloses background (a hole of at least RING_HOLE of its bounding box) is read as a ring;
a prompt may name it by a trigger word (`words`). `extra_colours` likewise adds colours to the palette.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..tiny.shapes import COLOURS, SHAPES, aspect_size, caption, combinations

PALETTE_NAMES = list(COLOURS)
PALETTE = np.array([COLOURS[n] for n in PALETTE_NAMES], dtype=np.float64)
BORDER = 0.03  # share of the side read as background
FOREGROUND = 90.0  # RGB distance from the background colour that counts as shape
FILL_SQUARE, FILL_CIRCLE = 0.9, 0.64  # fill-ratio thresholds between triangle < circle < square
RING_HOLE = 0.06  # enclosed background, as a share of the bounding box, that makes a ring (a drawn one: 0.24)


@dataclass
class Reading:
    background: str
    background_error: float  # mean |RGB − exact background colour| over the border, 0–255
    shape_colour: str | None
    shape: str | None
    fill: float
    inside: bool = True  # no shape pixel in the border band: the shape is whole and inside the frame
    # mean |RGB − pure black| and |RGB − pure white| over the border: scored for every image whose prompt
    # asks for that background, whatever colour it was read as (a model that misses black entirely counts)
    black_error: float = 0.0
    white_error: float = 0.0


def palette(extra_colours: dict | None = None) -> tuple[list[str], np.ndarray]:
    """(names, RGB rows) of the dataset's colours plus `extra_colours` (name → (r, g, b))."""
    if not extra_colours:
        return PALETTE_NAMES, PALETTE
    clash = sorted(set(extra_colours) & set(PALETTE_NAMES))
    if clash:
        raise ValueError(f"extra colour {clash[0]!r} is already one of the dataset's colours")
    names = PALETTE_NAMES + list(extra_colours)
    return names, np.vstack([PALETTE, np.array(list(extra_colours.values()), dtype=np.float64)])


def nearest(rgb: np.ndarray, exclude: str | None = None, colours: tuple[list[str], np.ndarray] | None = None) -> str:
    names, rows = colours or (PALETTE_NAMES, PALETTE)
    distances = np.linalg.norm(rows - rgb, axis=1)
    if exclude is not None:
        distances[names.index(exclude)] = np.inf
    return names[int(distances.argmin())]


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask (a breadth-first fill; images are small)."""
    h, w = mask.shape
    seen = np.zeros_like(mask)
    best: list[int] = []
    flat, visited = mask.ravel(), seen.ravel()
    for start in np.flatnonzero(flat):
        if visited[start]:
            continue
        visited[start] = True
        region, queue = [], [int(start)]
        while queue:
            i = queue.pop()
            region.append(i)
            y, x = divmod(i, w)
            for j, ok in ((i - w, y > 0), (i + w, y < h - 1), (i - 1, x > 0), (i + 1, x < w - 1)):
                if ok and flat[j] and not visited[j]:
                    visited[j] = True
                    queue.append(j)
        if len(region) > len(best):
            best = region
    out = np.zeros(h * w, dtype=bool)
    out[best] = True
    return out.reshape(h, w)


def enclosed(region: np.ndarray) -> int:
    """Pixels of a region's bounding box outside the region that cannot reach the box's edge: its holes."""
    outside = ~region
    reached = np.zeros_like(region)
    reached[0], reached[-1], reached[:, 0], reached[:, -1] = outside[0], outside[-1], outside[:, 0], outside[:, -1]
    while True:  # grow through outside pixels, 4-connected, until nothing changes (a few dozen steps at these sizes)
        grown = reached.copy()
        grown[1:] |= reached[:-1]
        grown[:-1] |= reached[1:]
        grown[:, 1:] |= reached[:, :-1]
        grown[:, :-1] |= reached[:, 1:]
        grown &= outside
        if (grown == reached).all():
            return int((outside & ~reached).sum())
        reached = grown


def read_image(image: Image.Image, extra_colours: dict | None = None, rings: bool = False) -> Reading:
    colours = palette(extra_colours)
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    h, w, _ = pixels.shape
    b = max(1, round(BORDER * min(h, w)))
    border = np.concatenate([pixels[:b].reshape(-1, 3), pixels[-b:].reshape(-1, 3),
                             pixels[:, :b].reshape(-1, 3), pixels[:, -b:].reshape(-1, 3)])
    background_rgb = np.median(border, axis=0)
    background = nearest(background_rgb, colours=colours)
    error, black_error, white_error = (float(np.abs(border - colours[1][colours[0].index(name)]).mean())
                                       for name in (background, "black", "white"))
    to_background = np.linalg.norm(pixels - background_rgb, axis=2)
    candidates = to_background > FOREGROUND
    if candidates.sum() < 0.005 * h * w:  # nothing drawn
        return Reading(background, error, None, None, 0.0, False, black_error, white_error)
    shape_rgb = np.median(pixels[candidates], axis=0)
    shape_colour = nearest(shape_rgb, exclude=background, colours=colours)
    mask = largest_component(candidates)
    ys, xs = np.nonzero(mask)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = float(mask.sum() / box)
    shape = "square" if fill >= FILL_SQUARE else "circle" if fill >= FILL_CIRCLE else "triangle"
    if rings and enclosed(mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]) >= RING_HOLE * box:
        shape = "ring"
    ring = np.ones_like(mask)
    ring[b:-b, b:-b] = False
    inside = bool(mask[ring].mean() < 0.01)  # a stray pixel is noise; a cut shape fills a stretch of the border
    return Reading(background, error, shape_colour, shape, fill, inside, black_error, white_error)


def score(readings: list[tuple[tuple[str, str, str], Reading]]) -> dict:
    """Accuracies over (expected (colour, shape, background), reading) pairs, and the extremes' RGB error."""
    n = len(readings)
    out = {
        "images": n,
        "background_accuracy": sum(r.background == bg for (_, _, bg), r in readings) / n,
        "shape_colour_accuracy": sum(r.shape_colour == c for (c, _, _), r in readings) / n,
        "shape_accuracy": sum(r.shape == s for (_, s, _), r in readings) / n,
        "inside_frame": sum(r.inside for _, r in readings) / n,
        "whole_shape_accuracy": sum(r.inside and r.shape == s for (_, s, _), r in readings) / n,
    }
    for extreme in ("black", "white"):
        errors = [getattr(r, f"{extreme}_error") for (_, _, bg), r in readings if bg == extreme]
        out[f"{extreme}_background_rgb_error"] = float(np.mean(errors)) if errors else None
    return out


def evaluate_images(items: list[tuple[tuple[str, str, str], Image.Image]], extra_colours: dict | None = None,
                    rings: bool = False) -> tuple[dict, list]:
    readings = [(expected, read_image(image, extra_colours, rings)) for expected, image in items]
    return score(readings), readings


def prompts_for(combinations: list[tuple[str, str, str]], words: dict | None = None) -> list[str]:
    """The caption of each (colour, shape, background); `words` renames colours or shapes in the prompt (e.g. a trigger
    word: {"ring": "zwx circle"})."""
    words = words or {}
    return [caption(words.get(c, c), words.get(s, s), words.get(b, b)) for c, s, b in combinations]


def evaluate_pipeline(pipe, combinations: list[tuple[str, str, str]], per_prompt: int = 2, seed: int = 0, steps: int = 25,
                      guidance_scale: float = 3.0, size: int | tuple[int, int] | None = None, extra_colours: dict | None = None,
                      words: dict | None = None, rings: bool = False) -> tuple[dict, list]:
    """Generate `per_prompt` images per combination (seeds seed, seed+1, ...) and read them back.
    `size`: side or (width, height); default the pipeline's own."""
    from ..generate import generate

    width, height = (size, size) if isinstance(size, int) or size is None else size
    images = generate(pipe, prompts_for(combinations, words), seed=seed, steps=steps, guidance_scale=guidance_scale,
                      width=width, height=height, num_images=per_prompt)
    expected = [c for c in combinations for _ in range(per_prompt)]
    scores, readings = evaluate_images(list(zip(expected, images)), extra_colours, rings)
    return scores, [(e, r, im) for (e, r), im in zip(readings, images)]


def native_size(pipe) -> int:
    """The side the pipeline generates by default (the UNet's sample size × the VAE's downscale)."""
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


def evaluate_model(pipe, aspects: tuple[str, ...] = ("1:1",), per_prompt: int = 2, seed: int = 0, steps: int = 25,
                   guidance_scale: float = 3.0, limit: int | None = None, extra_colours: dict | None = None,
                   rings: bool = False) -> tuple[dict, list]:
    """Every aspect ratio × {seen, held-out} prompt group: {"aspect seen": scores, ...} and all results."""
    groups = {"seen": combinations(held_out=False), "held-out": combinations(held_out=True)}
    side = native_size(pipe)
    report, results = {}, []
    for aspect in aspects:
        for group, combos in groups.items():
            combos = combos[:limit] if limit else combos
            if not combos:
                continue
            scores, found = evaluate_pipeline(pipe, combos, per_prompt, seed, steps, guidance_scale, aspect_size(side, aspect),
                                              extra_colours, rings=rings)
            report[f"{aspect} {group}"] = scores
            results += found
    return report, results


def worst_cases_sheet(results: list, out: Path, limit: int = 16) -> Path:
    """A labelled contact sheet of the images read back most wrongly (what was asked / what was read)."""
    from ..generate import labelled_grid

    def wrong(item):
        (colour, shape, background), reading, _ = item
        return (reading.background != background) * 3 + (reading.shape_colour != colour) * 2 + (reading.shape != shape)

    worst = sorted(results, key=wrong, reverse=True)[:limit]
    labels = [f"{c} {s} on {b} / read {r.shape_colour} {r.shape} on {r.background}" for (c, s, b), r, _ in worst]
    labelled_grid([im for _, _, im in worst], labels, columns=min(4, len(worst))).save(out)
    return out


def write_report(report: dict, results: list, folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"asked": {"colour": c, "shape": s, "background": b}, "size": list(im.size), "read": asdict(r)}
            for (c, s, b), r, im in results]
    (folder / "shapes_eval.json").write_text(json.dumps({"scores": report, "images": rows}, indent=2))
    worst_cases_sheet(results, folder / "shapes_eval_worst.png")
    return report


ROWS = [
    ("images", "images", str),
    ("background colour", "background_accuracy", "pct"),
    ("shape colour", "shape_colour_accuracy", "pct"),
    ("shape type", "shape_accuracy", "pct"),
    ("whole, inside frame", "whole_shape_accuracy", "pct"),
    ("black bg |RGB| error", "black_background_rgb_error", "err"),
    ("white bg |RGB| error", "white_background_rgb_error", "err"),
]


def format_table(report: dict) -> str:
    """One column per group ("1:1 seen", "1:1 held-out", ...), one row per measure; errors in RGB units of 255."""
    def cell(value, kind):
        if value is None:
            return "–"
        return f"{value:.1%}" if kind == "pct" else f"{value:.1f}" if kind == "err" else kind(value)

    groups = list(report)
    width = max(12, *(len(g) + 2 for g in groups))
    lines = [" " * 22 + "".join(g.rjust(width) for g in groups)]
    for label, key, kind in ROWS:
        lines.append(label.ljust(22) + "".join(cell(report[g].get(key), kind).rjust(width) for g in groups))
    return "\n".join(lines)


def preference(images: list[Image.Image], prompts: list[str], background: str | None = None,
               colour: str | None = None, shape: str | None = None, right_weight: float = 0.1) -> list[float]:
    """A reward for the shapes toy, in `pgv25 data pairs`' scorer form (`--scorer pgv25.eval.shapes:preference
    --scorer-option background=black`): 1 for each preferred attribute the image shows (its background, shape colour
    or shape as given), plus `right_weight` for each attribute the prompt states and the image gets right (so among
    images with the preferred value, right ones rank first). A prompt the shapes captions do not parse scores only
    the preference."""
    from ..tiny.shapes import parse_caption, parse_open_caption

    wanted = {"background": background, "shape_colour": colour, "shape": shape}
    scores = []
    for image, prompt in zip(images, prompts):
        reading = read_image(image)
        stated = parse_caption(prompt)
        if stated is None and (opened := parse_open_caption(prompt)) is not None:
            stated = (*opened, None)
        value = float(sum(getattr(reading, key) == want for key, want in wanted.items() if want is not None))
        if stated is not None:
            found = (reading.shape_colour, reading.shape, reading.background)
            value += right_weight * sum(s is not None and s == f for s, f in zip(stated, found))
        scores.append(value)
    return scores


__all__ = ["SHAPES", "evaluate_images", "evaluate_model", "evaluate_pipeline", "format_table", "preference", "read_image", "score",
           "write_report"]
