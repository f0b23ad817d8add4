"""`rrhf_ray.report`: per-round rows from the run state, the Markdown table, and the files
(metrics.jsonl, rounds/<r>/metrics.json, summary.md, report.png) the driver writes."""

from __future__ import annotations

import hashlib
import json
import math
import pathlib
import struct
from pathlib import Path

import pytest

from rrhf_ray.report import (
    format_table,
    round_row,
    rows_upto,
    sample_table,
    write_metrics,
    write_report,
)
from tests.helpers import EVAL0, EVAL1, POOL1, state_stages

# --------------------------------------------------------------------------- rows


def test_round_row_of_round0_has_the_eval_metrics_and_empty_training_columns() -> None:
    row = round_row(state_stages(), 0)
    assert row == {
        "round": 0, **EVAL0,
        "train_loss": None, "train_rank_loss": None, "train_sft_loss": None,
        "train_fit_rank_accuracy": None, "train_tokens_per_s": None,
        "pool_reward_mean": None, "pool_reward_mean_premerge": None, "pool_candidates": None,
        "pool_candidates_premerge": None, "pool_k_histogram": None, "pool_groups_without_pair": None,
        "pool_stats": {},
        "seconds_sample": 0.0, "seconds_score": 0.0, "seconds_reference": 0.0, "seconds_train": 0.0,
        "seconds_refresh": 0.0, "seconds_eval": 3.0, "refresh_logprob_gap": None,
        "refresh_logprob_separation": None,
        "seconds_round": 3.0, "seconds_compute": 0.0, "seconds_overhead": 3.0,
    }


def test_round_row_of_a_trained_round_joins_its_four_stages() -> None:
    row = round_row(state_stages(), 1)
    assert row["round"] == 1
    assert {k: row[k] for k in EVAL1} == EVAL1
    assert (row["train_loss"], row["train_rank_loss"], row["train_sft_loss"]) == (1.5, 0.5, 1.0)
    assert math.isnan(row["train_fit_rank_accuracy"])
    assert row["train_tokens_per_s"] == 900.0
    assert "train_epoch" not in row and "epoch" not in row  # only the named training columns
    assert row["pool_reward_mean"] == 0.25
    assert (row["pool_reward_mean_premerge"], row["pool_candidates"], row["pool_candidates_premerge"]) == (0.5, 8, 10)
    assert row["pool_k_histogram"] == {"1": 1, "2": 2, "3": 1} and row["pool_groups_without_pair"] == 2
    assert row["pool_stats"] == POOL1
    assert [row[f"seconds_{s}"] for s in ("sample", "score", "train", "eval")] == [10.4, 2.0, 30.6, 4.0]


def test_a_round_whose_eval_is_unfinished_has_no_row() -> None:
    assert round_row(state_stages(), 2) is None
    assert round_row(state_stages(), 7) is None
    assert round_row({}, 0) is None


def test_rows_upto_lists_the_evaluated_rounds_in_order() -> None:
    stages = state_stages()
    assert [r["round"] for r in rows_upto(stages, 0)] == [0]
    assert [r["round"] for r in rows_upto(stages, 1)] == [0, 1]
    assert [r["round"] for r in rows_upto(stages, 5)] == [0, 1]  # 2 to 5: not evaluated
    assert rows_upto(stages, 1)[1] == round_row(stages, 1)
    assert rows_upto({}, 3) == []


# --------------------------------------------------------------------------- table


def test_format_table_formats_each_column_and_dashes_missing_or_nan() -> None:
    table = format_table(rows_upto(state_stages(), 1)).splitlines()
    assert table == [
        ("| round | greedy reward | sampled reward | Δ sampled vs r0 | win vs r0 | greedy len | sampled len "
         "| ref ppl | judge ppl | held-out rank acc | pool reward | pool no pair | train loss | fit rank acc |"),
        "|" + "|".join([" ---: "] * 14) + "|",
        ("| 0 | -0.500 [-0.750, -0.250] | -0.750 [-1.000, -0.500] | +0.000 | 0.50 | 12.5 | 10.2 | 40.00 "
         "| 30.00 | 0.50 | – | – | – | – |"),
        ("| 1 | +0.500 [+0.375, +0.625] | +0.250 [+0.125, +0.375] | +1.000 [+0.750, +1.250] "
         "| 0.88 [0.75, 1.00] | 20.0 | – | – | 25.00 | – | +0.250 | 2 | 1.500 | – |"),
    ]


def test_format_table_of_no_rows_is_the_header() -> None:
    assert len(format_table([]).splitlines()) == 2
    assert format_table([{"round": 3}]).splitlines()[2] == "| 3 |" + " – |" * 13


# --------------------------------------------------------------------------- files


def test_write_metrics_writes_the_jsonl_and_one_json_per_round(tmp_path: Path) -> None:
    stages = state_stages()
    rows = write_metrics(tmp_path, stages, 1)
    expected = rows_upto(stages, 1)
    assert math.isnan(expected[1]["heldout_rank_accuracy"]) and math.isnan(expected[1]["train_fit_rank_accuracy"])
    expected[1]["heldout_rank_accuracy"] = expected[1]["train_fit_rank_accuracy"] = None
    assert rows == expected  # NaN written as null
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert "NaN" not in "".join(lines)
    assert len(lines) == 2
    on_disk = [json.loads(line) for line in lines]
    assert [r["round"] for r in on_disk] == [0, 1]
    assert on_disk[0] == rows[0]
    assert on_disk[1]["train_loss"] == 1.5 and on_disk[1]["pool_stats"] == POOL1
    assert on_disk[1]["win_rate_vs_round0"] == 0.875 and on_disk[1]["seconds_train"] == 30.6
    for r in (0, 1):
        per_round = json.loads((tmp_path / "rounds" / str(r) / "metrics.json").read_text())
        assert per_round == on_disk[r]
        assert per_round["round"] == r
    assert not (tmp_path / "rounds" / "2").exists()  # round 2 is not evaluated: no file
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [
        "metrics.json", "metrics.json", "metrics.jsonl"]  # no temporary file left


def test_write_metrics_is_idempotent_and_rebuilds_rather_than_appends(tmp_path: Path) -> None:
    stages = state_stages()
    write_metrics(tmp_path, stages, 0)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1
    write_metrics(tmp_path, stages, 1)
    first = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    write_metrics(tmp_path, stages, 1)  # a resumed run writes again
    again = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert again == first
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_a_failed_write_leaves_the_previous_metrics_whole(tmp_path: Path, monkeypatch) -> None:
    """The files are written under a temporary name and renamed: a write that fails half-way
    (disk full) leaves the last complete metrics.jsonl, and no temporary file."""
    stages = state_stages()
    write_metrics(tmp_path, stages, 0)
    before = (tmp_path / "metrics.jsonl").read_text()
    real_write_text = pathlib.Path.write_text

    def half_then_fail(self, data, *args, **kwargs):
        if self.name.startswith(".metrics.jsonl"):
            real_write_text(self, data[: len(data) // 2], *args, **kwargs)
            raise OSError(28, "No space left on device")
        return real_write_text(self, data, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        write_metrics(tmp_path, stages, 1)
    assert (tmp_path / "metrics.jsonl").read_text() == before
    assert json.loads(before)["round"] == 0
    assert not [p for p in tmp_path.rglob(".*") if "tmp" in p.name]


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_write_report_writes_the_summary_and_the_plot(tmp_path: Path) -> None:
    rows = rows_upto(state_stages(), 1)
    write_report(tmp_path, rows)
    summary = (tmp_path / "summary.md").read_text()
    assert summary.startswith("# RRHF run summary\n")
    assert format_table(rows) in summary
    assert "+0.500 [+0.375, +0.625]" in summary  # the intervals
    assert ("- round 1: groups by k 1: 1, 2: 2, 3: 1; 2 without a strict pair; 10 candidates drawn, "
            "8 after merging duplicates; reward mean +0.250 merged, +0.500 as drawn") in summary
    assert ("reported): round 0: sample 0, score 0, train 0, eval 3, overhead 3 of 3; "
            "round 1: sample 10, score 2, train 31, eval 4, overhead 47 of 47") in summary
    assert "`metrics.jsonl`" in summary
    assert _png_size((tmp_path / "report.png").read_bytes()) == (1800, 350)  # 18 × 3.5 in at 100 dpi: 4 panels
    assert "Greedy len, sampled len: mean reply length in tokens" in summary
    assert "Sample replies" not in summary  # no eval.jsonl in this directory: no samples
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.png", "summary.md"]


def test_write_report_of_round0_alone_without_perplexity(tmp_path: Path) -> None:
    rows = rows_upto(state_stages(), 0)
    for key in ("reference_perplexity", "judge_perplexity", "eval_reward_mean_ci95", "sampled_reward_mean_ci95"):
        rows[0][key] = None
    write_report(tmp_path, rows)
    summary = (tmp_path / "summary.md").read_text()
    assert "| 0 | -0.500 | -0.750 | +0.000 | 0.50 | 12.5 | 10.2 | – | – | 0.50 | – | – | – | – |" in summary
    assert "Training pool per round" not in summary  # no round trained yet
    assert _png_size((tmp_path / "report.png").read_bytes()) == (1800, 350)
    before = (tmp_path / "summary.md").read_bytes()
    write_report(tmp_path, rows)
    assert (tmp_path / "summary.md").read_bytes() == before


# --------------------------------------------------------------------------- sample replies


def _write_eval(out: Path, r: int, rows: list[dict]) -> None:
    path = out / "rounds" / str(r) / "eval.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _row(query: str, replies: list[str], rewards: list[float]) -> dict:
    return {"query": query, "greedy_reply": replies[0] if replies else " greedy", "greedy_reward": 0.0,
            "sampled_replies": replies, "sampled_rewards": rewards}


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


QUERIES = [f"\n\nHuman: How do I do task {i}?\n\nAssistant:" for i in range(5)]


def test_sample_table_picks_the_same_queries_in_every_round_whatever_the_file_order(tmp_path: Path) -> None:
    _write_eval(tmp_path, 0, [_row(q, [f" r0 q{i} a", f" r0 q{i} b"], [0.5, -0.5]) for i, q in enumerate(QUERIES)])
    round1 = [_row(q, [f" r1 q{i} a", f" r1 q{i} b"], [-1.0, 1.0]) for i, q in enumerate(QUERIES)]
    _write_eval(tmp_path, 1, round1[::-1] + [_row("only in round 1", [" x"], [1.0])])
    # the documented rule: of the queries every round evaluated, the n with the smallest SHA-256
    picked = sorted(QUERIES, key=_sha)[:2]
    in_file_order = [q for q in QUERIES if q in picked]
    table = sample_table(tmp_path, [0, 1, 2], n=2)  # round 2: no eval.jsonl, left out
    assert [(s["round"], s["query"]) for s in table] == [(0, q) for q in in_file_order] + [(1, q) for q in in_file_order]
    for s in table:
        i = QUERIES.index(s["query"])
        if s["round"] == 0:
            assert (s["best_reply"], s["best_reward"], s["worst_reply"], s["worst_reward"]) == (
                f" r0 q{i} a", 0.5, f" r0 q{i} b", -0.5)
        else:
            assert (s["best_reply"], s["best_reward"], s["worst_reply"], s["worst_reward"]) == (
                f" r1 q{i} b", 1.0, f" r1 q{i} a", -1.0)
    assert sample_table(tmp_path, [0, 1], n=2) == table  # deterministic
    alone = sorted([*QUERIES, "only in round 1"], key=_sha)[:2]  # round 1 alone: its own queries
    assert [s["query"] for s in sample_table(tmp_path, [1], n=2)] == [q for q in [*QUERIES[::-1], "only in round 1"]
                                                                     if q in alone]
    assert {s["query"] for s in sample_table(tmp_path, [0, 1], n=10)} == set(QUERIES)  # not "only in round 1"
    assert sample_table(tmp_path, [0, 1], n=0) == [] and sample_table(tmp_path, [2, 3]) == []
    assert set(sample_table(tmp_path, [0])[0]) == {"round", "query", "best_reply", "best_reward",
                                                    "worst_reply", "worst_reward"}


def test_sample_table_best_and_worst_on_ties_missing_rewards_and_no_samples(tmp_path: Path) -> None:
    _write_eval(tmp_path, 0, [
        _row("a", [" one", " two", " three", " four", " five"], [0.25, 1.0, -0.5, 1.0, -0.5]),
        _row("b", [" same1", " same2", " same3"], [0.5, 0.5, 0.5]),
        _row("c", [" nan", " fine", " none"], [float("nan"), -0.25, None]),
        _row("d", [], []),
    ])
    got = {s["query"]: (s["best_reply"], s["best_reward"], s["worst_reply"], s["worst_reward"])
           for s in sample_table(tmp_path, [0], n=4)}
    assert got == {
        "a": (" two", 1.0, " five", -0.5),  # the first of the best, the last of the worst
        "b": (" same1", 0.5, " same3", 0.5),  # all tie: two different replies
        "c": (" fine", -0.25, " fine", -0.25),  # NaN and null rewards left out
        "d": (None, None, None, None),
    }


# Round 0 and round 1 of three queries; query "pipe" has a reply with `|`, a line break, HTML,
# a backslash before a pipe and a control character; "long" has a 300-character reply.
LONG = " Sure! " + "Step after step, " * 16 + "and you are done. Hope this helps!"
SAMPLE_EVALS = {
    0: [_row("\n\nHuman: How do I use a pipe?\n\nAssistant:",
             [" Type a | b\nin the shell. <b>Done</b>", " Whatever\\| no\x03"], [0.75, -1.25]),
        _row("\n\nHuman: Tell me everything.\n\nAssistant:", [LONG, " No."], [0.5, -1.0]),
        _row("\n\nHuman: Hi?\n\nAssistant:", [" Hello!", " Hi."], [0.25, 0.0])],
    1: [_row("\n\nHuman: How do I use a pipe?\n\nAssistant:", [" Use a pipe: a | b.", " Figure it out."],
             [1.0, -0.5]),
        _row("\n\nHuman: Tell me everything.\n\nAssistant:", [" Short.", " Shorter"], [0.0, -1.25]),
        _row("\n\nHuman: Hi?\n\nAssistant:", [" Hello there!", " Hello!"], [0.5, 0.25])],
}


def _sample_dir(tmp_path: Path) -> list[dict]:
    for r, rows in SAMPLE_EVALS.items():
        _write_eval(tmp_path, r, rows)
    rows = rows_upto(state_stages(), 1)
    write_report(tmp_path, rows)
    return rows


def test_summary_shows_the_best_and_worst_sampled_reply_per_round_markdown_safe(tmp_path: Path) -> None:
    _sample_dir(tmp_path)
    summary = (tmp_path / "summary.md").read_text()
    start = summary.index("Sample replies: 3 held-out queries (the same in every round")
    section = summary[start:summary.index("Seconds per stage")].splitlines()
    assert section[2:] == [
        "**Query 1.** Human: How do I use a pipe?<br><br>Assistant:",
        "",
        "| round | best sampled reply | reward | worst sampled reply | reward |",
        "| ---: | --- | ---: | --- | ---: |",
        "| 0 | Type a \\| b<br>in the shell. &lt;b&gt;Done&lt;/b&gt; | +0.750 | Whatever\\\\\\| no␃ | -1.250 |",
        "| 1 | Use a pipe: a \\| b. | +1.000 | Figure it out. | -0.500 |",
        "",
        "**Query 2.** Human: Tell me everything.<br><br>Assistant:",
        "",
        "| round | best sampled reply | reward | worst sampled reply | reward |",
        "| ---: | --- | ---: | --- | ---: |",
        ("| 0 | Sure! Step after step, Step after step, Step after step, Step after step, Step after step, "
         "Step after step, Step after step, Step aft … after step, Step after step, and you are done. Hope "
         "this helps! | +0.500 | No. | -1.000 |"),
        "| 1 | Short. | +0.000 | Shorter | -1.250 |",
        "",
        "**Query 3.** Human: Hi?<br><br>Assistant:",
        "",
        "| round | best sampled reply | reward | worst sampled reply | reward |",
        "| ---: | --- | ---: | --- | ---: |",
        "| 0 | Hello! | +0.250 | Hi. | +0.000 |",
        "| 1 | Hello there! | +0.500 | Hello! | +0.250 |",
        "",
    ]
    long_cell = section[13].split(" | ")[1]
    assert len(LONG) == 313 and len(long_cell) == 199 and long_cell.count("…") == 1  # ≤ 200: start … end
    assert sample_table(tmp_path, [0, 1])[0]["best_reply"] == " Type a | b\nin the shell. <b>Done</b>"  # full text


def test_the_sample_tables_parse_as_markdown_tables_with_the_texts_intact(tmp_path: Path) -> None:
    """Rendered by a CommonMark + GFM-tables parser: every row has its 5 cells, and each reply
    reads as it was written (line break as <br>, HTML shown as text)."""
    markdown_it = pytest.importorskip("markdown_it")
    _sample_dir(tmp_path)
    tokens = markdown_it.MarkdownIt("commonmark").enable("table").parse((tmp_path / "summary.md").read_text())
    tables, cells = [], None
    for tok in tokens:
        if tok.type == "table_open":
            tables.append([])
        elif tok.type == "tr_open":
            cells = []
            tables[-1].append(cells)
        elif tok.type == "inline" and cells is not None and tables:
            cells.append(tok.content)
        elif tok.type == "tr_close":
            cells = None
    assert len(tables) == 4  # the round table and one per sampled query
    for table in tables[1:]:
        assert [len(row) for row in table] == [5, 5, 5]
    pipe = tables[1]
    renderer = markdown_it.MarkdownIt("commonmark")
    assert renderer.renderInline(pipe[1][1]) == "Type a | b<br>in the shell. &lt;b&gt;Done&lt;/b&gt;"
    assert renderer.renderInline(pipe[1][3]) == "Whatever\\| no␃"
    assert renderer.renderInline(pipe[2][1]) == "Use a pipe: a | b."
    assert [row[0] for row in pipe] == ["round", "0", "1"] and pipe[1][2] == "+0.750"


def test_summary_samples_are_the_same_queries_after_another_round(tmp_path: Path) -> None:
    _sample_dir(tmp_path)
    first = sample_table(tmp_path, [0, 1])
    _write_eval(tmp_path, 2, [_row(row["query"], [" r2"], [0.125]) for row in SAMPLE_EVALS[0]])
    again = sample_table(tmp_path, [0, 1, 2])
    assert again[:6] == first
    assert [(s["round"], s["query"]) for s in again[6:]] == [(2, s["query"]) for s in first[:3]]
    assert {s["best_reply"] for s in again[6:]} == {" r2"}
