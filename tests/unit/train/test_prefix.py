"""The prefix-shared forward equals the padded one: log-probs and every parameter's gradient,
with either attention kernel (sdpa; flex, whose CPU backward is FlexAttention's eager reference:
the `flex_backward_on_cpu` fixture)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rrhf_ray.train.prefix import (
    PackedQueries,
    candidate_logprobs_padded,
    candidate_logprobs_shared,
    supports_prefix_sharing,
    tokens_computed,
)

VOCAB = 1000
ARCHS = ["llama", "qwen2", "mistral", "gpt_neox"]
KERNELS = ["sdpa", "flex"]


def _build_tiny_llama(out_dir: Path) -> Path:
    from rrhf_ray.demo.tiny import build_tiny_llama

    return build_tiny_llama(out_dir, hidden_size=128, num_layers=2, num_heads=2, seed=0)


def _random_model(arch: str) -> torch.nn.Module:
    """A randomly initialised tiny model of another architecture: hidden 128, 2 heads, 2 layers."""
    import transformers as tf

    common = {
        "vocab_size": VOCAB, "hidden_size": 128, "num_attention_heads": 2, "num_hidden_layers": 2,
        "intermediate_size": 256, "max_position_embeddings": 512, "tie_word_embeddings": False,
    }
    if arch == "qwen2":
        config = tf.Qwen2Config(num_key_value_heads=1, **common)  # GQA, q/k/v biases
        cls = tf.Qwen2ForCausalLM
    elif arch == "mistral":
        config = tf.MistralConfig(num_key_value_heads=1, **common)  # sliding-window cache layers
        cls = tf.MistralForCausalLM
    elif arch == "gpt_neox":
        config = tf.GPTNeoXConfig(rotary_pct=0.5, **common)  # partial rotary, parallel residual
        cls = tf.GPTNeoXForCausalLM
    else:
        raise ValueError(arch)
    torch.manual_seed(0)
    return cls(config)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.nn.Module]:
    from transformers import AutoModelForCausalLM

    out = {}
    llama_dir = _build_tiny_llama(tmp_path_factory.mktemp("prefix") / "tiny-llama")
    out["llama"] = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    for arch in ARCHS[1:]:
        out[arch] = _random_model(arch)
    for model in out.values():
        model.float().eval()
    return out


def _assert_gradients_close(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    """Every parameter's gradient within rtol 1e-4 of the padded path's, above an absolute floor
    of 1e-6 times the tensor's largest entry (at least 1e-6): an entry summed over many tokens
    (an embedding row, a value projection) carries a rounding error of a few float32 ulps of
    the largest entries, since the two paths add the same terms in another order (≈ 5e-7 of the
    largest entry measured, with either kernel; a mask error is orders of magnitude above)."""
    assert got.keys() == ref.keys() and len(ref) > 0
    for name, expected in ref.items():
        floor = 1e-6 * max(1.0, float(expected.abs().max()))
        torch.testing.assert_close(got[name], expected, rtol=1e-4, atol=floor, msg=name)


def _batch(vocab: int, seed: int = 0) -> PackedQueries:
    """3 queries, P = 5, 17, 40, k = 1, 3, 6, responses of 1..30 tokens."""
    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    prompts, responses = [], []
    for p, k in [(5, 1), (17, 3), (40, 6)]:
        prompts.append([1] + ids(p - 1))
        lens = torch.randint(1, 31, (k,), generator=g).tolist()
        responses.append([ids(n - 1) + [2] for n in lens])
    responses[2][0] = [7]  # a one-token response beside longer ones
    return PackedQueries(prompts, responses)


@pytest.mark.parametrize("attention", KERNELS)
@pytest.mark.parametrize("arch", ARCHS)
def test_logprobs_equal(models: dict[str, torch.nn.Module], arch: str, attention: str) -> None:
    model = models[arch]
    batch = _batch(model.config.vocab_size)
    assert supports_prefix_sharing(model)
    with torch.no_grad():
        ref, ref_len = candidate_logprobs_padded(model, batch)
        got, got_len = candidate_logprobs_shared(model, batch, attention)
    assert model.config._attn_implementation == f"rrhf_prefix_{attention}"
    assert supports_prefix_sharing(model)  # still, after the switch
    assert got.dtype == torch.float32 and got.shape == (10,)
    assert got_len.tolist() == [len(r) for r in batch.flat_responses] == ref_len.tolist()
    # Per-token log-probs (the RRHF scores at α = 1) within 1e-5; the sums (|Σ| up to ~250, where
    # one float32 ulp is 1.5e-5: the two paths add the terms in another order) within 1e-6 relative.
    torch.testing.assert_close(got / got_len, ref / ref_len, rtol=0, atol=1e-5)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("attention", KERNELS)
@pytest.mark.parametrize("arch", ARCHS)
def test_gradients_equal(models: dict[str, torch.nn.Module], arch: str, attention: str,
                         request: pytest.FixtureRequest) -> None:
    if attention == "flex":
        request.getfixturevalue("flex_backward_on_cpu")
    model = models[arch]
    batch = _batch(model.config.vocab_size, seed=1)
    weights = torch.randn(sum(batch.num_candidates), generator=torch.Generator().manual_seed(2))

    def grads(fn) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        logp, _ = fn(model, batch)
        (logp * weights).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref = grads(candidate_logprobs_padded)
    got = grads(lambda m, b: candidate_logprobs_shared(m, b, attention))
    model.zero_grad(set_to_none=True)
    _assert_gradients_close(got, ref)


@pytest.mark.parametrize("attention", KERNELS)
def test_single_query_one_token(models: dict[str, torch.nn.Module], attention: str) -> None:
    model = models["llama"]
    batch = PackedQueries([[1, 50, 60]], [[[2]]])
    with torch.no_grad():
        ref, _ = candidate_logprobs_padded(model, batch)
        got, lengths = candidate_logprobs_shared(model, batch, attention)
    assert lengths.tolist() == [1]
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("attention", KERNELS)
def test_gradient_checkpointing_shares_the_prompt_too(models: dict[str, torch.nn.Module], attention: str,
                                                      request: pytest.FixtureRequest) -> None:
    """One ordinary forward with a 4-D mask: recomputing activations in the backward changes
    nothing, so sharing stays on under gradient checkpointing and gives the padded gradient."""
    if attention == "flex":
        request.getfixturevalue("flex_backward_on_cpu")
    model = models["llama"]
    batch = _batch(model.config.vocab_size)

    def grads(fn) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        logp, _ = fn(model, batch)
        logp.sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    try:
        assert supports_prefix_sharing(model)
        got = grads(lambda m, b: candidate_logprobs_shared(m, b, attention))
        ref = grads(candidate_logprobs_padded)
    finally:
        model.gradient_checkpointing_disable()
        model.zero_grad(set_to_none=True)
        model.eval()
    _assert_gradients_close(got, ref)


def test_a_sliding_window_shorter_than_a_row_is_refused_by_the_shared_path() -> None:
    """A window that P_max + R_max reaches would cut the packed row elsewhere than the padded
    one: the shared forward refuses it (never a silently different result); the padded path,
    what `train.prefix_sharing: off` runs, still scores the batch."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(
        vocab_size=VOCAB, hidden_size=64, num_attention_heads=2, num_key_value_heads=1,
        num_hidden_layers=1, intermediate_size=128, sliding_window=16,
    )).eval()
    batch = _batch(VOCAB)  # P_max 40 + R_max > 16
    assert supports_prefix_sharing(model)  # the architecture is supported, the window is what refuses
    with pytest.raises(ValueError, match="sliding window"):
        candidate_logprobs_shared(model, batch)
    with torch.no_grad():
        logp, lengths = candidate_logprobs_padded(model, batch)
    assert lengths.tolist() == [len(r) for r in batch.flat_responses]
    assert bool(torch.isfinite(logp).all()) and bool((logp < 0).all())


def test_supports_prefix_sharing_allow_list() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=2))
    assert not supports_prefix_sharing(gpt2)
    assert not supports_prefix_sharing(torch.nn.Linear(2, 2))


def test_packed_queries_validation() -> None:
    with pytest.raises(ValueError):
        PackedQueries([[1]], [])
    with pytest.raises(ValueError):
        PackedQueries([[1]], [[]])
    with pytest.raises(ValueError):
        PackedQueries([[1]], [[[]]])
    with pytest.raises(ValueError):
        PackedQueries([[]], [[[2]]])


def test_tokens_computed() -> None:
    assert tokens_computed(200, [10, 20, 30], shared=True) == 260
    assert tokens_computed(200, [10, 20, 30], shared=False) == 660
    assert tokens_computed(5, [1], shared=True) == tokens_computed(5, [1], shared=False) == 6


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_at_equals_the_full_logits_there_and_leaves_no_hook(models, arch):
    """`logits_at` (the head run on the gathered hidden states only) equals the full forward's
    logits at the asked positions, in the asked order, through a DDP-style wrapper (`.module`);
    the head has no hook left afterwards, also when the forward raises."""
    from rrhf_ray.train.prefix import logits_at

    model = models[arch]
    torch.manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (3, 9))
    full = model(input_ids=ids, use_cache=False).logits
    rows, cols = torch.tensor([2, 0, 0, 1, 2]), torch.tensor([8, 0, 5, 3, 0])

    class Wrapper(torch.nn.Module):  # exposes the model as `.module`, forwards to it, as DDP does
        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self.module = module

        def forward(self, **kwargs):
            return self.module(**kwargs)

    got = logits_at(Wrapper(model), rows, cols, input_ids=ids)
    assert got.shape == (5, full.shape[-1])
    torch.testing.assert_close(got, full[rows, cols], rtol=1e-5, atol=1e-5)
    head = model.get_output_embeddings()
    assert not head._forward_pre_hooks

    class Failing(Wrapper):
        def forward(self, **kwargs):
            assert self.module.get_output_embeddings()._forward_pre_hooks  # the hook is on
            raise RuntimeError("the forward failed")

    with pytest.raises(RuntimeError, match="the forward failed"):
        logits_at(Failing(model), rows, cols, input_ids=ids)
    assert not head._forward_pre_hooks
