"""The shared vocabulary: query groups, candidates, data errors, and the files that hold them.

Everything here is plain data and file I/O; it imports nothing of Ray, vLLM or torch, so any
module (a data loader, an actor, a trainer, the driver) can use it. RRHF's vocabulary:

- a *candidate* is one response y_i to a query x, with what its source knew about it;
- a *candidate group* is a query with its k candidates, before scoring;
- a *query group* (`QueryGroup`) is a query with its k responses and their rewards r_i: the unit
  the trainer consumes.

Two file formats hold query groups:

- the reference repo's JSONL, one object a line: {"query": str, "responses": [str], "scores": [float]}
  (this project adds an optional "sources": [str], the origin of each response);
- the project's round pool, Parquet with the same four columns.

Every row is validated when it is read; an error names the file and the line (JSONL, from 1)
or the row (Parquet, from 0). Every file is written under a temporary name and renamed when
whole, so a reader (or a resumed run) never sees half a file.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "Candidate", "CandidateGroup", "DataError", "QueryGroup", "atomic_path", "atomic_write",
    "install_dir", "iter_jsonl", "read_groups", "reward_stats", "row_error", "write_groups",
]


class DataError(ValueError):
    """Malformed input data; the message names the file, the row and the field."""


# --------------------------------------------------------------------------- candidates


@dataclass(frozen=True)
class Candidate:
    """One candidate response y_i to a query, tagged with where it came from.

    `token_ids` are the response tokens only (the EOS that ended it included), empty when the
    source was text (a data set, a file); `cumulative_logprob` is Σ log π(y_t | x, y_<t) in nats
    under the sampling policy, None when not known; `finish_reason` is the engine's ("stop",
    "length"), None for text sources. `source` is e.g. "policy@2" (round 2's checkpoint ρ*),
    "initial@0" (the frozen ρ), "chosen" (the data set's), or several joined by "+" after
    duplicates were merged. `version` is the policy version (round) that produced it.
    """

    text: str
    token_ids: tuple[int, ...] = ()
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    source: str = "policy"
    version: int | None = None


@dataclass(frozen=True)
class CandidateGroup:
    """One query and its candidates before scoring; `to_group(scores)` makes the QueryGroup."""

    query: str
    candidates: tuple[Candidate, ...]

    @property
    def responses(self) -> list[str]:
        return [c.text for c in self.candidates]

    @property
    def sources(self) -> list[str]:
        return [c.source for c in self.candidates]

    def to_group(self, scores: Sequence[float] | None = None) -> QueryGroup:
        """As a QueryGroup; without scores every reward is 0.0 (a placeholder until scored)."""
        scores = [0.0] * len(self.candidates) if scores is None else [float(s) for s in scores]
        return QueryGroup(query=self.query, responses=self.responses, scores=scores,
                          sources=self.sources)

    @classmethod
    def from_group(cls, group: QueryGroup) -> CandidateGroup:
        sources = group.sources or ["file"] * group.k
        return cls(group.query, tuple(Candidate(text=r, source=s)
                                      for r, s in zip(group.responses, sources)))


def merge_duplicates(query: str, candidates: Iterable[Candidate]) -> CandidateGroup:
    """One candidate per distinct response (first occurrence kept, sources joined with "+").

    A duplicate would otherwise enter the ranking loss as a pair with itself, and the
    fine-tuning term would count it twice.
    """
    merged: dict[str, Candidate] = {}
    for c in candidates:
        key = c.text.strip()
        first = merged.get(key)
        if first is None:
            merged[key] = c
        elif c.source not in first.source.split("+"):
            merged[key] = replace(first, source=f"{first.source}+{c.source}",
                                  version=first.version if first.version is not None else c.version)
    return CandidateGroup(query, tuple(merged.values()))


# --------------------------------------------------------------------------- query groups


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


# --------------------------------------------------------------------------- reading


def row_error(origin: str | Path, row: int, err: Exception, what: str = "line") -> DataError:
    """A DataError "<origin> <what> <row>: <detail>" from a pydantic ValidationError (its
    field locations joined), a ValueError or a TypeError."""
    if isinstance(err, ValidationError):
        parts = []
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"])
            msg = e["msg"].removeprefix("Value error, ")
            parts.append(f"{loc}: {msg}" if loc else msg)
        detail = "; ".join(parts)
    else:
        detail = str(err)
    return DataError(f"{origin} {what} {row}: {detail}")


def iter_jsonl(path: str | Path, *, objects_only: bool = True) -> Iterator[tuple[int, Any]]:
    """(line number from 1, parsed value) for each non-blank line of a JSONL file.

    A line that is not UTF-8, not JSON, or (with `objects_only`) not a JSON object is a
    DataError naming the file and the line; so is a file that cannot be read.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            for lineno, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise DataError(f"{path} line {lineno}: not UTF-8 text ({err.reason})") from None
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path} line {lineno}: not valid JSON ({err.msg})") from None
                if objects_only and not isinstance(obj, dict):
                    raise DataError(f"{path} line {lineno}: expected a JSON object")
                yield lineno, obj
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err})") from None


def read_parquet_rows(path: str | Path) -> list[dict[str, Any]]:
    """Every row of a Parquet file as a dict; an unreadable file is a DataError."""
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"{path}: cannot read as Parquet ({err})") from None


def read_groups(path: str | Path) -> list[QueryGroup]:
    """Read and validate every group of a reference-format JSONL or a Parquet pool file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    if path.suffix == ".parquet":
        rows = list(enumerate(read_parquet_rows(path)))
        missing = {"query", "responses", "scores"} - set(rows[0][1] if rows else {})
        if rows and missing:
            raise DataError(f"{path}: missing column(s) {sorted(missing)}")
        what = "row"
    else:
        rows, what = list(iter_jsonl(path)), "line"
    groups = []
    for number, obj in rows:
        try:
            groups.append(QueryGroup.model_validate(obj))
        except ValidationError as err:
            raise row_error(path, number, err, what) from None
    if not groups:
        raise DataError(f"{path} holds no query groups")
    return groups


# --------------------------------------------------------------------------- writing


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary sibling of `path` to write; renamed onto `path` when the block ends without
    an error, removed otherwise. Works for files and directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    install_dir(tmp, path) if tmp.is_dir() else os.replace(tmp, path)


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write text or bytes to `path` atomically (temporary name, then rename)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data) if isinstance(data, bytes) else tmp.write_text(data, encoding="utf-8")
    return Path(path)


def install_dir(src: Path, dst: Path) -> None:
    """Move a finished directory into place; an existing `dst` is replaced only after `src` is whole."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        _remove(old)
        os.replace(dst, old)
        os.replace(src, dst)
        _remove(old)
    else:
        os.replace(src, dst)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_groups(groups: Iterable[QueryGroup], path: str | Path) -> Path:
    """Write groups as reference JSONL (.jsonl) or Parquet (.parquet), atomically."""
    path = Path(path)
    rows = [g.model_dump(exclude_none=True) for g in groups]
    with atomic_path(path) as tmp:
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
    return path


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """One JSON object a line, atomically."""
    return atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
