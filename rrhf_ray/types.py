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

A query is either the paper's raw text (`str`) or a conversation (`Conversation`: a tuple of
`Message`s, role and content, system and multi-turn allowed), validated once by `parse_query`.
A conversation is written to JSONL as a list of {role, content} objects; in Parquet (one type a
column) it goes to a `messages` column with `query` null, a column that text-only pools never
have, so their files stay as they were.

Every row is validated when it is read; an error names the file and the line (JSONL, from 1)
or the row (Parquet, from 0). Every file is written under a temporary name and renamed when
whole, so a reader (or a resumed run) never sees half a file.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "ROLES",
    "Candidate",
    "CandidateGroup",
    "Conversation",
    "DataError",
    "Message",
    "Query",
    "QueryGroup",
    "atomic_path",
    "atomic_write",
    "conversation_text",
    "install_dir",
    "is_conversation",
    "iter_jsonl",
    "parse_query",
    "query_text",
    "read_groups",
    "reward_stats",
    "row_error",
    "write_groups",
]


class DataError(ValueError):
    """Malformed input data; the message names the file, the row and the field."""


# --------------------------------------------------------------------------- queries

ROLES = ("system", "user", "assistant", "tool")


class Message(BaseModel):
    """One turn of a conversation: who speaks (`role`, one of ROLES) and what (`content`)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    role: str
    content: str


Conversation = tuple[Message, ...]
Query = Union[str, Conversation]  # noqa: UP007 (a runtime alias pydantic reads)


def parse_query(value: Any, name: str = "query") -> Query:
    """`value` as a query: a non-empty string as it is (the raw-text path, unchanged), or a
    non-empty list of {role, content} mappings (or `Message`s) as a Conversation. Anything else
    raises a ValueError / TypeError naming `name`, the turn and the field."""
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"{name} is empty")
        return value
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a string or a list of messages, got {type(value).__name__}")
    if not value:
        raise ValueError(f"{name} is an empty list of messages")
    turns = []
    for i, m in enumerate(value):
        if isinstance(m, Message):
            m = m.model_dump()
        if not isinstance(m, Mapping):
            raise TypeError(f"{name}[{i}] must be an object with role and content, got {type(m).__name__}")
        for key in ("role", "content"):
            if key not in m:
                raise ValueError(f"{name}[{i}] has no {key!r}")
            if not isinstance(m[key], str):
                raise TypeError(f"{name}[{i}].{key} must be a string, got {type(m[key]).__name__}")
        if m["role"] not in ROLES:
            raise ValueError(f"{name}[{i}].role {m['role']!r} is not one of {', '.join(ROLES)}")
        if not m["content"].strip():
            raise ValueError(f"{name}[{i}].content is empty")
        turns.append(Message(role=m["role"], content=m["content"]))
    return tuple(turns)


def is_conversation(query: Query) -> bool:
    return not isinstance(query, str)


def conversation_text(conversation: Conversation) -> str:
    """A conversation in the paper's raw-text layout (what a model without a chat template
    reads): "\n\nHuman: …" for user turns, "\n\nAssistant: …" for assistant turns, a system
    message first as plain text, ending with the "\n\nAssistant:" that the reply continues."""
    parts = []
    for m in conversation:
        if m.role == "system":
            parts.append(m.content)
        else:
            parts.append(f"\n\n{'Assistant' if m.role == 'assistant' else 'Human'}: {m.content}")
    return "".join(parts) + "\n\nAssistant:"


def query_text(query: Query) -> str:
    """The query as text: raw text as it is, a conversation as `conversation_text` (for rule
    rewards, logs and reports)."""
    return query if isinstance(query, str) else conversation_text(query)


def query_json(query: Query) -> Any:
    """The query as JSON: the string, or a list of {role, content} objects."""
    return query if isinstance(query, str) else [m.model_dump() for m in query]


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
    `multiplicity` is how many drawn candidates `merge_duplicates` merged into this one (1 if none).
    """

    text: str
    token_ids: tuple[int, ...] = ()
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    source: str = "policy"
    version: int | None = None
    prompt_token_ids: tuple[int, ...] = ()  # the query as the engine tokenized it
    tokenizer: str | None = None  # fingerprint of the tokenizer that made the token ids
    multiplicity: int = 1

    @property
    def truncated(self) -> bool:
        """Cut off by the length limit: no EOS closes it."""
        return self.finish_reason == "length"


@dataclass(frozen=True)
class CandidateGroup:
    """One query and its candidates before scoring; `to_group(scores)` makes the QueryGroup."""

    query: Query
    candidates: tuple[Candidate, ...]

    @property
    def responses(self) -> list[str]:
        return [c.text for c in self.candidates]

    @property
    def sources(self) -> list[str]:
        return [c.source for c in self.candidates]

    def to_group(self, scores: Sequence[float] | None = None) -> QueryGroup:
        """As a QueryGroup, with what the samplers knew about each candidate; without scores the
        group is unscored (`scores` None), which training refuses."""
        cs = self.candidates
        sampled = [c for c in cs if c.token_ids and c.tokenizer]
        tokens = {}
        if sampled:  # candidates of one group come from engines of one tokenizer
            first = sampled[0]
            tokens = {
                "prompt_ids": list(first.prompt_token_ids) or None,
                "tokenizer": first.tokenizer,
                "token_ids": [list(c.token_ids) if c.tokenizer == first.tokenizer else None for c in cs],
            }
        return QueryGroup(
            query=self.query, responses=self.responses, sources=self.sources,
            scores=None if scores is None else [float(s) for s in scores],
            finish_reasons=_or_none([c.finish_reason for c in cs]),
            logprobs=_or_none([c.cumulative_logprob for c in cs]),
            versions=_or_none([c.version for c in cs]),
            counts=None if all(c.multiplicity == 1 for c in cs) else [c.multiplicity for c in cs],
            **tokens,
        )

    @classmethod
    def from_group(cls, group: QueryGroup) -> CandidateGroup:
        k = group.k
        sources = group.sources or ["file"] * k
        token_ids = group.token_ids or [None] * k
        finish = group.finish_reasons or [None] * k
        logprobs = group.logprobs or [None] * k
        versions = group.versions or [None] * k
        counts = group.counts or [1] * k
        return cls(group.query, tuple(
            Candidate(text=group.responses[i], source=sources[i],
                      token_ids=tuple(token_ids[i] or ()), finish_reason=finish[i],
                      cumulative_logprob=logprobs[i], version=versions[i],
                      prompt_token_ids=tuple(group.prompt_ids or ()) if token_ids[i] else (),
                      tokenizer=group.tokenizer if token_ids[i] else None,
                      multiplicity=counts[i])
            for i in range(k)))


def _or_none(values: list[Any]) -> list[Any] | None:
    """`values`, or None when none is known (keeps text-only files in the reference format)."""
    return values if any(v is not None for v in values) else None


def merge_duplicates(query: Query, candidates: Iterable[Candidate]) -> CandidateGroup:
    """One candidate per distinct response (first occurrence kept, sources joined with "+",
    `multiplicity` the number of candidates merged: what was drawn, for the pool's statistics).

    A duplicate would otherwise enter the ranking loss as a pair with itself, and the
    fine-tuning term would count it twice.
    """
    merged: dict[str, Candidate] = {}
    for c in candidates:
        key = c.text.strip()
        first = merged.get(key)
        if first is None:
            merged[key] = c
            continue
        source = first.source
        if c.source not in source.split("+"):
            source = f"{source}+{c.source}"
        merged[key] = replace(first, source=source, multiplicity=first.multiplicity + c.multiplicity,
                              version=first.version if first.version is not None else c.version)
    return CandidateGroup(query, tuple(merged.values()))


# --------------------------------------------------------------------------- query groups


class QueryGroup(BaseModel):
    """One query x with candidates y_1 … y_k and rewards r_1 … r_k (k ≥ 1).

    `scores[i]` is the reward of `responses[i]` (None: not scored yet); `sources[i]` tags where
    it came from (e.g. "policy@2" for round 2's sampler, "chosen" / "rejected" for the data
    set's own). The reference format is query, responses and scores; the other fields are what a
    sampler knew, optional, per candidate (None where a candidate came from text):

    - `token_ids[i]`: the response's token ids as the engine sampled them (the EOS that ended
      it included; a stop string's tokens cut off), made by the tokenizer `tokenizer` (a
      fingerprint), whose ids of the query are `prompt_ids`;
    - `finish_reasons[i]`: "stop" (ended by EOS or a stop string) or "length" (cut off);
    - `logprobs[i]`: Σ log π of its tokens under the sampling policy; `versions[i]`: that
      policy's round;
    - `counts[i]`: how many drawn candidates were merged into response i (`merge_duplicates`;
      None: one each);
    - `ref_logprobs[i]`: Σ log π_ref of its response tokens under DPO's frozen reference policy,
      over exactly the tokens the trainer scores (`rrhf_ray.train.reference`); None for a
      candidate the trainer leaves out (`train.truncated: drop`).
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    query: Query  # raw text, or a conversation (`parse_query`)
    responses: list[str] = Field(min_length=1)
    scores: list[float] | None
    sources: list[str] | None = None
    token_ids: list[list[int] | None] | None = None
    finish_reasons: list[str | None] | None = None
    logprobs: list[float | None] | None = None
    versions: list[int | None] | None = None
    ref_logprobs: list[float | None] | None = None
    counts: list[int] | None = None
    prompt_ids: list[int] | None = None
    tokenizer: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _messages_column(cls, data: Any) -> Any:
        # A Parquet pool holds a conversation in `messages`, its `query` null (module docstring).
        if isinstance(data, Mapping) and data.get("query") is None and data.get("messages") is not None:
            data = {**data, "query": data["messages"]}
        if isinstance(data, Mapping) and "query" in data:
            try:
                data = {**data, "query": parse_query(data["query"])}
            except TypeError as err:  # pydantic reports ValueErrors only
                raise ValueError(str(err)) from None
        return data

    @model_validator(mode="after")
    def _consistent(self) -> QueryGroup:
        k = len(self.responses)
        for name in ("scores", "sources", "token_ids", "finish_reasons", "logprobs", "versions",
                     "ref_logprobs"):
            values = getattr(self, name)
            if values is not None and len(values) != k:
                raise ValueError(f"{name} has {len(values)} entries but responses has {k}")
        for i, s in enumerate(self.scores or ()):
            if not math.isfinite(s):
                raise ValueError(f"scores[{i}] is {s}, not a finite number")
        for i, s in enumerate(self.ref_logprobs or ()):
            if s is not None and not math.isfinite(s):
                raise ValueError(f"ref_logprobs[{i}] is {s}, not a finite number")
        if self.counts is not None and (len(self.counts) != k or min(self.counts) < 1):
            raise ValueError(f"counts must hold {k} integers >= 1, got {self.counts}")
        for i, reason in enumerate(self.finish_reasons or ()):
            if reason not in (None, "stop", "length"):
                raise ValueError(f"finish_reasons[{i}] is {reason!r}, not 'stop', 'length' or null")
        if self.token_ids is not None and any(self.token_ids) and not self.tokenizer:
            raise ValueError("token_ids are given but tokenizer (the fingerprint that made them) is not")
        return self

    @property
    def scored(self) -> bool:
        return self.scores is not None

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


def read_groups(path: str | Path, *, scored: bool = True) -> list[QueryGroup]:
    """Read and validate every group of a reference-format JSONL or a Parquet pool file.

    `scored`: every group must carry rewards (training); a group with `scores: null` (sampled,
    not scored yet) is then an error naming its line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    if path.suffix == ".parquet":
        rows = list(enumerate(read_parquet_rows(path)))
        missing = {"query", "responses"} - set(rows[0][1] if rows else {})
        if rows and missing:
            raise DataError(f"{path}: missing column(s) {sorted(missing)}")
        what = "row"
    else:
        rows, what = list(iter_jsonl(path)), "line"
    groups = []
    for number, obj in rows:
        try:
            group = QueryGroup.model_validate(obj)
        except ValidationError as err:
            raise row_error(path, number, err, what) from None
        if scored and not group.scored:
            raise DataError(f"{path} {what} {number}: scores: null, the group is not scored yet "
                            "(score it first: `rrhf-ray score`)")
        groups.append(group)
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
    """Write groups as reference JSONL (.jsonl) or Parquet (.parquet), atomically. Optional
    fields that are unknown are left out of JSONL lines; `scores` is always written (null when
    the group is not scored)."""
    path = Path(path)
    rows = [{**g.model_dump(exclude_none=True), "query": query_json(g.query), "scores": g.scores}
            for g in groups]
    with atomic_path(path) as tmp:
        if path.suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            chat = any(not isinstance(r["query"], str) for r in rows)
            for r in rows:
                for name in QueryGroup.model_fields:
                    r.setdefault(name, None)
                if chat:  # one type a column: conversations in `messages`
                    text = isinstance(r["query"], str)
                    r["query"], r["messages"] = (r["query"], None) if text else (None, r["query"])
            pq.write_table(pa.Table.from_pylist(rows), tmp)
        else:
            with tmp.open("w", encoding="utf-8") as f:
                for r in rows:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """One JSON object a line, atomically."""
    return atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
