"""`win_rate`, the bootstrap intervals, the evaluation's seeds and `EvalResult.metrics`: the
per-round evaluation numbers, worked by hand."""

from __future__ import annotations

import math
import random

import pytest

from rrhf_ray.config import EvalConfig, SamplingConfig
from rrhf_ray.evaluation import (
    EVAL_SEED_OFFSET,
    EvalResult,
    bootstrap_ci,
    eval_sampling,
    paired_bootstrap_ci,
    win_rate,
)


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


def test_win_rate_of_no_queries_is_nan_not_an_error() -> None:
    assert math.isnan(win_rate([], []))


# --------------------------------------------------------------------------- intervals


def test_bootstrap_ci_of_constant_values_is_that_value() -> None:
    assert bootstrap_ci([0.25] * 10) == [0.25, 0.25]
    assert bootstrap_ci([]) is None


def test_bootstrap_ci_is_seeded_and_covers_the_mean() -> None:
    rng = random.Random(0)
    values = [rng.gauss(0.3, 1.0) for _ in range(400)]
    mean = sum(values) / len(values)
    ci = bootstrap_ci(values, resamples=1000, seed=7)
    assert ci == bootstrap_ci(values, resamples=1000, seed=7)  # same seed, same interval
    assert ci != bootstrap_ci(values, resamples=1000, seed=8)
    lo, hi = ci
    assert lo < mean < hi
    # the percentile interval of a mean: about ±1.96 σ/√n = ±0.098 here
    assert hi - lo == pytest.approx(2 * 1.96 / math.sqrt(400), rel=0.15)


def test_bootstrap_ci_takes_a_statistic_of_rows() -> None:
    # (sum, count) per query: the statistic is the mean of every sample of the resampled queries
    rows = [[1.0, 2], [3.0, 2], [0.0, 1]]
    ci = bootstrap_ci(rows, lambda r: r[:, 0].sum() / r[:, 1].sum(), resamples=500, seed=0)
    assert 0.0 <= ci[0] <= 0.8 <= ci[1] <= 1.5
    assert bootstrap_ci([[2.0, 2], [4.0, 4]], lambda r: r[:, 0].sum() / r[:, 1].sum()) == [1.0, 1.0]


def test_paired_bootstrap_keeps_the_queries_paired() -> None:
    rng = random.Random(1)
    before = [rng.uniform(-1, 1) for _ in range(200)]  # queries differ a lot from each other ...
    after = [b + 0.1 for b in before]                  # ... but each improved by exactly 0.1

    def diff(a, b):
        return sum(x - y for x, y in zip(a, b)) / len(a)

    assert paired_bootstrap_ci(after, before, diff) == pytest.approx([0.1, 0.1])
    assert paired_bootstrap_ci(after, before, win_rate) == [1.0, 1.0]
    # resampled independently, the same difference of means would look uncertain
    lo, hi = bootstrap_ci(after)
    assert hi - lo > 0.1
    with pytest.raises(ValueError, match="3 values against 2 paired values"):
        paired_bootstrap_ci([1.0, 2.0, 3.0], [1.0, 2.0], diff)


def test_paired_win_rate_interval_brackets_the_win_rate() -> None:
    rng = random.Random(2)
    before = [rng.uniform(-1, 1) for _ in range(300)]
    after = [b + rng.gauss(0.2, 0.5) for b in before]
    lo, hi = paired_bootstrap_ci(after, before, win_rate, resamples=1000, seed=0)
    assert lo < win_rate(after, before) < hi and 0.5 < lo and hi < 1.0


# --------------------------------------------------------------------------- seeds


def test_evaluation_samples_with_the_same_seed_every_round() -> None:
    """Evaluation is a paired comparison across rounds: one fixed seed, whatever the round
    (training rounds mix the round into theirs: tests/unit/test_workflow_paths.py)."""
    sampling, cfg = SamplingConfig(seed=3, n=4, temperature=0.7), EvalConfig(num_samples=2, max_new_tokens=16)
    greedy, sampled = eval_sampling(sampling, cfg)
    assert sampled.seed == 3 + EVAL_SEED_OFFSET and (sampled.n, sampled.temperature) == (2, 0.7)
    assert (greedy.n, greedy.temperature, greedy.max_new_tokens) == (1, 0.0, 16)
    assert eval_sampling(sampling, cfg) == (greedy, sampled)  # no round in it: constant
    assert not sampled.use_beam_search and not greedy.use_beam_search


def test_metrics_are_the_mean_and_population_std_of_greedy_and_sampled_rewards() -> None:
    result = EvalResult(greedy=[1.0, 3.0, 2.0, 2.0], sampled=[[0.0, 1.0], [2.0, 3.0], [4.0], []],
                        greedy_replies=["a", "b", "c", "d"], reference_perplexity=12.5,
                        judge_perplexity=20.0, heldout_rank_accuracy=0.75)
    m = result.metrics([0.0, 3.0, 4.0, 2.0])  # win, tie, loss, tie
    assert set(m) == {"eval_reward_mean", "eval_reward_std", "eval_reward_mean_ci95", "sampled_reward_mean",
                      "sampled_reward_std", "sampled_reward_mean_ci95", "reference_perplexity",
                      "judge_perplexity", "heldout_rank_accuracy",
                      "eval_reply_length_mean", "sampled_reply_length_mean",
                      "win_rate_vs_round0", "win_rate_vs_round0_ci95",
                      "sampled_win_rate_vs_round0", "sampled_win_rate_vs_round0_ci95",
                      "sampled_reward_delta_vs_round0", "sampled_reward_delta_vs_round0_ci95"}
    assert m["eval_reward_mean"] == 2.0
    assert m["eval_reward_std"] == pytest.approx(math.sqrt(0.5))  # deviations 1, 1, 0, 0 over 4
    assert m["sampled_reward_mean"] == 2.0                        # the 5 samples, flattened
    assert m["sampled_reward_std"] == pytest.approx(math.sqrt(2.0))  # (4 + 1 + 0 + 1 + 4) / 5
    assert (m["reference_perplexity"], m["judge_perplexity"], m["heldout_rank_accuracy"]) == (12.5, 20.0, 0.75)
    assert m["win_rate_vs_round0"] == 0.5
    lo, hi = m["win_rate_vs_round0_ci95"]
    assert 0.0 <= lo <= 0.5 <= hi <= 1.0
    assert m["eval_reward_mean_ci95"][0] <= 2.0 <= m["eval_reward_mean_ci95"][1]
    assert m["sampled_reward_mean_ci95"][0] <= 2.0 <= m["sampled_reward_mean_ci95"][1]
    assert m["sampled_reward_delta_vs_round0"] == 0.0 and m["sampled_reward_delta_vs_round0_ci95"] is None


def test_sampled_comparisons_with_round0_are_per_query() -> None:
    now = EvalResult(greedy=[1.0, 1.0, 1.0], sampled=[[1.0, 0.0], [0.5, 0.5], [1.0, 1.0]],
                     greedy_replies=["a", "b", "c"], reference_perplexity=None)
    round0 = [[0.0, 0.0], [0.5, 0.5], [-1.0, 0.0]]  # per-query means 0.0, 0.5, -0.5
    m = now.metrics([0.0, 1.0, 2.0], round0, resamples=200, seed=0)
    assert m["sampled_win_rate_vs_round0"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert m["sampled_reward_delta_vs_round0"] == pytest.approx((0.5 + 0.0 + 1.5) / 3)
    lo, hi = m["sampled_reward_delta_vs_round0_ci95"]
    assert 0.0 <= lo <= 2 / 3 <= hi <= 1.5
    assert m == now.metrics([0.0, 1.0, 2.0], round0, resamples=200, seed=0)  # seeded
    with pytest.raises(ValueError, match="3 sampled rewards against 2 baseline rewards"):
        now.metrics([0.0, 1.0, 2.0], round0[:2])


def test_round0_against_itself_or_without_a_baseline_is_one_half() -> None:
    result = EvalResult(greedy=[1.0, -1.0], sampled=[[1.0], [-1.0]], greedy_replies=["a", "b"],
                        reference_perplexity=None)
    assert result.metrics(None)["win_rate_vs_round0"] == 0.5
    assert result.metrics([])["win_rate_vs_round0"] == 0.5
    assert result.metrics([1.0, -1.0])["win_rate_vs_round0"] == 0.5
    assert result.metrics([0.0, -2.0])["win_rate_vs_round0"] == 1.0
    assert result.metrics(None)["reference_perplexity"] is None
    assert result.metrics(None)["win_rate_vs_round0_ci95"] is None
    assert result.metrics(None)["eval_reward_std"] == 1.0


def test_metrics_of_no_queries_are_nan_not_an_error() -> None:
    m = EvalResult(greedy=[], sampled=[], greedy_replies=[], reference_perplexity=None).metrics(None)
    for key in ("eval_reward_mean", "eval_reward_std", "sampled_reward_mean", "sampled_reward_std"):
        assert math.isnan(m[key]), key
    assert m["win_rate_vs_round0"] == 0.5
    assert m["eval_reward_mean_ci95"] is None and m["sampled_reward_mean_ci95"] is None


def test_a_baseline_of_another_length_is_refused() -> None:
    result = EvalResult(greedy=[1.0, 2.0], sampled=[[1.0], [2.0]], greedy_replies=["a", "b"],
                        reference_perplexity=None)
    with pytest.raises(ValueError, match="2 rewards against 3 baseline rewards"):
        result.metrics([0.0, 0.0, 0.0])


def test_reply_lengths_are_the_mean_response_tokens_of_greedy_and_sampled_replies() -> None:
    result = EvalResult(greedy=[1.0, 0.0], sampled=[[0.0, 1.0], [2.0]], greedy_replies=["a", "b"],
                        reference_perplexity=None, greedy_lengths=[4, 6], sampled_lengths=[[1, 2], [6]])
    m = result.metrics(None)
    assert m["eval_reply_length_mean"] == 5.0 and m["sampled_reply_length_mean"] == 3.0
    unknown = EvalResult(greedy=[1.0], sampled=[[1.0]], greedy_replies=["a"], reference_perplexity=None)
    assert unknown.metrics(None)["eval_reply_length_mean"] is None
