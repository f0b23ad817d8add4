"""The RRHF loss (arXiv:2304.05302 eq. 1-5) and its family (RAFT, PRO, SimPO, SLiC-HF, DPO):
hand-worked cases, float64 references in plain Python loops, masking, and batch-split invariance."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from rrhf_ray.loss import (
    LOSSES,
    LossOutput,
    dpo_loss,
    pro_loss,
    raft_loss,
    rrhf_loss,
    sequence_logprobs,
    simpo_loss,
    slic_loss,
)


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


# ---------------------------------------------------------------------------------------------
# The family: RAFT, PRO, SimPO, SLiC-HF, DPO.  The three-candidate case used by several hand-worked
# tests: logp = [-2, -6, -3], |y| = [2, 3, 1], r = [1, 0, 0.5]  →  p = [-1, -2, -3]; best b = 0,
# L_ft = 2 / 2 = 1; strict pairs (worse, better): (1, 0), (1, 2), (2, 0).
# ---------------------------------------------------------------------------------------------

LOGP3, LEN3, R3 = t([-2, -6, -3]), t([2, 3, 1]), t([1, 0, 0.5])


def test_one_output_class_for_every_loss():
    options = {"dpo": {"ref_logp_sum": LOGP3 + 1.0}}
    for name, fn in LOSSES.items():
        out = fn(LOGP3, LEN3, R3, **options.get(name, {}))
        assert type(out) is LossOutput, name
        assert out.num_pairs.item() == 3 and out.best_index.tolist() == [0], name  # the pairs of the case above
    assert set(LOSSES) == {"rrhf", "raft", "pro", "simpo", "slic", "dpo"}
    assert LOSSES["rrhf"] is rrhf_loss and LOSSES["raft"] is raft_loss
    assert LOSSES["pro"] is pro_loss and LOSSES["simpo"] is simpo_loss
    assert LOSSES["slic"] is slic_loss and LOSSES["dpo"] is dpo_loss
    for name in LOSSES:
        assert isinstance(call(name, LOGP3, LEN3, R3), LossOutput)


def test_pro_hand_worked():
    """Sorted best first: 0 (r 1, p -1), 2 (r 0.5, p -3), 1 (r 0, p -2).

    k = 0: gaps to 2 and 1 are 0.5 and 1, τ = 1:
        −log(e^{-1} / (e^{-1} + e^{0.5·-3} + e^{1·-2})) = log(1 + e^{-0.5} + e^{-1}) = 0.680270
    k = 2: only 1 is worse, gap 0.5 = τ:
        −log(e^{0.5·-3} / (e^{0.5·-3} + e^{0.5·-2})) = log(1 + e^{0.5}) = 0.974077
    k = 1: nothing worse, no term.      L_PRO = 1.654347;  L_ft = 1;
    sft_weight = 0.5  →  L = 2.154347.  Accuracy as RRHF's: 2/3.
    """
    out = pro_loss(LOGP3, LEN3, R3, sft_weight=0.5)
    pro = math.log(1 + math.exp(-0.5) + math.exp(-1)) + math.log(1 + math.exp(0.5))
    assert out.rank_loss.item() == pytest.approx(pro, abs=1e-12)
    assert out.sft_loss.item() == pytest.approx(1.0)
    assert out.loss.item() == pytest.approx(pro + 0.5, abs=1e-12)
    assert out.rank_accuracy.item() == pytest.approx(2 / 3)
    assert out.num_pairs.item() == 3
    assert out.best_index.tolist() == [0]


def test_pro_skips_tied_candidates():
    """logp = [-1, -4, -1], |y| = 1, r = [1, 1, 0]  →  p = [-1, -4, -1]; 0 and 1 tie at the top.

    k = 0: only 2 is strictly worse (1 ties: skipped), gap 1 = τ:
        −log(e^{-1} / (e^{-1} + e^{-1})) = log 2 = 0.693147
    k = 1: only 2 is strictly worse, τ = 1:
        −log(e^{-4} / (e^{-4} + e^{-1})) = log(1 + e^3) = 3.048587
    L_PRO = 3.741735, whichever of the tied 0 and 1 the sort puts first.  (Keeping the tie in the
    sum with g = 0 would add e^0 = 1 to k = 0's denominator.)  sft_weight = 0: L = L_PRO.
    """
    expected = math.log(2) + math.log(1 + math.exp(3))
    out = pro_loss(t([-1, -4, -1]), t([1, 1, 1]), t([1, 1, 0]), sft_weight=0.0)
    assert out.loss.item() == pytest.approx(expected, abs=1e-12)
    swapped = pro_loss(t([-4, -1, -1]), t([1, 1, 1]), t([1, 1, 0]), sft_weight=0.0)
    assert swapped.rank_loss.item() == pytest.approx(expected, abs=1e-12)


def test_simpo_hand_worked():
    """β = 2, γ = 1 (the defaults).  Pairs (worse i, better j), z = β(p_j − p_i) − γ:
    (1, 0): 2·(-1 - -2) - 1 = 1;   (1, 2): 2·(-3 - -2) - 1 = -3;   (2, 0): 2·(-1 - -3) - 1 = 3.
    −log σ(z) = log(1 + e^{-z}): 0.313262, 3.048587, 0.048587;  mean L_SimPO = 1.136812.
    sft_weight = 0 (default): L = 1.136812;  sft_weight = 2: L = 1.136812 + 2·1.
    """
    terms = [math.log1p(math.exp(-z)) for z in (1, -3, 3)]
    out = simpo_loss(LOGP3, LEN3, R3)
    assert out.rank_loss.item() == pytest.approx(sum(terms) / 3, abs=1e-12)
    assert out.loss.item() == pytest.approx(sum(terms) / 3, abs=1e-12)
    assert out.sft_loss.item() == pytest.approx(1.0)
    weighted = simpo_loss(LOGP3, LEN3, R3, sft_weight=2.0)
    assert weighted.loss.item() == pytest.approx(sum(terms) / 3 + 2.0, abs=1e-12)


def test_slic_hand_worked():
    """Sequence log-likelihoods, not p: logp_b = -2 (b = 0).  margin δ = 2:
    worse 1: max(0, 2 - -2 + -6) = max(0, -2) = 0;   worse 2: max(0, 2 - -2 + -3) = 1.
    L_cal = (0 + 1) / 2 = 0.5;  L_ft = 1;  sft_weight 0.5  →  L = 1.
    (Length-normalised, candidate 2 would be the safe one: p_0 - p_2 = 2 ≥ δ.)

    Ties with the best are no negatives: logp = [-2, -1, -5], |y| = 1, r = [1, 1, 0], δ = 1:
    b = 0; 1 ties (skipped); 2: max(0, 1 + 2 - 5) = 0  →  L_cal = 0 (it would be 2 with 1 in).
    """
    out = slic_loss(LOGP3, LEN3, R3, margin=2.0, sft_weight=0.5)
    assert out.rank_loss.item() == pytest.approx(0.5)
    assert out.sft_loss.item() == pytest.approx(1.0)
    assert out.loss.item() == pytest.approx(1.0)
    tied = slic_loss(t([-2, -1, -5]), t([1, 1, 1]), t([1, 1, 0]), margin=1.0, sft_weight=0.0)
    assert tied.rank_loss.item() == 0.0
    assert tied.best_index.tolist() == [0]


def test_dpo_hand_worked():
    """ref = [-3, -5, -3]  →  h = logp - ref = [1, -1, 0].  β = 0.5.
    Pairs (worse i, better j), β(h_j − h_i):  (1, 0): 0.5·2 = 1;  (1, 2): 0.5·1 = 0.5;
    (2, 0): 0.5·1 = 0.5.   −log σ(x) = log(1 + e^{-x}): 0.313262, 0.474077, 0.474077;
    L_DPO = 0.420472;  sft_weight 0.1: L = 0.420472 + 0.1·1.
    The ranking accuracy is on the policy's p (2/3), not on h.
    """
    expected = (math.log1p(math.exp(-1)) + 2 * math.log1p(math.exp(-0.5))) / 3
    out = dpo_loss(LOGP3, LEN3, R3, ref_logp_sum=t([-3, -5, -3]), beta=0.5, sft_weight=0.1)
    assert out.rank_loss.item() == pytest.approx(expected, abs=1e-12)
    assert out.loss.item() == pytest.approx(expected + 0.1, abs=1e-12)
    assert out.rank_accuracy.item() == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="ref_logp_sum"):
        dpo_loss(LOGP3, LEN3, R3, ref_logp_sum=t([-3, -5]))


def test_raft_is_rrhf_without_the_rank_term():
    """L = L_ft = 1 for the three-candidate case; rank_loss still reports RRHF's L_rank = 1."""
    out = raft_loss(LOGP3, LEN3, R3)
    assert out.loss.item() == pytest.approx(1.0)
    assert out.rank_loss.item() == pytest.approx(1.0)
    ref = rrhf_loss(LOGP3, LEN3, R3, rank_weight=0.0)
    for field in LossOutput.__dataclass_fields__:
        a, b = getattr(out, field), getattr(ref, field)
        assert torch.equal(a, b) or (a.isnan().all() and b.isnan().all()), field


# Options for the generic tests; SFT_WEIGHT / PREF_WEIGHT: the weights `loss` gives L_ft and the
# preference part.
OPTIONS = {
    "rrhf": {"rank_weight": 0.7, "length_penalty": 0.8},
    "raft": {"length_penalty": 0.8},
    "pro": {"sft_weight": 0.3, "length_penalty": 0.8},
    "simpo": {"beta": 2.5, "gamma": 0.7, "sft_weight": 0.2, "length_penalty": 0.8},
    "slic": {"margin": 3.0, "sft_weight": 0.4},
    "dpo": {"beta": 0.3, "sft_weight": 0.25},
}
SFT_WEIGHT = {"rrhf": 1.0, "raft": 1.0, "pro": 0.3, "simpo": 0.2, "slic": 0.4, "dpo": 0.25}
PREF_WEIGHT = {"rrhf": 0.7, "raft": 0.0, "pro": 1.0, "simpo": 1.0, "slic": 1.0, "dpo": 1.0}


def call(name, logp, lengths, rewards, valid=None, ref=None, **overrides):
    kwargs = {**OPTIONS[name], **overrides}
    if name == "dpo":
        kwargs["ref_logp_sum"] = ref if ref is not None else torch.zeros_like(logp)
    return LOSSES[name](logp, lengths, rewards, valid, **kwargs)


def reference_pairs(r, selection="all"):
    """The (worse, better) pairs of one query's rewards {slot: r} that `selection` names."""
    best = max(r, key=lambda i: (r[i], -i))  # the first index on ties
    worst = min(r, key=lambda i: (r[i], i))
    pairs = [(i, j) for i in r for j in r if r[i] < r[j]]
    if selection == "best_rest":
        return [(i, j) for i, j in pairs if j == best]
    if selection == "best_worst":
        return [(i, j) for i, j in pairs if (i, j) == (worst, best)]
    return pairs


def reference_query(name, cands, selection="all"):
    """(preference part, L_ft, per-query loss) of one query in plain float64 Python.
    cands: [(slot, logp, length, reward, ref_logp)] of its valid candidates, in slot order;
    selection: the `pairs` option of simpo, slic and dpo."""
    o = OPTIONS[name]
    alpha = o.get("length_penalty", 1.0)
    p = {c[0]: c[1] / c[2] ** alpha for c in cands}
    logp = {c[0]: c[1] for c in cands}
    r = {c[0]: c[3] for c in cands}
    pairs = reference_pairs(r, selection)
    best = max(p, key=lambda i: (r[i], -i))
    ft = -logp[best] / next(c[2] for c in cands if c[0] == best)
    if name in ("rrhf", "raft"):
        pref = sum(max(0.0, p[i] - p[j]) for i, j in pairs)
    elif name == "pro":
        order = sorted(p, key=lambda i: -r[i])  # stable: slot order among ties
        pref = 0.0
        for pos, k in enumerate(order):
            worse = [i for i in order[pos + 1:] if r[i] < r[k]]
            if not worse:
                continue
            tau = max(r[k] - r[i] for i in worse)
            num = math.exp(tau * p[k])
            pref -= math.log(num / (num + sum(math.exp((r[k] - r[i]) * p[i]) for i in worse)))
    elif name == "simpo":
        z = [o["beta"] * (p[j] - p[i]) - o["gamma"] for i, j in pairs]
        pref = sum(math.log1p(math.exp(-x)) for x in z) / len(z) if z else 0.0
    elif name == "slic":
        worse = [i for i, j in pairs if j == best]
        hinge = [max(0.0, o["margin"] - logp[best] + logp[i]) for i in worse]
        pref = sum(hinge) / len(hinge) if hinge else 0.0
    elif name == "dpo":
        h = {c[0]: c[1] - c[4] for c in cands}
        z = [o["beta"] * (h[j] - h[i]) for i, j in pairs]
        pref = sum(math.log1p(math.exp(-x)) for x in z) / len(z) if z else 0.0
    return pref, ft, PREF_WEIGHT[name] * pref + SFT_WEIGHT[name] * ft


def random_batch(seed, b=6, k=5, dtype=torch.float64):
    """Rewards in {0, 1, 2, 3} (plenty of ties), ~30 % missing slots holding NaN / 0 / NaN, and
    on even seeds one query with no candidate at all."""
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(b, k, generator=g, dtype=dtype) * 30
    lengths = torch.randint(1, 20, (b, k), generator=g).to(dtype)
    rewards = torch.randint(0, 4, (b, k), generator=g).to(dtype)
    ref = -torch.rand(b, k, generator=g, dtype=dtype) * 30
    valid = torch.rand(b, k, generator=g) > 0.3
    if seed % 2 == 0:
        valid[seed % b] = False
    nan = torch.tensor(float("nan"), dtype=dtype)
    logp, ref = torch.where(valid, logp, nan), torch.where(valid, ref, nan)
    rewards = torch.where(valid, rewards, nan)
    lengths = torch.where(valid, lengths, torch.zeros_like(lengths))
    return logp, lengths, rewards, valid, ref


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_family_matches_float64_reference(name, seed):
    logp, lengths, rewards, valid, ref = random_batch(seed)
    out = call(name, logp, lengths, rewards, valid, ref)
    per_query, prefs, fts, n_pairs, n_correct = [], [], [], 0, 0
    for b in range(logp.shape[0]):
        cands = [(i, float(logp[b, i]), float(lengths[b, i]), float(rewards[b, i]),
                  float(ref[b, i])) for i in range(logp.shape[1]) if valid[b, i]]
        if not cands:
            assert not out.query_mask[b] and out.per_query_loss[b].item() == 0.0
            continue
        pref, ft, loss = reference_query(name, cands)
        assert out.query_mask[b]
        assert out.per_query_loss[b].item() == pytest.approx(loss, abs=1e-6)
        per_query.append(loss)
        prefs.append(pref)
        fts.append(ft)
        alpha = OPTIONS[name].get("length_penalty", 1.0)
        p = {i: lp / ln**alpha for i, lp, ln, _, _ in cands}
        r = {i: rw for i, _, _, rw, _ in cands}
        for i, j in itertools.permutations(p, 2):
            if r[i] < r[j]:
                n_pairs += 1
                n_correct += p[i] < p[j]
    assert out.loss.item() == pytest.approx(sum(per_query) / len(per_query), abs=1e-6)
    assert out.rank_loss.item() == pytest.approx(sum(prefs) / len(prefs), abs=1e-6)
    assert out.sft_loss.item() == pytest.approx(sum(fts) / len(fts), abs=1e-6)
    assert out.num_pairs.item() == n_pairs
    assert out.rank_accuracy.item() == pytest.approx(n_correct / n_pairs)
    assert out.loss.item() == pytest.approx(
        PREF_WEIGHT[name] * out.rank_loss.item() + SFT_WEIGHT[name] * out.sft_loss.item(), abs=1e-9
    )


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_family_no_gradient_through_missing_slots(name):
    """NaN logp, zero length, a reward of 5 or NaN and a NaN reference in the missing slots: the
    loss and every gradient stay finite, and the missing slots get exactly zero gradient."""
    nan = float("nan")
    logp = torch.tensor([[-2.0, -6.0, nan], [-1.0, -3.0, -9.0], [nan, -4.0, nan]],
                        requires_grad=True)
    ref = torch.tensor([[-3.0, -5.0, nan], [-2.0, -2.0, -8.0], [nan, -1.0, nan]],
                       requires_grad=True)
    lengths = torch.tensor([[2.0, 3.0, 0.0], [1.0, 1.0, 3.0], [0.0, 2.0, 0.0]])
    rewards = torch.tensor([[1.0, 0.0, 5.0], [0.0, 1.0, 0.5], [nan, 0.2, 9.0]])
    valid = torch.tensor([[True, True, False], [True, True, True], [False, True, False]])
    out = call(name, logp, lengths, rewards, valid, ref)
    assert torch.isfinite(out.loss) and torch.isfinite(out.per_query_loss).all()
    out.loss.backward()
    assert torch.isfinite(logp.grad).all()
    assert (logp.grad[~valid] == 0).all()
    assert (logp.grad[valid] != 0).any()
    if name == "dpo":
        assert torch.isfinite(ref.grad).all() and (ref.grad[~valid] == 0).all()
    assert out.best_index.tolist() == [0, 1, 1]


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_family_query_without_strict_pair_contributes_only_its_fine_tuning_term(name):
    """Query 0: all rewards tie (0.5) — no pair; b = 0: L_ft = 3 / 2 = 1.5.
    Query 1: a single candidate: L_ft = 4 / 2 = 2.
    Each gives sft_weight · L_ft and nothing else."""
    logp = t([-3, -1, -2], [-4, 0, 0])
    lengths = t([2, 1, 1], [2, 1, 1])
    rewards = t([0.5, 0.5, 0.5], [0.3, 0, 0])
    valid = torch.tensor([[True, True, True], [True, False, False]])
    out = call(name, logp, lengths, rewards, valid, ref=t([-9, 0, 5], [3, 0, 0]))
    w = SFT_WEIGHT[name]
    assert out.per_query_loss.tolist() == pytest.approx([w * 1.5, w * 2.0])
    assert out.rank_loss.item() == 0.0
    assert out.sft_loss.item() == pytest.approx(1.75)
    assert out.loss.item() == pytest.approx(w * 1.75)
    assert out.num_pairs.item() == 0
    assert math.isnan(out.rank_accuracy.item())


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_family_same_loss_for_a_batch_split_in_two(name):
    """The mean of per_query_loss over the union of the halves' query_mask is the whole batch's
    loss (not the mean of the halves' losses: a half may hold the query with no candidate)."""
    logp, lengths, rewards, valid, ref = random_batch(4, b=9, k=4)
    whole = call(name, logp, lengths, rewards, valid, ref)
    halves = [call(name, logp[s], lengths[s], rewards[s], valid[s], ref[s])
              for s in (slice(0, 4), slice(4, None))]
    per_query = torch.cat([h.per_query_loss for h in halves])
    mask = torch.cat([h.query_mask for h in halves])
    assert torch.equal(mask, whole.query_mask) and not mask.all()
    assert per_query[mask].mean().item() == pytest.approx(whole.loss.item(), abs=1e-12)
    assert torch.allclose(per_query, whole.per_query_loss, atol=1e-12)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_family_stays_finite_for_extreme_scores(name):
    """Log-likelihoods of -1e4 per token and reward gaps of 100 (PRO: τ·p ≈ -1e6): no overflow."""
    logp = torch.tensor([[-1e4, -3e4, -2e4, -5.0]], requires_grad=True)
    lengths = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    rewards = torch.tensor([[100.0, 0.0, 50.0, -100.0]])
    out = call(name, logp, lengths, rewards, ref=torch.tensor([[0.0, -1e4, 3e4, -1e4]]))
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(logp.grad).all()


def test_pro_depends_on_the_reward_scale_where_rrhf_does_not():
    """PRO's temperatures are the reward gaps (docs/algorithm.md): the same ranking with rewards
    × 0.01 gives a near-uniform softmax (loss → log of the terms' counts) and a gradient about a
    hundred times smaller; RRHF's hinge reads only the order."""
    torch.manual_seed(0)
    logp = torch.randn(2, 4, dtype=torch.float64) * 5
    lengths = torch.full((2, 4), 5.0, dtype=torch.float64)
    rewards = torch.tensor([[1.0, -1.0, 0.5, 0.0], [0.2, 0.9, -0.4, 0.1]], dtype=torch.float64)

    def grad(fn, scale, **kwargs):
        x = logp.clone().requires_grad_(True)
        out = fn(x, lengths, rewards * scale, **kwargs)
        out.loss.backward()
        return out.loss.item(), x.grad.abs().sum().item()

    (pro1, g1), (pro001, g001) = grad(pro_loss, 1.0, sft_weight=0.0), grad(pro_loss, 0.01, sft_weight=0.0)
    assert g1 / g001 > 50 and pro1 > pro001  # the same ranking, another loss and gradient
    # every position k with worse candidates after it: −log(1 / (1 + #worse)) at zero logits
    assert pro001 == pytest.approx(2 * (math.log(4) + math.log(3) + math.log(2)) / 2, rel=0.05)
    assert grad(rrhf_loss, 1.0) == pytest.approx(grad(rrhf_loss, 0.01))


# ---------------------------------------------------------------------------------------------
# `pairs` of the pairwise losses (simpo, slic, dpo): all (default) | best_worst | best_rest.
# ---------------------------------------------------------------------------------------------

PAIRWISE = ("simpo", "slic", "dpo")


def sp(x):
    """−log σ(x) = log(1 + e^{-x})."""
    return math.log1p(math.exp(-x))


def test_pairs_best_worst_hand_worked():
    """The three-candidate case: b = 0 (r 1), w = 1 (r 0): the one pair (1, 0); candidate 2
    (r 0.5) is left out.  p = [-1, -2, -3], logp = [-2, -6, -3].

    SimPO, β = 2, γ = 1:  z = 2·(-1 - -2) - 1 = 1:  L = log(1 + e^{-1}) = 0.313262.
    DPO, ref = [-3, -5, -3] (h = [1, -1, 0]), β = 0.5:  0.5·(1 - -1) = 1:  L = 0.313262.
    SLiC, δ = 2:  max(0, 2 - -2 + -6) = 0:  L_cal = 0 (all pairs: 0.5, from candidate 2).
    One pair, p_1 = -2 < p_0 = -1: num_pairs 1, rank_accuracy 1 (all pairs: 3 and 2/3).
    """
    one = math.log1p(math.exp(-1))
    simpo = simpo_loss(LOGP3, LEN3, R3, pairs="best_worst")
    dpo = dpo_loss(LOGP3, LEN3, R3, ref_logp_sum=t([-3, -5, -3]), beta=0.5, pairs="best_worst")
    slic = slic_loss(LOGP3, LEN3, R3, margin=2.0, sft_weight=0.0, pairs="best_worst")
    assert simpo.rank_loss.item() == pytest.approx(one, abs=1e-12)
    assert dpo.rank_loss.item() == pytest.approx(one, abs=1e-12)
    assert slic.rank_loss.item() == 0.0
    for out in (simpo, dpo, slic):
        assert out.num_pairs.item() == 1 and out.rank_accuracy.item() == 1.0
        assert out.best_index.tolist() == [0] and out.sft_loss.item() == pytest.approx(1.0)


def test_pairs_best_rest_hand_worked():
    """The three-candidate case: b = 0 against the strictly worse 1 and 2: pairs (1, 0), (2, 0);
    the pair (1, 2) of the all-pairs mean is left out.

    SimPO:  z = 1 and 2·(-1 - -3) - 1 = 3:  (0.313262 + 0.048587) / 2 = 0.180925.
    DPO (h = [1, -1, 0], β = 0.5):  1 and 0.5·(1 - 0) = 0.5:  (0.313262 + 0.474077) / 2 = 0.393670.
    SLiC, δ = 2:  0 and max(0, 2 - -2 + -3) = 1:  L_cal = 0.5, as with all pairs (b is SLiC's
    positive either way), but num_pairs 2 and rank_accuracy 1 (p_1, p_2 < p_0) instead of 3, 2/3.
    """
    simpo = simpo_loss(LOGP3, LEN3, R3, pairs="best_rest")
    dpo = dpo_loss(LOGP3, LEN3, R3, ref_logp_sum=t([-3, -5, -3]), beta=0.5, pairs="best_rest")
    slic = slic_loss(LOGP3, LEN3, R3, margin=2.0, sft_weight=0.0, pairs="best_rest")
    assert simpo.rank_loss.item() == pytest.approx((sp(1) + sp(3)) / 2, abs=1e-12)
    assert dpo.rank_loss.item() == pytest.approx((sp(1) + sp(0.5)) / 2, abs=1e-12)
    assert slic.rank_loss.item() == pytest.approx(0.5)
    for out in (simpo, dpo, slic):
        assert out.num_pairs.item() == 2 and out.rank_accuracy.item() == 1.0
    every = slic_loss(LOGP3, LEN3, R3, margin=2.0, sft_weight=0.0)
    assert every.rank_loss.item() == pytest.approx(0.5) and every.num_pairs.item() == 3


def test_pairs_ties_pick_the_first_index():
    """logp = [-1, -4, -1, -2], |y| = 1 (p = logp), r = [1, 1, 0, 0]: 0 and 1 tie for best,
    2 and 3 for worst.  b = 0 and w = 2, the first of each; candidate 1 is never paired.
    SimPO (β = 2, γ = 1), z = 2·(p_0 − p_i) − 1:
      best_worst: (2, 0): z = -1:  log(1 + e) = 1.313262  (it would be 0.313262 with w = 3);
      best_rest:  (2, 0), (3, 0): z = -1, 1:  (1.313262 + 0.313262) / 2 = 0.813262;
      all:        (2, 0), (3, 0), (2, 1), (3, 1): 4 pairs.
    Swapping slots 2 and 3 makes w = 2 the candidate with p = -2: 0.313262.
    """
    logp, lengths, rewards = t([-1, -4, -1, -2]), t([1, 1, 1, 1]), t([1, 1, 0, 0])
    worst = simpo_loss(logp, lengths, rewards, pairs="best_worst")
    assert worst.rank_loss.item() == pytest.approx(sp(-1), abs=1e-12) and worst.num_pairs.item() == 1
    rest = simpo_loss(logp, lengths, rewards, pairs="best_rest")
    assert rest.rank_loss.item() == pytest.approx((sp(-1) + sp(1)) / 2, abs=1e-12)
    assert rest.num_pairs.item() == 2
    assert simpo_loss(logp, lengths, rewards).num_pairs.item() == 4
    swapped = simpo_loss(t([-1, -4, -2, -1]), lengths, rewards, pairs="best_worst")
    assert swapped.rank_loss.item() == pytest.approx(sp(1), abs=1e-12)


def test_pairs_best_worst_skips_a_missing_slot_as_the_worst():
    """A missing slot holding reward -100 is not the worst: r = [0, 1, (-100)], w = 0, b = 1."""
    out = simpo_loss(t([-1, -2, float("nan")]), t([1, 1, 0]), t([0, 1, -100]),
                     torch.tensor([[True, True, False]]), pairs="best_worst")
    assert out.num_pairs.item() == 1
    assert out.rank_loss.item() == pytest.approx(math.log1p(math.exp(-(2 * (-2 - -1) - 1))))


@pytest.mark.parametrize("selection", ["best_worst", "best_rest"])
@pytest.mark.parametrize("name", PAIRWISE)
def test_pairs_query_without_strict_pair_contributes_only_its_fine_tuning_term(name, selection):
    """All rewards equal (query 0) or one candidate (query 1): no pair under any selection."""
    logp = t([-3, -1, -2], [-4, 0, 0])
    lengths = t([2, 1, 1], [2, 1, 1])
    rewards = t([0.5, 0.5, 0.5], [0.3, 0, 0])
    valid = torch.tensor([[True, True, True], [True, False, False]])
    out = call(name, logp, lengths, rewards, valid, ref=t([-9, 0, 5], [3, 0, 0]), pairs=selection)
    w = SFT_WEIGHT[name]
    assert out.per_query_loss.tolist() == pytest.approx([w * 1.5, w * 2.0])
    assert out.rank_loss.item() == 0.0 and out.num_pairs.item() == 0
    assert math.isnan(out.rank_accuracy.item())


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("selection", ["all", "best_worst", "best_rest"])
@pytest.mark.parametrize("name", PAIRWISE)
def test_pairs_match_float64_reference(name, selection, seed):
    logp, lengths, rewards, valid, ref = random_batch(seed)
    out = call(name, logp, lengths, rewards, valid, ref, pairs=selection)
    per_query, n_pairs, n_correct = [], 0, 0
    alpha = OPTIONS[name].get("length_penalty", 1.0)
    for b in range(logp.shape[0]):
        cands = [(i, float(logp[b, i]), float(lengths[b, i]), float(rewards[b, i]),
                  float(ref[b, i])) for i in range(logp.shape[1]) if valid[b, i]]
        if not cands:
            continue
        _, _, loss = reference_query(name, cands, selection)
        assert out.per_query_loss[b].item() == pytest.approx(loss, abs=1e-6)
        per_query.append(loss)
        p = {i: lp / ln**alpha for i, lp, ln, _, _ in cands}
        for i, j in reference_pairs({i: rw for i, _, _, rw, _ in cands}, selection):
            n_pairs += 1
            n_correct += p[i] < p[j]
    assert out.loss.item() == pytest.approx(sum(per_query) / len(per_query), abs=1e-6)
    assert out.num_pairs.item() == n_pairs
    assert out.rank_accuracy.item() == pytest.approx(n_correct / n_pairs)


# The all-pairs losses' output on random_batch(3) with OPTIONS, recorded from loss.py at commit
# 8a10516 (before `pairs`): (loss, rank_loss, num_pairs, rank_accuracy), float64 as float.hex.
ALL_PAIRS_RECORDED = {
    "simpo": ("0x1.868378b702c08p+1", "0x1.5fde0ddcd1ebcp+1", 22, "0x1.0000000000000p-1"),
    "slic": ("0x1.9dd103fae3fdbp+1", "0x1.50862e4682543p+1", 22, "0x1.1745d1745d174p-1"),
    "dpo": ("0x1.110cdf6aa2500p+1", "0x1.c17c33b3ca8c3p+0", 22, "0x1.1745d1745d174p-1"),
}


@pytest.mark.parametrize("name", PAIRWISE)
def test_pairs_default_is_all_and_gives_the_recorded_numbers_bit_for_bit(name):
    logp, lengths, rewards, valid, ref = random_batch(3)
    default = call(name, logp, lengths, rewards, valid, ref)
    loss, rank, n, accuracy = ALL_PAIRS_RECORDED[name]
    assert default.loss.item() == float.fromhex(loss)
    assert default.rank_loss.item() == float.fromhex(rank)
    assert default.num_pairs.item() == n
    assert default.rank_accuracy.item() == float.fromhex(accuracy)
    explicit = call(name, logp, lengths, rewards, valid, ref, pairs="all")
    for field in LossOutput.__dataclass_fields__:
        a, b = getattr(default, field), getattr(explicit, field)
        assert torch.equal(a, b), field


@pytest.mark.parametrize("name", PAIRWISE)
def test_pairs_unknown_value_is_refused(name):
    with pytest.raises(ValueError, match="pairs must be 'all', 'best_worst' or 'best_rest'"):
        call(name, LOGP3, LEN3, R3, pairs="best")
