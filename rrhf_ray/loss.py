"""Ranking losses over groups of scored candidates, pure torch: RRHF and its family.

RRHF (Yuan et al., "RRHF: Rank Responses to Align Language Models with Human Feedback without
tears", NeurIPS 2023, arXiv:2304.05302, eq. 1-5). For a query x with candidates y_1 … y_k and
rewards r_1 … r_k:

    p_i    = Σ_t log π(y_i,t | x, y_i,<t) / |y_i|^α                      (eq. 1, α = length_penalty)
    L_rank = Σ_{r_i < r_j} max(0, p_i − p_j)                             (eq. 2, all ordered pairs,
                                                                           strict: ties give no pair)
    L_ft   = −Σ_t log π(y_i',t | x, y_i',<t),   i' = argmax_i r_i        (eq. 4, first index on ties)
    L      = w_rank · L_rank + L_ft                                      (eq. 5)

`sft_reduction="mean"` divides L_ft by |y_i'| (the authors' code keeps L_ft on the per-token
scale of the p_i; unlike that code, the divisor here is the response's own length, not the
padded width). The batch loss is the mean over queries that have at least one valid candidate.

The rest of the family reads the same [B, K] tensors and shares these definitions, per query and
over its valid candidates only:

    strict pairs  (i, j) with r_i < r_j (i the worse; ties give no pair)
    b             the best candidate, argmax_i r_i, first index on ties
    p_i           logp_sum_i / lengths_i^α
    L_ft          −logp_sum_b / lengths_b                  (always per token, for every loss below)
    L             preference part + sft_weight · L_ft      (preference part 0 without a strict pair)

and the batch loss is the mean of L over the queries with at least one valid candidate:

    raft   RAFT / best-of-k fine-tuning (Dong et al., arXiv:2304.06767): RRHF with w_rank = 0.
    pro    PRO (Song et al., arXiv:2306.17492): listwise softmax, reward-gap temperature.
    simpo  SimPO (Meng et al., arXiv:2405.14734, eq. 6): mean over pairs of −log σ(β(p_j−p_i) − γ).
    slic   SLiC-HF (Zhao et al., arXiv:2305.10425, eq. 1): mean over worse i of
           max(0, δ − logp_sum_b + logp_sum_i).
    dpo    DPO (Rafailov et al., arXiv:2305.18290, eq. 7): mean over pairs of −log σ(β(h_j − h_i)),
           h = logp_sum − ref_logp_sum.

The pairwise losses (simpo, slic, dpo) take `pairs`, which strict pairs of a query they read
(`_select_pairs`): "all" (default: every strict pair), "best_worst" (one pair: the worst candidate w,
argmin_i r_i with the first index on ties, against b) or "best_rest" (b against every strictly
worse candidate). Their `num_pairs` and `rank_accuracy` count the pairs selected. slic compares
every negative with b alone, so "all" and "best_rest" give it the same loss (its diagnostics still
differ). rrhf, raft and pro always read every strict pair.

Every loss returns a `LossOutput`, so that a trainer and a metric meter read any of them the same
way; `LOSSES` maps the names above to the functions. The run config picks one by name
(`train.loss.name`, `rrhf_ray.config.LossConfig`: one settings class per loss, its fields this
function's keyword options with the same defaults), and the trainer calls it with those settings
(`rrhf_ray.train.rrhf.loss_function`). Adding a loss is one function here (registered in
`LOSSES`) and one class in config/training.py (added to `LossConfig`); tests/unit/test_config.py checks that
the two cover the same names and options, and `rrhf-ray compare` gets it as a built-in variant.

Shapes: B queries, K candidate slots. A query with fewer than K candidates marks the missing
slots False in `valid`; their values (logp, length, reward, reference logp) are ignored, replaced
by neutral values before any arithmetic, and receive no gradient (NaN there stays out).

This module imports nothing of Ray, vLLM or the rest of the project.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LOSSES",
    "LossOutput",
    "Pairs",
    "dpo_loss",
    "pro_loss",
    "raft_loss",
    "rrhf_loss",
    "sequence_logprobs",
    "simpo_loss",
    "slic_loss",
]


@dataclass
class LossOutput:
    """What every loss of this module returns. Scalars are means over the queries that have at
    least one valid candidate, so that loss = w_pref · rank_loss + w_sft · sft_loss (RRHF:
    w_pref = rank_weight, w_sft = 1; the others: w_pref = 1, w_sft = sft_weight).

    loss: scalar tensor (differentiable), the mean of per_query_loss over query_mask.
    rank_loss: scalar, the preference part, unweighted (RRHF's L_rank, PRO's listwise term, …).
    sft_loss: scalar, L_ft, unweighted.
    per_query_loss: [B] the loss of each query (0 for a query with no candidate).
    query_mask: [B] bool, queries that count in the means.
    scores: [B, K] the length-normalised log-probabilities p_i (0 where invalid); α is the loss's
        length_penalty, 1 for the losses that have none (slic, dpo).
    best_index: [B] b = argmax_i r_i over valid candidates (first index on ties).
    rank_accuracy: scalar, fraction of the loss's pairs (i, j), r_i < r_j, with p_i < p_j (NaN if
        no pair).
    num_pairs: scalar long, the loss's pairs: every ordered pair with a strict reward difference,
        or those its `pairs` option selects (simpo, slic, dpo).
    """

    loss: Tensor
    rank_loss: Tensor
    sft_loss: Tensor
    per_query_loss: Tensor
    query_mask: Tensor
    scores: Tensor
    best_index: Tensor
    rank_accuracy: Tensor
    num_pairs: Tensor


@dataclass
class _Group:
    """The shared per-query quantities, with neutral values in the invalid slots."""

    valid: Tensor  # [B, K] bool
    logp: Tensor  # [B, K] logp_sum, 0 where invalid
    length: Tensor  # [B, K] |y_i| ≥ 1, 1 where invalid
    rewards: Tensor  # [B, K] r_i in logp's dtype, 0 where invalid
    scores: Tensor  # [B, K] p_i
    pair_mask: Tensor  # [B, K, K] [b, i, j]: r_i < r_j, both valid (narrowed by _select_pairs)
    best: Tensor  # [B] long
    query_mask: Tensor  # [B] bool


def _check_shapes(logp_sum: Tensor, lengths: Tensor, rewards: Tensor) -> None:
    if logp_sum.dim() != 2 or lengths.shape != logp_sum.shape or rewards.shape != logp_sum.shape:
        raise ValueError(
            f"logp_sum, lengths and rewards must share one [B, K] shape, got "
            f"{tuple(logp_sum.shape)}, {tuple(lengths.shape)}, {tuple(rewards.shape)}"
        )


def _group(
    logp_sum: Tensor, lengths: Tensor, rewards: Tensor, valid: Tensor | None, length_penalty: float
) -> _Group:
    _check_shapes(logp_sum, lengths, rewards)
    if valid is None:
        valid = torch.ones_like(logp_sum, dtype=torch.bool)
    valid = valid.bool()

    # Neutral values in missing slots, so that neither the forward nor the backward sees them
    # (a zero length there would turn the masked-out gradient into 0 · inf = NaN, and a NaN
    # reward would reach the gradient through the reward gaps of PRO).
    logp = torch.where(valid, logp_sum, torch.zeros_like(logp_sum))
    length = torch.where(valid, lengths.to(logp.dtype), torch.ones_like(logp)).clamp_min(1.0)
    scores = logp / length.pow(length_penalty)  # p_i, eq. 1
    r = torch.where(valid, rewards.to(logp.dtype), torch.zeros_like(logp))

    # Ordered pairs (i, j) with r_i < r_j among valid candidates: mask[b, i, j].
    pair_mask = (r.unsqueeze(2) < r.unsqueeze(1)) & valid.unsqueeze(2) & valid.unsqueeze(1)
    # Best candidate: argmax over valid rewards; torch.argmax returns the first maximum.
    best = torch.where(valid, r, torch.full_like(r, float("-inf"))).argmax(dim=1)
    return _Group(valid, logp, length, r, scores, pair_mask, best, valid.any(dim=1))


Pairs = Literal["all", "best_worst", "best_rest"]
"""Which strict pairs of a query a pairwise loss reads (`_select_pairs`)."""


def _select_pairs(g: _Group, pairs: Pairs) -> _Group:
    """`g` with its pair mask narrowed to the pairs `pairs` names; its best b is unchanged.

        all         every strict pair (i, j), r_i < r_j: `g` itself.
        best_rest   (i, b) for every i with r_i < r_b.
        best_worst  (w, b) alone, w = argmin_i r_i over valid candidates, the first index on ties
                    (as b is the first on ties); none when r_w = r_b (all rewards equal, or one
                    candidate).

    A candidate tied with b is never paired with anything under best_rest or best_worst, and a
    candidate tied with w is not the worst under best_worst.
    """
    if pairs not in ("all", "best_worst", "best_rest"):
        raise ValueError(f"pairs must be 'all', 'best_worst' or 'best_rest', got {pairs!r}")
    if pairs == "all":
        return g
    slots = torch.arange(g.valid.shape[1], device=g.valid.device)
    keep = slots[None, None, :] == g.best[:, None, None]  # [B, 1, K]: j = b
    if pairs == "best_worst":
        # torch.argmin returns the first minimum.
        worst = torch.where(g.valid, g.rewards, torch.full_like(g.rewards, float("inf"))).argmin(dim=1)
        keep = keep & (slots[None, :, None] == worst[:, None, None])  # i = w
    return replace(g, pair_mask=g.pair_mask & keep)


def _best(g: _Group, x: Tensor) -> Tensor:
    return x.gather(1, g.best[:, None]).squeeze(1)


def _sft_mean(g: _Group) -> Tensor:
    """[B] L_ft = −logp_sum_b / |y_b|."""
    return -_best(g, g.logp) / _best(g, g.length)


def _pair_mean(g: _Group, values: Tensor) -> Tensor:
    """[B] mean over each query's strict pairs of values[b, i, j] (0 without a pair)."""
    total = torch.where(g.pair_mask, values, torch.zeros_like(values)).sum(dim=(1, 2))
    return total / g.pair_mask.sum(dim=(1, 2)).clamp_min(1)


def _with_sft(g: _Group, rank: Tensor, sft_weight: float) -> LossOutput:
    """The output of a loss whose per-query value is its preference part + sft_weight · L_ft."""
    sft = _sft_mean(g)
    return _output(g, rank, sft, rank + sft_weight * sft)


def _output(g: _Group, rank: Tensor, sft: Tensor, per_query: Tensor) -> LossOutput:
    per_query = torch.where(g.query_mask, per_query, torch.zeros_like(per_query))
    n = g.query_mask.sum().clamp_min(1)

    def mean(x: Tensor) -> Tensor:
        return torch.where(g.query_mask, x, torch.zeros_like(x)).sum() / n

    with torch.no_grad():
        num_pairs = g.pair_mask.sum()
        diff = g.scores.unsqueeze(2) - g.scores.unsqueeze(1)  # p_i − p_j
        correct = ((diff < 0) & g.pair_mask).sum()
        accuracy = correct.double() / num_pairs if num_pairs > 0 else torch.tensor(float("nan"))

    return LossOutput(
        loss=mean(per_query),
        rank_loss=mean(rank),
        sft_loss=mean(sft),
        per_query_loss=per_query,
        query_mask=g.query_mask,
        scores=torch.where(g.valid, g.scores, torch.zeros_like(g.scores)),
        best_index=g.best,
        rank_accuracy=accuracy,
        num_pairs=num_pairs,
    )


def rrhf_loss(
    logp_sum: Tensor, lengths: Tensor, rewards: Tensor, valid: Tensor | None = None, *,
    rank_weight: float = 1.0,
    length_penalty: float = 1.0,
    sft_reduction: Literal["mean", "sum"] = "mean",
) -> LossOutput:
    """RRHF loss of a batch of queries.

    Args:
        logp_sum: [B, K] Σ_t log π(y_i,t | …) over each candidate's response tokens (EOS included).
        lengths:  [B, K] |y_i|, the number of response tokens summed in `logp_sum`.
        rewards:  [B, K] r_i.
        valid:    [B, K] bool, False for a missing candidate; default all True.
        rank_weight: w_rank; 0 leaves only the fine-tuning term.
        length_penalty: α.
        sft_reduction: "mean" (−logp/|y|, default) or "sum" (−logp, eq. 4 literally).
    """
    _check_shapes(logp_sum, lengths, rewards)
    if sft_reduction not in ("mean", "sum"):
        raise ValueError(f"sft_reduction must be 'mean' or 'sum', got {sft_reduction!r}")
    g = _group(logp_sum, lengths, rewards, valid, length_penalty)

    diff = g.scores.unsqueeze(2) - g.scores.unsqueeze(1)  # p_i − p_j
    rank_per_query = (diff.clamp_min(0.0) * g.pair_mask).sum(dim=(1, 2))  # eq. 2
    sft_per_query = _sft_mean(g) if sft_reduction == "mean" else -_best(g, g.logp)
    per_query = rank_weight * rank_per_query + sft_per_query
    return _output(g, rank_per_query, sft_per_query, per_query)


def raft_loss(
    logp_sum: Tensor, lengths: Tensor, rewards: Tensor, valid: Tensor | None = None, *,
    length_penalty: float = 1.0,
    sft_reduction: Literal["mean", "sum"] = "mean",
) -> LossOutput:
    """RAFT / best-of-k fine-tuning (Dong et al., "RAFT: Reward rAnked FineTuning",
    arXiv:2304.06767): L = L_ft of the best candidate only, i.e. `rrhf_loss` with rank_weight = 0.

    The output is `rrhf_loss`'s: `rank_loss` still reports RRHF's L_rank (and `rank_accuracy` the
    ranking of the p_i) as diagnostics, with no weight in `loss`. `length_penalty` only changes
    those diagnostics. Arguments as for `rrhf_loss`.
    """
    return rrhf_loss(
        logp_sum, lengths, rewards, valid,
        rank_weight=0.0, length_penalty=length_penalty, sft_reduction=sft_reduction,
    )


def pro_loss(
    logp_sum: Tensor, lengths: Tensor, rewards: Tensor, valid: Tensor | None = None, *,
    sft_weight: float = 0.05,
    length_penalty: float = 1.0,
) -> LossOutput:
    """PRO, Preference Ranking Optimization (Song et al., arXiv:2306.17492): a listwise
    (Plackett-Luce) softmax over the ranking, each step's logits scaled by reward gaps.

    Sort the valid candidates by reward, best first; for each position k that has a strictly worse
    candidate after it, with the gaps g_ki = r_(k) − r_(i) > 0 and τ_k = max_i g_ki,

        L_PRO = Σ_k −log( e^{τ_k·p_(k)} / (e^{τ_k·p_(k)} + Σ_{i>k, r_(i) < r_(k)} e^{g_ki·p_(i)}) )
        L     = L_PRO + sft_weight · L_ft

    (the paper's temperatures T = 1/g, T_k^k = min_i T_k^i). Ties are skipped, as RRHF's strict
    pairs: the sum runs over the strictly worse candidates only, never over one tied with the
    candidate at k. So every candidate that has a strictly worse one gets its own term, whatever
    order the sort leaves ties in. (The authors' code keeps a tied candidate in the sum with g = 0,
    adding e^0 = 1 to the denominator.)

    Default sft_weight = 0.05: the `--sft_weight 0.05` of the authors' training scripts
    (github.com/AlibabaResearch/DAMO-ConvAI, PRO/train/train_hh.sh). Their code multiplies it by
    (n − 1)² for a ranking of length n (0.05 is exact for n = 2; pass 0.05·(n−1)² to follow the
    schedule) and applies it to the summed NLL −logp_sum_b, where L_ft here is per token, so their
    value is a starting point, not an equivalent. p_i is per token in the paper (α = 1).

    The gaps are temperatures, so unlike RRHF's hinge the loss depends on the rewards' scale:
    rewards × 0.01 give a nearly uniform softmax and a gradient about 100× smaller
    (docs/algorithm.md).

    Args: as for `rrhf_loss`; sft_weight weighs L_ft; length_penalty: α.
    """
    g = _group(logp_sum, lengths, rewards, valid, length_penalty)
    # worse[b, k, i]: candidate i is strictly worse than candidate k (= pair (i, k)).
    worse = g.pair_mask.transpose(1, 2)
    gap = g.rewards.unsqueeze(2) - g.rewards.unsqueeze(1)  # [b, k, i] r_k − r_i
    tau = torch.where(worse, gap, torch.zeros_like(gap)).amax(dim=2)  # [b, k] τ_k (0 if none)
    positive = tau * g.scores  # τ_k · p_k
    negatives = torch.where(worse, gap * g.scores.unsqueeze(1), torch.full_like(gap, float("-inf")))
    logits = torch.cat([positive.unsqueeze(2), negatives], dim=2)  # [b, k, 1 + K]
    step = logits.logsumexp(dim=2) - positive  # −log softmax of the positive
    rank = torch.where(worse.any(dim=2), step, torch.zeros_like(step)).sum(dim=1)
    return _with_sft(g, rank, sft_weight)


def simpo_loss(
    logp_sum: Tensor, lengths: Tensor, rewards: Tensor, valid: Tensor | None = None, *,
    beta: float = 2.0,
    gamma: float = 1.0,
    sft_weight: float = 0.0,
    length_penalty: float = 1.0,
    pairs: Pairs = "all",
) -> LossOutput:
    """SimPO, Simple Preference Optimization (Meng et al., arXiv:2405.14734, eq. 6), over the
    strict pairs (i worse, j better) of each query that `pairs` selects (`_select_pairs`):

        L_SimPO = mean_{(i, j) selected} −log σ(β·(p_j − p_i) − γ)   (computed as softplus, stable)
        L       = L_SimPO + sft_weight · L_ft

    The paper trains on (chosen, rejected) pairs; with several samples per prompt, its on-policy
    recipe takes the highest- and lowest-scored as chosen and rejected: `pairs="best_worst"`. The
    default "all" averages over every strict pair.

    The paper's reward is (β/|y|)·log π(y|x), i.e. β·p with α = 1, and γ is the absolute target
    margin (γ/β the margin in p units). Defaults β = 2.0, γ = 1.0: the paper's Llama-3-Base
    setting (γ/β = 0.5; the settings it reports span β 2.0–2.5 and γ 0.3–1.6, and it stresses
    that both want tuning per model). sft_weight = 0: SimPO has no SFT term (the authors' trainer's
    `sft_weight` defaults to 0).

    Args: as for `rrhf_loss`; beta: β; gamma: γ; sft_weight weighs L_ft; length_penalty: α;
    pairs: "all", "best_worst" or "best_rest".
    """
    g = _select_pairs(_group(logp_sum, lengths, rewards, valid, length_penalty), pairs)
    diff = g.scores.unsqueeze(2) - g.scores.unsqueeze(1)  # [b, i, j] p_i − p_j
    rank = _pair_mean(g, F.softplus(beta * diff + gamma))  # −log σ(β(p_j − p_i) − γ)
    return _with_sft(g, rank, sft_weight)


def slic_loss(
    logp_sum: Tensor, lengths: Tensor, rewards: Tensor, valid: Tensor | None = None, *,
    margin: float = 1.0,
    sft_weight: float = 0.5,
    pairs: Pairs = "all",
) -> LossOutput:
    """SLiC-HF rank calibration (Zhao et al., arXiv:2305.10425, eq. 1) with the best candidate b
    as the positive and as negatives the strictly worse candidates i of the selected pairs (i, b):

        L_cal = mean_{(i, b) selected} max(0, δ − logp_sum_b + logp_sum_i)
        L     = L_cal + sft_weight · L_ft

    on sequence log-likelihoods, not length-normalised (as in the paper). Candidates tied with b
    are not negatives. The paper's regulariser is the cross-entropy of the SFT target y_ref; here
    the best candidate stands in for it, per token like every L_ft of this module.

    Eq. 1 is a hinge of a positive over a negative sequence; the paper's sample-and-rank variant
    draws candidates from the SFT model and ranks them with a ranking or reward model. The
    negatives by `pairs` (`_select_pairs`): "all" and "best_rest", every i with r_i < r_b (the
    same loss; under "all", `num_pairs` and `rank_accuracy` still count every strict pair, as for
    the other losses); "best_worst", the worst candidate alone.

    Defaults: margin δ = 1.0, the paper's margin (eq. 1) at unit scale, the usual hinge choice;
    sft_weight λ = 0.5 is recalled from the paper's setting and not checked against its text here
    (and its λ weighs a summed cross-entropy, not a per-token one): tune it. `scores` and
    `rank_accuracy` use p_i with α = 1.

    Args: as for `rrhf_loss`; margin: δ; sft_weight: λ; pairs: "all", "best_worst" or
    "best_rest".
    """
    g = _select_pairs(_group(logp_sum, lengths, rewards, valid, 1.0), pairs)
    # The negatives of each query: the selected pairs (i, b), i valid and strictly worse.
    negative = g.pair_mask.gather(2, g.best[:, None, None].expand(-1, g.valid.shape[1], 1))
    negative = negative.squeeze(2)
    hinge = (margin - _best(g, g.logp).unsqueeze(1) + g.logp).clamp_min(0.0)
    total = torch.where(negative, hinge, torch.zeros_like(hinge)).sum(dim=1)
    rank = total / negative.sum(dim=1).clamp_min(1)
    return _with_sft(g, rank, sft_weight)


def dpo_loss(
    logp_sum: Tensor, lengths: Tensor, rewards: Tensor, valid: Tensor | None = None, *,
    ref_logp_sum: Tensor,
    beta: float = 0.1,
    sft_weight: float = 0.0,
    pairs: Pairs = "all",
) -> LossOutput:
    """DPO, Direct Preference Optimization (Rafailov et al., arXiv:2305.18290, eq. 7), over the
    strict pairs (i worse, j better) of each query that `pairs` selects (`_select_pairs`), with
    h = logp_sum − ref_logp_sum:

        L_DPO = mean_{(i, j) selected} −log σ(β·(h_j − h_i))         (computed as softplus, stable)
        L     = L_DPO + sft_weight · L_ft

    Eq. 7 is an expectation over a data set of (prompt, chosen, rejected) triples, one pair per
    comparison; `pairs="best_worst"` reads one such pair per query, the default "all" every strict
    pair.

    Default β = 0.1, the paper's value unless noted otherwise (its appendix B); sft_weight = 0,
    plain DPO (a positive weight gives the DPO + NLL mix of later work). The reference log-
    likelihoods enter as given: compute them under torch.no_grad(). `scores` and
    `rank_accuracy` use the policy's p_i with α = 1, not h.

    Args: as for `rrhf_loss`; ref_logp_sum: [B, K] Σ_t log π_ref over the same tokens; beta: β;
    sft_weight weighs L_ft; pairs: "all", "best_worst" or "best_rest".
    """
    if ref_logp_sum.shape != logp_sum.shape:
        raise ValueError(
            f"ref_logp_sum must have logp_sum's [B, K] shape {tuple(logp_sum.shape)}, "
            f"got {tuple(ref_logp_sum.shape)}"
        )
    g = _select_pairs(_group(logp_sum, lengths, rewards, valid, 1.0), pairs)
    ref = torch.where(g.valid, ref_logp_sum.to(g.logp.dtype), torch.zeros_like(g.logp))
    h = g.logp - ref
    diff = h.unsqueeze(2) - h.unsqueeze(1)  # [b, i, j] h_i − h_j
    rank = _pair_mean(g, F.softplus(beta * diff))  # −log σ(β(h_j − h_i))
    return _with_sft(g, rank, sft_weight)


LOSSES: dict[str, Callable[..., LossOutput]] = {
    "rrhf": rrhf_loss,
    "raft": raft_loss,
    "pro": pro_loss,
    "simpo": simpo_loss,
    "slic": slic_loss,
    "dpo": dpo_loss,
}
"""The losses by name; each takes (logp_sum, lengths, rewards, valid=None, *, options). The keys
are the names `train.loss.name` accepts (rrhf_ray.config.LOSS_CONFIGS has the same)."""


def sequence_logprobs(
    logits: Tensor, input_ids: Tensor, response_mask: Tensor
) -> tuple[Tensor, Tensor]:
    """Per-sequence (Σ log π of the response tokens, number of response tokens).

    Args:
        logits:        [N, T, V] model output for `input_ids` (position t predicts token t + 1).
        input_ids:     [N, T] query tokens, then response tokens, then the EOS, then padding.
        response_mask: [N, T] bool, True on the response tokens of `input_ids`, the closing EOS
                       included; False on the query and on padding. Position 0 must be False
                       (nothing predicts the first token).
    Returns:
        logp_sum: [N] float32; lengths: [N] long.
    """
    if logits.shape[:2] != input_ids.shape or response_mask.shape != input_ids.shape:
        raise ValueError(
            f"logits [N, T, V] must match input_ids and response_mask [N, T], got "
            f"{tuple(logits.shape)}, {tuple(input_ids.shape)}, {tuple(response_mask.shape)}"
        )
    if response_mask[:, 0].any():
        raise ValueError("response_mask[:, 0] must be False: no logit predicts the first token")
    pred = logits[:, :-1].float()
    target = input_ids[:, 1:]
    mask = response_mask[:, 1:].bool()
    token_logp = pred.gather(-1, target.unsqueeze(-1)).squeeze(-1) - pred.logsumexp(-1)
    logp_sum = torch.where(mask, token_logp, torch.zeros_like(token_logp)).sum(-1)
    return logp_sum, mask.sum(-1)


def kl_to_reference(logp: Tensor, ref_logp: Tensor, mask: Tensor, estimator: str = "k1") -> Tensor:
    """The KL of the policy to a reference policy, estimated on sampled responses, summed over each
    response's tokens (the online policy's penalty, `online.kl_estimator`; docs/algorithm.md):

        k1 = Σ_t (log π_t − log π_ref,t)
        k3 = Σ_t (ρ_t − 1) − log ρ_t,   ρ_t = π_ref,t / π_t

    Both are unbiased for KL(π ‖ π_ref) on responses sampled from π; k3 is never negative per token
    and has the lower variance. Computed in float64.

    Args:
        logp, ref_logp: [N, T] per-token log π and log π_ref of N responses' tokens.
        mask:           [N, T] bool, True on the response tokens (False on padding).
    Returns:
        [N] float64, the estimate of each response.
    """
    if not logp.shape == ref_logp.shape == mask.shape:
        raise ValueError(f"logp, ref_logp and mask must have one shape, got {tuple(logp.shape)}, "
                         f"{tuple(ref_logp.shape)}, {tuple(mask.shape)}")
    log_ratio = ref_logp.double() - logp.double()  # log ρ_t
    if estimator == "k1":
        per_token = -log_ratio
    elif estimator == "k3":
        per_token = torch.expm1(log_ratio) - log_ratio
    else:
        raise ValueError(f"unknown KL estimator {estimator!r}; known: k1, k3")
    return torch.where(mask.bool(), per_token, torch.zeros_like(per_token)).sum(-1)
