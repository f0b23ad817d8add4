"""Query sources: the paper's data (Anthropic HH), the reference repo's JSONL, or a user's prompts.

Every source becomes the same typed `QueryRecord`s, so the rest of the workflow never sees a
source's layout. Layouts (docs/algorithm.md, "Data"):

- ``rm-static``: `Dahoas/rm-static` rows {prompt, response, chosen, rejected}; chosen ranks first.
- ``hh-rlhf``: raw `Anthropic/hh-rlhf` rows {chosen, rejected}, each a whole dialogue; the query
  is the shared text up to and including the last "\\n\\nAssistant:", the responses what follows.
- ``reference``: the reference repo's JSONL {query, responses, scores[, sources]}.
- ``prompts``: plain prompts {query}.

TRL's and the Hub's layouts (docs/chat.md), each standard (strings) or conversational (lists of
{role, content} messages; a conversational response is one assistant message):

- ``prompt-only`` {prompt}; ``prompt-completion`` {prompt, completion} (the completion is the
  data set's one response, source "completion");
- ``preference`` {prompt, chosen, rejected} (explicit prompt; rm-static is its standard form);
- ``implicit-preference`` {chosen, rejected} as two conversations sharing every turn but the
  last assistant one (hh-rlhf is its raw-text form);
- ``messages`` {messages}: the conversation up to its last assistant turn is the query, that
  turn the data set's response (a conversation that ends on a user turn is a prompt only).

A query that is a conversation stays one (`rrhf_ray.types.parse_query`) unless
`data.chat_template` is off, or auto and the policy's tokenizer has no template: it is then
written in the paper's raw-text layout (`conversation_text`) at load time. `on` renders every
query with the template, raw text as one user turn.

Containers: a hub id or a directory of data files (`datasets.load_dataset`, the same call for
both), a directory written by `save_to_disk`, a single .jsonl / .parquet file, or a loader
registered in `rrhf_ray.registry` and named as ``builtin:<name>``.

Every row is converted (and so validated) before anything is tokenized or shuffled: a malformed
row raises `DataError` naming the file, the row and the field, before any expensive work.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from rrhf_ray import registry
from rrhf_ray.config import DataConfig
from rrhf_ray.train.tokens import chat_template_of, prompt_ids
from rrhf_ray.types import (
    Conversation,
    DataError,
    Message,
    Query,
    QueryGroup,
    conversation_text,
    iter_jsonl,
    parse_query,
    read_parquet_rows,
    row_error,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"


@dataclass(frozen=True)
class QueryRecord:
    """One query x and, optionally, the data set's own responses to it, best first.

    `scores[i]` orders `responses[i]` (higher is better: HH chosen 1.0, rejected 0.0; reference
    JSONL: its scores); `sources[i]` tags where it came from ("chosen", "rejected", "dataset").
    A prompt-only source leaves all three empty.
    """

    query: Query  # raw text or a conversation
    responses: tuple[str, ...] = ()
    scores: tuple[float, ...] = ()
    sources: tuple[str, ...] = ()
    cut: tuple[bool, ...] = ()  # responses cut to data.max_response_tokens (no EOS); () = none

    def __post_init__(self) -> None:
        # Builtin loaders build records by hand; a lopsided record would mis-rank silently later.
        if isinstance(self.query, str):
            if not self.query.strip():
                raise ValueError("query is empty or not a string")
        else:
            object.__setattr__(self, "query", parse_query(self.query))
        object.__setattr__(self, "responses", tuple(self.responses))
        object.__setattr__(self, "scores", tuple(float(s) for s in self.scores))
        sources = tuple(self.sources) or ("dataset",) * len(self.responses)
        object.__setattr__(self, "sources", sources)
        if not len(self.responses) == len(self.scores) == len(self.sources):
            raise ValueError(
                f"{len(self.responses)} responses, {len(self.scores)} scores and "
                f"{len(self.sources)} sources: the three must be the same length"
            )
        object.__setattr__(self, "cut", tuple(self.cut))
        if self.cut and len(self.cut) != len(self.responses):
            raise ValueError(f"{len(self.responses)} responses but {len(self.cut)} cut flags")

    @property
    def finish_reasons(self) -> list[str] | None:
        """"length" for each response cut at load time, "stop" for the others; None when none was cut."""
        return ["length" if c else "stop" for c in self.cut] if any(self.cut) else None

    def to_group(self) -> QueryGroup:
        """The data set's responses as a scored group (the paper's candidate source D)."""
        return QueryGroup(
            query=self.query,
            responses=list(self.responses),
            scores=list(self.scores),
            sources=list(self.sources),
            finish_reasons=self.finish_reasons,
        )


@dataclass
class SourceStats:
    """What happened to one split of a source; every row read lands in exactly one bucket.

    read = kept + dropped + duplicates + diverged + held_out + capped; `truncated` counts kept
    rows whose query was cut from the left to fit `max_prompt_tokens`.
    """

    name: str
    read: int = 0
    kept: int = 0
    truncated: int = 0
    responses_cut: int = 0  # data-set responses of kept rows cut to data.max_response_tokens
    dropped: int = 0  # longer than max_prompt_tokens even after cutting at a turn
    duplicates: int = 0  # a query seen before (in this split or the eval split), as read or as cut
    split: str = ""
    diverged: int = 0  # hh-rlhf rows whose two dialogues do not share a prompt
    held_out: int = 0  # moved to the seeded eval split
    capped: int = 0  # beyond max_prompts / max_eval_prompts

    def summary(self) -> str:
        return (
            f"data {self.name} [{self.split}]: read {self.read}, kept {self.kept}, "
            f"truncated {self.truncated}, dropped {self.dropped} (too long), "
            f"duplicates {self.duplicates}, diverged {self.diverged}, "
            f"held out {self.held_out}, over the cap {self.capped}"
            + (f"; {self.responses_cut} response(s) cut to data.max_response_tokens" if self.responses_cut else "")
        )


@dataclass
class LoadedData:
    """Training and held-out queries, and one `SourceStats` per split (train first)."""

    train: list[QueryRecord]
    eval: list[QueryRecord]
    stats: list[SourceStats]


@dataclass
class RawSplit:
    """The raw rows of one split of a source, before any layout is applied."""

    origin: str  # named in every error: a file path or "<source>[<split>]"
    unit: str  # "line" (JSONL, from 1) or "row" (tables, from 0), as in rrhf_ray.types
    split: str
    rows: list[tuple[int, Any]]  # (line or row number, raw row)


# --------------------------------------------------------------------------- builtins


def _open_builtin(name: str, cfg: DataConfig) -> tuple[RawSplit, RawSplit | None]:
    try:
        loader = registry.lookup("data", name)
    except registry.UnknownBuiltinError as err:
        raise DataError(f"data.source: {err}") from None
    out = loader()
    origin = registry.PREFIX + name
    if isinstance(out, Mapping):
        return _pick_splits(out, origin, cfg)
    return RawSplit(origin, "row", cfg.split, list(enumerate(out))), None


# --------------------------------------------------------------------------- containers


def open_source(cfg: DataConfig) -> tuple[RawSplit, RawSplit | None]:
    """The training split and the source's own eval split (None when it has none), unconverted."""
    source = cfg.source.strip()
    if not source:
        raise DataError(
            "data.source is not set: name a hub id, a file, a directory or builtin:<name>"
        )
    if registry.is_builtin(source):
        return _open_builtin(source.removeprefix(registry.PREFIX), cfg)
    path = Path(source).expanduser()
    if path.suffix in (".jsonl", ".json", ".parquet"):
        if not path.is_file():
            raise DataError(f"data file not found: {path}")
        if path.suffix == ".parquet":
            return RawSplit(str(path), "row", cfg.split, list(enumerate(read_parquet_rows(path)))), None
        rows = list(iter_jsonl(path, objects_only=False))
        return RawSplit(str(path), "line", cfg.split, rows), None
    if path.is_dir() and any((path / n).is_file() for n in ("dataset_dict.json", "state.json")):
        return _pick_splits(_datasets_call("load_from_disk", str(path)), source, cfg)
    # A hub id, or a local directory of data files: one code path, `load_dataset(source)`.
    return _pick_splits(_datasets_call("load_dataset", source), source, cfg)


def _datasets_call(fn: str, source: str) -> Any:
    import datasets

    try:
        return getattr(datasets, fn)(source)
    # Unreachable hub, no such repo or directory, unparsable files: each is "cannot read" to
    # the user, and `datasets` raises a different class for each across versions.
    except Exception as err:  # noqa: BLE001
        raise DataError(f"cannot read data set {source!r} with datasets.{fn}: {err}") from None


def _pick_splits(splits: Any, origin: str, cfg: DataConfig) -> tuple[RawSplit, RawSplit | None]:
    """Train and eval splits of a DatasetDict / mapping; a lone Dataset has no eval split."""
    if not isinstance(splits, Mapping):  # DatasetDict is a dict; a lone Dataset is not
        return RawSplit(origin, "row", cfg.split, _rows(splits)), None
    if cfg.split not in splits:
        raise DataError(
            f"{origin}: no split {cfg.split!r} (data.split); it has {sorted(splits.keys())}"
        )
    train = RawSplit(f"{origin}[{cfg.split}]", "row", cfg.split, _rows(splits[cfg.split]))
    ev = cfg.eval_split
    if ev is None or ev == cfg.split or ev not in splits:
        return train, None
    return train, RawSplit(f"{origin}[{ev}]", "row", ev, _rows(splits[ev]))


def _rows(table: Any) -> list[tuple[int, Any]]:
    rows = table.to_list() if hasattr(table, "to_list") else list(table)
    return list(enumerate(rows))


# --------------------------------------------------------------------------- layouts


def text_field(row: Any, name: str, *, nonempty: bool = False) -> str:
    """Field `name` of a row as a string; the ValueError / TypeError names the field."""
    if not isinstance(row, Mapping):
        raise TypeError(f"expected an object with field {name!r}, got {type(row).__name__}")
    if name not in row:
        raise ValueError(f"missing field {name!r}")
    value = row[name]
    if not isinstance(value, str):
        raise TypeError(f"field {name!r} must be a string, got {type(value).__name__}")
    if nonempty and not value.strip():
        raise ValueError(f"field {name!r} is empty")
    return value


def _pair(query: str, chosen: str, rejected: str) -> QueryRecord:
    return QueryRecord(query, (chosen, rejected), (1.0, 0.0), ("chosen", "rejected"))


def _from_rm_static(row: Any) -> QueryRecord:
    prompt = text_field(row, "prompt", nonempty=True)
    return _pair(prompt, text_field(row, "chosen"), text_field(row, "rejected"))


def _split_dialogue(row: Any, name: str) -> tuple[str, str]:
    """(prompt up to and including the last assistant turn marker, the final response)."""
    text = text_field(row, name, nonempty=True)
    cut = text.rfind(ASSISTANT)
    if cut < 0:
        raise ValueError(f"field {name!r} has no {ASSISTANT!r} turn")
    cut += len(ASSISTANT)
    return text[:cut], text[cut:]


def _from_hh(row: Any) -> QueryRecord | None:
    prompt, chosen = _split_dialogue(row, "chosen")
    other, rejected = _split_dialogue(row, "rejected")
    if other != prompt:
        return None  # the two answers do not answer the same query: no ranking to learn from
    return _pair(prompt, chosen, rejected)


def _from_reference(row: Any) -> QueryRecord:
    if not isinstance(row, Mapping):
        raise TypeError(f"expected a JSON object, got {type(row).__name__}")
    group = QueryGroup.model_validate(row)  # rrhf_ray.types's checks: one definition of a valid group
    if group.scores is None:
        raise ValueError("scores: null, the responses are not ranked (score them first)")
    order = sorted(range(group.k), key=lambda i: -group.scores[i])  # stable: ties keep file order
    sources = group.sources or ["dataset"] * group.k
    return QueryRecord(
        group.query,
        tuple(group.responses[i] for i in order),
        tuple(group.scores[i] for i in order),
        tuple(sources[i] for i in order),
    )


def _from_prompt(row: Any) -> QueryRecord:
    return QueryRecord(query_field(row, "query"))


def query_field(row: Any, name: str) -> Query:
    """Field `name` as a query: a non-empty string, or a list of messages (`parse_query`)."""
    if isinstance(row, Mapping) and isinstance(row.get(name), (list, tuple)):
        return parse_query(row[name], name)
    return text_field(row, name, nonempty=True)


def response_field(row: Any, name: str) -> str:
    """Field `name` as a response: a string, or a conversational one (a list holding one
    assistant message) as that message's content."""
    if not (isinstance(row, Mapping) and isinstance(row.get(name), (list, tuple))):
        return text_field(row, name)
    turns = parse_query(row[name], name)
    if len(turns) != 1 or turns[0].role != "assistant":
        raise ValueError(f"{name} must be one assistant message, got the roles "
                         f"{[m.role for m in turns]}")
    return turns[0].content


def _from_prompt_only(row: Any) -> QueryRecord:
    return QueryRecord(query_field(row, "prompt"))


def _from_prompt_completion(row: Any) -> QueryRecord:
    return QueryRecord(query_field(row, "prompt"), (response_field(row, "completion"),), (1.0,), ("completion",))


def _from_preference(row: Any) -> QueryRecord:
    return _pair(query_field(row, "prompt"), response_field(row, "chosen"), response_field(row, "rejected"))


def _split_conversation(row: Any, name: str) -> tuple[Conversation, str]:
    """(the turns before the last one, the last turn's content): it must be the assistant's."""
    turns = parse_query(row[name] if isinstance(row, Mapping) and name in row else None, name)
    if len(turns) < 2 or turns[-1].role != "assistant":
        raise ValueError(f"{name} must end with an assistant message after at least one other")
    return turns[:-1], turns[-1].content


def _from_implicit(row: Any) -> QueryRecord | None:
    if not isinstance(row, Mapping):
        raise TypeError(f"expected an object with chosen and rejected, got {type(row).__name__}")
    if isinstance(row.get("chosen"), str):
        return _from_hh(row)  # the raw-text form: hh-rlhf's dialogues
    prompt, chosen = _split_conversation(row, "chosen")
    other, rejected = _split_conversation(row, "rejected")
    if other != prompt:
        return None  # the two answers do not answer the same conversation
    return _pair(prompt, chosen, rejected)


def _from_messages(row: Any) -> QueryRecord:
    turns = parse_query(row.get("messages") if isinstance(row, Mapping) else None, "messages")
    if turns[-1].role == "assistant" and len(turns) > 1:
        return QueryRecord(turns[:-1], (turns[-1].content,), (1.0,), ("completion",))
    return QueryRecord(turns)


def _from_record(row: Any) -> QueryRecord:
    if not isinstance(row, QueryRecord):
        raise TypeError(f"expected a QueryRecord, got {type(row).__name__}")
    return row


LAYOUTS: dict[str, Callable[[Any], QueryRecord | None]] = {
    "rm-static": _from_rm_static,
    "hh-rlhf": _from_hh,
    "reference": _from_reference,
    "prompts": _from_prompt,
    "records": _from_record,
    "prompt-only": _from_prompt_only,
    "prompt-completion": _from_prompt_completion,
    "preference": _from_preference,
    "implicit-preference": _from_implicit,
    "messages": _from_messages,
}
# In order: the first layout whose fields a row has wins (rm-static has chosen/rejected too).
# A raw-text row keeps the layout it always had (rm-static, hh-rlhf); conversational rows get
# TRL's names (`_conversational`).
_SIGNATURES = (
    ("reference", frozenset({"query", "responses"})),
    ("rm-static", frozenset({"prompt", "chosen", "rejected"})),
    ("hh-rlhf", frozenset({"chosen", "rejected"})),
    ("prompt-completion", frozenset({"prompt", "completion"})),
    ("messages", frozenset({"messages"})),
    ("prompt-only", frozenset({"prompt"})),
    ("prompts", frozenset({"query"})),
)
_CONVERSATIONAL = {"rm-static": ("preference", "prompt"), "hh-rlhf": ("implicit-preference", "chosen")}


def _conversational(layout: str, row: Mapping) -> str:
    name, field = _CONVERSATIONAL.get(layout, (layout, ""))
    return name if field and isinstance(row.get(field), (list, tuple)) else layout


def detect_layout(raw: RawSplit, fmt: str) -> str:
    """The configured layout, or the one the first row's fields match (format: auto)."""
    if not raw.rows:
        raise DataError(f"{raw.origin} holds no rows")
    number, first = raw.rows[0]
    if isinstance(first, QueryRecord):
        return "records"
    if fmt != "auto":
        return fmt
    if not isinstance(first, Mapping):
        raise DataError(
            f"{raw.origin} {raw.unit} {number}: expected an object, got {type(first).__name__}"
        )
    for layout, needed in _SIGNATURES:
        if needed <= set(first):
            return _conversational(layout, first)
    raise DataError(
        f"{raw.origin} {raw.unit} {number}: cannot tell the layout from fields {sorted(first)}: neither "
        "a prompt nor messages; "
        "expected prompt[+completion | chosen, rejected], messages, chosen+rejected or "
        "query[+responses, scores] (or set data.format)"
    )


def convert_rows(raw: RawSplit, convert: Callable[[Any], T | None]) -> tuple[list[T], list[int]]:
    """`convert` applied to every row: (the converted rows, the numbers of rows it skipped by
    returning None). The first row it rejects (ValueError / TypeError) raises a DataError naming
    the origin, the line or row, and the field; skipped rows are logged once."""
    out, skipped = [], []
    for number, row in raw.rows:
        try:
            item = convert(row)
        except (ValueError, TypeError) as err:  # pydantic's ValidationError is a ValueError too
            raise row_error(raw.origin, number, err, what=raw.unit) from None
        if item is None:
            skipped.append(number)
        else:
            out.append(item)
    if skipped:
        shown = ", ".join(map(str, skipped[:10])) + (" …" if len(skipped) > 10 else "")
        log.warning(
            "%s: skipped %d %s(s) whose chosen and rejected dialogues do not share the "
            "prompt: %s %s",
            raw.origin,
            len(skipped),
            raw.unit,
            raw.unit,
            shown,
        )
    return out, skipped


def _convert(raw: RawSplit, layout: str, stats: SourceStats,
             adapt: Callable[[QueryRecord], QueryRecord] | None = None) -> list[QueryRecord]:
    """Every row as a QueryRecord (then `adapt`ed); the first malformed row raises, diverged HH
    rows are skipped."""
    convert = LAYOUTS[layout]
    if adapt is not None:
        def convert(row: Any, layout_of: Callable[[Any], QueryRecord | None] = convert) -> QueryRecord | None:
            record = layout_of(row)
            return None if record is None else adapt(record)
    records, diverged = convert_rows(raw, convert)
    stats.read, stats.diverged = len(raw.rows), len(diverged)
    return records


# --------------------------------------------------------------------------- selection


def _dedupe(
    records: Iterable[QueryRecord], seen: set[Query], stats: SourceStats
) -> list[QueryRecord]:
    """First occurrence of each query; `seen` holds queries already claimed (by the eval split)."""
    out = []
    for record in records:
        if record.query in seen:
            stats.duplicates += 1
            continue
        seen.add(record.query)
        out.append(record)
    return out


def hold_out(items: Sequence[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """(train, held-out): a seeded shuffle, the first `fraction` held out (≥ 1 if fraction > 0
    and there are at least two items). Deterministic, so every Ray Train worker computes the
    same split."""
    order = list(items)
    if fraction <= 0 or len(order) < 2:
        return order, []
    random.Random(f"{seed}:held-out").shuffle(order)
    n = max(1, round(len(order) * fraction))
    return order[n:], order[:n]


def truncate_query(query: str, tokenizer: Any, max_tokens: int) -> str | None:
    """The query cut from the left at a "\\n\\nHuman:" turn so it fits `max_tokens`, or None.

    Keeps as many of the latest turns as fit (the last turn is what the response answers);
    cutting mid-turn would hand the policy a sentence fragment, so a query whose last turn
    alone is too long, or that has no turn marker, is not cut but dropped (None).
    Tokens are counted as the policy sees them, special tokens included.
    """

    def length(text: str) -> int:
        return len(tokenizer(text)["input_ids"])

    if length(query) <= max_tokens:
        return query
    for match in re.finditer(re.escape(HUMAN), query):
        if match.start() > 0 and length(query[match.start() :]) <= max_tokens:
            return query[match.start() :]  # earliest cut that fits = the most context kept
    return None


def truncate_conversation(query: Conversation, tokenizer: Any, max_tokens: int) -> Conversation | None:
    """The conversation cut from the left at a user turn so its rendered prompt (`prompt_ids`)
    fits `max_tokens`, a system message kept; None when even the last user turn on is too long."""
    if len(prompt_ids(tokenizer, query)) <= max_tokens:
        return query
    system, turns = (query[:1], query[1:]) if query[0].role == "system" else ((), query)
    for i, m in enumerate(turns):
        if i > 0 and m.role == "user" and len(prompt_ids(tokenizer, system + turns[i:])) <= max_tokens:
            return system + turns[i:]  # earliest cut that fits = the most context kept
    return None


def fit_query(query: Query, tokenizer: Any, max_tokens: int) -> Query | None:
    """`truncate_query` for raw text, `truncate_conversation` for a conversation."""
    if isinstance(query, str):
        return truncate_query(query, tokenizer, max_tokens)
    return truncate_conversation(query, tokenizer, max_tokens)


def chat_adapter(mode: str, tokenizer: Any) -> Callable[[QueryRecord], QueryRecord]:
    """What `data.chat_template` (`mode`) does to each record's query (module docstring); with a
    tokenizer, a conversation is rendered once here, so a template that renders it to nothing
    fails on its row. `on` with a tokenizer that has no template is a DataError."""
    template = chat_template_of(tokenizer) if tokenizer is not None else None
    if mode == "on" and tokenizer is not None and not template:
        raise DataError("data.chat_template is on but the policy's tokenizer has no chat_template "
                        "(use auto or off, or a tokenizer with a template: model.tokenizer)")

    def adapt(record: QueryRecord) -> QueryRecord:
        query = record.query
        if isinstance(query, str):
            if mode == "on":
                query = (Message(role="user", content=query),)
        elif mode == "off" or (tokenizer is not None and not template):
            query = conversation_text(query)
        if tokenizer is not None and not isinstance(query, str):
            prompt_ids(tokenizer, query)  # a template that renders it to nothing: ValueError
        return record if query is record.query else replace(record, query=query)

    return adapt


def cap_responses(record: QueryRecord, tokenizer: Any, max_tokens: int) -> tuple[QueryRecord, int]:
    """(`record` with each response over `max_tokens` policy tokens cut from the right to its
    first `max_tokens` tokens and flagged `cut`, how many were cut)."""
    texts, cut = [], []
    for text in record.responses:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        cut.append(len(ids) > max_tokens)
        texts.append(tokenizer.decode(ids[:max_tokens], skip_special_tokens=True) if cut[-1] else text)
    if not any(cut):
        return record, 0
    return replace(record, responses=tuple(texts), cut=tuple(cut)), sum(cut)


def _select(
    records: list[QueryRecord],
    limit: int | None,
    rng: random.Random,
    fit: Callable[[Query], Query | None] | None,
    stats: SourceStats,
    seen: set[Query],
) -> list[QueryRecord]:
    """Shuffle, fit each query to the token budget, stop at `limit`; counts go to `stats`.

    A fitted query already in `seen` (claimed by the held-out split, or by an earlier record of
    this one) is a duplicate: long dialogues that differ only in the turns the cut removes become
    the same query. `seen` gains the queries kept. Fitting is lazy, so a 76k-row source capped at
    1k prompts tokenizes about 1k of them.
    """
    order = list(records)
    rng.shuffle(order)
    kept: list[QueryRecord] = []
    for i, record in enumerate(order):
        if limit is not None and len(kept) >= limit:
            stats.capped = len(order) - i
            break
        query = fit(record.query) if fit else record.query
        if query is None:
            stats.dropped += 1
            continue
        if query in seen:
            stats.duplicates += 1
            continue
        seen.add(query)
        if query != record.query:
            stats.truncated += 1
            record = replace(record, query=query)
        kept.append(record)
    stats.kept = len(kept)
    return kept


# --------------------------------------------------------------------------- entry point


def load_data(cfg: DataConfig, tokenizer: Any = None, *, chat_tokenizer: Any = None) -> LoadedData:
    """Read `cfg.source`, validate every row, de-duplicate, split, fit to the token budget, cap.

    `tokenizer` (the policy's) enables the `max_prompt_tokens` policy; without it queries are
    kept whole. The eval split is the source's own (`eval_split`) when it has one, else a seeded
    `eval_fraction` of the training queries. A training query equal to an eval query is dropped
    from training (counted as a duplicate) so the held-out set stays held out: compared as read,
    and again as fitted to the budget, held-out queries first. With a tokenizer and
    `max_response_tokens`, the training rows' own responses are capped (`cap_responses`); the
    held-out references stay whole (the perplexity reads them within train.max_length).
    `chat_tokenizer` (without `tokenizer`): the policy's tokenizer for `data.chat_template` alone,
    no budget fit (the preflight's check that every conversation renders).
    """
    adapt = chat_adapter(cfg.chat_template, tokenizer if tokenizer is not None else chat_tokenizer)
    train_raw, eval_raw = open_source(cfg)
    layout = detect_layout(train_raw, cfg.format)
    train_stats = SourceStats(cfg.source, split=train_raw.split)
    train = _convert(train_raw, layout, train_stats, adapt)
    if eval_raw is not None:
        eval_stats = SourceStats(cfg.source, split=eval_raw.split)
        seen: set[Query] = set()
        held = _dedupe(_convert(eval_raw, layout, eval_stats, adapt), seen, eval_stats)
        train = _dedupe(train, seen, train_stats)
    else:
        train = _dedupe(train, set(), train_stats)
        train, held = hold_out(train, cfg.eval_fraction, cfg.seed)
        train_stats.held_out = len(held)
        eval_stats = SourceStats(cfg.source, read=len(held), split="held-out")

    fit = (
        None
        if tokenizer is None
        else (lambda q: fit_query(q, tokenizer, cfg.max_prompt_tokens))
    )
    claimed: set[Query] = set()
    held = _select(held, cfg.max_eval_prompts, random.Random(f"{cfg.seed}:eval"), fit, eval_stats, claimed)
    train = _select(train, cfg.max_prompts, random.Random(f"{cfg.seed}:train"), fit, train_stats, claimed)
    if tokenizer is not None and cfg.max_response_tokens is not None:
        for i, record in enumerate(train):
            train[i], n = cap_responses(record, tokenizer, cfg.max_response_tokens)
            train_stats.responses_cut += n
    for stats in (train_stats, eval_stats):
        log.info(stats.summary())
    if not train:
        raise DataError(
            f"data.source {cfg.source!r} leaves no training queries: {train_stats.summary()}"
            + (" (raise data.max_prompt_tokens?)" if train_stats.dropped else "")
        )
    return LoadedData(train, held, [train_stats, eval_stats])
