"""Prompt files for evaluation: MJHQ-30K's `meta_data.json` (`{id: {"category": ..., "prompt": ...}}`), or JSONL/CSV
rows with `prompt` and optional `category` and `id`.

A row without a usable prompt, or with an id seen before, is skipped, counted and named in one log line; a file that
cannot be read at all is one UserError line. Ids become file names, so anything but letters, digits, `-`, `_` and `.`
in them is replaced with `_` (MJHQ's ids are hex digests, unchanged).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

logger = logging.getLogger("pgv25")
UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class EvalPrompt:
    id: str  # the image's file name without its suffix
    prompt: str
    category: str | None = None  # images go to <out>/<category>/<id>.png, as MJHQ-30K lays out its references


def read_prompts(path: str | Path, per_category: int | None = None) -> list[EvalPrompt]:
    """The prompts of `path`, in file order; with `per_category`, the first N of each category (a quick look)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompt file {path} does not exist (MJHQ-30K's meta_data.json, or a .jsonl/.csv with a 'prompt' column)")
    text = path.read_bytes().decode("utf-8", errors="replace")
    suffix = path.suffix.lower()
    if suffix == ".json":
        records = _mjhq_records(text, path)
    elif suffix == ".jsonl":
        records = [_json_line(line) for line in text.splitlines() if line.strip()]
    elif suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if "prompt" not in (reader.fieldnames or []):
            raise UserError(f"prompt file {path} has no 'prompt' column; its columns are {reader.fieldnames}")
        records = list(reader)
    else:
        raise UserError(f"prompt file {path}: unknown format {suffix!r} (expected .json as MJHQ-30K's meta_data.json, .jsonl or .csv)")
    prompts, skipped, seen = [], Counter(), set()
    for number, record in enumerate(records):
        prompt = record.get("prompt") if isinstance(record, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            skipped["no prompt"] += 1
            continue
        raw_id = record.get("id")
        image_id = UNSAFE.sub("_", str(raw_id).strip()) if raw_id not in (None, "") else f"{number:06d}"
        if image_id in seen:
            skipped["an id seen before"] += 1
            continue
        seen.add(image_id)
        category = record.get("category")
        category = UNSAFE.sub("_", str(category).strip()) if category not in (None, "") else None
        prompts.append(EvalPrompt(image_id, prompt.strip(), category))
    if skipped:
        logger.warning("prompt file %s: %s skipped", path, ", ".join(f"{n} row(s) with {why}" for why, n in skipped.items()))
    if not prompts:
        raise UserError(f"prompt file {path} holds no usable prompt")
    if per_category is not None:  # the first N of each category, in file order
        rank_in_category = Counter()
        kept = []
        for prompt in prompts:
            rank_in_category[prompt.category] += 1
            if rank_in_category[prompt.category] <= per_category:
                kept.append(prompt)
        prompts = kept
    return prompts


def _mjhq_records(text: str, path: Path) -> list[dict]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"prompt file {path} is not valid JSON: {error.msg} at line {error.lineno}") from None
    if isinstance(data, list):  # a JSON list of rows, as a JSONL file would hold them
        return data
    if not isinstance(data, dict):
        raise UserError(f"prompt file {path}: expected MJHQ-30K's {{id: {{category, prompt}}}}, got a JSON {type(data).__name__}")
    return [{**value, "id": key} if isinstance(value, dict) else {"id": key} for key, value in data.items()]


def _json_line(line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None  # counted as a row with no prompt
