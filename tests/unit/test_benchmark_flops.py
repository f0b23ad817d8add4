"""The model-FLOP count of `benchmarks/flops.py` (the MFU numerator of benchmarks/train_step.py):
a hand count on toy shapes, and the weights it counts equal to a real Llama layer's."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

spec = importlib.util.spec_from_file_location("flops", Path(__file__).resolve().parents[2] / "benchmarks/flops.py")
flops = sys.modules["flops"] = importlib.util.module_from_spec(spec)  # as train_step.py imports it
spec.loader.exec_module(flops)


def test_query_flops_by_hand() -> None:
    s = flops.Shapes(hidden=4, intermediate=8, layers=1, heads=2, kv_heads=1, head_dim=2, vocab=10)
    assert s.layer_weights == 2 * 4 * 4 + 2 * 4 * 2 + 3 * 4 * 8  # q, o; k, v (one kv head); MLP
    # P = 2, responses of 1 and 2 tokens: 5 tokens through the layers, 3 predicted by the LM head;
    # keys attended: the prompt 1 + 2, response 1: 3, response 2: 3 + 4.
    expected = 6 * 144 * 5 + 6 * 4 * 10 * 3 + 12 * 1 * 2 * 2 * (3 + 3 + 7)
    assert flops.query_flops(s, 2, [1, 2]) == expected


def test_the_counted_weights_are_a_llama_layers_matmul_weights() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config)
    s = flops.Shapes.of(config)
    layer = model.model.layers[0]
    linear = sum(m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear))
    assert s.layer_weights == linear
    assert s.hidden * s.vocab == model.lm_head.weight.numel()
    per_token = sum(i * o * n for i, o, n in s.matmul_shapes())
    assert per_token == s.layers * s.layer_weights + s.hidden * s.vocab  # one token's forward matmuls
