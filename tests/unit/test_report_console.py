"""The end-of-run table on the console fits 80 columns: the headline columns only
(`report.CONSOLE_COLUMNS`), aligned; summary.md keeps every column (`report.COLUMNS`); the
README's table of the demo's console output has the same columns as the code."""

from __future__ import annotations

from pathlib import Path

from rrhf_ray.report import COLUMNS, CONSOLE_COLUMNS, CONSOLE_WIDTH, format_console_table, rows_upto
from tests.helpers import state_stages

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_console_table_shows_the_headline_columns_aligned():
    assert format_console_table(rows_upto(state_stages(), 1)).splitlines() == [
        "| round | sampled reward [95 % CI] | Δ vs r0 | greedy | reply len | ref ppl |",
        "|------:|-------------------------:|--------:|-------:|----------:|--------:|",
        "|     0 |  -0.750 [-1.000, -0.500] |  +0.000 | -0.500 |      10.2 |   40.00 |",
        "|     1 |  +0.250 [+0.125, +0.375] |  +1.000 | +0.500 |         – |       – |",
    ]
    assert {k for k, *_ in CONSOLE_COLUMNS} <= {k for k, *_ in COLUMNS}  # summary.md has them all


def test_every_console_table_line_fits_80_columns():
    wide = {"round": 12, "sampled_reward_mean": -9.875, "sampled_reward_mean_ci95": [-10.0, -9.75],
            "sampled_reward_delta_vs_round0": -19.5, "eval_reward_mean": -9.999,
            "sampled_reply_length_mean": 1024.0, "reference_perplexity": 9999.99}
    for rows in (rows_upto(state_stages(), 1), [wide], []):
        lines = format_console_table(rows).splitlines()
        assert len(lines) == 2 + len(rows)
        assert max(len(line) for line in lines) <= CONSOLE_WIDTH, lines


def test_the_readme_console_table_has_the_codes_columns():
    lines = README.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| round |"))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append([c.strip() for c in line.strip("|").split("|")])
    assert table[0] == [h for _, h, _, _ in CONSOLE_COLUMNS]
    assert all(len(row) == len(CONSOLE_COLUMNS) for row in table)
    assert [row[0] for row in table[2:]] == ["0", "1", "2", "3"]  # the demo's rounds
