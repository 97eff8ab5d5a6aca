"""Masked loss: a weight per pixel, so training looks at the subject and not at what surrounds it.

    train_dataloader.dataset.mask = dict(
        source='file',         # 'file': <name>_mask.png beside each image; 'column': a manifest or hub column
                               # (a path relative to the manifest, or an image); 'alpha': the image's own alpha channel
        suffix='_mask',        # source='file': the mask of cat.jpg is cat_mask.png (or .jpg, .webp, ...)
        column='mask',         # source='column'
        unmasked_weight=0.0,   # the weight where the mask is black; white is 1, grey in between
        normalize=False,       # True: each image's weights average 1, so a small subject weighs as much as a large one
        missing='skip',        # a row without a mask: 'skip' it (counted) or train it with weight 1 everywhere ('full')
    )

The mask goes through the image's own resize, crop and flip, and the loss is weighted at the latent's
resolution (the weights averaged over each latent pixel's patch): per sample λ(σ)·mean(w·‖D − x0‖²), the
mean over all latent elements as without a mask (kohya's and OneTrainer's masked loss; `normalize` is
OneTrainer's "normalize masked area loss"). The latent cache stores the weights with the latents.

A mask that cannot be used skips its row, counted like a bad image: missing, unreadable or of another size
than its image, when the scan reads the headers; all black (nothing to learn from) when it is decoded.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageOps

from ..errors import UserError
from .rows import IMAGE_SUFFIXES
from .transforms import ImageProblem, decode, header_size, to_rgb

SOURCES = ("file", "column", "alpha")
MISSING = ("skip", "full")
SETTINGS = ("source", "suffix", "column", "unmasked_weight", "normalize", "missing")
NO_MASK, BAD_MASK, MASK_SIZE, NO_ALPHA, EMPTY_MASK = (
    "mask not found", "unreadable mask", "mask size differs from image", "no alpha channel", "mask is all black")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


@dataclass(frozen=True)
class MaskOptions:
    source: str
    suffix: str = "_mask"
    column: str = "mask"
    unmasked_weight: float = 0.0
    normalize: bool = False
    missing: str = "skip"

    def weights(self, mask: torch.Tensor) -> torch.Tensor:
        """Mask values m ∈ [0, 1] → loss weights u + (1 − u)·m (fp16: the batch carries them at pixel resolution)."""
        w = self.unmasked_weight + (1.0 - self.unmasked_weight) * mask
        if float(w.max()) <= 0.0:
            raise ImageProblem(EMPTY_MASK)
        if self.normalize:
            w = w / w.mean()
        return w.to(torch.float16)


def mask_options(cfg: dict, key: str) -> MaskOptions | None:
    """`<key>.mask` checked (one line per mistake, before any model loads); None when masks are off."""
    options = cfg.get("mask")
    if options in (None, {}, False):
        return None
    if isinstance(options, str):
        options = {"source": options}
    if not isinstance(options, dict):
        raise UserError(f"{key}.mask must be a dict, e.g. dict(source='file', unmasked_weight=0.1), got {options!r}")
    unknown = sorted(set(options) - set(SETTINGS))
    if unknown:
        raise UserError(f"{key}.mask.{unknown[0]} is not a setting; use {', '.join(SETTINGS)}")
    source = options.get("source")
    if source not in SOURCES:
        raise UserError(f"{key}.mask.source must be one of {', '.join(map(repr, SOURCES))}, got {source!r}")
    weight = options.get("unmasked_weight", 0.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0.0 <= weight <= 1.0:
        raise UserError(f"{key}.mask.unmasked_weight must be a number from 0 to 1, got {weight!r}")
    missing = options.get("missing", "skip")
    if missing not in MISSING:
        raise UserError(f"{key}.mask.missing must be 'skip' or 'full', got {missing!r}")
    suffix, column = options.get("suffix", "_mask"), options.get("column", "mask")
    if not isinstance(suffix, str) or not suffix or "/" in suffix:
        raise UserError(f"{key}.mask.suffix must be a non-empty file-name ending such as '_mask', got {suffix!r}")
    if not isinstance(column, str) or not column:
        raise UserError(f"{key}.mask.column must be a column name, got {column!r}")
    if cfg.get("pairs"):
        raise UserError(f"{key}.mask: masked loss is not supported with preference pairs; remove mask or pairs")
    if cfg.get("streaming"):
        raise UserError(f"{key}.mask is not read in streaming mode; set {key}.streaming=False")
    return MaskOptions(source, suffix, column, float(weight), bool(options.get("normalize", False)), missing)


def is_mask_file(path: Path, options: MaskOptions | None) -> bool:
    """An image folder's mask files are not training images."""
    return options is not None and options.source == "file" and path.stem.endswith(options.suffix)


def sibling_mask(image: str, suffix: str) -> str | None:
    """`<name><suffix>.<ext>` beside the image, PNG first; None when there is none."""
    path = Path(image)
    for ext in (".png", *sorted(IMAGE_SUFFIXES - {".png"})):
        for candidate in (path.with_name(path.stem + suffix + ext), path.with_name(path.stem + suffix + ext.upper())):
            if candidate.is_file():
                return str(candidate)
    return None


def attach_masks(rows, options: MaskOptions | None, key: str, column_values=None) -> None:
    """Give `rows` (sources.Rows) their mask settings and each row's mask (a path, a hub cell, or None), and make
    their fingerprint depend on both, so the scan and the latent cache see a changed mask."""
    if options is None:
        return
    rows.mask = options
    if options.source == "file":
        if rows.hub is not None:
            raise UserError(f"{key}.mask.source='file' needs image files beside their masks; a hub dataset's masks come "
                            f"from a column: set source='column' and column=...")
        rows.masks = [sibling_mask(image, options.suffix) if isinstance(image, str) else None for image in rows.images]
    elif options.source == "column":
        if column_values is None:
            raise UserError(f"{key}.mask.source='column' reads a column of a manifest, a folder's metadata file or a hub "
                            f"dataset; an image folder without one has masks as files: set source='file'")
        rows.masks = list(column_values)
    digest = hashlib.sha1(repr(options).encode())
    for ref in rows.masks or ():
        digest.update(f"{ref}\0".encode(errors="surrogateescape"))
        if isinstance(ref, str):
            try:
                stat = os.stat(ref)
                digest.update(f"{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
            except OSError:
                pass
    rows.fingerprint = f"{rows.fingerprint}:mask={digest.hexdigest()[:16]}"


def has_alpha(image: Image.Image) -> bool:
    return image.mode in ALPHA_MODES or (image.mode in ("P", "L", "RGB") and "transparency" in image.info)


def has_mask(rows, i: int) -> bool:
    """Row i trains with a mask (not unmasked for want of one)."""
    options, ref = rows.mask_of(i)
    if options is None or options.source == "alpha":
        return options is not None
    return ref is not None and (not isinstance(ref, str) or os.path.isfile(ref))


def probe_mask(rows, i: int, size: tuple[int, int], max_pixels: int) -> str | None:
    """Why row i's mask cannot be used (header only), or None when it can (or the row needs none)."""
    options, ref = rows.mask_of(i)
    if options is None:
        return None
    if options.source == "alpha":
        try:
            with Image.open(rows.open(i)) as image:
                return None if has_alpha(image) else NO_ALPHA
        except (OSError, SyntaxError, ValueError, EOFError):
            return BAD_MASK
    if ref is None:
        return None if options.missing == "full" else NO_MASK
    target = rows.open_mask(i)
    if isinstance(target, str) and not os.path.isfile(target):
        return None if options.missing == "full" else NO_MASK
    found = header_size(target, max_pixels)
    if isinstance(found, str):
        return BAD_MASK
    return None if tuple(found) == tuple(size) else MASK_SIZE


def load_mask(rows, row: int, image: Image.Image, original: tuple[int, int], max_pixels: int) -> Image.Image | None:
    """Row `row`'s mask as an 8-bit greyscale image of the oriented original's size (white: weight 1), or None when the
    row trains unmasked; ImageProblem when it cannot be used (a file changed since the scan)."""
    options, ref = rows.mask_of(row)
    if options is None:
        return None
    if options.source == "alpha":
        oriented = ImageOps.exif_transpose(image)
        if not has_alpha(oriented):
            raise ImageProblem(NO_ALPHA)
        return oriented.convert("RGBA").getchannel("A")
    if ref is None:
        return None
    try:
        mask = decode(rows.open_mask(row), max_pixels)
    except ImageProblem as problem:
        if str(problem) == "file not found" and options.missing == "full":
            return None
        raise ImageProblem(NO_MASK if str(problem) == "file not found" else BAD_MASK) from None
    mask = to_rgb(mask).convert("L")  # EXIF rotation and 16-bit masks as images get them
    if mask.size != tuple(original):
        raise ImageProblem(MASK_SIZE)
    return mask


def loss_weights(options: MaskOptions | None, mask: torch.Tensor | None, target: tuple[int, int]) -> torch.Tensor:
    """A sample's [1, H, W] weights in a masked dataset: from its mask, or 1 everywhere for a row that has none (another
    dataset of the run, a class image, `missing='full'`)."""
    if options is None or mask is None:
        return torch.ones(1, target[1], target[0], dtype=torch.float16)
    return options.weights(mask)


def masked_sample(transform, rows, row: int, image: Image.Image, target: tuple[int, int], rng, original: tuple[int, int],
                  max_pixels: int, flip: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pixels, time_ids and loss weights of one row of a masked dataset (ImageProblem when its mask is bad)."""
    mask = load_mask(rows, row, image, original, max_pixels)
    pixels, time_ids, values = transform.with_mask(image, mask, target, rng, original, flip=flip)
    return pixels, time_ids, loss_weights(rows.mask_of(row)[0], values, target)
