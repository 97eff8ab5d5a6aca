"""Keep only rows whose numeric columns lie in given ranges: `train_dataloader.dataset.filters`.

Playground's own route to better images is supervised fine-tuning on a curated set; with a scored
dataset (an `aesthetic` or `clip_score` column) the curation is one key:

    filters=dict(aesthetic=dict(min=6.0))

A row outside a range is excluded by the scan like any bad row, with its reason ('aesthetic < 6'), so
`pgv25 data inspect`, the run's first lines and skipped_files.txt say how many each bound removed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import UserError


@dataclass
class RowFilter:
    bounds: dict  # column → (min or None, max or None), both inclusive

    @property
    def columns(self) -> list[str]:
        return list(self.bounds)

    def reason(self, value_of) -> str | None:
        """Why a row is left out (`value_of(column)` gives its cell), or None to keep it."""
        for column, (low, high) in self.bounds.items():
            value = _number(value_of(column))
            if value is None:
                return f"no numeric {column}"
            if low is not None and value < low:
                return f"{column} < {low:g}"
            if high is not None and value > high:
                return f"{column} > {high:g}"
        return None

    def check_columns(self, columns, name: str, key: str) -> None:
        missing = [c for c in self.bounds if c not in columns]
        if missing:
            raise UserError(f"{name} has no column {', '.join(map(repr, missing))} to filter on; its columns are "
                            f"{sorted(columns)} ({key}.filters)")


def _number(value) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)  # CSV cells are strings
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def row_filter(cfg: dict, key: str) -> RowFilter | None:
    """The configured filter, checked: {column: dict(min=, max=)} with at least one finite bound each."""
    given = cfg.get("filters")
    if not given:
        return None
    if not isinstance(given, dict):
        raise UserError(f"{key}.filters must map column names to dict(min=..., max=...), got {given!r}")
    bounds = {}
    for column, bound in given.items():
        if not isinstance(bound, dict) or not set(bound) <= {"min", "max"} or not bound:
            raise UserError(f"{key}.filters.{column} must be dict(min=...) and/or dict(max=...), got {bound!r}")
        low, high = (None if bound.get(k) is None else _number(bound[k]) for k in ("min", "max"))
        if (bound.get("min") is not None and low is None) or (bound.get("max") is not None and high is None):
            raise UserError(f"{key}.filters.{column}: min and max must be numbers, got {bound!r}")
        if low is not None and high is not None and low > high:
            raise UserError(f"{key}.filters.{column}: min {low:g} is above max {high:g}")
        bounds[column] = (low, high)
    return RowFilter(bounds)
