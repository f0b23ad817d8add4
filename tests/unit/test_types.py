"""Ranked query-group files: reference JSONL and Parquet, validated row by row."""

from __future__ import annotations

import json

import pytest

from rrhf_ray.types import DataError, QueryGroup, read_groups, reward_stats, write_groups


def write_lines(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = {"query": "\n\nHuman: hi\n\nAssistant:", "responses": [" Hello!", " Go away."], "scores": [1.0, -1.0]}


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"responses": [" a"], "scores": [1.0]}, "line 2: query: Field required"),
        ({**GOOD, "scores": [1.0]}, "line 2: scores has 1 entries but responses has 2"),
        ('{"query": "q", "responses": ["a"], "scores": [NaN]}', "line 2: scores[0] is nan"),
        ({**GOOD, "query": "   "}, "line 2: query is empty"),
        ({**GOOD, "responses": []}, "line 2: responses: List should have at least 1 item"),
        ("{not json", "line 2: not valid JSON"),
    ],
)
def test_malformed_rows_name_the_line(tmp_path, bad, message):
    path = write_lines(tmp_path / "data.jsonl", [GOOD, bad])
    with pytest.raises(DataError) as err:
        read_groups(path)
    assert message in str(err.value)
    assert str(path) in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_groups(tmp_path / "absent.jsonl")


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_round_trip(tmp_path, suffix):
    groups = [
        QueryGroup(**GOOD, sources=["policy@1", "rejected"]),
        QueryGroup(query="\n\nHuman: ünïcode ☃\n\nAssistant:", responses=[" ok"], scores=[0.5]),
    ]
    path = write_groups(groups, tmp_path / f"pool{suffix}")
    assert read_groups(path) == groups
    assert not list(tmp_path.glob(".*tmp*"))  # written under a temp name, then renamed


def test_reward_stats_per_source():
    groups = [
        QueryGroup(query="a", responses=["x", "y"], scores=[1.0, 3.0], sources=["policy", "chosen"]),
        QueryGroup(query="b", responses=["x", "y"], scores=[-1.0, 1.0], sources=["policy", "chosen"]),
    ]
    stats = reward_stats(groups)
    assert stats["policy"] == {"mean": 0.0, "std": 1.0, "max": 1.0, "count": 2.0}
    assert stats["chosen"]["mean"] == 2.0
    assert stats["all"]["count"] == 4.0
