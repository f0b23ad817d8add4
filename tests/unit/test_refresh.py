"""The refresh check's pure parts (`rrhf_ray.refresh`): the probe holds the best and the worst
reply of each group, the statistic does not let differences cancel, the tolerance follows the
served dtype. The check against real engines: tests/integration/actors/test_sampler.py."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from rrhf_ray.refresh import (
    DTYPE_TOLERANCE,
    mean_abs_gap,
    probe_sequences,
    recorded_probe,
    tolerance_for,
)
from rrhf_ray.types import QueryGroup, read_groups, write_groups
from tests.helpers import ranked_rows


def test_the_probe_is_the_best_and_the_worst_reply_of_the_first_groups(tiny_model_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = ranked_rows(6)
    rows[1] = {**rows[1], "scores": [0.5, 0.5, 0.5]}  # nothing to tell apart: its first reply, once
    write_groups([QueryGroup(**r) for r in rows], tmp_path / "pool.parquet")
    groups = read_groups(tmp_path / "pool.parquet")

    probe = probe_sequences(tmp_path / "pool.parquet", tok, n=4)

    expected = []
    for g in groups[:4]:
        best, worst = g.scores.index(max(g.scores)), g.scores.index(min(g.scores))
        for i in dict.fromkeys((best, worst)):
            expected.append((tok(g.query)["input_ids"], tok(g.responses[i], add_special_tokens=False)["input_ids"]))
    assert probe == expected and len(probe) == 7
    assert tok.decode(probe[0][1]).strip().startswith("Sure, happy to help!")  # group 0: best first
    assert "stupid question" in tok.decode(probe[1][1])  # then its worst


def test_the_gap_is_a_mean_of_absolute_per_token_differences():
    new = [[-1.0, -2.0], [-0.5]]
    # Opposite shifts within one reply cancel in a difference of sums; here they count.
    assert mean_abs_gap([[-1.3, -1.7], [-0.5]], new) == pytest.approx(0.2)
    assert mean_abs_gap(new, new) == 0.0
    assert mean_abs_gap([], []) != mean_abs_gap([], [])  # NaN: no probe
    with pytest.raises(ValueError):
        mean_abs_gap([[-1.0]], [[-1.0, -2.0]])  # a replica scored other tokens: a bug, not a gap


def test_the_tolerance_follows_the_served_dtype_unless_configured():
    assert tolerance_for("float32", None) == DTYPE_TOLERANCE["float32"] < tolerance_for("bfloat16", None)
    assert tolerance_for("bfloat16", 0.5) == 0.5


def test_a_probe_recorded_by_a_round_of_the_earlier_check_is_not_compared():
    """A run resumed from before the per-token check (state.earlier_fingerprints lets it) may
    hold a trained round whose probe is one summed log-prob per best reply: not comparable."""
    probe = [([1, 2], [3, 4]), ([1], [5])]
    new, old = [[-1.0, -2.0], [-0.5]], [[-1.5, -2.5], [-0.7]]
    assert recorded_probe({"probe_logprobs": new, "probe_start_logprobs": old}, probe) == (new, old)
    assert recorded_probe({"probe_logprobs": new}, probe) == (new, None)
    assert recorded_probe({"probe_logprobs": [-3.0, -0.5]}, probe) is None  # sums
    assert recorded_probe({"probe_logprobs": [[-1.0, -2.0]]}, probe) is None  # a best-only probe
    assert recorded_probe({}, []) == ([], None)  # nothing to probe: verify_refresh says NaN
