"""workflows/ultrafeedback_instruct.yaml (the chat recipe, docs/chat.md) passes `rrhf-ray
validate` with tiny local stand-ins for its hub policy, reward model and data set, so the
preflight reads every conversation and renders it with the stand-in's chat template."""

from __future__ import annotations

import json
from pathlib import Path

from rrhf_ray.cli import main
from rrhf_ray.config import load_config

RECIPE = Path(__file__).resolve().parents[2] / "workflows" / "ultrafeedback_instruct.yaml"


def test_ultrafeedback_recipe_validates_with_tiny_stand_ins(tmp_path, capsys):
    from rrhf_ray.demo.tiny import build_tiny_chat_model, build_tiny_chat_reward_model

    policy = build_tiny_chat_model(tmp_path / "policy", end_logit=0, max_position_embeddings=2048)
    reward = build_tiny_chat_reward_model(tmp_path / "reward")
    data = tmp_path / "ultrafeedback.jsonl"
    rows = [{"chosen": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": "Gladly."}],
             "rejected": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": "No."}]}
            for i in range(4)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = [f"model.name_or_path={policy}", f"reward.model={reward}", f"data.source={data}",
                 f"output.dir={tmp_path / 'out'}", f"output.storage_path={tmp_path / 'ray'}"]
    assert main(["validate", str(RECIPE), *overrides]) == 0, capsys.readouterr().err

    c = load_config(RECIPE)
    assert (c.data.format, c.data.chat_template, c.reward.chat_template) == ("implicit-preference", "on", "on")
    assert c.reward.kind == "model" and "8B" in c.reward.model
    assert c.sampling.stop == [] and c.sampling.use_gpu and c.train.use_gpu
    assert c.train.max_length >= c.data.max_prompt_tokens + c.sampling.max_new_tokens + 1


# --------------------------------------------------------------------------- data.chat_template_path

# ChatML with the roles upper-cased: unlike the tiny chat model's own template.
CUSTOM = ("{% for m in messages %}<|im_start|>{{ m['role'] | upper }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>ASSISTANT\n{% endif %}")
CONV = ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "How do I brew tea?"})


def run_config(tmp_path: Path, policy: Path, template: Path):
    from rrhf_ray.config import RunConfig

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": list(CONV)[:1] + [{"role": "user", "content": f"Q{i}?"}]}) + "\n"
                            for i in range(4)))
    return RunConfig.model_validate({
        "rounds": 1, "model": {"name_or_path": str(policy)},
        "data": {"source": str(data), "chat_template_path": str(template)},
        "reward": {"kind": "rule", "rule": "builtin:demo"}, "output": {"dir": str(tmp_path / "out")}})


def test_a_custom_chat_template_renders_prompts_token_for_token(tmp_path):
    """The run's tokenizer (<output.dir>/tokenizer, `with_run_tokenizer`) renders a conversation
    with the file's template, not the model's own: the prompt ids are the file's text tokenized,
    the same in the driver's data loading (`load_data`) and the trainer's encoding (`Encoder`), and
    a reply is closed with the template's turn end."""
    from transformers import AutoTokenizer

    from rrhf_ray.data.queries import load_data
    from rrhf_ray.demo.tiny import build_tiny_chat_model
    from rrhf_ray.train.encoding import Encoder
    from rrhf_ray.train.tokens import encode, prompt_ids
    from rrhf_ray.train.worker import load_tokenizer
    from rrhf_ray.types import QueryGroup, parse_query
    from rrhf_ray.workflow import with_run_tokenizer

    policy = build_tiny_chat_model(tmp_path / "policy", end_logit=0)
    template = tmp_path / "custom.jinja"
    template.write_text(CUSTOM)
    config = with_run_tokenizer(run_config(tmp_path, policy, template), str(policy), tmp_path / "out")
    assert config.model.tokenizer == str(tmp_path / "out" / "tokenizer")
    own = AutoTokenizer.from_pretrained(policy)
    run = load_tokenizer(config.model.tokenizer, False)  # as the trainer and evaluation tasks load it
    text = "<|im_start|>SYSTEM\nBe brief.<|im_end|>\n<|im_start|>USER\nHow do I brew tea?<|im_end|>\n<|im_start|>ASSISTANT\n"
    expected = own(text, add_special_tokens=False)["input_ids"]
    query = parse_query(list(CONV))
    assert prompt_ids(run, query) == expected != prompt_ids(own, query)
    ids, start = encode(run, query, " Steep it.", 256)
    im_end = own.convert_tokens_to_ids("<|im_end|>")
    assert ids[:start] == expected and ids[-1] == im_end
    encoded = Encoder(run, 256)(QueryGroup(query=query, responses=[" Steep it."], scores=[1.0]))
    assert encoded.prompt == expected and encoded.responses[0][-1] == im_end
    loaded = load_data(config.data, run)
    rendered = run.apply_chat_template([m.model_dump() for m in loaded.train[0].query], add_generation_prompt=True,
                                       tokenize=False)
    assert rendered.startswith("<|im_start|>SYSTEM\n") and rendered.endswith("<|im_start|>ASSISTANT\n")


def test_the_tokenizer_fingerprint_follows_the_template_file(tmp_path):
    """Rewriting the template file changes the run tokenizer's fingerprint (so a pool's recorded
    prompt ids are rendered anew by the trainer), while the run's config fingerprint, which names
    the file, stays: the same file content gives the same fingerprint again."""
    from rrhf_ray.demo.tiny import build_tiny_chat_model
    from rrhf_ray.state import config_fingerprint
    from rrhf_ray.train.encoding import Encoder
    from rrhf_ray.train.tokens import prompt_ids, tokenizer_fingerprint
    from rrhf_ray.train.worker import load_tokenizer
    from rrhf_ray.types import QueryGroup, parse_query
    from rrhf_ray.workflow import with_run_tokenizer

    policy = build_tiny_chat_model(tmp_path / "policy", end_logit=0)
    template = tmp_path / "custom.jinja"
    out = tmp_path / "out"

    def fingerprint(text: str):
        template.write_text(text)
        config = run_config(tmp_path, policy, template)
        tok = load_tokenizer(with_run_tokenizer(config, str(policy), out).model.tokenizer, False)
        return tokenizer_fingerprint(tok), config_fingerprint(config), tok

    first, run_first, tok_a = fingerprint(CUSTOM)
    second, run_second, tok_b = fingerprint(CUSTOM.replace("upper", "lower"))
    assert first != second and run_first == run_second
    assert first != tokenizer_fingerprint(load_tokenizer(str(policy), False))
    assert fingerprint(CUSTOM)[0] == first
    # A group sampled under the first template, trained under the second: its prompt is rendered anew.
    query = parse_query(list(CONV))
    stale = QueryGroup(query=query, responses=["x"], scores=[0.0], token_ids=[None],
                       prompt_ids=prompt_ids(tok_a, query), tokenizer=first)
    assert Encoder(tok_b, 256)(stale).prompt == prompt_ids(tok_b, query) != prompt_ids(tok_a, query)
