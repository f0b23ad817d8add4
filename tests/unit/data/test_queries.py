"""Data sources: every layout read from a small local file in its schema, no hub, no network.

Hub ids go through `datasets.load_dataset(source)`; the tests call that same code path with a
local directory laid out as the hub repos are (data/train-*.parquet, train.jsonl / test.jsonl).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rrhf_ray.config import DataConfig
from rrhf_ray.data.queries import (
    QueryRecord,
    SourceStats,
    load_data,
    truncate_query,
)
from rrhf_ray.registry import register, unregister
from rrhf_ray.types import DataError

H, A = "\n\nHuman:", "\n\nAssistant:"


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep `load_dataset`'s Arrow cache inside the test's tmp_path."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def cfg(source: Path | str, **kw) -> DataConfig:
    return DataConfig(source=str(source), **kw)


def rm_row(i: int, text: str = "question") -> dict:
    prompt = f"{H} {text} {i}?{A}"
    return {
        "prompt": prompt,
        "response": f" good {i}",
        "chosen": f" good {i}",
        "rejected": f" bad {i}",
    }


def invariant(s: SourceStats) -> int:
    return s.kept + s.dropped + s.duplicates + s.diverged + s.held_out + s.capped


# --------------------------------------------------------------------------- layouts


def test_rm_static_through_load_dataset_uses_own_test_split(tmp_path: Path) -> None:
    repo = tmp_path / "rm-static"
    train_rows = [rm_row(i) for i in range(6)]
    train_rows[2] = {
        "prompt": f"{H} ¿Qué tal? 你好 🙂{A}",
        "response": " Muy bien 👍",
        "chosen": " Muy bien 👍",
        "rejected": " 不好",
    }
    write_parquet(repo / "data" / "train-00000-of-00001.parquet", train_rows)
    write_parquet(
        repo / "data" / "test-00000-of-00001.parquet", [rm_row(i, "held") for i in range(3)]
    )

    data = load_data(cfg(repo))

    assert len(data.train) == 6 and len(data.eval) == 3
    by_query = {r.query: r for r in data.train}
    uni = by_query[f"{H} ¿Qué tal? 你好 🙂{A}"]
    assert uni == QueryRecord(
        uni.query, (" Muy bien 👍", " 不好"), (1.0, 0.0), ("chosen", "rejected")
    )
    assert by_query[f"{H} question 4?{A}"].responses == (" good 4", " bad 4")
    assert sorted(r.query for r in data.eval) == [f"{H} held {i}?{A}" for i in range(3)]
    train_stats, eval_stats = data.stats
    assert (train_stats.split, train_stats.read, train_stats.kept) == ("train", 6, 6)
    assert (eval_stats.split, eval_stats.read, eval_stats.kept, train_stats.held_out) == (
        "test",
        3,
        3,
        0,
    )


def test_hub_id_goes_through_load_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub id is handed to `load_dataset` unchanged; here it answers with local data."""
    import datasets

    repo = tmp_path / "rm"
    write_parquet(repo / "data" / "train-0.parquet", [rm_row(i) for i in range(4)])
    calls = []
    real = datasets.load_dataset

    def fake(source: str):
        calls.append(source)
        return real(str(repo))

    monkeypatch.setattr(datasets, "load_dataset", fake)
    data = load_data(DataConfig(source="Dahoas/rm-static", eval_fraction=0.25))
    assert calls == ["Dahoas/rm-static"]
    assert (len(data.train), len(data.eval)) == (3, 1)
    assert data.stats[1].split == "held-out"


def test_unreachable_hub_is_a_data_error() -> None:
    with pytest.raises(
        DataError, match=r"cannot read data set 'Dahoas/rm-static' with datasets.load_dataset"
    ):
        load_data(DataConfig(source="Dahoas/rm-static"))


def test_hh_rlhf_split_at_last_assistant_turn_and_diverging_rows(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repo = tmp_path / "hh"
    repo.mkdir()
    prompt = f"{H} Hi{A} Hello! How can I help?{H} Tell me a joke, 🙂 s'il vous plaît{A}"
    rows = [
        {"chosen": prompt + " Why did the chicken cross the road?", "rejected": prompt + " No."},
        {"chosen": f"{H} a{A} x", "rejected": f"{H} b{A} y"},  # the dialogues diverge
        {"chosen": f"{H} Name a colour{A} Blue.", "rejected": f"{H} Name a colour{A}"},
    ]
    write_jsonl(repo / "train.jsonl", rows)
    write_jsonl(repo / "test.jsonl", [{"chosen": f"{H} q{A} yes", "rejected": f"{H} q{A} no"}])

    with caplog.at_level(logging.INFO, logger="rrhf_ray.data.queries"):
        data = load_data(cfg(repo))

    by_query = {r.query: r for r in data.train}
    assert set(by_query) == {prompt, f"{H} Name a colour{A}"}
    assert by_query[prompt] == QueryRecord(
        prompt, (" Why did the chicken cross the road?", " No."), (1.0, 0.0), ("chosen", "rejected")
    )
    assert by_query[f"{H} Name a colour{A}"].responses == (" Blue.", "")
    assert data.eval == [
        QueryRecord(f"{H} q{A}", (" yes", " no"), (1.0, 0.0), ("chosen", "rejected"))
    ]
    train_stats = data.stats[0]
    assert (train_stats.read, train_stats.diverged, train_stats.kept) == (3, 1, 2)
    assert invariant(train_stats) == train_stats.read
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1 and "skipped 1 row(s)" in warning[0] and "[train]" in warning[0]
    assert any(
        "read 3, kept 2" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO
    )


def test_reference_jsonl_ranks_best_first_and_holds_out_a_seeded_share(tmp_path: Path) -> None:
    rows = [
        {
            "query": f"{H} q{i} — ünïcödé{A}",
            "responses": [" low", " high", " mid"],
            "scores": [0.1, 0.9, 0.5],
        }
        for i in range(8)
    ]
    rows[0]["sources"] = ["policy@1", "human", "dataset"]
    path = write_jsonl(tmp_path / "ref.jsonl", rows)

    data = load_data(cfg(path, eval_fraction=0.25))

    assert (len(data.train), len(data.eval)) == (6, 2)
    every = {r.query: r for r in data.train + data.eval}
    assert every[f"{H} q0 — ünïcödé{A}"] == QueryRecord(
        f"{H} q0 — ünïcödé{A}",
        (" high", " mid", " low"),
        (0.9, 0.5, 0.1),
        ("human", "dataset", "policy@1"),
    )
    assert every[f"{H} q1 — ünïcödé{A}"].sources == ("dataset",) * 3
    assert every[f"{H} q1 — ünïcödé{A}"].to_group().scores == [0.9, 0.5, 0.1]
    train_stats, eval_stats = data.stats
    assert (train_stats.read, train_stats.held_out, eval_stats.read, eval_stats.kept) == (
        8,
        2,
        2,
        2,
    )


def test_plain_prompts_jsonl_and_parquet(tmp_path: Path) -> None:
    prompts = [{"query": f"Write a haiku about {w}"} for w in ("rain", "snow", "日本", "sun")]
    for path in (
        write_jsonl(tmp_path / "p.jsonl", prompts),
        write_parquet(tmp_path / "p.parquet", prompts),
    ):
        data = load_data(cfg(path, eval_fraction=0.0))
        assert sorted(r.query for r in data.train) == sorted(p["query"] for p in prompts)
        assert all(r.responses == () and r.scores == () and r.sources == () for r in data.train)
        assert data.eval == [] and data.stats[0].kept == 4


def test_parquet_in_rm_static_layout(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "rm.parquet", [rm_row(i) for i in range(5)])
    data = load_data(cfg(path, eval_fraction=0.2, seed=3))
    assert (len(data.train), len(data.eval)) == (4, 1)
    assert all(r.scores == (1.0, 0.0) and r.responses[0].startswith(" good") for r in data.train)


def test_save_to_disk_directories(tmp_path: Path) -> None:
    from datasets import Dataset, DatasetDict

    dd = DatasetDict(
        {
            "train": Dataset.from_list([rm_row(i) for i in range(4)]),
            "validation": Dataset.from_list([rm_row(9, "v")]),
        }
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    data = load_data(cfg(tmp_path / "dd", eval_split="validation"))
    assert (len(data.train), [r.query for r in data.eval]) == (4, [f"{H} v 9?{A}"])

    Dataset.from_list([{"query": f"p{i}"} for i in range(10)]).save_to_disk(str(tmp_path / "one"))
    data = load_data(cfg(tmp_path / "one", eval_fraction=0.3))
    assert (len(data.train), len(data.eval), data.stats[1].split) == (7, 3, "held-out")


@pytest.fixture
def test_builtins():
    """Built-ins registered by a test, forgotten after it (the registry is process-wide)."""
    yield
    for name in ("test-list", "test-splits", "test-rows"):
        unregister("data", name)


def test_builtin_loaders(tmp_path: Path, test_builtins) -> None:
    register("data", "test-list", lambda: [QueryRecord(f"q{i}") for i in range(5)])
    register("data", "test-splits",
        lambda: {
            "train": [QueryRecord("a"), QueryRecord("b", (" y",), (1.0,))],
            "test": [QueryRecord("c")],
        },
    )
    register("data", "test-rows", lambda: [{"query": "r1"}, {"query": "r2"}])
    data = load_data(DataConfig(source="builtin:test-list", eval_fraction=0.2))
    assert sorted(r.query for r in data.train + data.eval) == [f"q{i}" for i in range(5)]
    assert len(data.eval) == 1

    data = load_data(DataConfig(source="builtin:test-splits"))
    assert sorted(r.query for r in data.train) == ["a", "b"]
    assert data.eval == [QueryRecord("c")]
    data = load_data(DataConfig(source="builtin:test-rows", eval_fraction=0.0))
    assert sorted(r.query for r in data.train) == ["r1", "r2"]  # rows in a layout work too
    assert QueryRecord("b", (" y",), (1.0,)).sources == ("dataset",)

    with pytest.raises(DataError, match=r"unknown built-in data builtin:nope.*test-list"):
        load_data(DataConfig(source="builtin:nope"))


# --------------------------------------------------------------------------- splits and sizes


def test_seeded_split_is_stable_and_disjoint(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"query": f"prompt {i}"} for i in range(40)])

    def split(seed: int) -> tuple[list[str], list[str]]:
        d = load_data(cfg(path, seed=seed, eval_fraction=0.25))
        return [r.query for r in d.train], [r.query for r in d.eval]

    train0, eval0 = split(0)
    assert (len(train0), len(eval0)) == (30, 10)
    assert not set(train0) & set(eval0) and len(set(train0) | set(eval0)) == 40
    assert split(0) == (train0, eval0)  # same seed: same split, same order
    assert set(split(1)[1]) != set(eval0)
    # Caps take a prefix of the same shuffled order, so a smaller run sees a subset.
    capped = load_data(cfg(path, seed=0, eval_fraction=0.25, max_prompts=5, max_eval_prompts=2))
    assert [r.query for r in capped.train] == train0[:5]
    assert [r.query for r in capped.eval] == eval0[:2]
    assert (capped.stats[0].capped, capped.stats[1].capped) == (25, 8)
    assert all(invariant(s) == s.read for s in capped.stats)


def test_duplicates_are_counted_and_eval_queries_leave_training(tmp_path: Path) -> None:
    repo = tmp_path / "hh"
    repo.mkdir()
    d = lambda q, a: {"chosen": f"{H} {q}{A} {a}", "rejected": f"{H} {q}{A} no"}
    write_jsonl(
        repo / "train.jsonl", [d("a", "1"), d("b", "1"), d("a", "2"), d("c", "1"), d("a", "3")]
    )
    write_jsonl(repo / "test.jsonl", [d("c", "9"), d("e", "1"), d("e", "2")])

    data = load_data(cfg(repo))

    assert sorted(r.query for r in data.train) == [f"{H} a{A}", f"{H} b{A}"]
    first_a = next(r for r in data.train if r.query == f"{H} a{A}")
    assert first_a.responses[0] == " 1"  # the first occurrence is kept
    assert sorted(r.query for r in data.eval) == [f"{H} c{A}", f"{H} e{A}"]
    train_stats, eval_stats = data.stats
    assert (train_stats.read, train_stats.duplicates, train_stats.kept) == (5, 3, 2)
    assert (eval_stats.read, eval_stats.duplicates, eval_stats.kept) == (3, 1, 2)


# --------------------------------------------------------------------------- length


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text)["input_ids"])


def test_truncation_at_turn_boundaries_and_dropping(tokenizer, tmp_path: Path) -> None:
    last = f"{H} How do I reset my password?{A}"
    middle = f"{H} Can you help me fix a flat tyre?{A} Sure, loosen the nuts."
    first = f"{H} What is a good way to learn to cook?{A} Start with simple recipes."
    three_turns = first + middle + last
    budget = n_tokens(tokenizer, middle + last)
    assert n_tokens(tokenizer, three_turns) > budget >= n_tokens(tokenizer, last)

    assert truncate_query(three_turns, tokenizer, budget) == middle + last
    assert truncate_query(three_turns, tokenizer, budget - 1) == last
    assert truncate_query(last, tokenizer, budget) == last  # fits: untouched
    long_turn = f"{H} " + "please thanks sorry " * 30 + A
    assert (
        truncate_query(long_turn, tokenizer, budget) is None
    )  # one turn too long: nothing to cut at
    assert truncate_query("sure " * 200, tokenizer, budget) is None  # no turn marker

    rows = [
        {"query": three_turns},
        {"query": last},
        {"query": long_turn},
        {"query": "sure " * 200},
        {"query": first + first + last},
    ]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    data = load_data(cfg(path, max_prompt_tokens=budget, eval_fraction=0.0), tokenizer=tokenizer)

    # first + first + last: the earliest cut that fits keeps one `first` turn.
    assert sorted(r.query for r in data.train) == sorted([middle + last, last, first + last])
    s = data.stats[0]
    assert (s.read, s.kept, s.truncated, s.dropped) == (5, 3, 2, 2)
    assert all(n_tokens(tokenizer, r.query) <= budget for r in data.train)
    assert all(r.query.startswith(H) for r in data.train)
    assert invariant(s) == s.read

    # Without a tokenizer the budget is not applied.
    assert load_data(cfg(path, max_prompt_tokens=budget, eval_fraction=0.0)).stats[0].kept == 5


def test_every_query_too_long_is_an_error_naming_the_budget(tokenizer, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"query": "sure " * 50}])
    with pytest.raises(
        DataError, match=r"leaves no training queries.*dropped 1.*max_prompt_tokens"
    ):
        load_data(cfg(path, max_prompt_tokens=8, eval_fraction=0.0), tokenizer=tokenizer)


# --------------------------------------------------------------------------- malformed input


@pytest.mark.parametrize(
    ("rows", "kw", "message"),
    [
        (
            [{"query": "ok"}, {"query": 5}],
            {},
            r"p\.jsonl line 2: field 'query' must be a string, got int",
        ),
        (
            [{"query": "ok"}, {"query": "ok2"}, {"query": "   "}],
            {},
            r"p\.jsonl line 3: field 'query' is empty",
        ),
        ([{"query": "ok"}, {"prompt": "x"}], {}, r"p\.jsonl line 2: missing field 'query'"),
        (
            [{"query": "q", "responses": ["a", "b"], "scores": [1.0]}],
            {},
            r"p\.jsonl line 1: scores has 1 entries but responses has 2",
        ),
        (
            [{"query": "q", "responses": ["a"], "scores": [1.0]}, {"query": "q2", "scores": [1.0]}],
            {},
            r"p\.jsonl line 2: responses: Field required",
        ),
        (
            [{"query": "q", "responses": [3], "scores": [1.0]}],
            {},
            r"p\.jsonl line 1: responses\.0: .*string",
        ),
        ([["query", "q"]], {}, r"p\.jsonl line 1: expected an object"),
        (
            [{"prompt": "p", "chosen": "a"}],
            {"format": "rm-static"},
            r"p\.jsonl line 1: missing field 'rejected'",
        ),
        (
            [{"prompt": "p", "chosen": "a", "rejected": None}],
            {},
            r"line 1: field 'rejected' must be a string, got NoneType",
        ),
        (
            [{"chosen": f"{H} hi{A} yo", "rejected": f"{H} hi no answer"}],
            {},
            r"p\.jsonl line 1: field 'rejected' has no '\\n\\nAssistant:' turn",
        ),
        ([{"text": "what"}], {}, r"p\.jsonl line 1: cannot tell the layout from fields \['text'\]"),
    ],
)
def test_malformed_jsonl_rows_name_file_line_and_field(tmp_path: Path, rows, kw, message) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(DataError, match=message):
        load_data(cfg(path, **kw))


def test_malformed_table_rows_name_source_row_and_field(tmp_path: Path) -> None:
    repo = tmp_path / "rm"
    good, bad = rm_row(0), {**rm_row(1), "prompt": ""}
    write_parquet(repo / "data" / "train-0.parquet", [good, bad])
    with pytest.raises(DataError, match=r"rm\[train\] row 1: field 'prompt' is empty"):
        load_data(cfg(repo))

    no_rejected = [{k: v for k, v in rm_row(i).items() if k != "rejected"} for i in range(2)]
    path = write_parquet(tmp_path / "x.parquet", no_rejected)
    with pytest.raises(DataError, match=r"x\.parquet row 0: missing field 'rejected'"):
        load_data(cfg(path, format="rm-static"))

    ints = write_parquet(tmp_path / "ints.parquet", [{"prompt": 1, "chosen": "a", "rejected": "b"}])
    with pytest.raises(
        DataError, match=r"ints\.parquet row 0: field 'prompt' must be a string, got int"
    ):
        load_data(cfg(ints))


def test_unreadable_sources(tmp_path: Path) -> None:
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"query": "fine"}\n{"query": oops}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl line 2: not valid JSON"):
        load_data(cfg(bad_json))

    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"query": "ok"}\n{"query": "café"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.jsonl line 2: not UTF-8 text"):
        load_data(cfg(latin1))

    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"this is not parquet")
    with pytest.raises(DataError, match=r"broken\.parquet: cannot read as Parquet"):
        load_data(cfg(broken))

    with pytest.raises(DataError, match=r"data file not found: .*missing\.jsonl"):
        load_data(cfg(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match=r"cannot read data set '.*no-such-dir'"):
        load_data(cfg(tmp_path / "no-such-dir"))
    with pytest.raises(DataError, match=r"empty\.jsonl holds no rows"):
        load_data(cfg(write_jsonl(tmp_path / "empty.jsonl", [])))
    with pytest.raises(DataError, match=r"data\.source is not set"):
        load_data(DataConfig.model_construct(source="  "))

    repo = tmp_path / "rm"
    write_parquet(repo / "data" / "train-0.parquet", [rm_row(0)])
    with pytest.raises(DataError, match=r"no split 'training' \(data\.split\); it has \['train'\]"):
        load_data(cfg(repo, split="training"))


def test_config_rejects_unknown_format_and_bad_fraction() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="format"):
        DataConfig(format="csv")
    with pytest.raises(ValidationError, match="eval_fraction"):
        DataConfig(eval_fraction=1.0)
    default = DataConfig(source="x.jsonl")
    assert default.format == "auto" and default.eval_fraction == 0.05


def test_dialogues_that_truncate_to_a_held_out_query_leave_training(tokenizer, tmp_path: Path) -> None:
    """Duplicates are found on the final queries (after the cut to `max_prompt_tokens`), held-out
    set first: long dialogues that differ only in their early turns become the same query once
    cut, and none of them may train on a query the evaluation holds out, or twice."""
    last = f"{H} How do I reset my password?{A}"
    early = [f"{H} Tell me about topic number {i} in some detail please.{A} Fine, here it is." for i in range(7)]
    budget = n_tokens(tokenizer, last)
    assert all(n_tokens(tokenizer, e + last) > budget for e in early)
    repo = tmp_path / "prompts"
    repo.mkdir()
    write_jsonl(repo / "train.jsonl", [{"query": e + last} for e in early] + [{"query": f"{H} Other?{A}"}])
    write_jsonl(repo / "test.jsonl", [{"query": early[0] + early[1] + last}])

    data = load_data(cfg(repo, max_prompt_tokens=budget), tokenizer=tokenizer)

    assert [r.query for r in data.eval] == [last]
    assert [r.query for r in data.train] == [f"{H} Other?{A}"]  # 7 of 7 long dialogues were `last`
    train_stats, eval_stats = data.stats
    assert (train_stats.read, train_stats.truncated, train_stats.duplicates, train_stats.kept) == (8, 0, 7, 1)
    assert invariant(train_stats) == train_stats.read and invariant(eval_stats) == eval_stats.read

    # Within one split too: the first of the dialogues that cut to the same query is kept.
    path = write_jsonl(tmp_path / "p.jsonl", [{"query": e + last} for e in early])
    data = load_data(cfg(path, max_prompt_tokens=budget, eval_fraction=0.0), tokenizer=tokenizer)
    assert [r.query for r in data.train] == [last]
    assert (data.stats[0].truncated, data.stats[0].duplicates) == (1, 6)


def test_max_response_tokens_caps_the_data_sets_responses_at_load_and_marks_them_cut(tokenizer,
                                                                                      tmp_path: Path) -> None:
    """A 260-token `chosen` capped at load time: cut from the right to 40 policy tokens, marked
    cut off, so it joins the pool without EOS and the trainer keeps the group's prompt whole."""
    from rrhf_ray.data.candidates import dataset_candidates
    from rrhf_ray.train.encoding import Encoder

    long = " " + " ".join(["please help me with the bread and the tea"] * 26)
    assert len(tokenizer(long, add_special_tokens=False)["input_ids"]) >= 260
    q = f"{H} How do I bake bread?{A}"
    path = write_jsonl(tmp_path / "ranked.jsonl", [{"query": q, "responses": [long, " Bake it."], "scores": [1, 0]}])
    data = load_data(cfg(path, eval_fraction=0.0, max_response_tokens=40), tokenizer=tokenizer)
    (record,) = data.train
    assert record.cut == (True, False) and record.finish_reasons == ["length", "stop"]
    capped = tokenizer(record.responses[0], add_special_tokens=False)["input_ids"]
    assert len(capped) <= 40 and long.startswith(record.responses[0]) and record.responses[1] == " Bake it."
    assert data.stats[0].responses_cut == 1 and "1 response(s) cut" in data.stats[0].summary()
    assert [c.finish_reason for c in dataset_candidates(record)] == ["length", "stop"]

    enc = Encoder(tokenizer, 96)(record.to_group())
    assert enc.prompt == tokenizer(q)["input_ids"]  # not cut: the long response gave way at load
    assert enc.responses[0][-1] != tokenizer.eos_token_id and enc.responses[1][-1] == tokenizer.eos_token_id
    # Uncapped, the same row leaves the prompt only max_length // 2 and its response is cut later.
    whole = load_data(cfg(path, eval_fraction=0.0), tokenizer=tokenizer).train[0]
    assert whole.cut == () and whole.responses[0] == long
