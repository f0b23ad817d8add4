"""Per-round metrics: `metrics.jsonl` (one object per round), `rounds/<r>/metrics.json`,
`summary.md`, `report.png`, and the table the driver prints at the end. docs/metrics.md
documents every key; a NaN (e.g. a ranking accuracy without a strict pair) is written as null."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

from rrhf_ray.types import atomic_write

STAGES = ("sample", "score", "train", "eval")

COLUMNS = [  # (key, header, format); a key with a "<key>_ci95" [lo, hi] shows it after the value
    ("round", "round", "{:d}"),
    ("eval_reward_mean", "greedy reward", "{:+.3f}"),
    ("sampled_reward_mean", "sampled reward", "{:+.3f}"),
    ("sampled_reward_delta_vs_round0", "Δ sampled vs r0", "{:+.3f}"),
    ("win_rate_vs_round0", "win vs r0", "{:.2f}"),
    ("reference_perplexity", "ref ppl", "{:.2f}"),
    ("judge_perplexity", "judge ppl", "{:.2f}"),
    ("heldout_rank_accuracy", "held-out rank acc", "{:.2f}"),
    ("pool_reward_mean", "pool reward", "{:+.3f}"),
    ("pool_groups_without_pair", "pool no pair", "{:d}"),
    ("train_loss", "train loss", "{:.3f}"),
    ("train_fit_rank_accuracy", "fit rank acc", "{:.2f}"),
]


def round_row(stages: dict[str, Any], r: int) -> dict[str, Any] | None:
    """The metrics of round r from the run state's stages, or None while its evaluation is unfinished."""
    ev = stages.get(f"round{r}/eval")
    if ev is None:
        return None
    row: dict[str, Any] = {"round": r, **ev["eval"]}
    train = stages.get(f"round{r}/train", {}).get("train", {})
    row["train_loss"] = train.get("loss")
    row["train_rank_loss"] = train.get("rank_loss")
    row["train_sft_loss"] = train.get("sft_loss")
    row["train_fit_rank_accuracy"] = train.get("rank_accuracy")  # on the pool it trained on
    row["train_tokens_per_s"] = train.get("tokens_per_s")
    score = stages.get(f"round{r}/score", {})
    pool = score.get("pool_stats", {})
    row["pool_reward_mean"] = pool.get("all", {}).get("mean")
    shape = score.get("pool", {})  # rrhf_ray.data.candidates.pool_summary
    row["pool_reward_mean_premerge"] = shape.get("reward_mean_premerge")
    row["pool_candidates"] = shape.get("candidates")
    row["pool_candidates_premerge"] = shape.get("candidates_premerge")
    row["pool_k_histogram"] = shape.get("k_histogram")
    row["pool_groups_without_pair"] = shape.get("groups_without_pair")
    row["pool_stats"] = pool
    for stage in STAGES:
        row[f"seconds_{stage}"] = stages.get(f"round{r}/{stage}", {}).get("seconds", 0.0)
    return row


def rows_upto(stages: dict[str, Any], upto: int) -> list[dict[str, Any]]:
    return [row for r in range(upto + 1) if (row := round_row(stages, r)) is not None]


def json_safe(value: Any) -> Any:
    """`value` with every NaN or infinite float replaced by None (null in JSON), recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_metrics(out: Path, stages: dict[str, Any], upto: int) -> list[dict[str, Any]]:
    """Rebuild metrics.jsonl and each round's metrics.json from the state (idempotent on resume);
    returns the rows as written (NaN as None)."""
    rows = [json_safe(row) for row in rows_upto(stages, upto)]
    for row in rows:
        atomic_write(out / "rounds" / str(row["round"]) / "metrics.json", json.dumps(row, indent=2))
    atomic_write(out / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    return rows


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _cell(value: Any, fmt: str, ci: Any = None) -> str:
    """`fmt` of the value, and its interval "[lo, hi]" (same format) when there is one."""
    if _missing(value):
        return "–"
    text = fmt.format(value)
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and not any(_missing(x) for x in ci):
        text += " [" + ", ".join(fmt.format(x) for x in ci) + "]"
    return text


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of the headline metrics, one line per round, 95 % intervals in brackets."""
    lines = ["| " + " | ".join(h for _, h, _ in COLUMNS) + " |",
             "|" + "|".join(" ---: " for _ in COLUMNS) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(k), f, row.get(f"{k}_ci95")) for k, _, f in COLUMNS)
                     + " |")
    return "\n".join(lines)


def _pool_line(row: dict[str, Any]) -> str:
    hist = row.get("pool_k_histogram") or {}
    parts = [f"round {row['round']}: groups by k " + ", ".join(f"{k}: {n}" for k, n in hist.items())]
    if row.get("pool_groups_without_pair") is not None:
        parts.append(f"{row['pool_groups_without_pair']} without a strict pair")
    if row.get("pool_candidates") is not None:
        parts.append(f"{row['pool_candidates_premerge']} candidates drawn, {row['pool_candidates']} "
                     "after merging duplicates")
    if not _missing(row.get("pool_reward_mean")) and not _missing(row.get("pool_reward_mean_premerge")):
        parts.append(f"reward mean {row['pool_reward_mean']:+.3f} merged, "
                     f"{row['pool_reward_mean_premerge']:+.3f} as drawn")
    return "; ".join(parts)


def write_report(out: Path, rows: list[dict[str, Any]]) -> None:
    """summary.md (the table, the pools, where things are) and report.png (reward, win rate vs
    round 0 and perplexity by round, 95 % intervals as error bars)."""
    summary = [
        "# RRHF run summary", "",
        ("Greedy reward: held-out queries, greedy replies (the paper's protocol). Sampled reward: "
        "the same queries, sampled replies (the same seeds every round): on small models greedy "
        "decoding saturates early, so read both. Δ sampled vs r0 and win vs r0 (greedy replies; "
        "a tie counts one half) compare each query with round 0's. [lo, hi]: 95 % intervals, a "
        "seeded bootstrap over the held-out queries. Ref ppl: the policy's perplexity of the data "
        "set's reference replies; judge ppl: a fixed judge's perplexity of the greedy replies. "
        "Held-out rank acc: the policy's length-normalised log-probabilities against the rewards "
        "of its sampled held-out replies; fit rank acc: the same on the pool it trained on. Pool "
        "reward: mean reward of the round's training candidates; pool no pair: its groups without "
        "a strict pair. docs/metrics.md defines each number."), "",
        format_table(rows), "",
        *(["Training pool per round (k after merging identical replies):", "",
           *(f"- {_pool_line(r)}" for r in rows if r.get("pool_k_histogram")), ""]
          if any(r.get("pool_k_histogram") for r in rows) else []),
        "Seconds per stage: " + "; ".join(
            f"round {r['round']}: " + ", ".join(f"{s} {r[f'seconds_{s}']:.0f}" for s in STAGES)
            for r in rows), "",
        ("Files: `metrics.jsonl` (one object per round), `rounds/<r>/pool.parquet`, "
        "`rounds/<r>/checkpoint/` (Hugging Face safetensors), `rounds/<r>/eval.jsonl` (every "
        "held-out greedy and sampled reply with its reward)."),
    ]
    atomic_write(out / "summary.md", "\n".join(summary) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in rows]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(13.5, 3.5))
    _plot(ax1, rounds, rows, [("eval_reward_mean", "greedy"), ("sampled_reward_mean", "sampled"),
                              ("pool_reward_mean", "training pool")])
    ax1.set(xlabel="round", ylabel="reward", title="reward (held-out queries; 95 % CI)")
    _plot(ax2, rounds, rows, [("win_rate_vs_round0", "greedy"), ("sampled_win_rate_vs_round0", "sampled")])
    ax2.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax2.set(xlabel="round", ylabel="win rate", title="win rate vs round 0 (95 % CI)")
    _plot(ax3, rounds, rows, [("reference_perplexity", "policy on references"),
                              ("judge_perplexity", "judge on greedy replies")])
    ax3.set(xlabel="round", ylabel="perplexity", title="perplexity")
    for ax in (ax1, ax2, ax3):
        ax.set_xticks(rounds)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write(out / "report.png", buf.getvalue())


def _plot(ax: Any, rounds: list[int], rows: list[dict[str, Any]], series: list[tuple[str, str]]) -> None:
    """One line per (key, label) with the rounds that have the key; error bars from "<key>_ci95"."""
    drawn = False
    for key, label in series:
        pts = [(x, r[key], r.get(f"{key}_ci95")) for x, r in zip(rounds, rows) if not _missing(r.get(key))]
        if not pts:
            continue
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        cis = [p[2] if isinstance(p[2], (list, tuple)) and not any(_missing(c) for c in p[2]) else (y, y)
               for p, y in zip(pts, ys)]
        yerr = [[max(0.0, y - lo) for (lo, _), y in zip(cis, ys)], [max(0.0, hi - y) for (_, hi), y in zip(cis, ys)]]
        ax.errorbar(xs, ys, yerr=yerr, marker="o", capsize=3, label=label)
        drawn = True
    if drawn:
        ax.legend()
