"""`win_rate` and `EvalResult.metrics`: the per-round evaluation numbers, worked by hand."""

from __future__ import annotations

import math

import pytest

from rrhf_ray.evaluation import EvalResult, win_rate


def test_win_rate_counts_wins_over_all_queries() -> None:
    assert win_rate([1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 5.0, 5.0]) == 0.5
    assert win_rate([1.0, 1.0, 1.0], [0.0, 0.0, 0.0]) == 1.0
    assert win_rate([0.0, 0.0], [1.0, 1.0]) == 0.0
    assert win_rate([-1.0, 2.0, 3.0], [-2.0, 2.5, 3.5]) == pytest.approx(1 / 3)


def test_a_tie_counts_one_half() -> None:
    assert win_rate([1.0, 1.0], [1.0, 1.0]) == 0.5
    # one win, one tie, one loss, one tie: (1 + 0.5 + 0 + 0.5) / 4
    assert win_rate([2.0, 1.0, 0.0, -3.0], [1.0, 1.0, 1.0, -3.0]) == 0.5
    assert win_rate([2.0, 1.0, 1.0], [1.0, 1.0, 5.0]) == pytest.approx(1.5 / 3)


def test_win_rate_is_order_sensitive_pairwise_not_a_comparison_of_means() -> None:
    # The same rewards paired with the baseline's queries differently.
    assert win_rate([2.0, 1.0], [1.5, 0.5]) == 1.0
    assert win_rate([1.0, 2.0], [1.5, 0.5]) == 0.5
    assert win_rate([10.0, 0.0, 0.0], [9.0, 1.0, 1.0]) == pytest.approx(1 / 3)  # higher mean, fewer wins


@pytest.mark.parametrize("rewards, baseline", [([1.0, 2.0], [1.0]), ([], [1.0]), ([1.0], [])])
def test_a_length_mismatch_raises(rewards, baseline) -> None:
    with pytest.raises(ValueError, match=rf"{len(rewards)} rewards against {len(baseline)} baseline rewards"):
        win_rate(rewards, baseline)


def test_metrics_are_the_mean_and_population_std_of_greedy_and_sampled_rewards() -> None:
    result = EvalResult(greedy=[1.0, 3.0, 2.0, 2.0], sampled=[[0.0, 1.0], [2.0, 3.0], [4.0], []],
                        greedy_replies=["a", "b", "c", "d"], perplexity=12.5)
    m = result.metrics([0.0, 3.0, 4.0, 2.0])  # win, tie, loss, tie
    assert set(m) == {"eval_reward_mean", "eval_reward_std", "sampled_reward_mean",
                      "sampled_reward_std", "perplexity", "win_rate_vs_round0"}
    assert m["eval_reward_mean"] == 2.0
    assert m["eval_reward_std"] == pytest.approx(math.sqrt(0.5))  # deviations 1, 1, 0, 0 over 4
    assert m["sampled_reward_mean"] == 2.0                        # the 5 samples, flattened
    assert m["sampled_reward_std"] == pytest.approx(math.sqrt(2.0))  # (4 + 1 + 0 + 1 + 4) / 5
    assert m["perplexity"] == 12.5
    assert m["win_rate_vs_round0"] == 0.5


def test_round0_against_itself_or_without_a_baseline_is_one_half() -> None:
    result = EvalResult(greedy=[1.0, -1.0], sampled=[[1.0], [-1.0]], greedy_replies=["a", "b"],
                        perplexity=None)
    assert result.metrics(None)["win_rate_vs_round0"] == 0.5
    assert result.metrics([])["win_rate_vs_round0"] == 0.5
    assert result.metrics([1.0, -1.0])["win_rate_vs_round0"] == 0.5
    assert result.metrics([0.0, -2.0])["win_rate_vs_round0"] == 1.0
    assert result.metrics(None)["perplexity"] is None
    assert result.metrics(None)["eval_reward_std"] == 1.0


def test_metrics_of_no_queries_are_nan_not_an_error() -> None:
    m = EvalResult(greedy=[], sampled=[], greedy_replies=[], perplexity=None).metrics(None)
    for key in ("eval_reward_mean", "eval_reward_std", "sampled_reward_mean", "sampled_reward_std"):
        assert math.isnan(m[key]), key
    assert m["win_rate_vs_round0"] == 0.5


def test_a_baseline_of_another_length_is_refused() -> None:
    result = EvalResult(greedy=[1.0, 2.0], sampled=[[1.0], [2.0]], greedy_replies=["a", "b"], perplexity=None)
    with pytest.raises(ValueError, match="2 rewards against 3 baseline rewards"):
        result.metrics([0.0, 0.0, 0.0])
