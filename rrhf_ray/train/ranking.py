"""How well a saved policy's p_i follow the rewards of held-out query groups (the evaluation's
`heldout_rank_accuracy`, `rrhf_ray.evaluation.ranking_task`): the trainer's tokens and forward,
no gradients."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rrhf_ray.loss import rrhf_loss
from rrhf_ray.train.encoding import Encoder, end_token_ids, group_tensors
from rrhf_ray.train.prefix import supports_prefix_sharing
from rrhf_ray.train.rrhf import candidate_logprobs
from rrhf_ray.train.worker import inference_dtype, load_tokenizer
from rrhf_ray.types import QueryGroup


@torch.no_grad()
def ranking_metrics(model_path: str, groups: Sequence[QueryGroup], max_length: int = 192,
                    micro_batch_queries: int = 8, dtype: str = "auto",
                    tokenizer_path: str | None = None) -> dict[str, float]:
    """How well the model at `model_path` ranks the candidates of `groups`: pairwise ranking
    accuracy of its p_i (eq. 1) against the rewards, and the mean per-token NLL of each query's
    best candidate. The model runs on the CPU, its weights in `dtype` (`model.dtype`: auto is
    float32 there). `tokenizer_path`: the run's tokenizer (`model.tokenizer`), default the model's."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(tokenizer_path or model_path, False)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=inference_dtype(dtype, "cpu"),
                                                 use_safetensors=True).eval()
    encoder = Encoder(tokenizer, max_length, ends=end_token_ids(model))
    encoded = [encoder(g) for g in groups]
    shared = supports_prefix_sharing(model)
    pairs = correct = 0
    nll, n = 0.0, 0
    for s in range(0, len(encoded), micro_batch_queries):
        batch = encoded[s : s + micro_batch_queries]
        t = group_tensors(batch, *candidate_logprobs(model, batch, shared))
        out = rrhf_loss(t.logp_sum, t.lengths, t.rewards, t.valid)
        p = int(out.num_pairs)
        pairs += p
        correct += round(float(out.rank_accuracy) * p) if p else 0
        nll += float(out.sft_loss) * int(out.query_mask.sum())
        n += int(out.query_mask.sum())
    return {"rank_accuracy": correct / pairs if pairs else float("nan"), "best_nll": nll / max(n, 1)}
