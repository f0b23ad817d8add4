"""The tiny chat kit: a ChatML tokenizer whose end of turn is not its EOS, a chat model whose
generation config ends on both, and a reward classifier with a template of its own."""

from __future__ import annotations

import json

import pytest

from rrhf_ray.demo.tiny import IM_END, IM_START, build_tiny_chat_model, build_tiny_chat_reward_model

CONVERSATION = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "How do I water a cactus?"}]


@pytest.fixture(scope="module")
def chat_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    return build_tiny_chat_model(root / "policy"), build_tiny_chat_reward_model(root / "reward")


def test_chat_policy_renders_chatml_and_ends_turns_with_im_end(chat_dirs):
    from transformers import AutoTokenizer

    policy, _ = chat_dirs
    tok = AutoTokenizer.from_pretrained(policy)
    text = tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nHow do I water a cactus?<|im_end|>\n<|im_start|>assistant\n")
    im_end = tok.convert_tokens_to_ids(IM_END)
    ids = tok.apply_chat_template(CONVERSATION, add_generation_prompt=True)["input_ids"]
    assert ids.count(tok.convert_tokens_to_ids(IM_START)) == 3 and ids.count(im_end) == 2
    assert im_end != tok.eos_token_id and tok.bos_token is None
    gen = json.loads((policy / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [tok.eos_token_id, im_end]


def test_chat_policy_samples_end_of_turn_more_often_than_eos(chat_dirs):
    """The end_logit bias: the first reply token's probability of <|im_end|> is well above a
    random model's 1/vocab, and above the EOS's (so sampled replies end their turn)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    policy, _ = chat_dirs
    tok = AutoTokenizer.from_pretrained(policy)
    model = AutoModelForCausalLM.from_pretrained(policy)
    ids = tok.apply_chat_template(CONVERSATION, add_generation_prompt=True)["input_ids"]
    with torch.no_grad():
        probs = model(torch.tensor([ids])).logits[0, -1].softmax(-1)
    im_end = tok.convert_tokens_to_ids(IM_END)
    assert probs[im_end] > 2 / len(tok) and probs[im_end] > 2 * probs[tok.eos_token_id]


def test_chat_reward_model_has_its_own_template(chat_dirs):
    from transformers import AutoConfig, AutoTokenizer

    policy, reward = chat_dirs
    reply = [*CONVERSATION, {"role": "assistant", "content": "Rarely."}]
    rt, pt = AutoTokenizer.from_pretrained(reward), AutoTokenizer.from_pretrained(policy)
    text = rt.apply_chat_template(reply, tokenize=False)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n")
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\nRarely.<|eot_id|>")
    assert text != pt.apply_chat_template(reply, tokenize=False)
    assert AutoConfig.from_pretrained(reward).num_labels == 1
