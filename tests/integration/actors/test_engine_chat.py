"""The engine and a chat model whose generation config does not list its end-of-turn token: a
conversation goes to vLLM as its template's prompt ids, the reply stops at <|im_end|> all the same
(the template's turn end is added to the stop ids) and keeps it as its last token; a raw-text
prompt of the same engine is sampled as it always was (no extra stop id)."""

from __future__ import annotations

import json

import pytest
import ray

from rrhf_ray.config import SamplingConfig
from rrhf_ray.types import parse_query

pytestmark = [pytest.mark.ray, pytest.mark.vllm]

CONV = parse_query([{"role": "user", "content": "How do I water a cactus?"}])
TEXT = "\n\nHuman: How do I water a cactus?\n\nAssistant:"


@ray.remote(num_cpus=1, max_calls=1)  # a process of its own, gone with its engine afterwards
def _sample(model_dir: str) -> list[list[tuple[tuple[int, ...], str, tuple[int, ...]]]]:
    from rrhf_ray.actors.engine import VLLMEngine

    cfg = SamplingConfig(n=8, max_new_tokens=24, dtype="float32", max_model_len=256, enforce_eager=True, seed=3,
                         stop=[])
    engine = VLLMEngine(model_dir, cfg)
    out = engine.generate([CONV, TEXT], [3, 3])
    return [[(c.token_ids, c.finish_reason, c.prompt_token_ids) for c in group] for group in out]


def test_a_conversation_stops_at_the_templates_turn_end(ray_cluster, tmp_path):
    from transformers import AutoTokenizer

    from rrhf_ray.demo.tiny import build_tiny_chat_model

    model = build_tiny_chat_model(tmp_path / "chat")
    tok = AutoTokenizer.from_pretrained(model)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    gen = model / "generation_config.json"
    gen.write_text(json.dumps({**json.loads(gen.read_text()), "eos_token_id": tok.eos_token_id}))  # EOS only

    chat, text = ray.get(_sample.remote(str(model)))
    assert {p for _, _, p in chat} == {tuple(tok.apply_chat_template([m.model_dump() for m in CONV],
                                                                     add_generation_prompt=True)["input_ids"])}
    stopped = [ids for ids, reason, _ in chat if reason == "stop"]
    assert stopped and all(ids[-1] in (im_end, tok.eos_token_id) for ids in stopped)
    assert any(ids[-1] == im_end for ids in stopped)
    assert not any(im_end in ids[:-1] for ids, _, _ in chat)
    # Raw text: only the EOS stops it, so an <|im_end|> may sit inside a reply.
    assert {p for _, _, p in text} == {tuple(tok(TEXT)["input_ids"])}
    assert all(ids[-1] == tok.eos_token_id for ids, reason, _ in text if reason == "stop")
