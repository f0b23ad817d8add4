"""Conversations as token ids (rrhf_ray/train/tokens.py, encoding.py): the chat template's prompt,
its end-of-turn token closing replies, the reward model's own rendering cut at a turn, and a
fingerprint that tells templates apart. Pure logic on the tiny chat tokenizers."""

from __future__ import annotations

import copy

import pytest

from rrhf_ray.train.encoding import Encoder
from rrhf_ray.train.tokens import (
    closing_id,
    encode,
    prompt_ids,
    reward_ids,
    tokenizer_fingerprint,
    turn_end_id,
)
from rrhf_ray.types import QueryGroup, parse_query

CONV = parse_query([{"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": "How do I water a cactus?"}])


@pytest.fixture(scope="module")
def chat():
    from rrhf_ray.demo.tiny import HEADER_TEMPLATE, train_chat_tokenizer

    return train_chat_tokenizer(), train_chat_tokenizer(template=HEADER_TEMPLATE)


def test_prompt_ids_are_the_templates_and_replies_close_with_im_end(chat):
    tok, _ = chat
    messages = [m.model_dump() for m in CONV]
    assert prompt_ids(tok, CONV) == tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert turn_end_id(tok) == im_end == closing_id(tok, CONV) != tok.eos_token_id
    assert closing_id(tok, "\n\nHuman: hi\n\nAssistant:") == tok.eos_token_id  # raw text: EOS as always
    ids, start = encode(tok, CONV, "Rarely.", 200)
    assert ids[:start] == prompt_ids(tok, CONV) and ids[-1] == im_end
    assert ids[start:-1] == tok("Rarely.", add_special_tokens=False)["input_ids"]


def test_encoder_renders_data_set_replies_and_keeps_a_sampled_turn_end(chat):
    tok, _ = chat
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    reply = tok("Rarely.", add_special_tokens=False)["input_ids"]
    group = QueryGroup(query=CONV, responses=["Rarely.", "No."], scores=[1.0, 0.0],
                       token_ids=[reply + [im_end], None], tokenizer=tokenizer_fingerprint(tok),
                       finish_reasons=["stop", None])
    enc = Encoder(tok, 200)(group)
    assert enc.prompt == prompt_ids(tok, CONV)
    assert enc.responses == [reply + [im_end], tok("No.", add_special_tokens=False)["input_ids"] + [im_end]]


def test_the_fingerprint_covers_the_template(chat):
    tok, _ = chat
    other = copy.deepcopy(tok)
    other.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    assert len({tokenizer_fingerprint(t) for t in (tok, other, plain)}) == 3


def test_reward_ids_use_the_reward_models_template_and_cut_at_a_turn(chat):
    _, rm = chat
    long = parse_query([{"role": "system", "content": "Be kind."},
                        {"role": "user", "content": "first question " * 30},
                        {"role": "assistant", "content": "first answer " * 30},
                        {"role": "user", "content": "How do I water a cactus?"}])
    whole = reward_ids(rm, long, "Rarely.", 10_000)
    assert whole == rm.apply_chat_template([*[m.model_dump() for m in long],
                                            {"role": "assistant", "content": "Rarely."}])["input_ids"]
    kept = [long[0], long[3]]
    short = rm.apply_chat_template([*[m.model_dump() for m in kept],
                                    {"role": "assistant", "content": "Rarely."}])["input_ids"]
    assert reward_ids(rm, long, "Rarely.", len(short) + 5) == short  # system kept, old turns cut
    assert encode(rm, long, "Rarely.", 10_000, policy=False)[0] == whole


def test_the_refresh_probe_renders_a_conversation_without_recorded_ids(chat, tmp_path):
    from rrhf_ray.refresh import probe_sequences
    from rrhf_ray.types import write_groups

    tok, _ = chat
    pool = write_groups([QueryGroup(query=CONV, responses=["Rarely.", "No."], scores=[1.0, 0.0])],
                        tmp_path / "pool.parquet")
    (best, _), (worst, _) = [(p, r) for p, r in probe_sequences(pool, tok)]
    assert best == worst == tok.apply_chat_template([m.model_dump() for m in CONV],
                                                    add_generation_prompt=True)["input_ids"]
