"""The stages before RRHF read conversations: SFT pairs from messages / prompt–completion, reward
model pairs from preference data (explicit or implicit prompt), each rendered by the tokenizer's
chat template when encoded."""

from __future__ import annotations

import json

import pytest

from rrhf_ray.data.pairs import read_preference_pairs, read_sft_pairs
from rrhf_ray.train.reward_model import encode_text
from rrhf_ray.train.sft import encode_pair
from rrhf_ray.types import DataError, parse_query

USER = [{"role": "user", "content": "How do I water a cactus?"}]
REPLY = {"role": "assistant", "content": "Rarely."}
NO = {"role": "assistant", "content": "No."}


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def chat():
    from rrhf_ray.demo.tiny import HEADER_TEMPLATE, train_chat_tokenizer

    return train_chat_tokenizer(), train_chat_tokenizer(template=HEADER_TEMPLATE)


@pytest.mark.parametrize("row", [{"messages": [*USER, REPLY]}, {"prompt": USER, "completion": [REPLY]}],
                         ids=["messages", "prompt-completion"])
def test_sft_reads_conversations_and_closes_the_turn(tmp_path, chat, row):
    tok, _ = chat
    (pair,) = read_sft_pairs(write(tmp_path / "s.jsonl", [row]))
    assert (pair.query, pair.response) == (parse_query(USER), "Rarely.")
    ids, start = encode_pair(tok, pair, 128)
    assert ids[:start] == tok.apply_chat_template(USER, add_generation_prompt=True)["input_ids"]
    assert ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")


@pytest.mark.parametrize("row", [{"prompt": USER, "chosen": [REPLY], "rejected": [NO]},
                                 {"chosen": [*USER, REPLY], "rejected": [*USER, NO]}],
                         ids=["preference", "implicit-preference"])
def test_reward_model_pairs_from_conversational_preferences(tmp_path, chat, row):
    _, rm_tok = chat
    (pair,) = read_preference_pairs(write(tmp_path / "p.jsonl", [row]))
    assert (pair.query, pair.chosen, pair.rejected) == (parse_query(USER), "Rarely.", "No.")
    assert encode_text(rm_tok, pair.query, pair.chosen, 128) == rm_tok.apply_chat_template([*USER, REPLY])["input_ids"]


def test_a_prompt_only_set_is_no_sft_data(tmp_path):
    with pytest.raises(DataError, match=r"s\.jsonl line 1: has 0 response\(s\); SFT needs one"):
        read_sft_pairs(write(tmp_path / "s.jsonl", [{"prompt": USER}]))
