"""Candidate sources: where the k candidates of one query come from, combined into one group.

RRHF ranks candidates from anywhere (docs/algorithm.md, "Sampling policies"). The sources here:

- the current policy ρ* (a `SamplerPool` refreshed each round): tag "policy@<version>";
- the frozen initial policy ρ (an optional second pool that never refreshes): "initial@0";
- the data set's own responses (`rrhf_ray.data.queries.QueryRecord`, best first): "chosen", "rejected", …;
- files of responses from other models or humans, JSONL {"query", "responses", "source"}.

Presets name the paper's policies (table 1) as a choice of sources. Diverse beam search is not
offered by vLLM; temperature / top-p sampling (`SamplingParams(n=k)`) stands in for it, the
modern default:

| preset | policy candidates                      | data set responses |
| ------ | -------------------------------------- | ------------------ |
| BP     | beam search by ρ (width n)             | yes                |
| DP     | sampled by ρ                           | yes                |
| D      | sampled by ρ                           | no                 |
| P      | none (offline)                         | yes                |
| IP-n   | sampled by ρ* = round n−1's model      | yes (IP-1 ≡ DP)    |
| OP     | sampled by the current π (each segment) | yes               |

Identical responses to one query (after stripping surrounding whitespace) are merged into one
candidate whose source lists every origin ("policy@1+chosen"): a duplicate would otherwise enter
the ranking loss as a pair with itself, and the fine-tuning term would count it twice.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from rrhf_ray.types import (
    Candidate,
    CandidateGroup,
    DataError,
    QueryGroup,
    iter_jsonl,
    merge_duplicates,
)

CandidateSource = Sequence[Sequence[Candidate]] | Mapping[str, Sequence[Candidate]]
"""Either one list of candidates per query (aligned with the queries) or a map query → list."""


@dataclass(frozen=True)
class Preset:
    """Which sources a named sampling policy uses (see the module table)."""

    name: str
    policy: Literal["initial", "current"] | None  # which sampler draws; None = no sampling
    beam: bool
    dataset: bool


PRESETS: dict[str, Preset] = {
    "BP": Preset("BP", "initial", beam=True, dataset=True),
    "DP": Preset("DP", "initial", beam=False, dataset=True),
    "D": Preset("D", "initial", beam=False, dataset=False),
    "P": Preset("P", None, beam=False, dataset=True),
    "IP": Preset("IP", "current", beam=False, dataset=True),
    # Online (OP-k): the same sources as IP, drawn each segment (`online.refresh_every` steps).
    "OP": Preset("OP", "current", beam=False, dataset=True),
}


def get_preset(name: str) -> Preset:
    """"IP-3" → the IP preset (the round number picks the checkpoint, not the sources)."""
    match = re.fullmatch(r"(BP|DP|D|P|IP|OP)(?:-([1-9]\d*))?", name)
    if not match or (match.group(2) and match.group(1) != "IP"):
        raise ValueError(f"unknown sampling preset {name!r}; known: BP, DP, D, P, IP-n, OP")
    return PRESETS[match.group(1)]


def dataset_candidates(record: Any) -> list[Candidate]:
    """The data set's own responses of a `rrhf_ray.data.QueryRecord`, best first, tagged; one
    cut to `data.max_response_tokens` is marked cut off (finish reason "length": no EOS)."""
    finish = record.finish_reasons or [None] * len(record.responses)
    return [Candidate(text=r, source=s, finish_reason=f) for r, s, f in zip(record.responses, record.sources, finish)]


def read_external(path: str | Path) -> dict[str, list[Candidate]]:
    """Read a JSONL of responses {"query", "responses", "source"} into a map query → candidates.

    A query may appear on several lines (e.g. one per model); its responses are concatenated.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"external responses file not found: {path}")
    out: dict[str, list[Candidate]] = {}
    for lineno, obj in iter_jsonl(path):
        query, responses, source = (obj.get(k) for k in ("query", "responses", "source"))
        if not isinstance(query, str) or not query.strip():
            raise DataError(f"{path} line {lineno}: query: missing or not a non-empty string")
        if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
            raise DataError(f"{path} line {lineno}: responses: expected a list of strings")
        if not isinstance(source, str) or not source.strip():
            raise DataError(f"{path} line {lineno}: source: missing or not a non-empty string")
        out.setdefault(query, []).extend(Candidate(text=r, source=source) for r in responses)
    return out


def combine(queries: Sequence[str], sources: Sequence[CandidateSource]) -> list[CandidateGroup]:
    """One merged group per query, its candidates in the order the sources are given.

    Aligned sources must have one entry per query (a mismatch is a bug upstream, not data to
    drop); mapped sources may miss queries. A query left with no candidate is an error, since
    the trainer cannot rank an empty group.
    """
    for i, src in enumerate(sources):
        if not isinstance(src, Mapping) and len(src) != len(queries):
            raise ValueError(f"source {i} has {len(src)} entries for {len(queries)} queries")
    groups = []
    for qi, query in enumerate(queries):
        found: list[Candidate] = []
        for src in sources:
            found.extend(src.get(query, ()) if isinstance(src, Mapping) else src[qi])
        if not found:
            raise DataError(f"query {qi} has no candidate from any source: {query[:80]!r}")
        groups.append(merge_duplicates(query, found))
    return groups


def pool_summary(groups: Sequence[QueryGroup]) -> dict[str, Any]:
    """The shape of a scored pool (docs/metrics.md, "Pool"): what the ranking term had to work with.

    - `k_histogram`: {k: number of groups with k candidates} after duplicates were merged;
    - `groups_without_pair`: groups with no strict pair (k = 1, or every reward tied): the ranking
      term has nothing to rank there, only the fine-tuning term trains;
    - `candidates` / `candidates_premerge`: candidates after merging / as drawn (Σ `counts`);
    - `reward_mean` / `reward_mean_premerge`: the mean reward over the merged candidates / over the
      drawn ones, each merged candidate weighted by its multiplicity (a duplicate has the reward of
      the text it repeats). A policy that repeats its best reply raises the second, not the first.
    """
    hist: dict[int, int] = {}
    without_pair = 0
    n = n_drawn = 0
    total = total_drawn = 0.0
    for g in groups:
        scores = g.scores or []
        counts = g.counts or [1] * g.k
        hist[g.k] = hist.get(g.k, 0) + 1
        if len(set(scores)) < 2:
            without_pair += 1
        n += len(scores)
        total += sum(scores)
        n_drawn += sum(counts[: len(scores)])
        total_drawn += sum(c * s for c, s in zip(counts, scores))
    return {
        "groups": len(groups),
        "k_histogram": {str(k): hist[k] for k in sorted(hist)},
        "groups_without_pair": without_pair,
        "candidates": n,
        "candidates_premerge": n_drawn,
        "reward_mean": total / n if n else None,
        "reward_mean_premerge": total_drawn / n_drawn if n_drawn else None,
    }
