"""Where image–caption rows come from: a hub (or saved local) dataset, an image folder, a manifest.

Every source is reduced to the same thing, `Rows`: row i has an image (a file path, or bytes held
by a 🤗 dataset) and a list of candidate captions (or a caption problem). Nothing here decodes
pixels; `index.py` reads headers, the dataset decodes during training. A problem with one row is
recorded for that row; only problems with the source as a whole (missing manifest, wrong column,
unreachable hub) raise, as one-line `UserError`s, before any model loads.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from ..errors import UserError
from .filters import RowFilter, row_filter
from .masks import MaskOptions, attach_masks, is_mask_file, mask_options
from .pairs import pair_rows
from .rows import BAD_LINE, CAPTION_PROBLEMS, IMAGE_SUFFIXES, METADATA_FILES, NO_CAPTION, NOT_UTF8, Rows, parse_captions, rows_fingerprint
from .tables import check_columns, filtered_out, metadata_file, open_hub_dataset, read_manifest

logger = logging.getLogger(__name__)


def load_rows(cfg: dict, key: str = "train_dataloader.dataset") -> Rows:
    """Rows from the dataset config: `type` 'hub' | 'folder' | 'manifest' and `path` (with `pairs`: preference pairs)."""
    kind, path = cfg.get("type", "hub"), cfg.get("path")
    if not path:
        raise UserError(f"set {key}.path (a hub id or dataset folder for type='hub', an image folder, or a manifest file)")
    masks = mask_options(cfg, key)  # refused with pairs
    if cfg.get("pairs"):
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
    return Rows(str(folder), [str(p) for p in images], captions, rows_fingerprint([str(p) for p in images], captions))


def _sidecar_caption(path: Path):
    if not path.is_file():
        return NO_CAPTION
    try:
        return parse_captions(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        return NOT_UTF8


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
        captions.append((keep and keep.reason(record.get)) or parse_captions(record.get(caption_column)))
    return Rows(str(manifest), images, captions, rows_fingerprint(images, captions))


# ------------------------------------------------------------------------------------------------ hub


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
    captions = [reason or parse_captions(value) for reason, value in zip(excluded, cells)]
    return Rows(name, list(range(len(dataset))), captions, f"{dataset._fingerprint}:{image_column}:{caption_column}:{keep}",
                hub=dataset, image_column=image_column)


