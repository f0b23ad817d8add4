"""Prefix-shared forward for the RRHF update: each query's prompt goes through the model once.

Why: RRHF scores k candidate responses per query, all continuing the same prompt. The plain
way (`candidate_logprobs_padded`) runs one right-padded row `prompt + response_i` per
candidate, so the prompt's P tokens are computed k times and every response is padded to the
longest: k·(P + R_max) tokens per query. `candidate_logprobs_shared` packs each query into one
row `prompt + y_1 + … + y_k` whose attention is block-structured (the prompt causal, each
response seeing the prompt and its own earlier tokens, never another response) with position ids
that restart at P for every response: P + ΣR tokens per query, no padding inside a query. For
Anthropic-HH-shaped data (P ≈ 200, k = 6, R̄ ≈ 65, R_max ≈ 110) that is ≈ 590 instead of
≈ 1860 tokens.

Two kernels compute that attention (`train.prefix_attention`, `prefix_kernel`: auto = flex on
CUDA, sdpa elsewhere). sdpa (`PREFIX_ATTENTION`, `_prefix_sdpa`) never forms a T × T mask for the
layout (T = P + ΣR): for each row it runs SDPA once over the prompt (causal) and once per response
over the prompt's keys and its own (P + R_i keys), so the masked blocks between responses cost
nothing; packed SFT rows take one SDPA call with a dense block-diagonal mask. flex
(`PREFIX_FLEX`, `rrhf_ray.train.flex`) runs PyTorch's FlexAttention with one block mask per
forward: one fused kernel per layer over the whole micro-batch on CUDA, where flash-attention
kernels take no custom mask and per-response calls are many small launches.

What is exact: every response token attends to the same keys and values at the same rotary
positions as in its padded row, so log-probs and every parameter's gradient equal the padded
path's up to float rounding (the tests check 1e-5 per token and rtol 1e-4 on gradients). It is
one ordinary forward (no KV cache), so it works with gradient checkpointing, LoRA, DDP and FSDP
like any forward. Log-softmax is taken in float32 whatever the model's dtype, and only the
logits that predict a response token are computed (`logits_at`: the output head sees only
those hidden states).

Where it applies: see `supports_prefix_sharing` (tested architectures, loaded with eager / sdpa
attention: flash-attention kernels unpad by their own rules); a sliding window shorter than a
packed row is refused (`candidate_logprobs_shared` raises), never silently cut. The trainer picks
the path per `train.prefix_sharing` (`rrhf_ray.train.rrhf.use_prefix_sharing`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from rrhf_ray.loss import sequence_logprobs
from rrhf_ray.train.flex import flex_attend, segment_block_mask

if TYPE_CHECKING:
    from transformers import PreTrainedConfig

__all__ = [
    "PackedQueries",
    "candidate_logprobs_padded",
    "candidate_logprobs_shared",
    "pack_rows",
    "packed_nll_sum",
    "prefix_kernel",
    "supports_prefix_sharing",
    "tokens_computed",
]

# Model types whose forward takes `position_ids` and a custom 4-D mask the way the shared pass
# needs; each one is checked in the unit tests.
TESTED_MODEL_TYPES = frozenset({"llama", "qwen2", "mistral", "gpt_neox"})
# flash_attention_2 & co. unpad with their own rules: untested, so they take the padded path.
TESTED_ATTN_IMPLEMENTATIONS = frozenset({"eager", "sdpa", "rrhf_prefix_sdpa", "rrhf_prefix_flex"})


@dataclass
class PackedQueries:
    """B queries with their candidates, as token ids.

    prompt_ids:   one list per query, the BOS included (at least one token).
    response_ids: per query, per candidate, the response tokens, the EOS included when the
                  candidate stopped (at least one token; at least one candidate per query).
    Candidates are flattened query-major: query 0's candidates, then query 1's, …
    """

    prompt_ids: list[list[int]]
    response_ids: list[list[list[int]]]

    def __post_init__(self) -> None:
        if len(self.prompt_ids) != len(self.response_ids):
            raise ValueError(
                f"{len(self.prompt_ids)} prompts but {len(self.response_ids)} candidate lists"
            )
        if not self.prompt_ids:
            raise ValueError("no query")
        for b, (prompt, cands) in enumerate(zip(self.prompt_ids, self.response_ids)):
            if not prompt:
                raise ValueError(f"query {b}: empty prompt")
            if not cands:
                raise ValueError(f"query {b}: no candidate")
            if any(len(r) == 0 for r in cands):
                raise ValueError(f"query {b}: empty response")

    @property
    def num_candidates(self) -> list[int]:
        return [len(c) for c in self.response_ids]

    @property
    def flat_responses(self) -> list[list[int]]:
        return [r for cands in self.response_ids for r in cands]


def tokens_computed(prompt_len: int, response_lens: Sequence[int], shared: bool) -> int:
    """Tokens one query costs in the forward: P + ΣR shared, Σ(P + R) padded.

    Padding is not counted; use it to fill micro-batches up to a token budget.
    """
    if shared:
        return prompt_len + sum(response_lens)
    return len(response_lens) * prompt_len + sum(response_lens)


def _unwrap(model: nn.Module) -> nn.Module:
    """The causal LM inside DDP-style wrappers (which expose it as `.module`)."""
    while not hasattr(model, "config") and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def logits_at(model: nn.Module, rows: Tensor, columns: Tensor, **inputs) -> Tensor:
    """The logits of `model(**inputs)` at the positions (`rows`[i], `columns`[i]) only, [N, V]:
    the output head (`get_output_embeddings`) sees just those N hidden states, gathered by a
    forward pre-hook, so neither the head's matmul nor the log-softmax after it runs at a
    position nothing reads (a prompt token, padding, another row's response). What the model
    does after the head (a softcap, a logit scale) is elementwise and applies unchanged. The
    forward goes through `model` itself (a DDP or PEFT wrapper included); the hook is removed
    on return."""
    head = _unwrap(model).get_output_embeddings()

    def gather(_module: nn.Module, args: tuple) -> tuple:
        hidden = args[0]  # [B, T, H]
        flat = rows * hidden.shape[1] + columns
        return (hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat)[None], *args[1:])

    handle = head.register_forward_pre_hook(gather)
    try:
        logits = model(use_cache=False, logits_to_keep=0, **inputs).logits  # [1, N, V]
    finally:
        handle.remove()
    return logits[0]


def supports_prefix_sharing(model: nn.Module) -> bool:
    """True when `candidate_logprobs_shared` is known to equal the padded path for `model`.

    Requires a model type from `TESTED_MODEL_TYPES` (Llama, Qwen2, Mistral, GPT-NeoX: their
    forward takes `position_ids` and passes a 4-D attention mask through unchanged; each is
    checked in the unit tests) and eager or sdpa attention. PEFT (LoRA) and DDP wrappers keep
    the base config and forward the same arguments.
    """
    inner = _unwrap(model)
    config = getattr(inner, "config", None)
    if config is None or getattr(config, "model_type", None) not in TESTED_MODEL_TYPES:
        return False
    return getattr(config, "_attn_implementation", None) in TESTED_ATTN_IMPLEMENTATIONS


def _fits_sliding_window(config: PreTrainedConfig, batch: PackedQueries) -> bool:
    """True unless some layer uses a sliding window that P_max + R_max reaches."""
    text = config.get_text_config(decoder=True)
    window = getattr(text, "sliding_window", None)
    types = getattr(text, "layer_types", None)
    if window is None or (types is not None and not any("sliding" in t for t in types)):
        return True
    p_max = max(len(p) for p in batch.prompt_ids)
    r_max = max(len(r) for r in batch.flat_responses)
    return p_max + r_max < window


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _right_pad(rows: list[list[int]], device: torch.device) -> tuple[Tensor, Tensor]:
    """[N, T_max] ids (padded with 0, masked anyway) and the [N, T_max] long attention mask."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    lens = torch.tensor([len(r) for r in rows], dtype=torch.long)
    mask = (torch.arange(width) < lens[:, None]).long()
    return ids.to(device), mask.to(device)


# --------------------------------------------------------------------------- attention

PREFIX_ATTENTION = "rrhf_prefix_sdpa"
"""The attention implementation the shared path switches a model to for the sdpa kernel: SDPA,
plus the packed layout when a forward passes `prefix_layout` (without it, exactly SDPA)."""

PREFIX_FLEX = "rrhf_prefix_flex"
"""The same for the flex kernel: FlexAttention when a forward passes `prefix_block_mask` (built
once per forward, `rrhf_ray.train.flex.segment_block_mask`), exactly SDPA without it."""

KERNELS = ("sdpa", "flex")  # `train.prefix_attention` past auto


def prefix_kernel(model: nn.Module, setting: str = "auto") -> str:
    """The kernel of the packed attention for `train.prefix_attention` = `setting` on `model`'s
    device: auto = flex on CUDA (a fused kernel that skips the masked blocks), sdpa elsewhere
    (on CPU FlexAttention runs its eager reference and has no backward)."""
    if setting == "auto":
        return "flex" if _device(model).type == "cuda" else "sdpa"
    if setting not in KERNELS:
        raise ValueError(f"train.prefix_attention: {setting!r} is none of auto, "
                         f"{', '.join(KERNELS)}")
    return setting


def _prefix_sdpa(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                 attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                 prefix_layout: tuple | None = None, segment_mask: Tensor | None = None,
                 **kwargs) -> tuple[Tensor, None]:
    """SDPA over packed rows without computing the masked blocks.

    `prefix_layout[b] = (P, ((s_1, e_1), …))`: row b holds a prompt of P tokens, then the
    responses at [s_i, e_i). The prompt attends causally to itself; response i attends to the
    prompt and causally to itself: one SDPA call per response over P + R_i keys, instead of one
    dense T × T pass of which most blocks are masked. Rows' right padding gets zeros (its
    outputs are never read). query [B, H, T, D], key / value [B, H_kv, T, D] (after rotary);
    returns [B, T, H, D] like the other attention functions.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if segment_mask is not None:  # packed independent sequences: one SDPA call, a block-diagonal mask
        return sdpa_attention_forward(module, query, key, value, segment_mask, dropout=dropout,
                                      scaling=scaling, is_causal=False)
    if prefix_layout is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    width = query.shape[2]
    outputs = []
    # The pieces come from one `split` per row and tensor (not one slice each): a split's backward
    # is one concatenation, where every slice's backward would fill a zero tensor of the whole
    # row and add into it (k + 1 times per layer and tensor).
    for (p, spans), q, k, v in zip(prefix_layout, query.split(1), key.split(1), value.split(1)):
        end = spans[-1][1] if spans else p
        sizes = [p, *(e - s for s, e in spans)] + ([width - end] if end < width else [])
        qs, ks, vs = (t.split(sizes, dim=2) for t in (q, k, v))
        pieces = [sdpa_attention_forward(module, qs[0], ks[0], vs[0], None,
                                         dropout=dropout, scaling=scaling, is_causal=True)[0]]
        for i, (s, e) in enumerate(spans, start=1):
            r = e - s
            keys = torch.cat([ks[0], ks[i]], dim=2)
            values = torch.cat([vs[0], vs[i]], dim=2)
            # allowed[j, t]: response token j sees every prompt key and its own keys up to j.
            allowed = torch.ones(r, p + r, dtype=torch.bool, device=q.device)
            allowed[:, p:] = torch.ones(r, r, dtype=torch.bool, device=q.device).tril()
            pieces.append(sdpa_attention_forward(module, qs[i], keys, values, allowed[None, None],
                                                 dropout=dropout, scaling=scaling)[0])
        if end < width:
            pieces.append(pieces[0].new_zeros(1, width - end, *pieces[0].shape[2:]))
        outputs.append(torch.cat(pieces, dim=1))
    return torch.cat(outputs, dim=0), None


def _prefix_flex(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                 attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                 softcap: float | None = None, prefix_block_mask: object | None = None,
                 **kwargs) -> tuple[Tensor, None]:
    """FlexAttention under `prefix_block_mask` (the packed rows' block mask, one per forward,
    shared by every layer), with the layer's scaling and logit softcap; grouped-query heads are
    broadcast by the kernel. Without a block mask, exactly SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if prefix_block_mask is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if dropout > 0:
        raise ValueError(f"train.prefix_attention flex: FlexAttention has no attention dropout "
                         f"(this model's is {dropout}); use prefix_attention sdpa")
    out = flex_attend(query, key, value, prefix_block_mask, module.training, scaling, softcap)
    return out, None


def use_prefix_attention(model: nn.Module, kernel: str = "sdpa") -> None:
    """Switch `model` (a causal LM, unwrapped) to the attention of `kernel` (`PREFIX_ATTENTION`
    or `PREFIX_FLEX`), registered once with transformers. Plain forwards are unchanged (SDPA,
    with SDPA's mask); the switch is not saved with the config."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    for name, function in ((PREFIX_ATTENTION, _prefix_sdpa), (PREFIX_FLEX, _prefix_flex)):
        if name not in AttentionInterface._global_mapping:
            AttentionInterface.register(name, function)
            ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)
    name = PREFIX_FLEX if kernel == "flex" else PREFIX_ATTENTION
    if model.config._attn_implementation != name:
        model.config._attn_implementation = name


def candidate_logprobs_padded(model: nn.Module, batch: PackedQueries) -> tuple[Tensor, Tensor]:
    """Reference path: one right-padded row `prompt + response_i` per candidate.

    Returns (logp_sum [N] float32, lengths [N] long) over the flattened candidates.
    """
    device = _device(model)
    rows, prompt_lens, resp_lens = [], [], []
    for prompt, cands in zip(batch.prompt_ids, batch.response_ids):
        for resp in cands:
            rows.append(prompt + resp)
            prompt_lens.append(len(prompt))
            resp_lens.append(len(resp))
    ids, mask = _right_pad(rows, device)
    pos = torch.arange(ids.shape[1], device=device)
    p = torch.tensor(prompt_lens, device=device)[:, None]
    r = torch.tensor(resp_lens, device=device)[:, None]
    response_mask = (pos >= p) & (pos < p + r)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    return sequence_logprobs(logits, ids, response_mask)


@torch.no_grad()
def candidate_token_logprobs(model: nn.Module, batch: PackedQueries) -> list[list[float]]:
    """Per-token log π of every response token (float32 log-softmax), one right-padded row
    `prompt + response_i` per candidate as `candidate_logprobs_padded`, no gradient: what the
    online policy's per-token KL estimators read (`rrhf_ray.loss.kl_to_reference`). One list per
    flattened candidate, in order."""
    device = _device(model)
    rows = [prompt + resp for prompt, cands in zip(batch.prompt_ids, batch.response_ids) for resp in cands]
    spans = [(len(prompt), len(resp)) for prompt, cands in zip(batch.prompt_ids, batch.response_ids)
             for resp in cands]
    ids, mask = _right_pad(rows, device)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    return [logp[i, p - 1 : p - 1 + r].tolist() for i, (p, r) in enumerate(spans)]


def _right_fill(rows: list[list[int]], width: int, fill: int, device: torch.device) -> Tensor:
    """[len(rows), width] long: each row's values, then `fill`."""
    out = torch.full((len(rows), width), fill, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out.to(device)


def _no_padding(pad_mask: Tensor) -> Tensor:
    """The 2-D mask to hand transformers beside a block mask, which masks the padding itself
    (segment −1): all ones, so that no 4-D mask is built (with none at all, transformers would
    read the restarting position ids as packed sequences and build one)."""
    return torch.ones_like(pad_mask)


def candidate_logprobs_shared(model: nn.Module, batch: PackedQueries,
                              attention: str = "auto") -> tuple[Tensor, Tensor]:
    """Prefix-shared path without padding: each query is one row `prompt + y_1 + … + y_k`.

    The attention (`attention`: auto, sdpa or flex, `prefix_kernel`) lets the prompt attend
    causally to itself and each response to the prompt and to its own earlier tokens (never to
    another response); position ids restart at P for every response, so each response sees
    exactly the keys, values and rotary positions of its padded row. One forward, no cache:
    P + ΣR tokens per query, no response padding. Several queries are right-padded to the longest
    row. Only the logits that predict a response token are computed (`logits_at`). Same result
    as `candidate_logprobs_padded` up to rounding, with either kernel.
    """
    device = _device(model)
    inner = _unwrap(model)
    if not _fits_sliding_window(inner.config, batch):
        # The packed row's key positions run past P + R: a binding window would cut elsewhere.
        raise ValueError("a sliding window shorter than prompt + response: use the padded path")
    kernel = prefix_kernel(model, attention)
    use_prefix_attention(inner, kernel)
    rows, positions, layout, segments = [], [], [], []
    targets, predictors, owners = [], [], []  # per response token: id, predicting column, row
    lengths = []
    for q, (prompt, cands) in enumerate(zip(batch.prompt_ids, batch.response_ids)):
        p = len(prompt)
        row, pos, spans, seg = list(prompt), list(range(p)), [], [0] * p
        for resp in cands:
            start = len(row)
            row += resp
            pos += range(p, p + len(resp))
            spans.append((start, len(row)))
            seg += [len(spans)] * len(resp)  # response i is segment i (1-based), the prompt 0
            targets += resp
            predictors += [p - 1] + list(range(start, start + len(resp) - 1))
            owners += [q] * len(resp)
            lengths.append(len(resp))
        rows.append(row)
        positions.append(pos)
        layout.append((p, tuple(spans)))
        segments.append(seg)
    ids, pad_mask = _right_pad(rows, device)
    pos_t = _right_fill(positions, ids.shape[1], 0, device)
    if kernel == "flex":
        seg_t = _right_fill(segments, ids.shape[1], -1, device)  # padding: −1
        masks = {"attention_mask": _no_padding(pad_mask),
                 "prefix_block_mask": segment_block_mask(seg_t)}
    else:
        masks = {"attention_mask": pad_mask, "prefix_layout": tuple(layout)}

    picked = logits_at(model, torch.tensor(owners, device=device), torch.tensor(predictors, device=device),
                       input_ids=ids, position_ids=pos_t, **masks).float()  # [M, V], one per response token
    target = torch.tensor(targets, device=device)
    token_logp = picked.gather(-1, target[:, None]).squeeze(-1) - picked.logsumexp(-1)
    lengths_t = torch.tensor(lengths, device=device)
    cand = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths_t)
    logp_sum = torch.zeros(len(lengths), dtype=token_logp.dtype, device=device).index_add(0, cand, token_logp)
    return logp_sum, lengths_t


# --------------------------------------------------------------------------- packed sequences (SFT)


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of sequences of `lengths` packed into rows of at most `capacity` tokens (first fit,
    longest first; a sequence longer than `capacity` gets a row of its own). Few rows of nearly
    equal width: the padding left is what the last row of each width class lacks."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def packed_nll_sum(model: nn.Module, examples: Sequence[tuple[list[int], int]], capacity: int,
                   attention: str = "auto") -> tuple[Tensor, int]:
    """(Σ −log π over the response tokens, their number) of (ids, response start) examples, the
    SFT loss of `rrhf_ray.train.sft.nll_sum` without padding: the examples are packed into rows of
    at most `capacity` tokens (`pack_rows`), each attending only to itself, with positions
    restarting at 0, and only the logits that predict a response token are computed. The
    attention (`attention`: auto, sdpa or flex, `prefix_kernel`): sdpa = `PREFIX_ATTENTION` with
    a block-diagonal causal `segment_mask`, one SDPA call per layer (a padding position attends
    to itself alone, so nothing is undefined); flex = the same mask as a block mask. Equal to the
    padded loss and gradients up to float rounding (tested)."""
    device = _device(model)
    inner = _unwrap(model)
    kernel = prefix_kernel(model, attention)
    use_prefix_attention(inner, kernel)
    rows, positions, segments, predictors, owners, targets = [], [], [], [], [], []
    for b, members in enumerate(pack_rows([len(ids) for ids, _ in examples], capacity)):
        row: list[int] = []
        pos: list[int] = []
        seg: list[int] = []
        for n, i in enumerate(members):
            ids, start = examples[i]
            begin = len(row)
            row += ids
            pos += range(len(ids))
            seg += [n + 1] * len(ids)  # from 1: no segment is a shared prompt (0)
            predictors += range(begin + start - 1, begin + len(ids) - 1)
            targets += ids[start:]
            owners += [b] * (len(ids) - start)
        rows.append(row)
        positions.append(pos)
        segments.append(seg)
    ids, pad_mask = _right_pad(rows, device)
    width = ids.shape[1]
    pos_t = _right_fill(positions, width, 0, device)
    seg_t = _right_fill(segments, width, -1, device)  # padding: −1
    if kernel == "flex":
        masks = {"attention_mask": _no_padding(pad_mask),
                 "prefix_block_mask": segment_block_mask(seg_t)}
    else:
        causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
        same = (seg_t[:, :, None] == seg_t[:, None, :]) & (seg_t[:, :, None] >= 0)
        eye = torch.eye(width, dtype=torch.bool, device=device)
        segment_mask = ((same & causal) | eye)[:, None]  # [B, 1, T, T]
        masks = {"attention_mask": pad_mask, "segment_mask": segment_mask}
    picked = logits_at(model, torch.tensor(owners, device=device), torch.tensor(predictors, device=device),
                       input_ids=ids, position_ids=pos_t, **masks).float()  # one row per response token
    loss = torch.nn.functional.cross_entropy(picked, torch.tensor(targets, device=device), reduction="sum")
    return loss, len(targets)
