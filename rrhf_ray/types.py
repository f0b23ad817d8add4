"""Ranked query groups: the unit the trainer consumes, and their files.

A *group* is one query with its k candidate responses and their rewards (RRHF.md, notation).
Two file formats hold groups:

- the reference repo's JSONL, one object a line: {"query": str, "responses": [str], "scores": [float]}
  (this project adds an optional "sources": [str], the origin of each response);
- the project's round pool, Parquet with the same four columns.

Every row is validated before any expensive work starts; an error names the file and the line.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class DataError(ValueError):
    """Malformed input data; the message names the file, the row and the field."""


class QueryGroup(BaseModel):
    """One query x with candidates y_1 … y_k and rewards r_1 … r_k (k ≥ 1).

    `scores[i]` is the reward of `responses[i]`; `sources[i]` tags where it came from
    (e.g. "policy@2" for round 2's sampler, "chosen" / "rejected" for the data set's own).
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    query: str
    responses: list[str] = Field(min_length=1)
    scores: list[float]
    sources: list[str] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> QueryGroup:
        if not self.query.strip():
            raise ValueError("query is empty")
        if len(self.scores) != len(self.responses):
            raise ValueError(
                f"scores has {len(self.scores)} entries but responses has {len(self.responses)}"
            )
        for i, s in enumerate(self.scores):
            if not math.isfinite(s):
                raise ValueError(f"scores[{i}] is {s}, not a finite number")
        if self.sources is not None and len(self.sources) != len(self.responses):
            raise ValueError(
                f"sources has {len(self.sources)} entries but responses has {len(self.responses)}"
            )
        return self

    @property
    def k(self) -> int:
        return len(self.responses)


def _row_error(path: Path, row: int, err: ValidationError | ValueError, what: str = "line") -> DataError:
    if isinstance(err, ValidationError):
        parts = []
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"])
            msg = e["msg"].removeprefix("Value error, ")
            parts.append(f"{loc}: {msg}" if loc else msg)
        detail = "; ".join(parts)
    else:
        detail = str(err)
    return DataError(f"{path} {what} {row}: {detail}")


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; a line that is not a JSON object is a
    DataError naming the file and the line."""
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path} line {lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path} line {lineno}: expected a JSON object")
            yield lineno, obj


def read_groups(path: str | Path) -> list[QueryGroup]:
    """Read and validate every group of a reference-format JSONL or a Parquet pool file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    if path.suffix == ".parquet":
        return _read_parquet(path)
    groups = []
    for lineno, obj in iter_jsonl(path):
        try:
            groups.append(QueryGroup.model_validate(obj))
        except ValidationError as err:
            raise _row_error(path, lineno, err) from None
    if not groups:
        raise DataError(f"{path} holds no query groups")
    return groups


def _read_parquet(path: Path) -> list[QueryGroup]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    missing = {"query", "responses", "scores"} - set(table.column_names)
    if missing:
        raise DataError(f"{path}: missing column(s) {sorted(missing)}")
    groups = []
    for row, obj in enumerate(table.to_pylist()):
        try:
            groups.append(QueryGroup.model_validate(obj))
        except ValidationError as err:
            raise _row_error(path, row, err, what="row") from None
    if not groups:
        raise DataError(f"{path} holds no query groups")
    return groups


def _atomic_target(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_groups(groups: Iterable[QueryGroup], path: str | Path) -> Path:
    """Write groups as reference JSONL (.jsonl) or Parquet (.parquet), atomically."""
    path = Path(path)
    tmp = _atomic_target(path)
    rows = [g.model_dump(exclude_none=True) for g in groups]
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        for r in rows:
            r.setdefault("sources", None)
        pq.write_table(pa.Table.from_pylist(rows), tmp)
    else:
        with tmp.open("w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def reward_stats(groups: Sequence[QueryGroup]) -> dict[str, dict[str, float]]:
    """Reward mean / std / max per source and over all candidates (the paper's table 6)."""
    by_source: dict[str, list[float]] = {}
    for g in groups:
        for i, s in enumerate(g.scores):
            tag = g.sources[i] if g.sources else "all"
            by_source.setdefault(tag, []).append(s)
            if g.sources:
                by_source.setdefault("all", []).append(s)
    out = {}
    for tag, vals in by_source.items():
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))
        out[tag] = {"mean": mean, "std": std, "max": max(vals), "count": float(len(vals))}
    return out
