"""Generated image files, good and bad, for the data tests (no downloads)."""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image


def png(path, size=(40, 30), color=(200, 10, 10), mode="RGB"):
    Image.new(mode, size, color).save(path)
    return path


def jpeg(path, size=(40, 30), color=(10, 200, 10), orientation=None):
    image = Image.new("RGB", size, color)
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    image.save(path, "JPEG", exif=exif.tobytes())
    return path


def truncated_jpeg(path, size=(64, 48)):
    """A real JPEG cut in half: the header reads, the decode fails."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return path


BAD_FILES = {
    # name: (writer, reason the data layer must report)
    "zero.png": (lambda p: p.write_bytes(b""), "empty file"),
    "notes.png": (lambda p: p.write_text("this is not an image"), "not an image"),
    "cut.jpg": (truncated_jpeg, "truncated or corrupt image"),
}


def write_folder(root, n=4, extra_rows=(), **caption_fields):
    """An image folder with metadata.jsonl: n good 40×30 PNGs, then `extra_rows` (dicts) appended."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        png(root / f"{i}.png", color=(10 * i, 0, 0))
        rows.append({"file_name": f"{i}.png", "text": f"caption {i}", "alt": [f"a{i}", f"b{i}"]})
    rows.extend(extra_rows)
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root
