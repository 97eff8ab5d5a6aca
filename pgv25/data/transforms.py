"""Resize, crop and flip with SDXL micro-conditioning that records what was really done."""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image, ImageOps


def to_rgb(image: Image.Image) -> Image.Image:
    """Honour EXIF rotation; composite transparency on white rather than on black."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "P", "PA"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(canvas, rgba)
    return image.convert("RGB")


class SDXLTransform:
    """Shorter side → `resolution`, crop a `resolution`² square (random or centre), maybe flip.

    time_ids = original (h, w), crop top-left (y, x) in the resized image, target (h, w): the
    six numbers SDXL's `text_time` embedding was trained on. After a flip the crop's left edge is
    measured in the mirrored frame, so it still describes the pixels the model sees.
    """

    def __init__(self, resolution: int, center_crop: bool = False, random_flip: bool = True):
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip

    def __call__(self, image: Image.Image, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
        image = to_rgb(image)
        original_h, original_w = image.height, image.width
        r = self.resolution
        scale = r / min(original_h, original_w)
        new_w, new_h = max(r, round(original_w * scale)), max(r, round(original_h * scale))
        image = image.resize((new_w, new_h), Image.BICUBIC)
        if self.center_crop:
            top, left = (new_h - r) // 2, (new_w - r) // 2
        else:
            top, left = rng.randint(0, new_h - r), rng.randint(0, new_w - r)
        image = image.crop((left, top, left + r, top + r))
        if self.random_flip and rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
            left = new_w - left - r
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0
        time_ids = torch.tensor([original_h, original_w, top, left, r, r], dtype=torch.float32)
        return pixels, time_ids
