"""Bad chat input is refused by `rrhf-ray validate` (the preflight, before Ray starts) with one
`error:` line naming the field or the row: chat_template on without a template (policy and
reward model), and a conversation the policy's template renders to nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from rrhf_ray.cli import main
from tests.unit.test_preflight import error_line


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from rrhf_ray.demo.tiny import (
        build_tiny_chat_model,
        build_tiny_chat_reward_model,
        build_tiny_llama,
    )

    root = tmp_path_factory.mktemp("chat-preflight")
    return (build_tiny_chat_model(root / "chat", end_logit=0), build_tiny_llama(root / "plain", vocab_size=300),
            build_tiny_chat_reward_model(root / "rm"))


def run_validate(tmp: Path, model: Path, rows: list, **sections) -> int:
    data = tmp / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"rounds": 1, "model": {"name_or_path": str(model)},
              "data": {"source": str(data), "max_prompt_tokens": 64, **sections.get("data", {})},
              "sampling": {"max_new_tokens": 32, "max_model_len": 256}, "eval": {"max_new_tokens": 32},
              "reward": sections.get("reward", {"kind": "rule", "rule": "builtin:demo"}),
              "output": {"dir": str(tmp / "out")}}
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return main(["validate", str(path)])


CONV = [{"role": "user", "content": "How do I water a cactus?"}]


def test_a_conversational_run_validates(tmp_path, models, capsys):
    chat, _, rm = models
    assert run_validate(tmp_path, chat, [{"prompt": CONV}] * 2 + [{"prompt": CONV + CONV}],
                        data={"chat_template": "on"}, reward={"kind": "model", "model": str(rm),
                                                              "chat_template": "on"}) == 0, capsys.readouterr().err


def test_chat_template_on_without_a_template(tmp_path, models, capsys):
    _, plain, _ = models
    assert run_validate(tmp_path, plain, [{"prompt": CONV}], data={"chat_template": "on"}) == 2
    assert error_line(capsys) == (f"error: data.chat_template is on but the tokenizer in {plain} has no "
                                  "chat_template (use auto or off, or a tokenizer with a template: model.tokenizer)")


def test_reward_chat_template_on_without_a_template(tmp_path, models, capsys):
    chat, plain, _ = models
    assert run_validate(tmp_path, chat, [{"prompt": CONV}],
                        reward={"kind": "model", "model": str(plain), "chat_template": "on"}) == 2
    assert "reward.chat_template is on but the tokenizer of reward.model" in error_line(capsys)


def test_a_template_that_renders_to_nothing_names_the_row(tmp_path, models, capsys):
    chat, _, _ = models
    silent = shutil.copytree(chat, tmp_path / "silent")
    (silent / "chat_template.jinja").write_text("{% if false %}x{% endif %}")
    assert run_validate(tmp_path, silent, [{"prompt": CONV}, {"prompt": CONV + CONV}]) == 2
    line = error_line(capsys)
    assert line.startswith("error: data.source: ") and line.endswith(
        "d.jsonl line 1: the chat template renders the conversation to nothing")


def test_an_unknown_role_names_the_row(tmp_path, models, capsys):
    chat, _, _ = models
    assert run_validate(tmp_path, chat, [{"prompt": CONV}, {"prompt": [{"role": "bot", "content": "x"}]}]) == 2
    assert error_line(capsys).endswith("d.jsonl line 2: prompt[0].role 'bot' is not one of system, user, "
                                       "assistant, tool")


# A ChatML variant unlike the tiny model's own template: role and content on one line.
CUSTOM = ("{% for m in messages %}<|im_start|>{{ m['role'] }}: {{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant:{% endif %}")


def test_a_custom_chat_template_validates(tmp_path, models, capsys):
    _, plain, rm = models
    template = tmp_path / "custom.jinja"
    template.write_text(CUSTOM)
    # The plain tokenizer has no template of its own: chat_template on renders with the file's.
    assert run_validate(tmp_path, plain, [{"prompt": CONV}], data={"chat_template": "on",
                                                                   "chat_template_path": str(template)},
                        reward={"kind": "model", "model": str(rm), "chat_template_path": str(template)}) == 0, \
        capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"ok: data.chat_template_path {template}: renders a conversation" in out
    assert f"ok: reward.chat_template_path {template}: renders a conversation" in out


@pytest.mark.parametrize(("text", "problem"), [
    (None, "template file not found: {path}"),
    ("{% for m in messages %}{{ m['content'] }}", ("{path} does not compile as a Jinja template: Unexpected end "
     "of template. Jinja was looking for the following tags: 'endfor' or 'else'. The innermost block that needs "
     "to be closed is 'for'. (line 1)")),
    ("{% if false %}x{% endif %}", "{path} renders a sample conversation (one user turn) to nothing"),
    ("{{ raise_exception('only system turns') }}", ("{path} fails on a sample conversation (one user turn): "
     "TemplateError: only system turns")),
])
@pytest.mark.parametrize("section", ["data", "reward"])
def test_a_bad_chat_template_file_is_one_error_naming_field_and_file(tmp_path, models, capsys, text, problem,
                                                                      section):
    chat, _, rm = models
    template = tmp_path / "t.jinja"
    if text is not None:
        template.write_text(text)
    sections = {"data": {"chat_template_path": str(template)}} if section == "data" else {
        "reward": {"kind": "model", "model": str(rm), "chat_template_path": str(template)}}
    assert run_validate(tmp_path, chat, [{"prompt": CONV}], **sections) == 2
    assert error_line(capsys) == f"error: {section}.chat_template_path: " + problem.format(path=template)


def test_chat_template_off_with_a_template_file(tmp_path, models, capsys):
    chat, _, _ = models
    (tmp_path / "t.jinja").write_text(CUSTOM)
    assert run_validate(tmp_path, chat, [{"prompt": CONV}], data={"chat_template": "off",
                                                                  "chat_template_path": str(tmp_path / "t.jinja")}) == 2
    assert "data.chat_template is off but data.chat_template_path is set" in error_line(capsys)


def test_a_reward_template_file_with_a_rule(tmp_path, models, capsys):
    chat, _, _ = models
    (tmp_path / "t.jinja").write_text(CUSTOM)
    assert run_validate(tmp_path, chat, [{"prompt": CONV}], reward={
        "kind": "rule", "rule": "builtin:demo", "chat_template_path": str(tmp_path / "t.jinja")}) == 2
    assert "reward.chat_template_path is set but reward.kind is 'rule'" in error_line(capsys)


def test_rrhf_ray_sample_renders_with_the_template_file(tmp_path, models, capsys):
    """`rrhf-ray sample` (preset P: the data set's responses, no engine) reads data.chat_template_path
    as `run` does: a file that renders to nothing is the same one error line, a good one samples."""
    chat, _, _ = models
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": CONV, "completion": [{"role": "assistant", "content": "Rarely."}]}) + "\n")
    template = tmp_path / "t.jinja"
    config = {"rounds": 1, "model": {"name_or_path": str(chat)},
              "data": {"source": str(data), "eval_fraction": 0.0, "chat_template_path": str(template)},
              "sampling": {"preset": "P", "max_new_tokens": 32, "max_model_len": 256},
              "reward": {"kind": "rule", "rule": "builtin:demo"}, "output": {"dir": str(tmp_path / "out")}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    template.write_text("{% if false %}x{% endif %}")
    assert main(["sample", str(path), "--out", str(tmp_path / "pool.jsonl")]) == 2
    assert error_line(capsys) == (f"error: data.chat_template_path: {template} renders a sample conversation "
                                  "(one user turn) to nothing")
    template.write_text(CUSTOM)
    assert main(["sample", str(path), "--out", str(tmp_path / "pool.jsonl")]) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "pool.jsonl").read_text())["responses"] == ["Rarely."]


def test_a_reward_template_file_for_the_reward_model_stage_is_checked(tmp_path, models, capsys):
    """The reward model the reward_model stage will train does not exist yet: the file is checked alone."""
    chat, _, _ = models
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": CONV, "chosen": [{"role": "assistant", "content": "Yes."}],
                                 "rejected": [{"role": "assistant", "content": "No."}]}) + "\n")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": CONV}) + "\n")
    config = {"rounds": 1, "model": {"name_or_path": str(chat)},
              "data": {"source": str(data), "max_prompt_tokens": 64},
              "sampling": {"max_new_tokens": 32, "max_model_len": 256}, "eval": {"max_new_tokens": 32},
              "reward": {"kind": "model", "model": "unused", "chat_template_path": str(tmp_path / "t.jinja")},
              "reward_model": {"data": str(pairs)}, "output": {"dir": str(tmp_path / "out")}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["validate", str(path)]) == 2
    assert error_line(capsys) == f"error: reward.chat_template_path: template file not found: {tmp_path / 't.jinja'}"
