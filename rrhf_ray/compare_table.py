"""The aggregation of `rrhf-ray compare` (`rrhf_ray.compare`): the finished runs' metrics rows
and stage seconds, summarized per variant and round (mean ± std over seeds), as compare.jsonl
rows, a markdown table and a plot. Pure: it reads the runs' `metrics.jsonl` and `state.json`
and nothing else."""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rrhf_ray.state import STATE_FILE


@dataclass(frozen=True)
class Variant:
    """A name and the overrides it applies on top of the base config (`rrhf_ray.compare`)."""

    name: str
    overrides: tuple[str, ...] = ()


@dataclass
class RunResult:
    """One finished run: its metrics rows (metrics.jsonl, round 0 first), the seconds its own
    stages took per round (state.json; shared stages count 0) and the training candidates it had
    sampled by the end of each round (`round_candidates`)."""

    variant: str
    seed: int
    rows: list[dict[str, Any]]
    seconds: dict[int, float]
    candidates: dict[int, float] = field(default_factory=dict)


# A round's stage, or a stage of one of its segments (the online policy: round<r>/seg<i>/<stage>).
ROUND_STAGE = re.compile(r"round(\d+)/(?:seg\d+/)?\w+")


def round_seconds(stages: dict[str, Any]) -> dict[int, float]:
    """Seconds of each round's stages (sample, score, reference, train, eval; an online pass's
    segments' too) summed per round."""
    out: dict[int, float] = {}
    for name, info in stages.items():
        m = ROUND_STAGE.fullmatch(name)
        if m and isinstance(info, dict):
            out[int(m.group(1))] = out.get(int(m.group(1)), 0.0) + float(info.get("seconds", 0.0))
    return out


def round_candidates(stages: dict[str, Any]) -> dict[int, float]:
    """The training candidates sampled from round 1 to the end of each round r (r = 0: none), as
    drawn (duplicates counted: `candidates_premerge` of each scored pool, an online pass's
    segments summed; the evaluation's replies are not counted). IP-n and OP-k runs compare at
    equal cost on this axis, not by round: an OP pass samples its queries once, as an IP round.
    Empty (unknown) when a scored pool does not say how many it drew (a state.json older than
    the count): a partial sum would understate the run's cost."""
    per_round: dict[int, float] = {0: 0.0}
    for name, info in stages.items():
        m = ROUND_STAGE.fullmatch(name)
        if m and name.endswith("/score") and isinstance(info, dict):
            drawn = info.get("pool", {}).get("candidates_premerge")
            if not isinstance(drawn, (int, float)):
                return {}
            r = int(m.group(1))
            per_round[r] = per_round.get(r, 0.0) + float(drawn)
    total, out = 0.0, {}
    for r in range(max(per_round) + 1):
        total += per_round.get(r, 0.0)
        out[r] = total
    return out


def collect_run(variant: str, seed: int, run_dir: Path) -> RunResult:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [row for row in rows if "segment" not in row]  # the online policy's segment rows
    stages = json.loads((run_dir / STATE_FILE).read_text())["stages"]
    return RunResult(variant, seed, rows, round_seconds(stages), round_candidates(stages))


# (name in compare.jsonl, keys of a round's metrics row: the first present wins, header, format)
METRICS: tuple[tuple[str, tuple[str, ...], str, str], ...] = (
    ("sampled_reward", ("sampled_reward_mean",), "sampled reward", "{:+.3f}"),
    ("win_rate_vs_round0", ("win_rate_vs_round0",), "win vs r0 (greedy)", "{:.2f}"),
    ("sampled_win_rate_vs_round0", ("sampled_win_rate_vs_round0",), "win vs r0 (sampled)", "{:.2f}"),
    ("reply_length", ("sampled_reply_length_mean", "eval_reply_length_mean"), "reply length", "{:.1f}"),
    ("perplexity", ("reference_perplexity", "perplexity"), "perplexity", "{:.2f}"),
    ("seconds", (), "seconds", "{:.0f}"),
    ("candidates", (), "candidates sampled", "{:.0f}"),
)


def _value(row: dict[str, Any], keys: Sequence[str]) -> float | None:
    for key in keys:
        v = row.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v) if math.isfinite(v) else None
    return None


def summarize(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean and sample standard deviation (n − 1; None below two values) of the values present."""
    xs = [v for v in values if v is not None]
    mean = sum(xs) / len(xs) if xs else None
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None
    return {"mean": mean, "std": std, "n": len(xs), "values": list(values)}


def aggregate(results: Sequence[RunResult], order: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One row per variant and round: each metric of `METRICS` over the seeds (mean, std, n, and
    the value of each seed in `seeds` order). Variants in `order` (default: first seen)."""
    variants = list(order or dict.fromkeys(r.variant for r in results))
    rows = []
    for name in variants:
        runs = sorted((r for r in results if r.variant == name), key=lambda r: r.seed)
        rounds = sorted({row["round"] for r in runs for row in r.rows})
        for rnd in rounds:
            by_seed = [next((row for row in r.rows if row["round"] == rnd), None) for r in runs]
            out: dict[str, Any] = {"variant": name, "round": rnd, "seeds": [r.seed for r in runs]}
            for key, keys, _, _ in METRICS:
                if key == "seconds":
                    values = [r.seconds.get(rnd) for r in runs]
                elif key == "candidates":
                    values = [r.candidates.get(rnd) for r in runs]
                else:
                    values = [_value(row, keys) if row is not None else None for row in by_seed]
                out[key] = summarize(values)
            rows.append(out)
    return rows


def _cell(stat: dict[str, Any], fmt: str) -> str:
    if stat["mean"] is None:
        return "–"
    text = fmt.format(stat["mean"])
    return text + (" ± " + fmt.format(stat["std"]).lstrip("+") if stat["std"] is not None else "")


def format_markdown(rows: Sequence[dict[str, Any]], *, seeds: Sequence[int] = (),
                    variants: Sequence[Variant] = ()) -> str:
    """compare.md: one table (variant × round, mean ± std over seeds), metrics with no value
    anywhere left out; then each variant's overrides."""
    shown = [m for m in METRICS if any(r[m[0]]["mean"] is not None for r in rows)]
    lines = ["# Compare", "",
             (f"Each cell: mean ± standard deviation over the seeds ({', '.join(map(str, seeds)) or '–'}; "
             "one seed: no ±). Held-out queries, never trained on. Sampled reward: the mean reward of "
             "sampled replies; win vs r0: the share of held-out queries whose reward beats the same "
             "run's round 0 (ties ½); reply length: mean tokens of the sampled held-out replies; perplexity: "
             "the policy's on the reference responses; seconds: the round's stages (round 0: its "
             "evaluation); candidates sampled: the training candidates drawn by the round's end, as "
             "drawn (the cost axis on which IP-n rounds and OP-k passes compare)."), "",
             "| " + " | ".join(["variant", "round", *(m[2] for m in shown)]) + " |",
             "| " + " | ".join(["---", *("---:" for _ in range(len(shown) + 1))]) + " |"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['round']} | "
                     + " | ".join(_cell(r[m[0]], m[3]) for m in shown) + " |")
    if variants:
        lines += ["", "Variants (overrides on top of the base config and the seed's):", ""]
        lines += [f"- `{v.name}`: " + (", ".join(f"`{o}`" for o in v.overrides) or "the base config")
                  for v in variants]
    lines += ["", ("Files: `compare.jsonl` (these rows, with each seed's value), `compare.png`, and "
              "each run's own output directory `<variant>/seed<s>/` (metrics.jsonl, summary.md).")]
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict[str, Any]]) -> bytes:
    """compare.png: sampled reward, win rate against round 0 and reply length against the
    training candidates sampled so far (by round where a run did not record them), one line per
    variant, error bars ± std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("sampled_reward", "sampled reward (held-out)"), ("win_rate_vs_round0", "win rate vs round 0"),
              ("reply_length", "reply length (tokens)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    by_candidates = bool(rows) and all(r.get("candidates", {}).get("mean") is not None for r in rows)

    def x_of(r: dict[str, Any]) -> float:
        return r["candidates"]["mean"] if by_candidates else r["round"]

    for ax, (key, title) in zip(axes, panels):
        for name in variants:
            pts = [(x_of(r), r[key]["mean"], r[key]["std"] or 0.0) for r in rows
                   if r["variant"] == name and r[key]["mean"] is not None]
            if pts:
                x, y, e = zip(*pts)
                ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=name)
        ax.set(xlabel="training candidates sampled" if by_candidates else "round", title=title)
        if not by_candidates:
            ax.set_xticks(sorted({r["round"] for r in rows}))
        ax.grid(alpha=0.3)
    if rows:
        axes[0].legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
