"""Per-round metrics: `metrics.jsonl` (one object per round), `rounds/<r>/metrics.json`,
`summary.md`, `report.png`, and the table the driver prints at the end."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

from rrhf_ray.types import atomic_write

STAGES = ("sample", "score", "train", "eval")

COLUMNS = [  # (key, header, format)
    ("round", "round", "{:d}"),
    ("eval_reward_mean", "greedy reward", "{:+.3f}"),
    ("eval_reward_std", "± std", "{:.3f}"),
    ("sampled_reward_mean", "sampled reward", "{:+.3f}"),
    ("win_rate_vs_round0", "win vs r0", "{:.2f}"),
    ("perplexity", "perplexity", "{:.2f}"),
    ("pool_reward_mean", "pool reward", "{:+.3f}"),
    ("train_loss", "train loss", "{:.3f}"),
    ("train_rank_accuracy", "rank acc", "{:.2f}"),
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
    row["train_rank_accuracy"] = train.get("rank_accuracy")
    row["train_tokens_per_s"] = train.get("tokens_per_s")
    pool = stages.get(f"round{r}/score", {}).get("pool_stats", {})
    row["pool_reward_mean"] = pool.get("all", {}).get("mean")
    row["pool_stats"] = pool
    for stage in STAGES:
        row[f"seconds_{stage}"] = stages.get(f"round{r}/{stage}", {}).get("seconds", 0.0)
    return row


def rows_upto(stages: dict[str, Any], upto: int) -> list[dict[str, Any]]:
    return [row for r in range(upto + 1) if (row := round_row(stages, r)) is not None]


def write_metrics(out: Path, stages: dict[str, Any], upto: int) -> list[dict[str, Any]]:
    """Rebuild metrics.jsonl and each round's metrics.json from the state (idempotent on resume)."""
    rows = rows_upto(stages, upto)
    for row in rows:
        atomic_write(out / "rounds" / str(row["round"]) / "metrics.json", json.dumps(row, indent=2))
    atomic_write(out / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    return rows


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return fmt.format(value)


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of the headline metrics, one line per round."""
    lines = ["| " + " | ".join(h for _, h, _ in COLUMNS) + " |",
             "|" + "|".join(" ---: " for _ in COLUMNS) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(k), f) for k, _, f in COLUMNS) + " |")
    return "\n".join(lines)


def write_report(out: Path, rows: list[dict[str, Any]]) -> None:
    """summary.md (the table and where things are) and report.png (reward and perplexity by round)."""
    summary = [
        "# RRHF run summary", "",
        ("Greedy reward: held-out queries, greedy replies (the paper's protocol). Sampled reward: "
        "the same queries, sampled replies: on small models greedy decoding saturates early, so "
        "read both. Pool reward: mean reward of the round's training candidates."), "",
        format_table(rows), "",
        "Seconds per stage: " + "; ".join(
            f"round {r['round']}: " + ", ".join(f"{s} {r[f'seconds_{s}']:.0f}" for s in STAGES)
            for r in rows), "",
        ("Files: `metrics.jsonl` (one object per round), `rounds/<r>/pool.parquet`, "
        "`rounds/<r>/checkpoint/` (Hugging Face safetensors), `rounds/<r>/eval.jsonl`."),
    ]
    atomic_write(out / "summary.md", "\n".join(summary) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    for key, label in [("eval_reward_mean", "greedy"), ("sampled_reward_mean", "sampled"),
                       ("pool_reward_mean", "training pool")]:
        pts = [(x, r[key]) for x, r in zip(rounds, rows) if r.get(key) is not None]
        if pts:
            ax1.plot(*zip(*pts), marker="o", label=label)
    ax1.set(xlabel="round", ylabel="reward", title="reward (greedy, sampled: held-out queries)")
    ax1.legend()
    ppl = [(x, r["perplexity"]) for x, r in zip(rounds, rows) if r.get("perplexity") is not None]
    if ppl:
        ax2.plot(*zip(*ppl), marker="o", color="tab:red")
    ax2.set(xlabel="round", ylabel="perplexity", title="perplexity on reference responses")
    for ax in (ax1, ax2):
        ax.set_xticks(rounds)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write(out / "report.png", buf.getvalue())
