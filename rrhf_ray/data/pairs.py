"""Training pairs for the stages before RRHF: SFT pairs (query, response) and preference pairs
(query, chosen, rejected) for a reward model.

Sources: the pair JSONL / Parquet of these stages (`{"query", "response"}` or
`{"query", "chosen", "rejected"}`), or any source `rrhf_ray.data.queries` reads (rm-static, hh-rlhf,
reference JSONL, TRL's prompt-completion / messages / preference / implicit-preference layouts,
hub ids, `save_to_disk` directories, builtins), whose records list the data set's responses best
first: SFT takes the best, a preference pair the best and the worst. A conversation's query stays
a conversation (`rrhf_ray.types.Query`): the trainers render it with the tokenizer's chat
template (`rrhf_ray.train.tokens.encode`).

Every row is checked before anything is tokenized: a missing side, an empty text, or a chosen
equal to its rejected raises `DataError` naming the file (or split) and the line (or row).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from rrhf_ray.config import DataConfig
from rrhf_ray.data.queries import (
    LAYOUTS,
    RawSplit,
    convert_rows,
    detect_layout,
    open_source,
    text_field,
)
from rrhf_ray.types import DataError, Query

PairFormat = Literal["auto", "pairs", "rm-static", "hh-rlhf", "reference", "prompt-completion", "preference",
                     "implicit-preference", "messages"]


@dataclass(frozen=True)
class SFTPair:
    """A query x and the response y the policy should learn to give (loss on y + EOS only)."""

    query: Query
    response: str


@dataclass(frozen=True)
class PreferencePair:
    """A query x with a preferred response and a worse one (r_chosen > r_rejected wanted)."""

    query: Query
    chosen: str
    rejected: str


def _source_rows(source: str, fmt: str, split: str) -> tuple[RawSplit, str]:
    """Raw rows with their line / row numbers, and the layout of `rrhf_ray.data.queries` they
    follow ("pairs" for this module's own)."""
    cfg = DataConfig(source=source, split=split, eval_split=None,
                     format="auto" if fmt == "pairs" else fmt)
    raw, _ = open_source(cfg)
    if not raw.rows:
        raise DataError(f"{raw.origin} holds no rows")
    first = raw.rows[0][1]
    if fmt == "pairs" or (
        fmt == "auto" and isinstance(first, Mapping) and "query" in first and "responses" not in first
        and ("response" in first or "chosen" in first or "rejected" in first)
    ):
        return raw, "pairs"
    return raw, detect_layout(raw, fmt)


def _texts(row: Any, layout: str, names: tuple[str, ...], need: int) -> tuple[Query, tuple[str, ...]] | None:
    """(query, texts) of one row, checked; None for an hh-rlhf row whose dialogues diverge."""
    if layout == "pairs":
        query = text_field(row, "query", nonempty=True)
        texts = tuple(text_field(row, n, nonempty=True) for n in names)
    else:
        record = LAYOUTS[layout](row)
        if record is None:  # hh-rlhf dialogues that do not share a prompt: no pair to learn
            return None
        if len(record.responses) < need:
            raise ValueError(
                f"has {len(record.responses)} response(s); "
                + ("SFT needs one" if need == 1 else "a preference pair needs two")
            )
        if need == 2 and record.scores[0] <= record.scores[-1]:
            raise ValueError("its responses all have the same score: no preference to learn")
        query = record.query
        texts = record.responses[:1] if need == 1 else (record.responses[0], record.responses[-1])
        for text, what in zip(texts, names):
            if not text.strip():
                raise ValueError(f"the {what} response is empty")
    if need == 2 and texts[0].strip() == texts[1].strip():
        raise ValueError("chosen and rejected are the same text")
    return query, texts


def _records(source: str, fmt: PairFormat, split: str, need: int) -> list[tuple[Query, tuple[str, ...]]]:
    """(query, texts) of every row: for "pairs" rows the texts are (response,) or (chosen,
    rejected); for the query layouts the data set's responses, best first (at least `need`)."""
    raw, layout = _source_rows(source, fmt, split)
    names = ("response",) if need == 1 else ("chosen", "rejected")
    out, _ = convert_rows(raw, lambda row: _texts(row, layout, names, need))
    if not out:
        raise DataError(f"{raw.origin} holds no usable pairs")
    return out


def read_sft_pairs(source: str, *, format: PairFormat = "auto", split: str = "train") -> list[SFTPair]:
    """Every (query, response) of `source`, validated; see the module docstring for layouts."""
    return [SFTPair(q, t[0]) for q, t in _records(source, format, split, need=1)]


def read_preference_pairs(
    source: str, *, format: PairFormat = "auto", split: str = "train"
) -> list[PreferencePair]:
    """Every (query, chosen, rejected) of `source`, validated; see the module docstring."""
    return [PreferencePair(q, t[0], t[1]) for q, t in _records(source, format, split, need=2)]
