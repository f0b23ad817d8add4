"""`rrhf_ray.report`: per-round rows from the run state, the Markdown table, and the files
(metrics.jsonl, rounds/<r>/metrics.json, summary.md, report.png) the driver writes."""

from __future__ import annotations

import json
import math
import pathlib
import struct
from pathlib import Path

import pytest

from rrhf_ray.report import format_table, round_row, rows_upto, write_metrics, write_report

EVAL0 = {"eval_reward_mean": -0.5, "eval_reward_std": 0.25, "eval_reward_mean_ci95": [-0.75, -0.25],
         "sampled_reward_mean": -0.75, "sampled_reward_std": 0.5, "sampled_reward_mean_ci95": [-1.0, -0.5],
         "reference_perplexity": 40.0, "judge_perplexity": 30.0, "heldout_rank_accuracy": 0.5,
         "win_rate_vs_round0": 0.5, "win_rate_vs_round0_ci95": None,
         "sampled_win_rate_vs_round0": 0.5, "sampled_win_rate_vs_round0_ci95": None,
         "sampled_reward_delta_vs_round0": 0.0, "sampled_reward_delta_vs_round0_ci95": None}
EVAL1 = {"eval_reward_mean": 0.5, "eval_reward_std": 0.125, "eval_reward_mean_ci95": [0.375, 0.625],
         "sampled_reward_mean": 0.25, "sampled_reward_std": 0.375, "sampled_reward_mean_ci95": [0.125, 0.375],
         "reference_perplexity": None, "judge_perplexity": 25.0, "heldout_rank_accuracy": float("nan"),
         "win_rate_vs_round0": 0.875, "win_rate_vs_round0_ci95": [0.75, 1.0],
         "sampled_win_rate_vs_round0": 0.75, "sampled_win_rate_vs_round0_ci95": [0.5, 1.0],
         "sampled_reward_delta_vs_round0": 1.0, "sampled_reward_delta_vs_round0_ci95": [0.75, 1.25]}
POOL1 = {"all": {"mean": 0.25, "std": 1.0, "max": 2.0, "count": 8.0},
         "policy@0": {"mean": 0.25, "std": 1.0, "max": 2.0, "count": 8.0}}
SHAPE1 = {"groups": 4, "k_histogram": {"1": 1, "2": 2, "3": 1}, "groups_without_pair": 2,
          "candidates": 8, "candidates_premerge": 10, "reward_mean": 0.25, "reward_mean_premerge": 0.5}
TRAIN1 = {"loss": 1.5, "rank_loss": 0.5, "sft_loss": 1.0, "rank_accuracy": float("nan"),
          "tokens_per_s": 900.0, "epoch": 1.0}


def state_stages() -> dict:
    """The `stages` of a state.json: round 0 and 1 finished, round 2 sampled and scored only."""
    return {
        "round0/eval": {"seconds": 3.0, "finished": 1.0, "eval": EVAL0},
        "round1/sample": {"seconds": 10.4, "finished": 2.0, "groups": 4, "candidates": 8},
        "round1/score": {"seconds": 2.0, "finished": 3.0, "pool_stats": POOL1, "pool": SHAPE1},
        "round1/train": {"seconds": 30.6, "finished": 4.0, "train": TRAIN1},
        "round1/eval": {"seconds": 4.0, "finished": 5.0, "eval": EVAL1},
        "round2/sample": {"seconds": 9.0, "finished": 6.0},
        "round2/score": {"seconds": 1.0, "finished": 7.0, "pool_stats": POOL1},
    }


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
        "seconds_sample": 0.0, "seconds_score": 0.0, "seconds_train": 0.0, "seconds_eval": 3.0,
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
        ("| round | greedy reward | sampled reward | Δ sampled vs r0 | win vs r0 | ref ppl | judge ppl "
         "| held-out rank acc | pool reward | pool no pair | train loss | fit rank acc |"),
        "|" + "|".join([" ---: "] * 12) + "|",
        ("| 0 | -0.500 [-0.750, -0.250] | -0.750 [-1.000, -0.500] | +0.000 | 0.50 | 40.00 | 30.00 | 0.50 "
         "| – | – | – | – |"),
        ("| 1 | +0.500 [+0.375, +0.625] | +0.250 [+0.125, +0.375] | +1.000 [+0.750, +1.250] "
         "| 0.88 [0.75, 1.00] | – | 25.00 | – | +0.250 | 2 | 1.500 | – |"),
    ]


def test_format_table_of_no_rows_is_the_header() -> None:
    assert len(format_table([]).splitlines()) == 2
    assert format_table([{"round": 3}]).splitlines()[2] == "| 3 |" + " – |" * 11


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
    assert ("Seconds per stage: round 0: sample 0, score 0, train 0, eval 3; "
            "round 1: sample 10, score 2, train 31, eval 4") in summary
    assert "`metrics.jsonl`" in summary
    assert _png_size((tmp_path / "report.png").read_bytes()) == (1350, 350)  # 13.5 × 3.5 in at 100 dpi
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.png", "summary.md"]


def test_write_report_of_round0_alone_without_perplexity(tmp_path: Path) -> None:
    rows = rows_upto(state_stages(), 0)
    for key in ("reference_perplexity", "judge_perplexity", "eval_reward_mean_ci95", "sampled_reward_mean_ci95"):
        rows[0][key] = None
    write_report(tmp_path, rows)
    summary = (tmp_path / "summary.md").read_text()
    assert "| 0 | -0.500 | -0.750 | +0.000 | 0.50 | – | – | 0.50 | – | – | – | – |" in summary
    assert "Training pool per round" not in summary  # no round trained yet
    assert _png_size((tmp_path / "report.png").read_bytes()) == (1350, 350)
    before = (tmp_path / "summary.md").read_bytes()
    write_report(tmp_path, rows)
    assert (tmp_path / "summary.md").read_bytes() == before
