"""Per-round metrics: `metrics.jsonl` (one object per round), `rounds/<r>/metrics.json`,
`summary.md` (with sample replies: `sample_table`), `report.png`, the table the driver prints at
the end, and `rrhf-ray status` (`format_status`). docs/metrics.md documents every key; a NaN
(e.g. a ranking accuracy without a strict pair) is written as null."""

from __future__ import annotations

import hashlib
import html
import io
import json
import math
import re
import time
from pathlib import Path
from typing import Any

from rrhf_ray.state import driver_alive
from rrhf_ray.types import atomic_write, parse_query, query_text

STAGES = ("sample", "score", "reference", "train", "refresh", "eval")

COLUMNS = (  # (key, header, format); a key with a "<key>_ci95" [lo, hi] shows it after the value
    ("round", "round", "{:d}"),
    ("eval_reward_mean", "greedy reward", "{:+.3f}"),
    ("sampled_reward_mean", "sampled reward", "{:+.3f}"),
    ("sampled_reward_delta_vs_round0", "Δ sampled vs r0", "{:+.3f}"),
    ("win_rate_vs_round0", "win vs r0", "{:.2f}"),
    ("eval_reply_length_mean", "greedy len", "{:.1f}"),
    ("sampled_reply_length_mean", "sampled len", "{:.1f}"),
    ("reference_perplexity", "ref ppl", "{:.2f}"),
    ("judge_perplexity", "judge ppl", "{:.2f}"),
    ("heldout_rank_accuracy", "held-out rank acc", "{:.2f}"),
    ("pool_reward_mean", "pool reward", "{:+.3f}"),
    ("pool_groups_without_pair", "pool no pair", "{:d}"),
    ("train_loss", "train loss", "{:.3f}"),
    ("train_fit_rank_accuracy", "fit rank acc", "{:.2f}"),
)

# The end-of-run table on the console: the headline columns only, to fit 80 columns (summary.md
# keeps every column of COLUMNS). (key, header, format, whether its "<key>_ci95" is shown.)
CONSOLE_COLUMNS = (
    ("round", "round", "{:d}", False),
    ("sampled_reward_mean", "sampled reward [95 % CI]", "{:+.3f}", True),
    ("sampled_reward_delta_vs_round0", "Δ vs r0", "{:+.3f}", False),
    ("eval_reward_mean", "greedy", "{:+.3f}", False),
    ("sampled_reply_length_mean", "reply len", "{:.1f}", False),
    ("reference_perplexity", "ref ppl", "{:.2f}", False),
)
CONSOLE_WIDTH = 80


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
    upload = stages.get(f"round{r}/train", {}).get("checkpoint_upload")  # output.dir on object storage
    if upload is not None:
        row["checkpoint_upload_bytes"] = upload["bytes"]
        row["checkpoint_upload_seconds"] = upload["seconds"]
    download = stages.get(f"round{r}/refresh", {}).get("checkpoint_download")  # the samplers' side
    if download is not None:
        row["checkpoint_download_bytes"] = download["bytes"]
        row["checkpoint_download_seconds"] = download["seconds"]
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
    sample = stages.get(f"round{r}/sample", {})
    if "retokenized" in sample:  # rrhf_ray/stages.py:write_candidates; absent in older state files
        row["pool_retokenized"] = sample["retokenized"]
    for stage in STAGES:
        row[f"seconds_{stage}"] = stages.get(f"round{r}/{stage}", {}).get("seconds", 0.0)
    # Overhead: the round's stage wall time minus the compute its workers reported (trainer
    # steps, engine generation / probes / weight loads, evaluation forwards); docs/metrics.md.
    infos = [stages.get(f"round{r}/{stage}", {}) for stage in STAGES]
    refresh = stages.get(f"round{r}/refresh", {})
    row["refresh_logprob_gap"] = refresh.get("logprob_gap")
    row["refresh_logprob_separation"] = refresh.get("logprob_separation")
    row["seconds_round"] = sum(i.get("seconds", 0.0) for i in infos)
    row["seconds_compute"] = sum(i.get("seconds_compute", 0.0) for i in infos)
    row["seconds_overhead"] = row["seconds_round"] - row["seconds_compute"]
    return row


def rows_upto(stages: dict[str, Any], upto: int) -> list[dict[str, Any]]:
    return [row for r in range(upto + 1) if (row := round_row(stages, r)) is not None]


def segment_rows(stages: dict[str, Any], r: int) -> list[dict[str, Any]]:
    """The online policy's rows of round (pass) r, one per segment whose KL stage finished, in
    order (sampling.preset OP; `rrhf_ray.online.kl`): its reward, KL to ρ, reward − β·KL and
    response length means, its training loss and its refresh seconds. Empty for other presets."""
    found = sorted({int(m.group(1)) for name in stages
                    if (m := re.fullmatch(rf"round{r}/seg(\d+)/kl", name))})
    rows = []
    for i in found:
        name = f"round{r}/seg{i}"
        train = stages.get(f"{name}/train", {})
        rows.append({"round": r, "segment": i, **stages[f"{name}/kl"]["online"],
                     "train_loss": train.get("train", {}).get("loss"),
                     "seconds_train": train.get("seconds"),
                     "seconds_refresh": stages.get(f"{name}/refresh", {}).get("seconds")})
    return rows


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
    returns the rounds' rows as written (NaN as None). With the online policy, metrics.jsonl also
    holds each segment's row (`segment_rows`, a `segment` key) before its round's row."""
    rows = [json_safe(row) for row in rows_upto(stages, upto)]
    for row in rows:
        atomic_write(out / "rounds" / str(row["round"]) / "metrics.json", json.dumps(row, indent=2))
    lines = [json_safe(seg) for r in range(1, upto + 1) for seg in segment_rows(stages, r)]
    lines = sorted(lines + rows, key=lambda row: (row["round"], "segment" not in row))  # stable: in order
    atomic_write(out / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in lines))
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


def format_console_table(rows: list[dict[str, Any]]) -> str:
    """The table the run prints at its end: `CONSOLE_COLUMNS` (round, sampled reward with its
    interval, Δ vs round 0, greedy reward, sampled reply length, reference perplexity) as an
    aligned Markdown table that fits `CONSOLE_WIDTH` columns for rewards in [−10, 10]."""
    cells = [[h for _, h, _, _ in CONSOLE_COLUMNS]]
    cells += [[_cell(row.get(k), f, row.get(f"{k}_ci95") if ci else None) for k, _, f, ci in CONSOLE_COLUMNS]
              for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(CONSOLE_COLUMNS))]

    def line(values: list[str]) -> str:
        return "| " + " | ".join(v.rjust(w) for v, w in zip(values, widths)) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([line(cells[0]), rule, *(line(c) for c in cells[1:])])


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


# --------------------------------------------------------------------------- sample replies

REPLY_CHARS = 200  # a longer reply is shown as its start … its end in summary.md
QUERY_CHARS = 120  # a longer query is shown as … its end (the last turn)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _best_and_worst(row: dict[str, Any]) -> tuple[tuple[str | None, float | None], tuple[str | None, float | None]]:
    """((reply, reward) of the best, of the worst) sampled reply of one eval.jsonl row: the first
    of the highest reward, the last of the lowest (two different replies when all tie); replies
    without a finite reward are left out; (None, None) twice when none is left."""
    pairs = [(text, float(reward)) for text, reward in zip(row.get("sampled_replies") or [],
                                                           row.get("sampled_rewards") or [])
             if isinstance(reward, (int, float)) and not isinstance(reward, bool) and math.isfinite(reward)]
    if not pairs:
        return (None, None), (None, None)
    best = max(pairs, key=lambda p: p[1])
    worst = min(reversed(pairs), key=lambda p: p[1])
    return best, worst


def sample_table(out: Path, rounds: list[int], n: int = 3) -> list[dict[str, Any]]:
    """For `n` held-out queries, the best and the worst sampled reply of each round (from
    `rounds/<r>/eval.jsonl`; a round without that file is left out) with their rewards: rows
    {round, query, best_reply, best_reward, worst_reply, worst_reward}, full texts, round by
    round (in the order of `rounds`), then query by query. The queries are the same in every
    round: of those every listed round evaluated, the `n` with the smallest SHA-256 of their text
    (deterministic, whatever the file order), in the order of the first round's file."""
    evals = {r: _read_jsonl(path) for r in rounds if (path := Path(out) / "rounds" / str(r) / "eval.jsonl").exists()}
    if not evals or n <= 0:
        return []
    for rows in evals.values():  # a conversation (a list of messages) is shown as its text
        for row in rows:
            row["query"] = row["query"] if isinstance(row["query"], str) else query_text(parse_query(row["query"]))
    common = set.intersection(*({row["query"] for row in rows} for rows in evals.values()))
    picked = set(sorted(common, key=lambda q: hashlib.sha256(q.encode("utf-8")).hexdigest())[:n])
    first = next(iter(evals.values()))
    queries = list(dict.fromkeys(row["query"] for row in first if row["query"] in picked))
    table = []
    for r, rows in evals.items():
        by_query: dict[str, dict[str, Any]] = {}
        for row in rows:
            by_query.setdefault(row["query"], row)  # a repeated query: its first row
        for q in queries:
            (best, best_reward), (worst, worst_reward) = _best_and_worst(by_query[q])
            table.append({"round": r, "query": q, "best_reply": best, "best_reward": best_reward,
                          "worst_reply": worst, "worst_reward": worst_reward})
    return table


def _shorten(text: str, limit: int, keep: str = "middle") -> str:
    """`text` stripped, at most `limit` characters: its start and its end around " … " (`keep`
    "middle"), or "…" and its end ("end")."""
    text = text.strip()
    if len(text) <= limit:
        return text
    if keep == "end":
        return "…" + text[len(text) - limit + 1:].lstrip()
    head = (2 * limit) // 3
    return text[:head].rstrip() + " … " + text[len(text) - (limit - head - 3):].lstrip()


def md_text(text: str | None, limit: int, keep: str = "middle") -> str:
    """`text` as one line of Markdown that is safe in a table cell: shortened (`_shorten`), control
    characters shown as their symbols (␃), HTML and backslashes escaped, `|` as `\\|`, line
    breaks as `<br>`; "–" for None."""
    if text is None:
        return "–"
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", " ")
    text = "".join(chr(0x2400 + ord(c)) if ord(c) < 0x20 and c != "\n" else "␡" if c == "\x7f" else c
                   for c in text)
    text = html.escape(_shorten(text, limit, keep).replace("\\", "\\\\"), quote=False)
    return text.replace("|", "\\|").replace("\n", "<br>")


def format_samples(samples: list[dict[str, Any]]) -> list[str]:
    """The Markdown lines of `sample_table`'s rows: per query, one table row per round."""
    lines: list[str] = []
    queries = list(dict.fromkeys(s["query"] for s in samples))
    for i, q in enumerate(queries, 1):
        lines += [f"**Query {i}.** {md_text(q, QUERY_CHARS, keep='end')}", "",
                  "| round | best sampled reply | reward | worst sampled reply | reward |",
                  "| ---: | --- | ---: | --- | ---: |"]
        lines += [f"| {s['round']} | {md_text(s['best_reply'], REPLY_CHARS)} | {_cell(s['best_reward'], '{:+.3f}')} "
                  f"| {md_text(s['worst_reply'], REPLY_CHARS)} | {_cell(s['worst_reward'], '{:+.3f}')} |"
                  for s in samples if s["query"] == q]
        lines.append("")
    return lines


# --------------------------------------------------------------------------- files


def write_report(out: Path, rows: list[dict[str, Any]], samples: int = 3) -> None:
    """summary.md (the table, the pools, `samples` held-out queries with the best and worst
    sampled reply of each round, where things are) and report.png (reward, win rate vs round 0,
    perplexity and reply length by round, 95 % intervals as error bars)."""
    picked = sample_table(out, [r["round"] for r in rows], samples)
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
        "a strict pair. Greedy len, sampled len: mean reply length in tokens (a drift toward short "
        "or long replies is RRHF's known failure mode). docs/metrics.md defines each number."), "",
        format_table(rows), "",
        *(["Training pool per round (k after merging identical replies):", "",
           *(f"- {_pool_line(r)}" for r in rows if r.get("pool_k_histogram")), ""]
          if any(r.get("pool_k_histogram") for r in rows) else []),
        *([(f"Sample replies: {len({s['query'] for s in picked})} held-out queries (the same in every "
            "round, picked by a hash of their text) and, per round, the best and the worst of their "
            "sampled replies with the rewards; long texts shortened with …, every reply in "
            "`rounds/<r>/eval.jsonl`:"), "", *format_samples(picked)] if picked else []),
        "Seconds per stage (overhead: the stages' wall time minus the compute their workers "
        "reported): " + "; ".join(
            f"round {r['round']}: " + ", ".join(f"{s} {r[f'seconds_{s}']:.0f}" for s in STAGES
                                                if s in ("sample", "score", "train", "eval") or r[f"seconds_{s}"])
            + f", overhead {r.get('seconds_overhead', 0.0):.0f} of {r.get('seconds_round', 0.0):.0f}"
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
    fig, (ax1, ax2, ax3, ax4) = plt.subplots(1, 4, figsize=(18, 3.5))
    _plot(ax1, rounds, rows, [("eval_reward_mean", "greedy"), ("sampled_reward_mean", "sampled"),
                              ("pool_reward_mean", "training pool")])
    ax1.set(xlabel="round", ylabel="reward", title="reward (held-out queries; 95 % CI)")
    _plot(ax2, rounds, rows, [("win_rate_vs_round0", "greedy"), ("sampled_win_rate_vs_round0", "sampled")])
    ax2.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax2.set(xlabel="round", ylabel="win rate", title="win rate vs round 0 (95 % CI)")
    _plot(ax3, rounds, rows, [("reference_perplexity", "policy on references"),
                              ("judge_perplexity", "judge on greedy replies")])
    ax3.set(xlabel="round", ylabel="perplexity", title="perplexity")
    _plot(ax4, rounds, rows, [("eval_reply_length_mean", "greedy"), ("sampled_reply_length_mean", "sampled")])
    ax4.set(xlabel="round", ylabel="tokens", title="mean reply length (held-out)")
    for ax in (ax1, ax2, ax3, ax4):
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


# --------------------------------------------------------------------------- rrhf-ray status


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def waiting_line(running: dict[str, Any], now: float) -> str | None:
    """What the running stage's driver waits on, for how long, under which limit
    (`rrhf_ray.waits.Wait` records it in state.json's `running`); None when it records no wait."""
    waiting = running.get("waiting")
    if not isinstance(waiting, dict):
        return None
    line = f"{running.get('stage')}: waiting {_duration(now - waiting.get('since', now))} on {waiting.get('on')}"
    if isinstance(limit := waiting.get("limit_s"), (int, float)):
        line += f" (limit {limit:.0f} s: {waiting.get('key')})"
    for w in waiting.get("workers") or ():  # the replicas / scorers the stage's task waits on
        if isinstance(w, dict):
            line += (f"\n  {w.get('worker')}: chunk {int(w.get('chunk', 0)) + 1} of {w.get('chunks')} "
                     f"({w.get('queries')} queries) for {_duration(now - w.get('since', now))}")
    return line


def format_status(state: dict[str, Any], output_dir: str, now: float | None = None) -> str:
    """What `rrhf-ray status` prints for a state.json's contents: the finished stages, the stage
    running (for how long; "stopped" when its driver on this host is gone; the stages running
    beside it; what its driver waits on, `waiting_line`) or the one that failed,
    the next stage, and the table of the evaluated rounds. `now`: the wall clock (time.time())."""
    now = time.time() if now is None else now
    stages = state["stages"]
    rounds = state.get("rounds", 0)
    lines = [f"run in {output_dir}: {rounds} round(s) configured, {len(stages)} stage(s) finished"]
    width = max([16, *map(len, stages)])  # the online policy's segment stages are longer
    lines += [f"  done  {name:<{width}} {info.get('seconds', 0):8.1f} s" for name, info in stages.items()]
    config = state.get("config", {})
    dpo = config.get("train", {}).get("loss", {}).get("name") == "dpo"
    online = config.get("sampling", {}).get("preset") == "OP"  # a round = its segments, then its eval
    steps = ("sample", "score", "reference", "train", "eval") if dpo else ("sample", "score", "train", "eval")
    steps = ("eval",) if online else steps
    order = ["base", "sft", "reward_model", "round0/eval"] + [
        f"round{r}/{s}" for r in range(1, rounds + 1) for s in steps]
    pending = [s for s in order if s not in stages and (s.startswith("round") or s == "round0/eval")]
    running, failed = state.get("running"), state.get("failed")
    live = False
    if isinstance(running, dict):
        where = f"driver pid {running.get('pid')} on {running.get('host')}"
        since = _duration(now - running.get("started", now))
        alive = driver_alive(running)
        beside = [b for b in running.get("beside", ()) if isinstance(b, dict)]  # one-step overlap
        if alive is False:
            also = f" (and {', '.join(str(b.get('stage')) for b in beside)})" if beside else ""
            lines.append(f"{running['stage']}{also}: stopped (driver pid {running.get('pid')} not alive), "
                         f"started {since} ago; run the same command again to resume")
        else:
            live = True
            lines.append(f"{running['stage']}: running for {since} ({where}"
                         + ("; another host: not checked from here)" if alive is None else ")"))
            if (line := waiting_line(running, now)) is not None:
                lines.append(line)
            for b in beside:
                lines.append(f"{b.get('stage')}: running beside it for {_duration(now - b.get('started', now))}")
                if (line := waiting_line(b, now)) is not None:
                    lines.append(line)
    elif isinstance(failed, dict):
        lines.append(f"{failed['stage']}: failed after {_duration(failed.get('seconds', 0))}: "
                     f"{failed.get('error')}; run the same command again to resume")
    if not live:
        segmented = online and pending and pending[0] != "round0/eval"
        after = f"{pending[0].split('/')[0]}'s segments, then " if segmented else ""
        lines.append(f"next: {after}{pending[0]}" if pending else "finished")
    rows = rows_upto(stages, rounds)
    if rows:  # the run's end-of-run table: 80 columns; summary.md has every column
        lines += [format_console_table(rows), f"every column: {output_dir.rstrip('/')}/summary.md"]
    return "\n".join(lines)
