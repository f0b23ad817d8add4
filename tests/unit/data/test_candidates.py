"""Candidate sources: presets, duplicate merging, external files, combining per query."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rrhf_ray.actors.sampler import query_seed
from rrhf_ray.data.candidates import (
    combine,
    dataset_candidates,
    get_preset,
    pool_summary,
    read_external,
)
from rrhf_ray.types import (
    Candidate,
    CandidateGroup,
    DataError,
    merge_duplicates,
    read_groups,
    write_groups,
)

Q1 = "\n\nHuman: How do I reset my password?\n\nAssistant:"
Q2 = "\n\nHuman: How do I water a cactus?\n\nAssistant:"


def _record(query: str, responses: list[str], sources: list[str]):
    """A data-set record (rrhf_ray.data.queries.QueryRecord)."""
    from rrhf_ray.data.queries import QueryRecord

    return QueryRecord(query, tuple(responses), tuple(float(-i) for i in range(len(responses))),
                       tuple(sources))


def test_presets_map_to_sources() -> None:
    assert (get_preset("BP").policy, get_preset("BP").beam, get_preset("BP").dataset) == ("initial", True, True)
    assert (get_preset("DP").policy, get_preset("DP").beam, get_preset("DP").dataset) == ("initial", False, True)
    assert (get_preset("D").policy, get_preset("D").dataset) == ("initial", False)
    assert (get_preset("P").policy, get_preset("P").dataset) == (None, True)
    assert get_preset("IP-3") == get_preset("IP")
    assert get_preset("IP-1").policy == "current"
    for bad in ("XP", "DP-2", "IP-0", "ip"):
        with pytest.raises(ValueError, match="unknown sampling preset"):
            get_preset(bad)


def test_identical_responses_merge_and_keep_every_source() -> None:
    group = merge_duplicates(Q1, [
        Candidate(" Open settings.", token_ids=(5, 6), cumulative_logprob=-1.5, source="policy@1", version=1),
        Candidate(" Ask support.", source="policy@1", version=1),
        Candidate("Open settings.", source="chosen"),          # same text up to whitespace
        Candidate(" Open settings.", source="gpt4"),
        Candidate(" Open settings.", source="chosen"),         # same source twice: tagged once
    ])
    assert group.responses == [" Open settings.", " Ask support."]
    assert group.sources == ["policy@1+chosen+gpt4", "policy@1"]
    first = group.candidates[0]
    assert (first.token_ids, first.cumulative_logprob, first.version) == ((5, 6), -1.5, 1)
    assert [c.multiplicity for c in group.candidates] == [4, 1]  # every drawn copy counted


def test_combine_policy_dataset_and_external_in_query_order(tmp_path: Path) -> None:
    ext = tmp_path / "gpt4.jsonl"
    ext.write_text(
        json.dumps({"query": Q2, "responses": [" Water it monthly."], "source": "gpt4"}) + "\n"
        + json.dumps({"query": Q1, "responses": [" Press reset."], "source": "human"}) + "\n"
        + json.dumps({"query": Q2, "responses": [" Rarely."], "source": "human"}) + "\n"
    )
    policy = [[Candidate(" Press reset.", source="policy@2", version=2)],
              [Candidate(" No.", source="policy@2", version=2)]]
    records = [_record(Q1, [" Press reset.", " Whatever."], ["chosen", "rejected"]),
               _record(Q2, [" Water it monthly."], ["chosen"])]
    groups = combine([Q1, Q2], [policy, [dataset_candidates(r) for r in records], read_external(ext)])
    assert [g.query for g in groups] == [Q1, Q2]
    assert groups[0].responses == [" Press reset.", " Whatever."]
    assert groups[0].sources == ["policy@2+chosen+human", "rejected"]
    assert groups[1].responses == [" No.", " Water it monthly.", " Rarely."]
    assert groups[1].sources == ["policy@2", "chosen+gpt4", "human"]

    # The unscored pool round-trips through the reference file format with its sources.
    path = write_groups([g.to_group() for g in groups], tmp_path / "pool.jsonl")
    back = [CandidateGroup.from_group(g) for g in read_groups(path, scored=False)]
    assert [(g.query, g.responses, g.sources) for g in back] == \
        [(g.query, g.responses, g.sources) for g in groups]
    assert '"scores": null' in path.read_text().splitlines()[1]
    # Unscored groups never reach training: the reader that trains names the line.
    with pytest.raises(DataError, match=r"pool\.jsonl line 1: scores: null, the group is not scored yet"):
        read_groups(path)


def test_combine_rejects_misaligned_or_empty_sources() -> None:
    with pytest.raises(ValueError, match="source 0 has 1 entries for 2 queries"):
        combine([Q1, Q2], [[[Candidate("a")]]])
    with pytest.raises(DataError, match="query 1 has no candidate"):
        combine([Q1, Q2], [{Q1: [Candidate("a", source="human")]}])


@pytest.mark.parametrize("line, field", [
    ('{"query": "q", "responses": "not a list", "source": "s"}', "responses"),
    ('{"query": "", "responses": ["a"], "source": "s"}', "query"),
    ('{"query": "q", "responses": ["a"]}', "source"),
    ('not json', "not valid JSON"),
])
def test_external_file_errors_name_line_and_field(tmp_path: Path, line: str, field: str) -> None:
    path = tmp_path / "ext.jsonl"
    path.write_text('{"query": "q", "responses": ["a"], "source": "s"}\n' + line + "\n")
    with pytest.raises(DataError, match=rf"ext.jsonl line 2: {field}"):
        read_external(path)


def test_query_seeds_depend_only_on_base_seed_and_global_index() -> None:
    seeds = [query_seed(7, i) for i in range(1000)]
    assert seeds == [query_seed(7, i) for i in range(1000)]
    assert len(set(seeds)) == 1000 and all(0 <= s < 2**30 for s in seeds)
    assert query_seed(8, 0) != query_seed(7, 0)


def test_multiplicities_travel_through_the_pool_files_and_scoring(tmp_path: Path) -> None:
    policy = [[Candidate(" Yes.", source="policy@1"), Candidate(" Yes.", source="policy@1"),
               Candidate(" yes.", source="policy@1"), Candidate(" No.", source="policy@1")],
              [Candidate(" Maybe.", source="policy@1")]]
    groups = combine([Q1, Q2], [policy])
    unscored = [g.to_group() for g in groups]
    assert unscored[0].counts == [2, 1, 1] and unscored[1].counts is None  # none merged: left out
    for name in ("pool.jsonl", "pool.parquet"):
        back = [CandidateGroup.from_group(g) for g in read_groups(write_groups(unscored, tmp_path / name),
                                                                  scored=False)]
        assert [[c.multiplicity for c in g.candidates] for g in back] == [[2, 1, 1], [1]]
        scored = [g.to_group([1.0] * len(g.candidates)) for g in back]
        assert scored[0].counts == [2, 1, 1]
    assert '"counts"' not in (tmp_path / "pool.jsonl").read_text().splitlines()[1]


def test_a_bad_counts_field_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pool.jsonl"
    path.write_text(json.dumps({"query": Q1, "responses": [" a", " b"], "scores": [1.0, 0.0],
                                "counts": [1, 0]}) + "\n")
    with pytest.raises(DataError, match=r"line 1: counts must hold 2 integers >= 1"):
        read_groups(path)


def test_pool_summary_counts_k_ties_and_the_reward_as_drawn() -> None:
    from rrhf_ray.types import QueryGroup

    groups = [
        QueryGroup(query=Q1, responses=[" a", " b", " c"], scores=[1.0, 0.0, 0.0], counts=[3, 1, 1]),
        QueryGroup(query=Q2, responses=[" a", " b"], scores=[0.5, 0.5]),   # tied: no strict pair
        QueryGroup(query="q3", responses=[" a"], scores=[-1.0], counts=[4]),  # k = 1: no pair
    ]
    s = pool_summary(groups)
    assert s["groups"] == 3
    assert s["k_histogram"] == {"1": 1, "2": 1, "3": 1}
    assert s["groups_without_pair"] == 2
    assert (s["candidates"], s["candidates_premerge"]) == (6, 11)
    assert s["reward_mean"] == pytest.approx((1.0 + 0.0 + 0.0 + 0.5 + 0.5 - 1.0) / 6)
    assert s["reward_mean_premerge"] == pytest.approx((3 * 1.0 + 0 + 0 + 0.5 + 0.5 - 4 * 1.0) / 11)
    assert pool_summary([])["reward_mean"] is None
