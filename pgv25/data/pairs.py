"""Preference pairs for DPO: one caption, the image people preferred (winner) and the other (loser).

`train_dataloader.dataset.pairs` selects the form:
- 'pickapic' (Pick-a-Pic v2, `yuvalkirstain/pickapic_v2`, `kashif/pickascore`): two image columns
  (`jpg_0`, `jpg_1`: bytes or paths) and `label_0` (1: the first preferred, 0: the second, 0.5: a tie).
  Ties say nothing about which image is better and are dropped (counted like any excluded row);
  `keep_ties=True` keeps each tie twice, once in each order, which trains the symmetric loss.
- 'chosen_rejected': `chosen` and `rejected` columns (file paths, relative to a manifest).
- 'auto' (default): 'pickapic' when the label column exists, else 'chosen_rejected'.
Hub datasets, saved datasets, manifests and image folders with a metadata file all work.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..errors import UserError
from .filters import RowFilter, row_filter
from .rows import BAD_LINE, METADATA_FILES, Rows, parse_captions, rows_fingerprint
from .tables import filtered_out, open_hub_dataset, read_manifest

DEFAULTS = {"format": "auto", "chosen_column": "chosen", "rejected_column": "rejected",
            "image_columns": ["jpg_0", "jpg_1"], "label_column": "label_0", "keep_ties": False}
TIE, NO_LABEL = "tie (pairs.keep_ties=False)", "no preference label"


def pair_options(cfg: dict, key: str) -> dict:
    given = cfg.get("pairs")
    options = {**DEFAULTS, **(given if isinstance(given, dict) else {})}
    if options["format"] not in ("auto", "pickapic", "chosen_rejected"):
        raise UserError(f"{key}.pairs.format must be 'auto', 'pickapic' or 'chosen_rejected', got {options['format']!r}")
    if len(options["image_columns"]) != 2:
        raise UserError(f"{key}.pairs.image_columns must name two columns, got {options['image_columns']!r}")
    return options


def _form(options: dict, columns) -> tuple[str, list[str]]:
    """The pair format and the columns it needs."""
    kind = options["format"]
    if kind == "auto":
        kind = "pickapic" if options["label_column"] in columns else "chosen_rejected"
    if kind == "pickapic":
        return kind, [*options["image_columns"], options["label_column"]]
    return kind, [options["chosen_column"], options["rejected_column"]]


def _check_columns(columns, needed: list[str], caption_column: str, name: str, key: str) -> None:
    missing = [c for c in [*needed, caption_column] if c not in columns]
    if missing:
        raise UserError(f"{name} has no pair column {', '.join(map(repr, missing))}; its columns are {sorted(columns)} "
                        f"(set {key}.pairs: chosen_column/rejected_column, or image_columns/label_column, and caption_column)")


def _order(label, keep_ties: bool) -> tuple[int, ...] | str:
    """Which image wins, as the orders to train ((0,): the first, (1,): the second, (0, 1): a tie kept both
    ways), or why the row cannot be used."""
    try:
        value = float(label)
    except (TypeError, ValueError):
        return NO_LABEL
    if math.isnan(value):
        return NO_LABEL
    if value == 0.5:
        return (0, 1) if keep_ties else TIE
    return (0,) if value > 0.5 else (1,)


def pair_rows(cfg: dict, key: str) -> Rows:
    options = pair_options(cfg, key)
    kind, path = cfg.get("type", "hub"), cfg["path"]
    caption_column = cfg.get("caption_column", "caption")
    keep = row_filter(cfg, key)
    if kind == "hub":
        return _hub_pairs(path, cfg.get("split", "train"), caption_column, options, key, keep)
    table = Path(path).expanduser()
    if kind == "folder":
        if not table.is_dir():
            raise UserError(f"image folder {table} does not exist ({key}.path)")
        found = [table / name for name in METADATA_FILES if (table / name).is_file()]
        if not found:
            raise UserError(f"pair folder {table} has no {' / '.join(METADATA_FILES)} naming each pair's images")
        table = found[0]
    elif kind != "manifest":
        raise UserError(f"{key}.type must be 'hub', 'folder' or 'manifest', got '{kind}'")
    return _table_pairs(table, caption_column, options, key, keep)


def _table_pairs(manifest: Path, caption_column: str, options: dict, key: str, keep: RowFilter | None) -> Rows:
    records, columns = read_manifest(manifest, key)
    form, needed = _form(options, columns)
    _check_columns(columns, needed, caption_column, f"manifest {manifest}", key)
    if keep is not None:
        keep.check_columns(columns, f"manifest {manifest}", key)

    def path_of(record, column):
        value = record.get(column)
        return str(manifest.parent / value) if isinstance(value, str) and value else f"{manifest}:<no {column}>"

    winners, losers, captions = [], [], []
    for record in records:
        if BAD_LINE in record:
            winners.append(f"{manifest}:{record[BAD_LINE]}")
            losers.append(winners[-1])
            captions.append("unreadable manifest line")
            continue
        pair = [path_of(record, c) for c in needed[:2]]
        caption = (keep and keep.reason(record.get)) or parse_captions(record.get(caption_column))
        orders = _order(record.get(needed[2]), options["keep_ties"]) if form == "pickapic" else (0,)
        if isinstance(orders, str):  # a tie or no usable label: a row problem, counted by the scan
            orders, caption = (0,), orders
        for first in orders:
            winners.append(pair[first])
            losers.append(pair[1 - first])
            captions.append(caption)
    fingerprint = rows_fingerprint(winners + losers, captions + [form])
    return Rows(str(manifest), winners, captions, fingerprint, losers=losers)


def _hub_pairs(name: str, split: str, caption_column: str, options: dict, key: str, keep: RowFilter | None) -> Rows:
    import datasets

    dataset = open_hub_dataset(name, split, key)
    form, needed = _form(options, dataset.column_names)
    _check_columns(dataset.column_names, needed, caption_column, f"dataset {name}", key)
    if len(dataset) == 0:
        raise UserError(f"dataset {name} (split '{split}') is empty")
    for column in needed[:2]:  # bytes only: pgv25 decodes, and catches, itself
        if isinstance(dataset.features[column], datasets.Image):
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
    labels = dataset[needed[2]] if form == "pickapic" else [1.0] * len(dataset)
    excluded = filtered_out(dataset, keep, name, key)
    winners, losers, captions = [], [], []
    for row, (label, text, reason) in enumerate(zip(labels, dataset[caption_column], excluded)):
        caption, orders = reason or parse_captions(text), _order(label, options["keep_ties"])
        if isinstance(orders, str):
            orders, caption = (0,), orders
        for first in orders:
            winners.append((row, needed[first]))
            losers.append((row, needed[1 - first]))
            captions.append(caption)
    fingerprint = f"{dataset._fingerprint}:pairs:{form}:{needed}:{caption_column}:{options['keep_ties']}:{keep}"
    return Rows(name, winners, captions, fingerprint, hub=dataset, losers=losers)
