"""Conversational queries through the data sources and the pool files: TRL's / the Hub's
layouts detected by `data.format: auto`, `data.chat_template`, and one `DataError` naming the
row for each kind of bad conversation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rrhf_ray.config import DataConfig
from rrhf_ray.data.queries import load_data
from rrhf_ray.types import DataError, Message, QueryGroup, read_groups, write_groups

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def conv(i: int) -> list[dict]:
    return [SYSTEM, user(f"How do I water cactus {i}?")]


# One row each of the accepted conversational layouts (docs/chat.md's table).
LAYOUTS = {
    "prompt-only": lambda i: {"prompt": conv(i)},
    "prompt-completion": lambda i: {"prompt": conv(i), "completion": [assistant(f"Rarely, {i}.")]},
    "preference": lambda i: {"prompt": conv(i), "chosen": [assistant(f"Rarely, {i}.")],
                             "rejected": [assistant("Figure it out.")]},
    "implicit-preference": lambda i: {"chosen": [*conv(i), assistant(f"Rarely, {i}.")],
                                      "rejected": [*conv(i), assistant("Figure it out.")]},
    "messages": lambda i: {"messages": [*conv(i), assistant(f"Rarely, {i}.")]},
}
RESPONSES = {"prompt-only": (), "prompt-completion": ("Rarely, {i}.",), "messages": ("Rarely, {i}.",),
             "preference": ("Rarely, {i}.", "Figure it out."),
             "implicit-preference": ("Rarely, {i}.", "Figure it out.")}


@pytest.fixture(scope="module")
def chat_tokenizer():
    from rrhf_ray.demo.tiny import train_chat_tokenizer

    return train_chat_tokenizer()


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_each_conversational_layout_is_detected_and_keeps_the_conversation(tmp_path, layout, chat_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [LAYOUTS[layout](i) for i in range(4)])
    data = load_data(DataConfig(source=str(path), eval_fraction=0.25, max_prompt_tokens=200), chat_tokenizer)
    records = sorted(data.train + data.eval, key=lambda r: r.query[1].content)
    assert [r.query for r in records] == [tuple(Message(**m) for m in conv(i)) for i in range(4)]
    assert [r.responses for r in records] == [tuple(t.format(i=i) for t in RESPONSES[layout]) for i in range(4)]
    explicit = load_data(DataConfig(source=str(path), format=layout, eval_fraction=0.25, max_prompt_tokens=200),
                         chat_tokenizer)
    assert explicit.train == data.train


def test_chat_template_off_and_auto_without_template_write_raw_text(tmp_path, chat_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [LAYOUTS["preference"](i) for i in range(2)])
    off = load_data(DataConfig(source=str(path), eval_fraction=0.0, chat_template="off"), chat_tokenizer)
    assert min(r.query for r in off.train) == (
        "You are a helpful assistant.\n\nHuman: How do I water cactus 0?\n\nAssistant:")
    assert off.train[0].sources == ("chosen", "rejected")
    import copy

    plain = copy.deepcopy(chat_tokenizer)
    plain.chat_template = None
    auto = load_data(DataConfig(source=str(path), eval_fraction=0.0), plain)
    assert sorted(r.query for r in auto.train) == sorted(r.query for r in off.train)
    with pytest.raises(DataError, match="data.chat_template is on but the policy's tokenizer has no chat_template"):
        load_data(DataConfig(source=str(path), eval_fraction=0.0, chat_template="on"), plain)


def test_chat_template_on_renders_raw_text_as_one_user_turn(tmp_path, chat_tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hello there"}])
    data = load_data(DataConfig(source=str(path), eval_fraction=0.0, chat_template="on"), chat_tokenizer)
    assert data.train[0].query == (Message(role="user", content="Hello there"),)


def test_long_conversations_are_cut_at_a_user_turn_keeping_the_system_message(tmp_path, chat_tokenizer):
    from rrhf_ray.train.tokens import prompt_ids

    long = [SYSTEM, user("first question " * 20), assistant("first answer " * 20), user("How do I water a cactus?")]
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": long}])
    budget = len(prompt_ids(chat_tokenizer, tuple(Message(**m) for m in [SYSTEM, long[-1]]))) + 2
    data = load_data(DataConfig(source=str(path), eval_fraction=0.0, max_prompt_tokens=budget), chat_tokenizer)
    assert data.train[0].query == tuple(Message(**m) for m in [SYSTEM, long[-1]])
    assert data.stats[0].truncated == 1


@pytest.mark.parametrize(("row", "message"), [
    ({"prompt": [{"role": "bot", "content": "hi"}]},
     r"d\.jsonl line 2: prompt\[0\]\.role 'bot' is not one of system, user, assistant, tool"),
    ({"prompt": [SYSTEM, user("  ")]}, r"d\.jsonl line 2: prompt\[1\]\.content is empty"),
    ({"messages": [user("hi"), {"role": "user"}]}, r"d\.jsonl line 2: messages\[1\] has no 'content'"),
    ({"prompt": conv(1), "chosen": [user("x")], "rejected": [assistant("y")]},
     r"d\.jsonl line 2: chosen must be one assistant message"),
])
def test_bad_conversations_name_the_row(tmp_path, chat_tokenizer, row, message):
    first = {k: (conv(0) if k in ("prompt", "messages") else [assistant("ok")]) for k in row}
    path = write_jsonl(tmp_path / "d.jsonl", [first, row])
    with pytest.raises(DataError, match=message):
        load_data(DataConfig(source=str(path), eval_fraction=0.0), chat_tokenizer)


def test_neither_prompt_nor_messages_and_an_empty_template_name_the_row(tmp_path, chat_tokenizer):
    import copy

    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "what"}])
    with pytest.raises(DataError, match=r"d\.jsonl line 1: cannot tell the layout .* neither a prompt nor messages"):
        load_data(DataConfig(source=str(path), eval_fraction=0.0), chat_tokenizer)
    silent = copy.deepcopy(chat_tokenizer)
    silent.chat_template = "{% if false %}x{% endif %}"
    path = write_jsonl(tmp_path / "e.jsonl", [{"prompt": conv(0)}])
    with pytest.raises(DataError, match=r"e\.jsonl line 1: the chat template renders the conversation to nothing"):
        load_data(DataConfig(source=str(path), eval_fraction=0.0), silent)


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_pool_files_hold_conversations_beside_text(tmp_path, suffix):
    groups = [QueryGroup(query=conv(0), responses=["Rarely."], scores=[1.0], sources=["chosen"]),
              QueryGroup(query="\n\nHuman: hi\n\nAssistant:", responses=[" Hello."], scores=[0.5])]
    back = read_groups(write_groups(groups, tmp_path / f"pool{suffix}"))
    assert back == groups
    assert back[0].query == tuple(Message(**m) for m in conv(0))
    if suffix == ".jsonl":
        first = json.loads((tmp_path / "pool.jsonl").read_text().splitlines()[0])
        assert first["query"] == conv(0)


def test_text_only_parquet_pools_have_no_messages_column(tmp_path):
    import pyarrow.parquet as pq

    write_groups([QueryGroup(query="q", responses=["a"], scores=[1.0])], tmp_path / "p.parquet")
    assert "messages" not in pq.read_table(tmp_path / "p.parquet").column_names
