"""Where image–caption rows come from: a hub (or saved local) dataset, an image folder, a manifest.

Every source is reduced to the same thing, `Rows`: row i has an image (a file path, or bytes held
by a 🤗 dataset) and a list of candidate captions (or a caption problem). Nothing here decodes
pixels; `index.py` reads headers, the dataset decodes during training. A problem with one row is
recorded for that row; only problems with the source as a whole (missing manifest, wrong column,
unreachable hub) raise, as one-line `UserError`s, before any model loads.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..models.loading import hub_reachable, hub_unreachable_message
from .filters import RowFilter, row_filter
from .masks import MaskOptions, attach_masks, is_mask_file, mask_options

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
MANIFEST_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
# Caption problems a row can have; the scan skips and counts such rows.
NO_CAPTION, EMPTY_CAPTION, NOT_UTF8 = "missing caption", "empty caption", "caption not UTF-8"
CAPTION_PROBLEMS = (NO_CAPTION, EMPTY_CAPTION, NOT_UTF8)  # what a fixed caption (dataset.caption) makes good
BAD_LINE = "\0line"  # marks a manifest line that could not be parsed


@dataclass
class Rows:
    """Row i: `images[i]` (a path str, a row number into `hub`, or (row number, column)), `captions[i]` (list of
    str, or a problem str); for preference pairs (data/pairs.py) `images[i]` is the winner, `losers[i]` the loser."""

    name: str
    images: list
    captions: list
    fingerprint: str
    hub: object = None  # a datasets.Dataset whose image column is not decoded
    image_column: str = "image"
    losers: list | None = None  # None: not a pair dataset
    mask: object = None  # masks.MaskOptions when the loss is masked
    masks: list | None = None  # each row's mask: a path, a (row, column) hub cell, or None (data/masks.py)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def pairs(self) -> bool:
        return self.losers is not None

    def label(self, i: int) -> str:
        image = self.images[i]
        if isinstance(image, str):
            return image
        return f"{self.name}[{image[0] if isinstance(image, tuple) else image}]"

    @property
    def masked(self) -> bool:
        return self.mask is not None

    def mask_of(self, i: int) -> tuple:
        """(mask options or None, row i's mask reference or None)."""
        return self.mask, None if self.masks is None else self.masks[i]

    def open_mask(self, i: int):
        return self._open(self.masks[i])

    def open(self, i: int, loser: bool = False):
        """A file-like object or path for PIL.Image.open (of the pair's loser with `loser=True`)."""
        return self._open((self.losers if loser else self.images)[i])

    def _open(self, image):
        if isinstance(image, str):
            return image
        row, column = image if isinstance(image, tuple) else (image, self.image_column)
        value = self.hub[row][column]
        if isinstance(value, (bytes, bytearray)):  # a binary column (Pick-a-Pic's jpg_0 / jpg_1)
            return io.BytesIO(value)
        if isinstance(value, str):
            return value
        if value is None:
            return f"{self.name}[{row}]:<no {column}>"  # a path that does not exist: counted as 'file not found'
        if value.get("bytes") is not None:
            return io.BytesIO(value["bytes"])
        return value["path"]


def load_rows(cfg: dict, key: str = "train_dataloader.dataset") -> Rows:
    """Rows from the dataset config: `type` 'hub' | 'folder' | 'manifest' and `path` (with `pairs`: preference pairs)."""
    kind, path = cfg.get("type", "hub"), cfg.get("path")
    if not path:
        raise UserError(f"set {key}.path (a hub id or dataset folder for type='hub', an image folder, or a manifest file)")
    masks = mask_options(cfg, key)  # refused with pairs
    if cfg.get("pairs"):
        from .pairs import pair_rows

        return pair_rows(cfg, key)
    image_column, caption_column = cfg.get("image_column", "image"), cfg.get("caption_column", "text")
    keep = row_filter(cfg, key)
    fixed = cfg.get("caption")
    if fixed is not None and (not isinstance(fixed, str) or not fixed.strip()):
        raise UserError(f"{key}.caption must be a non-empty string (one caption for every image), got {fixed!r}")
    if kind == "hub":  # with one caption for all, the dataset needs no caption column (an image-only dataset)
        rows = hub_rows(path, cfg.get("split", "train"), image_column, None if fixed is not None else caption_column, key, keep)
    elif kind == "folder":
        rows = folder_rows(Path(path).expanduser(), image_column, caption_column, key, keep, masks)
    elif kind == "manifest":
        rows = manifest_rows(Path(path).expanduser(), image_column, caption_column, key, keep)
    else:
        raise UserError(f"{key}.type must be 'hub', 'folder' or 'manifest', got '{kind}'")
    attach_masks(rows, masks, key, mask_column(rows, masks, kind, Path(path).expanduser(), key))
    if fixed is not None:  # e.g. DreamBooth's instance prompt: the images need no captions of their own
        # a row left out for another reason (a filter, an unreadable manifest line) stays out
        rows.captions = [[fixed] if isinstance(c, list) or c in CAPTION_PROBLEMS else c for c in rows.captions]
        rows.fingerprint = f"{rows.fingerprint}:caption={hashlib.sha1(fixed.encode()).hexdigest()[:12]}"  # the scan differs
    return rows


# ---------------------------------------------------------------------------------------------- files


def folder_rows(folder: Path, image_column: str, caption_column: str, key: str, keep: RowFilter | None = None,
                masks: MaskOptions | None = None) -> Rows:
    """An image folder: `metadata.jsonl|csv|parquet` (column `file_name`, as 🤗 imagefolder) or a `.txt` beside each image."""
    if not folder.is_dir():
        raise UserError(f"image folder {folder} does not exist ({key}.path)")
    table = metadata_file(folder)
    if table is not None:
        return manifest_rows(table, "file_name" if image_column == "image" else image_column, caption_column, key, keep)
    if keep is not None:
        raise UserError(f"{key}.filters needs columns to filter on: image folder {folder} has no {' / '.join(METADATA_FILES)}")
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not is_mask_file(p, masks))
    if not images:
        raise UserError(f"image folder {folder} holds no images and no {' / '.join(METADATA_FILES)}")
    captions = [_sidecar_caption(p.with_suffix(".txt")) for p in images]
    return Rows(str(folder), [str(p) for p in images], captions, _fingerprint([str(p) for p in images], captions))


def _sidecar_caption(path: Path):
    if not path.is_file():
        return NO_CAPTION
    try:
        return _captions(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        return NOT_UTF8


def metadata_file(folder: Path) -> Path | None:
    """An image folder's metadata table, if it has one."""
    return next((folder / name for name in METADATA_FILES if (folder / name).is_file()), None)


def mask_column(rows: Rows, masks: MaskOptions | None, kind: str, path: Path, key: str) -> list | None:
    """Each row's cell of the mask column (source='column'): a path relative to the manifest, or a hub cell; None
    when the rows have no table to read it from."""
    if masks is None or masks.source != "column":
        return None
    column = masks.column
    if rows.hub is not None:
        import datasets

        if column not in rows.hub.column_names:
            raise UserError(f"dataset {rows.name} has no mask column {column!r}; its columns are {rows.hub.column_names} "
                            f"(set {key}.mask.column)")
        if isinstance(rows.hub.features[column], datasets.Image):
            rows.hub = rows.hub.cast_column(column, datasets.Image(decode=False))
        return [(i, column) for i in range(len(rows))]
    manifest = path if kind == "manifest" else metadata_file(path)
    if manifest is None:
        return None
    records, columns = read_manifest(manifest, key)
    if column not in columns:
        raise UserError(f"manifest {manifest} has no mask column {column!r}; its columns are {sorted(columns)} (set {key}.mask.column)")
    values = [record.get(column) for record in records]
    return [str(manifest.parent / v) if isinstance(v, str) and v.strip() else None for v in values]


def manifest_rows(manifest: Path, image_column: str, caption_column: str, key: str, keep: RowFilter | None = None) -> Rows:
    """A CSV/JSONL/parquet table of image paths (relative to the table) and captions (a string or a list)."""
    records, columns = read_manifest(manifest, key)
    missing = [c for c in (image_column, caption_column) if c is not None and c not in columns]
    if missing:
        raise UserError(f"manifest {manifest} has no column {', '.join(map(repr, missing))}; its columns are {sorted(columns)} "
                        f"(set {key}.image_column / caption_column)")
    if keep is not None:
        keep.check_columns(columns, f"manifest {manifest}", key)
    images, captions = [], []
    for record in records:
        if BAD_LINE in record:  # kept as a row so it is counted and logged like any other bad row
            images.append(f"{manifest}:{record[BAD_LINE]}")
            captions.append("unreadable manifest line")
            continue
        value = record.get(image_column)
        images.append(str(manifest.parent / value) if isinstance(value, str) and value else f"{manifest}:<no {image_column}>")
        captions.append((keep and keep.reason(record.get)) or _captions(record.get(caption_column)))
    return Rows(str(manifest), images, captions, _fingerprint(images, captions))


def read_manifest(manifest: Path, key: str) -> tuple[list[dict], set[str]]:
    """The records of a CSV/JSONL/parquet table and the columns they use; a missing, unknown or empty table raises."""
    if not manifest.is_file():
        raise UserError(f"manifest {manifest} does not exist ({key}.path)")
    fmt = MANIFEST_FORMATS.get(manifest.suffix.lower())
    if fmt is None:
        raise UserError(f"manifest {manifest}: unknown format (expected {', '.join(MANIFEST_FORMATS)})")
    records = _read_table(manifest, fmt)
    if not records:
        raise UserError(f"manifest {manifest} has no rows")
    return records, set().union(*(r.keys() for r in records if BAD_LINE not in r))


def _read_table(manifest: Path, fmt: str) -> list[dict]:
    """The records; a JSONL line that is not a JSON object becomes {BAD_LINE: its line number}.

    Text is decoded with `surrogateescape` so one row with bytes that are not UTF-8 costs that row
    (flagged by `_captions`), not the whole manifest, as pandas or pyarrow would make it.
    """
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.read_table(manifest).to_pylist()
    text = manifest.read_bytes().decode("utf-8", errors="surrogateescape")
    if fmt == "csv":
        return [dict(r) for r in csv.DictReader(io.StringIO(text, newline=""))]
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            records.append(record if isinstance(record, dict) else {BAD_LINE: number})
    return records


def _captions(value) -> list[str] | str:
    """A caption cell → a non-empty list of candidate captions, or the reason the row has none."""
    if value is None or (isinstance(value, float) and value != value):  # missing cell (None, NaN)
        return NO_CAPTION
    candidates = value if isinstance(value, (list, tuple)) else [value]
    candidates = [c for c in candidates if isinstance(c, str)]
    if any(_has_surrogates(c) for c in candidates):
        return NOT_UTF8
    candidates = [c.strip() for c in candidates if c.strip()]
    return candidates or EMPTY_CAPTION


def _has_surrogates(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def _fingerprint(images: list[str], captions: list) -> str:
    """Changes when any file's path, size or modification time, or any caption, changes."""
    digest = hashlib.sha1()
    for path, caption in zip(images, captions):
        try:
            stat = os.stat(path)
            digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode(errors="surrogateescape"))
        except OSError:
            digest.update(f"{path}\0missing\0".encode(errors="surrogateescape"))
        digest.update(json.dumps(caption).encode() + b"\n")
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------ hub


def open_hub_dataset(name: str, split: str, key: str, streaming: bool = False):
    """`datasets.load_dataset` for a hub id or a local dataset folder (`load_from_disk` for a saved one)."""
    local = Path(name).expanduser()
    if not local.exists():
        hub_reachable()  # offline at once when the Hub cannot be reached (models/loading.py)
    import datasets

    datasets.disable_progress_bars()
    try:
        if local.is_dir() and (local / "dataset_info.json").is_file() and (local / "state.json").is_file():
            return datasets.load_from_disk(str(local))
        if local.is_dir() and (local / split / "state.json").is_file():
            return datasets.load_from_disk(str(local / split))
        return datasets.load_dataset(str(local) if local.is_dir() else name, split=split, streaming=streaming)
    except (ConnectionError, OSError) as error:
        if not local.exists() and _looks_unreachable(error):
            raise UserError(hub_unreachable_message(name, "dataset", f"{key}.path")) from None
        raise UserError(f"cannot load dataset {name}: {first_line(error)}") from None
    except ValueError as error:
        raise UserError(f"cannot load dataset {name}: {first_line(error)}") from None


def hub_rows(name: str, split: str, image_column: str, caption_column: str | None, key: str, keep: RowFilter | None = None) -> Rows:
    import datasets

    dataset = open_hub_dataset(name, split, key)
    check_columns(dataset.column_names, image_column, caption_column, name, key)  # caption_column None: not read
    excluded = filtered_out(dataset, keep, name, key)
    if len(dataset) == 0:
        raise UserError(f"dataset {name} (split '{split}') is empty")
    if isinstance(dataset.features[image_column], datasets.Image):  # bytes only: pgv25 decodes, and catches, itself
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    cells = dataset[caption_column] if caption_column is not None else [None] * len(dataset)
    captions = [reason or _captions(value) for reason, value in zip(excluded, cells)]
    return Rows(name, list(range(len(dataset))), captions, f"{dataset._fingerprint}:{image_column}:{caption_column}:{keep}",
                hub=dataset, image_column=image_column)


def filtered_out(dataset, keep: RowFilter | None, name: str, key: str) -> list:
    """Per row of a 🤗 dataset, why `keep` leaves it out (None: kept); reads only the filtered columns."""
    if keep is None:
        return [None] * len(dataset)
    keep.check_columns(dataset.column_names, f"dataset {name}", key)
    values = {column: dataset[column] for column in keep.columns}
    return [keep.reason(lambda column, i=i: values[column][i]) for i in range(len(dataset))]


def check_columns(columns, image_column: str, caption_column: str, name: str, key: str) -> None:
    missing = [c for c in (image_column, caption_column) if c is not None and c not in columns]
    if missing:
        raise UserError(f"dataset {name} has no column {', '.join(map(repr, missing))}; its columns are {list(columns)} "
                        f"(set {key}.image_column / caption_column)")


def _looks_unreachable(error: Exception) -> bool:
    text = f"{type(error).__name__} {error}".lower()
    return any(word in text for word in ("connect", "offline", "resolve", "network", "timed out", "couldn't reach", "name or service"))


def first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
