"""The FlexAttention kernel of the packed rows: its block mask equals PyTorch's own construction,
it keeps the layer's scaling, softcap and grouped-query heads, the kernel is picked per device,
and on CUDA (when this runs where a GPU is) the compiled kernel gives the padded path's log-probs
and gradients. The model-level equalities on CPU are in test_prefix.py and test_sft.py."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask

from rrhf_ray.train import flex
from rrhf_ray.train.flex import allowed, flex_attend, segment_block_mask
from rrhf_ray.train.prefix import (
    PackedQueries,
    candidate_logprobs_padded,
    candidate_logprobs_shared,
    prefix_kernel,
)


def _segments() -> torch.Tensor:
    """Three rows of 75 tokens: a prompt of 20 then responses of 1, 30 and 9 tokens and padding;
    a prompt of 7 then one response of 68; packed SFT sequences of 40 and 35 (no prompt)."""
    rows = [[0] * 20 + [1] + [2] * 30 + [3] * 9, [0] * 7 + [1] * 68, [1] * 40 + [2] * 35]
    return torch.tensor([r + [-1] * (75 - len(r)) for r in rows])


def _dense(segments: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T] bool: `allowed` element by element."""
    pos = torch.arange(segments.shape[1])
    return allowed(segments[:, :, None], segments[:, None, :], pos[:, None], pos[None, :])[:, None]


def test_allowed_is_the_prefix_shared_and_the_packed_mask() -> None:
    mask = _dense(_segments())[:, 0]
    # Row 0: the prompt is causal; response 2 (tokens 21-50) sees the whole prompt and its own
    # earlier tokens, not response 1 (token 20) nor response 3; padding sees earlier padding only.
    assert mask[0, 5].tolist() == [True] * 6 + [False] * 69
    assert mask[0, 25].tolist() == [True] * 20 + [False] + [True] * 5 + [False] * 49
    assert mask[0, 55].tolist() == [True] * 20 + [False] * 31 + [True] * 5 + [False] * 19
    assert mask[0, 62].tolist() == [False] * 60 + [True] * 3 + [False] * 12
    # Row 2 (SFT packing): the second sequence sees only itself.
    assert mask[2, 45].tolist() == [False] * 40 + [True] * 6 + [False] * 29


@pytest.mark.parametrize("chunk_elements", [flex._CHUNK_ELEMENTS, 1], ids=["one-chunk", "tile-by-tile"])
def test_the_block_mask_is_pytorchs_own(monkeypatch: pytest.MonkeyPatch, chunk_elements: int) -> None:
    """The tiles (16 × 16 here, so every kind occurs, with a last tile cut at T = 75) that
    `segment_block_mask` marks partial and full are those `create_block_mask` finds from the
    dense mask, and the element mask it applies is `allowed`."""
    monkeypatch.setattr(flex, "_CHUNK_ELEMENTS", chunk_elements)
    segments = _segments()
    got = segment_block_mask(segments, block_size=16)

    def mask_mod(b, h, q, kv):
        return allowed(segments[b, q], segments[b, kv], q, kv)

    ref = create_block_mask(mask_mod, 3, None, 75, 75, device="cpu", BLOCK_SIZE=16)
    assert got.shape == ref.shape == (3, 1, 75, 75)
    for name in ("kv_num_blocks", "full_kv_num_blocks", "q_num_blocks", "full_q_num_blocks"):
        torch.testing.assert_close(getattr(got, name), getattr(ref, name), msg=name)
    torch.testing.assert_close(got.to_dense(), ref.to_dense())
    full = ref.full_kv_num_blocks.sum().item()
    skipped = 3 * 5 * 5 - ref.to_dense().sum().item()
    assert full > 0 and skipped > full  # tiles of each kind: skipped, full and partial
    pos = torch.arange(75)
    assert torch.equal(got.mask_mod(torch.tensor(0), 0, pos[:, None], pos[None, :]), _dense(segments)[0, 0])


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_flex_attend_keeps_scaling_softcap_and_grouped_heads(softcap: float | None) -> None:
    """4 query heads over 2 key / value heads, a scaling other than 1/√D, and a logit softcap
    (softcap · tanh(s / softcap)): the same output as the dense computation with the mask."""
    g = torch.Generator().manual_seed(0)
    segments = _segments()
    q = torch.randn(3, 4, 75, 16, generator=g)
    k, v = torch.randn(3, 2, 75, 16, generator=g), torch.randn(3, 2, 75, 16, generator=g)
    got = flex_attend(q, k, v, segment_block_mask(segments), training=False, scaling=0.3, softcap=softcap)
    scores = q @ k.repeat_interleave(2, dim=1).transpose(-1, -2) * 0.3
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~_dense(segments), float("-inf"))
    ref = (scores.softmax(-1) @ v.repeat_interleave(2, dim=1)).transpose(1, 2)
    assert got.shape == (3, 75, 4, 16)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_the_kernel_is_picked_per_device() -> None:
    model = torch.nn.Linear(2, 2)
    assert prefix_kernel(model) == prefix_kernel(model, "auto") == "sdpa"  # on the CPU
    assert prefix_kernel(model, "flex") == "flex" and prefix_kernel(model, "sdpa") == "sdpa"
    with pytest.raises(ValueError, match="prefix_attention"):
        prefix_kernel(model, "flash")


def test_attention_dropout_is_refused_by_flex(tiny_model_dir) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attention_dropout=0.1).train()
    batch = PackedQueries([[1, 50, 60]], [[[7, 2], [8, 9, 2]]])
    with torch.no_grad(), pytest.raises(ValueError, match="dropout"):
        candidate_logprobs_shared(model, batch, "flex")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_auto_is_the_compiled_flex_kernel_and_equals_the_padded_path(tiny_model_dir) -> None:
    """On a GPU: auto picks flex, and the compiled kernels give the padded path's log-probs and
    gradients (float32; two batches of other shapes, so a recompile is exercised too)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).cuda().eval()
    assert prefix_kernel(model) == "flex"
    g = torch.Generator().manual_seed(0)
    for p_len, k in [(40, 6), (150, 3)]:
        prompts = [[1] + torch.randint(3, 500, (p_len - 1,), generator=g).tolist() for _ in range(2)]
        responses = [[torch.randint(3, 500, (int(n),), generator=g).tolist() + [2]
                      for n in torch.randint(1, 60, (k,), generator=g)] for _ in range(2)]
        batch = PackedQueries(prompts, responses)

        def grads(fn, batch=batch):
            model.zero_grad(set_to_none=True)
            logp, _ = fn(model, batch)
            logp.sum().backward()
            return logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

        ref, ref_grads = grads(candidate_logprobs_padded)
        got, got_grads = grads(candidate_logprobs_shared)
        assert model.config._attn_implementation == "rrhf_prefix_flex"
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-3)
        for name in ref_grads:
            torch.testing.assert_close(got_grads[name], ref_grads[name], rtol=1e-3, atol=1e-5, msg=name)
