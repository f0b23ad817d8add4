"""The growth laws of `benchmarks/scaling.py` (`benchmarks/growth.py`): least-squares lines and
the fixed part's share, on synthetic rounds whose costs are known."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("growth", Path(__file__).resolve().parents[2] / "benchmarks/growth.py")
growth = sys.modules["growth"] = importlib.util.module_from_spec(spec)  # as scaling.py imports it
spec.loader.exec_module(growth)


def test_fit_line_by_hand() -> None:
    """Points (0, 1), (1, 2), (2, 2), (3, 4): x̄ = 1.5, ȳ = 2.25; Σ(x−x̄)² = 5,
    Σ(x−x̄)(y−ȳ) = (−1.5)(−1.25) + (−0.5)(−0.25) + (0.5)(−0.25) + (1.5)(1.75) = 4.5, so the slope is
    0.9 and the intercept 2.25 − 0.9 · 1.5 = 0.9. Residuals 0.1, 0.2, −0.7, 0.4: Σ = 0.7 of
    Σ(y−ȳ)² = 4.75, R² = 1 − 0.7 / 4.75."""
    line = growth.fit_line([0, 1, 2, 3], [1, 2, 2, 4])
    assert line.slope == pytest.approx(0.9)
    assert line.intercept == pytest.approx(0.9)
    assert line.r2 == pytest.approx(1 - 0.7 / 4.75)
    assert line.at(10) == pytest.approx(9.9)


def test_fit_line_refuses_what_has_no_slope() -> None:
    with pytest.raises(ValueError, match="two or more distinct x"):
        growth.fit_line([16, 16], [1.0, 2.0])
    with pytest.raises(ValueError, match="3 x values but 2 y values"):
        growth.fit_line([1, 2, 3], [1.0, 2.0])


def synthetic_round(queries: int, k: int, prompt_len: int, factors: list[str]) -> dict:
    """A round whose stages cost exactly: sample 0.5 s + 2 ms per candidate + 0.1 ms per prompt
    token; score 0.1 s + 1 ms per candidate; train 1 s + 20 ms per candidate + 0.5 ms per prompt
    token; refresh 0.4 s; eval 2 s. Fixed: 4 s, then 23 ms per candidate, 0.6 ms per prompt token."""
    c, p = queries * k, queries * prompt_len
    return {"factors": factors, "queries": queries, "k": k, "prompt_len": prompt_len, "candidates": c,
            "prompt_tokens": p, "candidate_tokens": c * 48,
            "seconds": {"sample": 0.5 + 0.002 * c + 0.0001 * p, "score": 0.1 + 0.001 * c,
                        "train": 1.0 + 0.02 * c + 0.0005 * p, "refresh": 0.4, "eval": 2.0}}


def test_growth_laws_recover_known_costs() -> None:
    rounds = [synthetic_round(16, 4, 64, ["queries", "k", "prompt"])]
    rounds += [synthetic_round(16 * s, 4, 64, ["queries"]) for s in (4, 16)]
    rounds += [synthetic_round(16, k, 64, ["k"]) for k in (2, 8, 16)]
    rounds += [synthetic_round(16, 4, p, ["prompt"]) for p in (128, 256, 512)]
    laws = growth.growth(rounds)

    queries = laws["queries"]
    assert queries["xs"] == [64, 256, 1024]  # candidates, by growing x
    # Growing the queries adds candidates and their prompts: 23 ms per candidate plus the prompt
    # tokens that come with each (64 / k = 16 tokens · 0.6 ms = 9.6 ms): 32.6 s per 1,000.
    assert queries["slope"] == pytest.approx(32.6)
    assert queries["fixed_seconds"] == pytest.approx(4.0)
    assert queries["lines"]["round"].r2 == pytest.approx(1.0)
    assert queries["lines"]["train"].slope == pytest.approx(0.02 + 0.0005 * 16)
    assert queries["lines"]["eval"].slope == pytest.approx(0.0)
    assert queries["lines"]["eval"].intercept == pytest.approx(2.0)

    # Growing k adds candidates only; the 16 queries' prompt tokens (1,024) are part of its fixed part.
    assert laws["k"]["slope"] == pytest.approx(23.0)  # ms per extra candidate
    assert laws["k"]["fixed_seconds"] == pytest.approx(4.0 + 0.0006 * 1024)
    # Growing the prompt: 0.6 ms per prompt token; the 64 candidates are fixed.
    assert laws["prompt"]["slope"] == pytest.approx(0.6)
    assert laws["prompt"]["fixed_seconds"] == pytest.approx(4.0 + 0.023 * 64)

    share = growth.fixed_share(rounds, laws)
    total = 4.0 + 0.023 * 1024 + 0.0006 * 256 * 64  # the measured round at 256 queries
    assert share["queries"] == 256
    assert share["round_seconds"] == pytest.approx(total)
    assert share["share"] == pytest.approx(4.0 / total)
    # Of the 4.0 s: the evaluation's 2.0 s, and 0.5 + 0.1 + 1.0 + 0.4 s of the other stages.
    assert share["eval_seconds"] == pytest.approx(2.0)
    assert share["overhead_seconds"] == pytest.approx(2.0)
    assert share["overhead_share"] == pytest.approx(2.0 / total)
    text = growth.summary(laws, share)
    assert "fixed part of a round at 256 queries" in text
    assert f"overhead (the other stages' fixed parts) 2.00 s = {2.0 / total:.1%} (target ≤ 5 %)" in text


def test_a_factor_measured_at_one_point_has_no_law() -> None:
    rounds = [synthetic_round(16, 4, 64, ["queries", "k", "prompt"]), synthetic_round(64, 4, 64, ["queries"])]
    laws = growth.growth(rounds)
    assert list(laws) == ["queries"]
    assert laws["queries"]["slope"] == pytest.approx(32.6)


def test_table_has_a_row_per_round_with_its_seconds_per_token() -> None:
    rounds = [synthetic_round(16, 4, 64, ["queries", "k", "prompt"]), synthetic_round(64, 4, 64, ["queries"])]
    lines = growth.table(rounds).splitlines()
    assert len(lines) == 2 + 2
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    # 16 queries × k = 4: 64 candidates, 1,024 prompt + 3,072 candidate tokens, 6.0864 s
    # (4 + 0.023 · 64 + 0.0006 · 1,024) → 1.486 ms per token.
    assert cells[:6] == ["queries, k, prompt", "16", "4", "64", "64", "4,096"]
    assert cells[-2:] == ["6.09", "1.49"]


def test_plot_has_one_panel_per_factor(tmp_path) -> None:
    import struct

    rounds = [synthetic_round(16, 4, 64, ["queries", "k", "prompt"]), synthetic_round(64, 4, 64, ["queries"]),
              synthetic_round(16, 8, 64, ["k"])]
    laws = growth.growth(rounds)
    growth.plot(rounds, laws, str(tmp_path / "scaling.png"))
    head = (tmp_path / "scaling.png").read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    # Two factors with a law (the prompt has one point): 2 × 4.5 in wide, 3.8 in high, at 110 dpi.
    assert struct.unpack(">II", head[16:24]) == (990, 418)
