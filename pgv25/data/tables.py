"""Reading tables: CSV/JSONL/parquet manifests and 🤗 datasets (hub ids or saved folders).

Shared by the image–caption sources (sources.py), preference pairs (pairs.py) and streaming
(streaming.py). A problem with the table as a whole raises a one-line `UserError`; a bad line is kept
as a row marked `BAD_LINE`, so it is counted and logged like any other bad row.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from ..errors import UserError
from ..models.loading import hub_reachable, hub_unreachable_message
from .filters import RowFilter
from .rows import BAD_LINE, METADATA_FILES

MANIFEST_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


def metadata_file(folder: Path) -> Path | None:
    """An image folder's metadata table, if it has one."""
    return next((folder / name for name in METADATA_FILES if (folder / name).is_file()), None)


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
    (flagged by `rows.parse_captions`), not the whole manifest, as pandas or pyarrow would make it.
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
