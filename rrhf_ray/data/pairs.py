"""Training pairs for the stages before RRHF: SFT pairs (query, response) and preference pairs
(query, chosen, rejected) for a reward model.

Sources: the pair JSONL / Parquet of these stages (`{"query", "response"}` or
`{"query", "chosen", "rejected"}`), or any source `rrhf_ray.data` reads (rm-static, hh-rlhf,
reference JSONL, hub ids, `save_to_disk` directories, builtins), whose records list the data
set's responses best first: SFT takes the best, a preference pair the best and the worst.

Every row is checked before anything is tokenized: a missing side, an empty text, or a chosen
equal to its rejected raises `DataError` naming the file (or split) and the line (or row).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from rrhf_ray.config import DataConfig
from rrhf_ray.pool import DataError, _row_error

log = logging.getLogger(__name__)

PairFormat = Literal["auto", "pairs", "rm-static", "hh-rlhf", "reference"]


@dataclass(frozen=True)
class SFTPair:
    """A query x and the response y the policy should learn to give (loss on y + EOS only)."""

    query: str
    response: str


@dataclass(frozen=True)
class PreferencePair:
    """A query x with a preferred response and a worse one (r_chosen > r_rejected wanted)."""

    query: str
    chosen: str
    rejected: str


def _source_rows(source: str, fmt: str, split: str) -> tuple[Any, str]:
    """Raw rows with their line / row numbers, and the layout of `rrhf_ray.data` they follow
    ("pairs" for this module's own). The one place that reaches into data.py's row reader."""
    from rrhf_ray import data

    cfg = DataConfig(source=source, split=split, eval_split=None,
                     format="auto" if fmt == "pairs" else fmt)
    raw, _ = data._open(cfg)
    if not raw.rows:
        raise DataError(f"{raw.origin} holds no rows")
    first = raw.rows[0][1]
    if fmt == "pairs" or (
        fmt == "auto" and isinstance(first, Mapping) and "query" in first and "responses" not in first
        and ("response" in first or "chosen" in first or "rejected" in first)
    ):
        return raw, "pairs"
    return raw, data._layout(raw, fmt)


def _field(row: Any, name: str) -> str:
    if not isinstance(row, Mapping):
        raise TypeError(f"expected an object, got {type(row).__name__}")
    if name not in row or row[name] is None:
        raise ValueError(f"missing field {name!r}")
    value = row[name]
    if not isinstance(value, str):
        raise TypeError(f"field {name!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"field {name!r} is empty")
    return value


def _texts(row: Any, layout: str, names: tuple[str, ...], need: int) -> tuple[str, tuple[str, ...]] | None:
    """(query, texts) of one row, checked; None for an hh-rlhf row whose dialogues diverge."""
    from rrhf_ray import data

    if layout == "pairs":
        query, texts = _field(row, "query"), tuple(_field(row, n) for n in names)
    else:
        record = data._LAYOUTS[layout](row)
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


def _records(source: str, fmt: PairFormat, split: str, need: int) -> list[tuple[str, tuple[str, ...]]]:
    """(query, texts) of every row: for "pairs" rows the texts are (response,) or (chosen,
    rejected); for data.py's layouts the data set's responses, best first (at least `need`)."""
    raw, layout = _source_rows(source, fmt, split)
    names = ("response",) if need == 1 else ("chosen", "rejected")
    out, skipped = [], 0
    for number, row in raw.rows:
        try:
            texts = _texts(row, layout, names, need)
        except (ValueError, TypeError) as err:
            problem = err if isinstance(err, ValueError) else ValueError(str(err))
            raise _row_error(Path(raw.origin), number, problem, what=raw.unit) from None
        if texts is None:
            skipped += 1
        else:
            out.append(texts)
    if skipped:
        log.warning("%s: skipped %d %s(s) whose chosen and rejected dialogues do not share the prompt",
                    raw.origin, skipped, raw.unit)
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


def hold_out(items: Sequence[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """(train, held-out): a seeded shuffle with the first `fraction` held out (≥ 1 if > 0).
    Deterministic, so every Ray Train worker computes the same split."""
    order = list(items)
    if fraction <= 0 or len(order) < 2:
        return order, []
    random.Random(f"{seed}:held-out").shuffle(order)
    n = max(1, round(len(order) * fraction))
    return order[n:], order[:n]
