"""What an RRHF update has to compute, and what this machine can compute: the model FLOPs of one
query group (the useful work, whatever the trainer's layout), and the dense matmul rate at the
model's own shapes (the ceiling). `train_step.py` divides one by the other: the model FLOPs
utilisation (MFU) of each trainer.

Model FLOPs of a Llama-shaped decoder for one query of prompt P and responses R_1 … R_k, the
prompt computed once (what a trainer has to do; padding and a prompt computed k times are waste):

- the matmuls: 2 FLOPs per weight and token forward, 4 backward: 6 · N_layers per token over
  the P + ΣR tokens (N_layers: the q, k, v, o and the three MLP
  projections of every layer), and 6 · h · V for the LM head at the ΣR positions that predict a
  response token (no other position's logits are needed);
- attention: per layer and token 4 · c · d FLOPs forward (QKᵀ and AV over the c keys the token
  attends to, d = heads × head_dim), 12 · c · d with the backward; a prompt token at position i
  attends to i + 1 keys, response token j of any candidate to P + j + 1 (the prompt and its own
  earlier tokens).

Embedding lookups, norms, activations, the softmax and the optimizer are left out (a few % at
these shapes), as MFU counts usually do.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Shapes:
    """The dimensions of a Llama-shaped decoder that its FLOPs depend on."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def of(cls, config: Any) -> Shapes:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(config.hidden_size, config.intermediate_size, config.num_hidden_layers, heads,
                   getattr(config, "num_key_value_heads", None) or heads, head_dim, config.vocab_size)

    @property
    def layer_weights(self) -> int:
        """Weights of one layer's matmuls: q and o (h × heads·head_dim), k and v (h × kv·head_dim),
        gate, up and down (h × I each)."""
        attn = self.heads * self.head_dim
        return 2 * self.hidden * attn + 2 * self.hidden * self.kv_heads * self.head_dim + 3 * self.hidden * self.intermediate

    def matmul_shapes(self) -> list[tuple[int, int, int]]:
        """(in, out, times per token) of every weight matmul a token's forward runs."""
        attn, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return [(self.hidden, attn, 2 * self.layers), (self.hidden, kv, 2 * self.layers),
                (self.hidden, self.intermediate, 2 * self.layers), (self.intermediate, self.hidden, self.layers),
                (self.hidden, self.vocab, 1)]


def query_flops(shapes: Shapes, prompt: int, responses: Sequence[int]) -> float:
    """Model FLOPs (forward + backward) of one query group (module docstring)."""
    tokens = prompt + sum(responses)
    dense = 6 * shapes.layers * shapes.layer_weights * tokens + 6 * shapes.hidden * shapes.vocab * sum(responses)
    # Σ keys attended: the prompt's causal triangle once, then each response over P + its own prefix.
    keys = prompt * (prompt + 1) // 2 + sum(r * prompt + r * (r + 1) // 2 for r in responses)
    return float(dense + 12 * shapes.layers * shapes.heads * shapes.head_dim * keys)


def matmul_ceiling(shapes: Shapes, tokens: int = 640, dtype: str = "float32", device: str = "cpu",
                   seconds: float = 2.0) -> float:
    """FLOP/s of `torch.mm` at the model's weight shapes for a `tokens`-row activation, in `dtype`
    on `device` with this process's threads: the matmuls of one token's forward in their
    proportions (time summed over shapes), repeated for about `seconds`. The best of three passes."""
    import torch

    dt = getattr(torch, dtype)
    pairs = [(torch.randn(tokens, i, dtype=dt, device=device), torch.randn(i, o, dtype=dt, device=device), n)
             for i, o, n in shapes.matmul_shapes()]
    flops = sum(2 * tokens * a.shape[1] * b.shape[1] * n for a, b, n in pairs)

    def one_pass() -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        for a, b, n in pairs:
            for _ in range(n):
                torch.mm(a, b)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    one_pass()  # warm-up (allocations, kernel selection)
    repeats = max(1, int(seconds / 3 / max(one_pass(), 1e-6)))
    best = min(sum(one_pass() for _ in range(repeats)) / repeats for _ in range(3))
    return flops / best
