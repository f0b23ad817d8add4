"""The RRHF loss (arXiv:2304.05302 eq. 1-5): hand-worked cases, a float64 reference, masking,
and batch-split invariance."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from rrhf_ray.loss import rrhf_loss, sequence_logprobs


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_hand_worked_three_candidates():
    """logp = [-2, -6, -3], |y| = [2, 3, 1], r = [1, 0, 0.5]  →  p = [-1, -2, -3].

    Pairs r_i < r_j:  (1, 0): max(0, -2 - -1) = 0;  (1, 2): max(0, -2 - -3) = 1;
                      (2, 0): max(0, -3 - -1) = 0.          L_rank = 1.
    Best i' = 0 (r = 1): L_ft(mean) = 2 / 2 = 1;  L_ft(sum) = 2.
    Ranking accuracy: p_1 < p_0 yes, p_1 < p_2 no, p_2 < p_0 yes  →  2/3.
    """
    out = rrhf_loss(t([-2, -6, -3]), t([2, 3, 1]), t([1, 0, 0.5]))
    assert out.rank_loss.item() == pytest.approx(1.0)
    assert out.sft_loss.item() == pytest.approx(1.0)
    assert out.loss.item() == pytest.approx(2.0)
    assert out.rank_accuracy.item() == pytest.approx(2 / 3)
    assert out.num_pairs.item() == 3
    assert out.scores.tolist() == [[-1.0, -2.0, -3.0]]

    summed = rrhf_loss(t([-2, -6, -3]), t([2, 3, 1]), t([1, 0, 0.5]), sft_reduction="sum")
    assert summed.loss.item() == pytest.approx(3.0)

    weighted = rrhf_loss(t([-2, -6, -3]), t([2, 3, 1]), t([1, 0, 0.5]), rank_weight=10.0)
    assert weighted.loss.item() == pytest.approx(11.0)


def test_ties_give_no_pair_and_first_best_wins():
    """logp = [-1, -4, -1], |y| = 1, r = [1, 1, 0]  →  p = [-1, -4, -1].

    Pairs: (2, 0): max(0, -1 - -1) = 0;  (2, 1): max(0, -1 - -4) = 3;  (0, 1) and (1, 0) tie: none.
    L_rank = 3. Best: r_0 = r_1 = 1, the first (0) wins: L_ft = 1 (it would be 4 for index 1).
    """
    out = rrhf_loss(t([-1, -4, -1]), t([1, 1, 1]), t([1, 1, 0]))
    assert out.num_pairs.item() == 2
    assert out.rank_loss.item() == pytest.approx(3.0)
    assert out.best_index.tolist() == [0]
    assert out.sft_loss.item() == pytest.approx(1.0)
    assert out.loss.item() == pytest.approx(4.0)


def test_missing_candidate_is_ignored_and_batch_mean_is_over_queries():
    """Query 0 is the three-candidate case above (L = 2, L_rank = 1, L_ft = 1).
    Query 1 has two candidates and an empty third slot (NaN logp, zero length, reward 100):
    p = [-1, -3], r = [0, 1]: pair (0, 1): max(0, -1 - -3) = 2; best = 1: L_ft = 3; L = 5.
    The slot's reward of 100 must not make it the best.  Batch: L = (2 + 5) / 2 = 3.5,
    L_rank = (1 + 2) / 2 = 1.5, L_ft = (1 + 3) / 2 = 2.
    """
    logp = t([-2, -6, -3], [-1, -3, float("nan")])
    lengths = t([2, 3, 1], [1, 1, 0])
    rewards = t([1, 0, 0.5], [0, 1, 100])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    out = rrhf_loss(logp, lengths, rewards, valid)
    assert out.loss.item() == pytest.approx(3.5)
    assert out.rank_loss.item() == pytest.approx(1.5)
    assert out.sft_loss.item() == pytest.approx(2.0)
    assert out.best_index.tolist() == [0, 1]
    assert out.per_query_loss.tolist() == pytest.approx([2.0, 5.0])


def test_single_candidate_contributes_fine_tuning_only():
    """k = 1: logp = -4, |y| = 2: no pair, L_rank = 0, L_ft = 4 / 2 = 2; accuracy undefined (NaN)."""
    out = rrhf_loss(t([-4]), t([2]), t([0.3]))
    assert out.rank_loss.item() == 0.0
    assert out.loss.item() == pytest.approx(2.0)
    assert out.num_pairs.item() == 0
    assert math.isnan(out.rank_accuracy.item())


def test_all_rewards_equal():
    """r = [0.5, 0.5, 0.5]: no pair at all; best is the first: L = L_ft = 1 / 1."""
    out = rrhf_loss(t([-1, -2, -3]), t([1, 1, 1]), t([0.5, 0.5, 0.5]))
    assert out.rank_loss.item() == 0.0
    assert out.loss.item() == pytest.approx(1.0)


def test_length_penalty_alpha():
    """α = 0 turns p_i into the raw sum: p = [-2, -6], r = [0, 1]: max(0, -2 - -6) = 4."""
    out = rrhf_loss(t([-2, -6]), t([2, 3]), t([0, 1]), length_penalty=0.0)
    assert out.rank_loss.item() == pytest.approx(4.0)


def reference_loss(logp, lengths, rewards, valid, rank_weight, alpha, reduction):
    """Plain-Python float64 loops over the paper's equations."""
    per_query = []
    for b in range(logp.shape[0]):
        idx = [i for i in range(logp.shape[1]) if valid[b, i]]
        if not idx:
            continue
        p = {i: float(logp[b, i]) / float(lengths[b, i]) ** alpha for i in idx}
        rank = sum(max(0.0, p[i] - p[j]) for i, j in itertools.permutations(idx, 2)
                   if float(rewards[b, i]) < float(rewards[b, j]))
        best = max(idx, key=lambda i: (float(rewards[b, i]), -i))
        ft = -float(logp[b, best]) / (float(lengths[b, best]) if reduction == "mean" else 1.0)
        per_query.append(rank_weight * rank + ft)
    return sum(per_query) / len(per_query)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matches_float64_reference(seed, reduction):
    g = torch.Generator().manual_seed(seed)
    b, k = 6, 5
    logp = -torch.rand(b, k, generator=g, dtype=torch.float64) * 30
    lengths = torch.randint(1, 20, (b, k), generator=g).double()
    rewards = torch.randint(0, 4, (b, k), generator=g).double()  # small range: plenty of ties
    valid = torch.rand(b, k, generator=g) > 0.25
    valid[:, 0] = True
    ours = rrhf_loss(logp, lengths, rewards, valid, rank_weight=0.7, length_penalty=0.8,
                     sft_reduction=reduction)
    ref = reference_loss(logp, lengths, rewards, valid, 0.7, 0.8, reduction)
    assert ours.loss.item() == pytest.approx(ref, rel=1e-12)


def test_gradients_flow_only_through_valid_candidates():
    logp = torch.tensor([[-2.0, -6.0, float("nan")], [-1.0, -3.0, -9.0]], requires_grad=True)
    lengths = torch.tensor([[2.0, 3.0, 0.0], [1.0, 1.0, 3.0]])
    rewards = torch.tensor([[1.0, 0.0, 5.0], [0.0, 1.0, 0.5]])
    valid = torch.tensor([[True, True, False], [True, True, True]])
    rrhf_loss(logp, lengths, rewards, valid).loss.backward()
    grad = logp.grad
    assert torch.isfinite(grad).all()
    assert grad[0, 2].item() == 0.0
    # The best candidate of query 0 (index 0) gets the SFT gradient −1/|y| / B = −1/2/2.
    assert grad[0, 0].item() == pytest.approx(-0.25)
    assert (grad[valid] != 0).any()


def test_same_loss_for_a_batch_split_in_two_halves():
    g = torch.Generator().manual_seed(7)
    logp = -torch.rand(8, 4, generator=g) * 10
    lengths = torch.randint(1, 9, (8, 4), generator=g).float()
    rewards = torch.rand(8, 4, generator=g)
    whole = rrhf_loss(logp, lengths, rewards).loss
    halves = (rrhf_loss(logp[:4], lengths[:4], rewards[:4]).loss
              + rrhf_loss(logp[4:], lengths[4:], rewards[4:]).loss) / 2
    assert whole.item() == pytest.approx(halves.item(), rel=1e-6)


def test_shape_and_option_errors():
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        rrhf_loss(torch.zeros(2, 3), torch.ones(2, 2), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="sft_reduction"):
        rrhf_loss(torch.zeros(1, 2), torch.ones(1, 2), torch.zeros(1, 2), sft_reduction="max")


def test_sequence_logprobs_scores_response_tokens_only():
    """Two sequences over a 4-token vocabulary. Row 0: [q, q, r, r, EOS], response from position 2;
    row 1: [q, r, EOS, pad, pad]. Position t's logits predict token t + 1, so the response sum of
    row 0 is log_softmax(logits[1])[r] + log_softmax(logits[2])[r] + log_softmax(logits[3])[EOS]."""
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 4)
    ids = torch.tensor([[0, 1, 2, 2, 3], [0, 2, 3, 0, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]], dtype=torch.bool)
    logp_sum, lengths = sequence_logprobs(logits, ids, mask)
    ls = logits.log_softmax(-1)
    expected0 = ls[0, 1, 2] + ls[0, 2, 2] + ls[0, 3, 3]
    expected1 = ls[1, 0, 2] + ls[1, 1, 3]
    assert lengths.tolist() == [3, 2]
    assert logp_sum[0].item() == pytest.approx(expected0.item(), abs=1e-6)
    assert logp_sum[1].item() == pytest.approx(expected1.item(), abs=1e-6)
    with pytest.raises(ValueError, match="first token"):
        sequence_logprobs(logits, ids, torch.ones_like(mask))
