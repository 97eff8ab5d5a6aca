"""Image sets for FID and CLIP score, as MJHQ-30K and `pgv25 eval generate` lay them out, or as any folder holds them.

A set is one of:
- a folder with `meta_data.json` (`{id: {category, prompt}}`) beside `<category>/<id>.<suffix>` (or `<id>.<suffix>`):
  MJHQ-30K's own download, and what `pgv25 eval generate` writes;
- parquet with an `image` column and a `label` (or `category`) column: MJHQ-30K as the Hub's dataset viewer serves it,
  a `.parquet` file, a folder of them, a saved 🤗 dataset or a Hub id (local copies only: the Hub may be unreachable);
- any other folder of images: every image under it, its category the first folder below the root (none at the root).

What cannot be used is counted and named in one log line per set, never a crash halfway through: ids of
`meta_data.json` without an image, images that `meta_data.json` does not list, images that cannot be decoded.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from ..data.rows import IMAGE_SUFFIXES
from ..data.tables import first_line
from ..errors import UserError
from ..models.loading import HUB_ID

logger = logging.getLogger("pgv25")
META = "meta_data.json"
# MJHQ-30K's ten categories, in the order of its parquet `label` ClassLabel (sorted, as `datasets` sorts names).
MJHQ_CATEGORIES = ("animals", "art", "fashion", "food", "indoor", "landscape", "logo", "people", "plants", "vehicles")


@dataclass(frozen=True)
class EvalImage:
    id: str
    category: str | None
    prompt: str | None
    read: Callable[[], bytes] = field(compare=False)  # the encoded file: decoded later, so a bad one is a counted skip
    stamp: str = ""  # what changes when the image does (path, size, mtime): the feature cache's key


@dataclass
class ImageSet:
    name: str
    source: str
    images: list[EvalImage]
    skipped: Counter = field(default_factory=Counter)

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha256(self.source.encode())
        for image in self.images:
            digest.update(f"{image.id}\0{image.category}\0{image.stamp}\n".encode())
        return digest.hexdigest()[:16]

    def categories(self) -> Counter:
        return Counter(image.category for image in self.images)


def read_image_set(path: str, name: str | None = None) -> ImageSet:
    """The images of `path` (a folder, a parquet file or a local 🤗 dataset), with their ids, categories and prompts."""
    local = Path(path).expanduser()
    name = name or local.name or str(path)
    if local.is_file() and local.suffix == ".parquet":
        image_set = _parquet_set([local], name, str(local.resolve()))
    elif local.is_dir() and (local / META).is_file():
        image_set = _meta_set(local, name)
    elif local.is_dir() and not any(_image_files(local)) and any(local.rglob("*.parquet")):
        image_set = _parquet_set(sorted(local.rglob("*.parquet")), name, str(local.resolve()))
    elif local.is_dir():
        image_set = _folder_set(local, name)
    elif local.exists():
        raise UserError(f"{path} is neither a folder of images nor a .parquet file")
    elif HUB_ID.match(str(path)):
        image_set = _hub_set(str(path), name)
    else:
        raise UserError(f"image set {path} does not exist (a folder of images, MJHQ-30K's meta_data.json + "
                        "<category>/<id>.jpg, or parquet with image and label columns)")
    if image_set.skipped:
        logger.warning("image set %s: %s", image_set.name, ", ".join(f"{n} {why}" for why, n in image_set.skipped.items()))
    if not image_set.images:
        raise UserError(f"image set {path} holds no usable image")
    return image_set


def _image_files(folder: Path):
    """Images under `folder`; hidden files (a write in progress: `.<id>.png.tmp…`) and hidden folders left out."""
    for file in sorted(folder.rglob("*")):
        relative = file.relative_to(folder)
        if file.suffix.lower() in IMAGE_SUFFIXES and not any(part.startswith(".") for part in relative.parts) and file.is_file():
            yield file


def _file_image(file: Path, image_id: str, category: str | None, prompt: str | None) -> EvalImage:
    stat = file.stat()
    return EvalImage(image_id, category, prompt, file.read_bytes, f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}")


def _meta_set(folder: Path, name: str) -> ImageSet:
    try:
        meta = json.loads((folder / META).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{folder / META} is not valid JSON ({error})") from None
    if not isinstance(meta, dict):
        raise UserError(f"{folder / META}: expected MJHQ-30K's {{id: {{category, prompt}}}}, got a JSON {type(meta).__name__}")
    by_stem: dict[tuple[str | None, str], Path] = {}
    for file in _image_files(folder):
        parent = file.parent.relative_to(folder).as_posix()
        by_stem.setdefault((None if parent == "." else parent, file.stem), file)
    images, skipped, used = [], Counter(), set()
    for image_id, record in meta.items():
        record = record if isinstance(record, dict) else {}
        category = record.get("category") or None
        category = str(category) if category is not None else None
        key = (category, str(image_id)) if (category, str(image_id)) in by_stem else (None, str(image_id))
        file = by_stem.get(key)
        if file is None:
            skipped[f"id(s) of {META} without an image"] += 1
            continue
        used.add(key)
        prompt = record.get("prompt") if isinstance(record.get("prompt"), str) else None
        images.append(_file_image(file, str(image_id), category, prompt))
    unlisted = len(set(by_stem) - used)
    if unlisted:
        skipped[f"image(s) that {META} does not list (left out)"] += unlisted
    return ImageSet(name, str(folder.resolve()), images, skipped)


def _folder_set(folder: Path, name: str) -> ImageSet:
    images = []
    for file in _image_files(folder):
        relative = file.relative_to(folder)
        category = relative.parts[0] if len(relative.parts) > 1 else None
        images.append(_file_image(file, relative.with_suffix("").as_posix(), category, None))
    if not images:
        raise UserError(f"{folder} holds no image ({', '.join(sorted(IMAGE_SUFFIXES))}) and no parquet file")
    return ImageSet(name, str(folder.resolve()), images)


def _category_names(dataset, column: str) -> Callable[[object], str | None]:
    names = getattr(dataset.features.get(column), "names", None)
    if names:
        return lambda value: names[value] if isinstance(value, int) and 0 <= value < len(names) else None
    # A bare integer label (parquet written without the ClassLabel's names): MJHQ-30K's order when it has ten.
    return lambda value: (MJHQ_CATEGORIES[value] if isinstance(value, int) and 0 <= value < len(MJHQ_CATEGORIES)
                          else (str(value) if value is not None else None))


def _dataset_set(dataset, name: str, source: str) -> ImageSet:
    import datasets

    columns = dataset.column_names
    if "image" not in columns:
        raise UserError(f"image set {source} has no 'image' column; its columns are {columns}")
    label = next((c for c in ("label", "category") if c in columns), None)
    category_of = _category_names(dataset, label) if label else (lambda value: None)
    dataset = dataset.cast_column("image", datasets.Image(decode=False))  # bytes: a bad image is a skip, not a crash
    id_column = next((c for c in ("id", "image_id") if c in columns), None)
    prompt_column = next((c for c in ("prompt", "text", "caption") if c in columns), None)
    images = []
    labels = dataset[label] if label else [None] * len(dataset)
    ids = dataset[id_column] if id_column else [None] * len(dataset)
    prompts = dataset[prompt_column] if prompt_column else [None] * len(dataset)
    for index in range(len(dataset)):
        def read(index=index):
            cell = dataset[index]["image"] or {}
            if cell.get("bytes"):
                return cell["bytes"]
            if cell.get("path"):
                return Path(cell["path"]).read_bytes()
            raise ValueError("an empty image cell")

        image_id = str(ids[index]) if ids[index] not in (None, "") else f"{index:06d}"
        images.append(EvalImage(image_id, category_of(labels[index]), prompts[index], read, str(index)))
    return ImageSet(name, source, images)


def _parquet_set(files: list[Path], name: str, source: str) -> ImageSet:
    import datasets

    datasets.disable_progress_bars()
    try:
        dataset = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train")
    except Exception as error:  # an unreadable parquet file: pyarrow's and datasets' errors vary by version
        raise UserError(f"cannot read parquet {source}: {first_line(error)[:200]}") from None
    stamps = ",".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    return _dataset_set(dataset, name, f"{source}|{stamps}")


def _hub_set(name_or_id: str, name: str) -> ImageSet:
    from ..data.tables import open_hub_dataset
    from ..models.loading import hub_reachable

    if not hub_reachable():
        raise UserError(f"{name_or_id} is no folder or file here, and the Hugging Face Hub cannot be reached to read it "
                        f"as a dataset id; download it where the Hub is reachable (huggingface-cli download {name_or_id} "
                        "--repo-type dataset --local-dir DIR) and give DIR instead")
    dataset = open_hub_dataset(name_or_id, "train", "the image set")
    return _dataset_set(dataset, name, name_or_id)


def decode(image: EvalImage, resolution: int) -> torch.Tensor:
    """The image as uint8 [3, R, R]: its shorter side resized to R with PIL's bicubic filter (clean-fid's resize),
    then its centre cropped square. Raises on an image that cannot be decoded (the caller counts it)."""
    with Image.open(io.BytesIO(image.read())) as opened:
        rgb = opened.convert("RGB")
    scale = resolution / min(rgb.size)
    width, height = max(resolution, round(rgb.width * scale)), max(resolution, round(rgb.height * scale))
    if (width, height) != rgb.size:
        rgb = rgb.resize((width, height), Image.BICUBIC)
    left, top = (width - resolution) // 2, (height - resolution) // 2
    rgb = rgb.crop((left, top, left + resolution, top + resolution))
    return torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1)
