"""FlexAttention over the packed rows of `rrhf_ray.train.prefix`: one block mask per forward.

Why: the packed rows need a block-structured mask (each response sees the prompt and its own
earlier tokens; each packed SFT sequence only itself). Flash-attention kernels (SDPA's flash
backend, `flash_attention_2`) take no custom mask at all, and a dense 4-D mask costs B·T² memory
and has every tile computed, masked or not. FlexAttention takes the mask as a `mask_mod` plus a
`BlockMask` that says which tiles (128 × 128 tokens) are empty, full or partial: it skips the
empty tiles (all the blocks between responses), runs full tiles without evaluating the mask, and
compiles to fused kernels on CUDA (`flex_attend`).

A row is described by one segment id per token (`segments`, [B, T] long): 0 the shared prompt,
n > 0 a response (prefix sharing) or a packed sequence (SFT packing, which has no segment 0),
−1 padding. Key kv is visible to query q when kv ≤ q and kv is in q's segment, or kv is in the
prompt and q in a response (`allowed`): the masks of the SDPA path, so the same log-probs and
gradients as the padded path up to float rounding (tests/unit/train/test_flex.py). Padding
attends to earlier padding: never read, but never a row with nothing to attend to.

The block mask is built once per forward from the segments (`segment_block_mask`, no dense
T × T mask and no compilation: a few tensor ops per 128-row tile) and passed to every layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

__all__ = ["allowed", "flex_attend", "segment_block_mask"]

# Bound on one chunk of the tile classification (query rows × keys × rows of the batch): the
# boolean mask of a chunk is this many bytes at most, whatever T is.
_CHUNK_ELEMENTS = 1 << 26


def allowed(q_segment: Tensor, kv_segment: Tensor, q: Tensor, kv: Tensor) -> Tensor:
    """Whether query q (in segment `q_segment`) sees key kv (in `kv_segment`); broadcasts."""
    same_or_prompt = (kv_segment == q_segment) | ((kv_segment == 0) & (q_segment > 0))
    return (kv <= q) & same_or_prompt


def segment_block_mask(segments: Tensor, block_size: int = 128) -> BlockMask:
    """The `BlockMask` of `allowed` over rows of `segments` ([B, T] long, on the model's device).

    Each `block_size` × `block_size` tile is classified (no key visible: skipped; every key
    visible: full; else partial, where the kernel evaluates `allowed`) from the element mask of
    a chunk of query rows at a time, so memory stays bounded for long rows. Equal to
    `create_block_mask` of the same `mask_mod` (tested), without its dense B × T × T mask.
    """
    from torch.nn.attention.flex_attention import BlockMask

    batch, width = segments.shape
    n = -(-width // block_size)
    device = segments.device
    # Padded to whole tiles with −1 (padding), so that the kernel's reads past T stay in bounds.
    seg = torch.nn.functional.pad(segments, (0, n * block_size - width), value=-1)
    pos = torch.arange(n * block_size, device=device)
    inside = pos < width
    rows = max(1, _CHUNK_ELEMENTS // (batch * n * block_size * block_size))  # query tiles per chunk
    partial, full = [], []
    for first in range(0, n, rows):
        q = slice(first * block_size, min(n, first + rows) * block_size)
        visible = allowed(seg[:, q, None], seg[:, None, :], pos[q, None], pos[None, :])
        visible &= inside[q, None] & inside[None, :]  # a tile reaching past T is never full
        tiles = visible.view(batch, -1, block_size, n, block_size)
        some = tiles.any(dim=4).any(dim=2)
        every = tiles.all(dim=4).all(dim=2)
        partial.append(some & ~every)
        full.append(every)

    def ordered(dense: list[Tensor]) -> tuple[Tensor, Tensor]:
        tiles = torch.cat(dense, dim=1)[:, None].to(torch.int32)  # [B, 1 (heads), n, n]
        order = torch.argsort(tiles, dim=-1, descending=True, stable=True)
        return tiles.sum(-1).to(torch.int32), order.to(torch.int32)

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return allowed(seg[b, q_idx], seg[b, kv_idx], q_idx, kv_idx)

    return BlockMask.from_kv_blocks(*ordered(partial), *ordered(full), BLOCK_SIZE=block_size,
                                    mask_mod=mask_mod, seq_lengths=(width, width))


def flex_attend(query: Tensor, key: Tensor, value: Tensor, block_mask: BlockMask, training: bool,
                scaling: float | None = None, softcap: float | None = None) -> Tensor:
    """FlexAttention of query [B, H, T, D] over key / value [B, H_kv, T, D] (grouped-query heads
    broadcast by the kernel) under `block_mask`, with the layer's `scaling` and logit `softcap`;
    returns [B, T, H, D] like transformers' attention functions.

    On CUDA the compiled kernel (transformers' `compile_friendly_flex_attention`: compiled once
    per process, recompiled per new shape until torch marks the lengths dynamic); elsewhere
    FlexAttention's eager reference, which computes the full score matrix (CPU: tests and
    gradient-free forwards; PyTorch's FlexAttention has no backward on CPU).
    """
    from torch.nn.attention.flex_attention import flex_attention

    score_mod = None
    if softcap is not None:
        def score_mod(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return softcap * torch.tanh(score / softcap)

    options = {"score_mod": score_mod, "block_mask": block_mask, "scale": scaling,
               "enable_gqa": query.shape[1] != key.shape[1]}
    if query.device.type == "cuda":
        from transformers.integrations.flex_attention import compile_friendly_flex_attention

        out = compile_friendly_flex_attention(query, key, value, training=training, **options)
    else:
        out = flex_attention(query, key, value, **options)
    return out.transpose(1, 2).contiguous()
