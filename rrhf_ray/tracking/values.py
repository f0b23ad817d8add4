"""What the trackers log, in backend-neutral form: a metrics row's numbers, a config's dotted
parameters, a table's columns and rows (and its markdown for the text-only TensorBoard)."""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any


def _number(value: Any) -> float | None:
    """`value` as a finite float, or None for anything else (booleans included)."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return None
    if isinstance(value, numbers.Real):
        value = float(value)
        return value if math.isfinite(value) else None
    return None


def round_metrics(row: Mapping[str, Any], skip: Iterable[str] = ("round",)) -> dict[str, float]:
    """The numbers of a metrics row: numbers as they are, a [lo, hi] pair as `<key>_lo` /
    `<key>_hi`; strings, dicts, other lists, None, NaN and booleans left out."""
    skip = set(skip)
    out: dict[str, float] = {}
    for key, value in row.items():
        if key in skip:
            continue
        if isinstance(value, (list, tuple)):
            if len(value) == 2:
                lo, hi = _number(value[0]), _number(value[1])
                if lo is not None:
                    out[f"{key}_lo"] = lo
                if hi is not None:
                    out[f"{key}_hi"] = hi
            continue
        number = _number(value)
        if number is not None:
            out[key] = number
    return out


def flatten_params(config: Any) -> dict[str, Any]:
    """A config (pydantic model or nested mapping) as {dotted.key: value}; values are JSON
    scalars or lists (an empty mapping stays as {})."""
    if hasattr(config, "model_dump"):
        config = config.model_dump(mode="json")
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, Mapping) and node:
            for key, value in node.items():
                walk(value, f"{prefix}.{key}" if prefix else str(key))
        else:
            out[prefix] = node

    walk(config, "")
    return out


def param_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def columns_and_rows(rows: list[Mapping[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Columns (in first-seen order) and data rows, a missing cell None."""
    columns: list[str] = []
    for row in rows:
        columns += [str(k) for k in row if str(k) not in columns]
    return columns, [[row.get(c) for c in columns] for row in rows]


def markdown_table(columns: list[str], data: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        text = "" if value is None else value if isinstance(value, str) else json.dumps(value, default=str)
        return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", " ⏎ ")

    lines = ["| " + " | ".join(cell(c) for c in columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in data]
    return "\n".join(lines)
