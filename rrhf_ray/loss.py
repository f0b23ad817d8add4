"""The RRHF loss, pure torch (Yuan et al., "RRHF: Rank Responses to Align Language Models with
Human Feedback without tears", NeurIPS 2023, arXiv:2304.05302, eq. 1-5).

For a query x with candidates y_1 … y_k and rewards r_1 … r_k:

    p_i    = Σ_t log π(y_i,t | x, y_i,<t) / |y_i|^α                      (eq. 1, α = length_penalty)
    L_rank = Σ_{r_i < r_j} max(0, p_i − p_j)                             (eq. 2, all ordered pairs,
                                                                           strict: ties give no pair)
    L_ft   = −Σ_t log π(y_i',t | x, y_i',<t),   i' = argmax_i r_i        (eq. 4, first index on ties)
    L      = w_rank · L_rank + L_ft                                      (eq. 5)

`sft_reduction="mean"` divides L_ft by |y_i'| (the authors' code keeps L_ft on the per-token
scale of the p_i; unlike that code, the divisor here is the response's own length, not the
padded width). The batch loss is the mean over queries that have at least one valid candidate.

Shapes: B queries, K candidate slots. A query with fewer than K candidates marks the missing
slots False in `valid`; their values are ignored and receive no gradient.

This module imports nothing of Ray, vLLM or the rest of the project.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

__all__ = ["RRHFLossOutput", "rrhf_loss", "sequence_logprobs"]


@dataclass
class RRHFLossOutput:
    """Scalars are means over the queries that have at least one valid candidate.

    loss, rank_loss, sft_loss: scalar tensors (differentiable).
    per_query_loss: [B] w_rank·L_rank + L_ft of each query (0 for a query with no candidate).
    query_mask: [B] bool, queries that count in the means.
    scores: [B, K] the length-normalised log-probabilities p_i (0 where invalid).
    best_index: [B] i' = argmax_i r_i over valid candidates.
    rank_accuracy: scalar, fraction of ordered pairs r_i < r_j with p_i < p_j (NaN if no pair).
    num_pairs: scalar long, ordered pairs with a strict reward difference.
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


def rrhf_loss(
    logp_sum: Tensor,
    lengths: Tensor,
    rewards: Tensor,
    valid: Tensor | None = None,
    *,
    rank_weight: float = 1.0,
    length_penalty: float = 1.0,
    sft_reduction: Literal["mean", "sum"] = "mean",
) -> RRHFLossOutput:
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
    if logp_sum.dim() != 2 or lengths.shape != logp_sum.shape or rewards.shape != logp_sum.shape:
        raise ValueError(
            f"logp_sum, lengths and rewards must share one [B, K] shape, got "
            f"{tuple(logp_sum.shape)}, {tuple(lengths.shape)}, {tuple(rewards.shape)}"
        )
    if sft_reduction not in ("mean", "sum"):
        raise ValueError(f"sft_reduction must be 'mean' or 'sum', got {sft_reduction!r}")
    if valid is None:
        valid = torch.ones_like(logp_sum, dtype=torch.bool)
    valid = valid.bool()

    # Neutral values in missing slots, so that neither the forward nor the backward sees them
    # (a zero length there would turn the masked-out gradient into 0 · inf = NaN).
    logp = torch.where(valid, logp_sum, torch.zeros_like(logp_sum))
    length = torch.where(valid, lengths.to(logp.dtype), torch.ones_like(logp)).clamp_min(1.0)
    scores = logp / length.pow(length_penalty)  # p_i, eq. 1

    # Ordered pairs (i, j) with r_i < r_j among valid candidates: mask[b, i, j].
    r = rewards.to(logp.dtype)
    pair_mask = (r.unsqueeze(2) < r.unsqueeze(1)) & valid.unsqueeze(2) & valid.unsqueeze(1)
    diff = scores.unsqueeze(2) - scores.unsqueeze(1)  # p_i − p_j
    rank_per_query = (diff.clamp_min(0.0) * pair_mask).sum(dim=(1, 2))  # eq. 2

    # Best candidate: argmax over valid rewards; torch.argmax returns the first maximum.
    masked_r = torch.where(valid, r, torch.full_like(r, float("-inf")))
    best = masked_r.argmax(dim=1)
    best_logp = logp.gather(1, best[:, None]).squeeze(1)
    best_len = length.gather(1, best[:, None]).squeeze(1)
    sft_per_query = -best_logp / best_len if sft_reduction == "mean" else -best_logp

    query_mask = valid.any(dim=1)
    per_query = torch.where(
        query_mask, rank_weight * rank_per_query + sft_per_query, torch.zeros_like(sft_per_query)
    )
    n = query_mask.sum().clamp_min(1)

    def mean(x: Tensor) -> Tensor:
        return torch.where(query_mask, x, torch.zeros_like(x)).sum() / n

    with torch.no_grad():
        num_pairs = pair_mask.sum()
        correct = ((diff < 0) & pair_mask).sum()
        accuracy = correct.double() / num_pairs if num_pairs > 0 else torch.tensor(float("nan"))

    return RRHFLossOutput(
        loss=mean(per_query),
        rank_loss=mean(rank_per_query),
        sft_loss=mean(sft_per_query),
        per_query_loss=per_query,
        query_mask=query_mask,
        scores=torch.where(valid, scores, torch.zeros_like(scores)),
        best_index=best,
        rank_accuracy=accuracy,
        num_pairs=num_pairs,
    )


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
