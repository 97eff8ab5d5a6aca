"""Decode, then resize-to-cover, crop and flip to a bucket, with SDXL micro-conditioning that
records what was really done."""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

EXIF_ORIENTATION = 0x0112
DEFAULT_MAX_PIXELS = 8192 * 8192  # a decompression bomb is refused before it is decoded


class ImageProblem(Exception):
    """A file that cannot be used; the message is the counted reason (e.g. 'truncated or corrupt image')."""


def header_orientation(image: Image.Image) -> int:
    """The EXIF orientation, if the header holds it: PIL's getexif() on a PNG decodes the whole
    image to look for an eXIf chunk after the pixels, which made PNG scans 80× slower."""
    if image.format in ("JPEG", "MPO", "TIFF", "WEBP"):
        return image.getexif().get(EXIF_ORIENTATION, 1)
    if "exif" in image.info:
        exif = Image.Exif()
        exif.load(image.info["exif"])
        return exif.get(EXIF_ORIENTATION, 1)
    return 1


def header_size(target, max_pixels: int) -> tuple[int, int] | str:
    """(width, height) as displayed (EXIF rotation applied) from the header alone, or why not."""
    try:
        with Image.open(target) as image:
            width, height = image.size
            orientation = header_orientation(image)
    except Image.DecompressionBombError:
        return "too many pixels"
    except UnidentifiedImageError:
        return "not an image"
    except (OSError, SyntaxError, ValueError, EOFError):
        return "unreadable image"
    if width * height > max_pixels:
        return "too many pixels"
    if width == 0 or height == 0:
        return "unreadable image"
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)  # rotated by 90°: swap


def decode(source, max_pixels: int, cover: tuple[int, int] | None = None) -> Image.Image:
    """Open and fully decode an image (path or file object); raise ImageProblem with the reason.

    With `cover` (the smallest (w, h) the oriented image will be resized to cover), a large JPEG is
    decoded at a reduced DCT scale that is still at least that big: the same pixels after resizing,
    at a fraction of the decode time for photos far larger than their bucket.
    """
    try:
        image = Image.open(source)
        if image.width * image.height > max_pixels:
            raise ImageProblem("too many pixels")
        if cover is not None and image.format == "JPEG":
            rotated = header_orientation(image) in (5, 6, 7, 8)
            width, height = (image.height, image.width) if rotated else image.size
            scale = max(cover[0] / width, cover[1] / height)
            if scale < 0.5:
                need = (math.ceil(image.width * scale), math.ceil(image.height * scale))
                image.draft("RGB", need)
        image.load()  # decode now: a truncated file fails here, inside the try
    except ImageProblem:
        raise
    except Image.DecompressionBombError:
        raise ImageProblem("too many pixels") from None
    except FileNotFoundError:
        raise ImageProblem("file not found") from None
    except (OSError, SyntaxError, ValueError, EOFError):  # PIL raises all of these for broken files
        raise ImageProblem("truncated or corrupt image") from None
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: EXIF rotation honoured, transparency composited on white (not black), 16-bit scaled down."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit or float greyscale: PIL's convert would clip
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if values.max() > 255 else (1.0 if image.mode == "F" and values.max() <= 1 else 255.0)
        image = Image.fromarray(np.clip(values * (255.0 / top), 0, 255).round().astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "P", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(canvas, rgba)
    return image.convert("RGB")  # also CMYK, YCbCr, greyscale


def cover_size(width: int, height: int, target: tuple[int, int]) -> tuple[int, int]:
    """The size (w, h) an image is resized to so that it covers `target` (w, h) with its aspect ratio kept."""
    scale = max(target[0] / width, target[1] / height)
    return max(target[0], round(width * scale)), max(target[1], round(height * scale))


class BucketTransform:
    """Resize to cover the bucket, crop it (random or centre), maybe flip.

    time_ids = original (h, w), crop top-left (y, x) in the resized image, target (h, w): the
    six numbers SDXL's `text_time` embedding was trained on. After a flip the crop's left edge is
    measured in the mirrored frame, so it still describes the pixels the model sees.
    """

    def __init__(self, center_crop: bool = False, random_flip: bool = True):
        self.center_crop = center_crop
        self.random_flip = random_flip

    def __call__(self, image: Image.Image, target: tuple[int, int], rng: random.Random,
                 original: tuple[int, int] | None = None, flip: bool | None = None,
                 crop: tuple[float, float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`target` is the bucket's (w, h); `original` the (w, h) before any reduced decode; `flip`
        forces the flip decision (the cache stores both), drawn from `rng` when None; `crop` the
        random crop's (top, left) as fractions of the slack, so two images of different sizes (a
        preference pair) get the same relative crop, drawn from `rng` when None."""
        pixels, time_ids, _ = self.with_mask(image, None, target, rng, original, flip, crop)
        return pixels, time_ids

    def with_mask(self, image: Image.Image, mask: Image.Image | None, target: tuple[int, int], rng: random.Random,
                  original: tuple[int, int] | None = None, flip: bool | None = None,
                  crop: tuple[float, float] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """As `__call__`, and the loss mask (8-bit greyscale, any size of the image's aspect ratio) put through the
        same resize, crop and flip: [1, H, W] in [0, 1], or None without a mask."""
        image = to_rgb(image)
        original_w, original_h = original or image.size
        width, height = target
        new_w, new_h = cover_size(image.width, image.height, target)
        if self.center_crop:
            top, left = (new_h - height) // 2, (new_w - width) // 2
        elif crop is None:
            top, left = rng.randint(0, new_h - height), rng.randint(0, new_w - width)
        else:
            top, left = round(crop[0] * (new_h - height)), round(crop[1] * (new_w - width))
        if flip is None:
            flip = self.random_flip and rng.random() < 0.5
        box = (left, top, left + width, top + height)
        # Reduce in a cheap step first (box filter to ≥ 2× the size), then antialiased bicubic.
        image = image.resize((new_w, new_h), Image.BICUBIC, reducing_gap=2.0).crop(box)
        if mask is not None:  # bilinear: a weight is not sharpened past its range as bicubic would
            mask = mask.resize((new_w, new_h), Image.BILINEAR, reducing_gap=2.0).crop(box)
        if flip:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
            mask = mask.transpose(Image.FLIP_LEFT_RIGHT) if mask is not None else None
            left = new_w - left - width
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0
        time_ids = torch.tensor([original_h, original_w, top, left, height, width], dtype=torch.float32)
        weights = None if mask is None else torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None]
        return pixels, time_ids, weights
