"""How a round's seconds grow with its work: least-squares lines through measured points, the
growth laws `scaling.py` prints, its table and its plot. Pure (no Ray, no model), so the fit is
unit-tested on synthetic numbers (tests/unit/test_benchmark_growth.py).

A measurement is one round at one sweep point: the point's factor ("queries", "k", "prompt"; the
base point belongs to every factor), its work (queries, k, prompt tokens per query, candidates,
prompt and candidate tokens) and the wall seconds of each stage. For each factor, each stage's
seconds (and the round's, their sum) are fitted as `seconds = intercept + slope · x` over that
factor's points, with x the work the factor varies (`FACTORS`): the slope is the cost of one more
unit of work, the intercept the part of the round that does not grow with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

STAGES = ("sample", "score", "train", "refresh", "eval")

# factor → (the measurement's key that is x, the unit the slope is printed in, its scale)
FACTORS: dict[str, tuple[str, str, float]] = {
    "queries": ("candidates", "s / 1,000 candidates", 1000.0),
    "k": ("candidates", "ms / extra candidate", 1000.0),
    "prompt": ("prompt_tokens", "ms / prompt token", 1000.0),
}


@dataclass(frozen=True)
class Line:
    """`y = intercept + slope · x`, fitted by least squares; `r2`: the share of y's variance it explains."""

    intercept: float
    slope: float
    r2: float

    def at(self, x: float) -> float:
        return self.intercept + self.slope * x


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> Line:
    """The least-squares line through (xs, ys): slope = cov(x, y) / var(x), through the means.
    Needs two or more distinct x."""
    if len(xs) != len(ys):
        raise ValueError(f"fit_line: {len(xs)} x values but {len(ys)} y values")
    n = len(xs)
    if n < 2 or len(set(xs)) < 2:
        raise ValueError(f"fit_line: needs two or more distinct x values, got {list(xs)}")
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    slope = sxy / sxx
    intercept = my - slope * mx
    syy = sum((y - my) ** 2 for y in ys)
    residual = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys))
    return Line(intercept, slope, 1.0 - residual / syy if syy > 0 else 1.0)


def round_seconds(m: dict) -> float:
    """A measured round's wall seconds: the sum of its stages."""
    return sum(m["seconds"][s] for s in STAGES)


def factor_points(measurements: Sequence[dict], factor: str) -> list[dict]:
    """The measurements that vary `factor` (the base point included), by growing x."""
    x = FACTORS[factor][0]
    return sorted((m for m in measurements if factor in m["factors"]), key=lambda m: m[x])


def growth(measurements: Sequence[dict]) -> dict[str, dict]:
    """Per factor: the fitted line of each stage and of the round ("round") against the factor's x,
    the slope in the factor's unit (`FACTORS`) and the points' x. Factors with fewer than two
    distinct x are left out."""
    laws = {}
    for factor, (key, unit, scale) in FACTORS.items():
        points = factor_points(measurements, factor)
        xs = [float(m[key]) for m in points]
        if len(set(xs)) < 2:
            continue
        lines = {s: fit_line(xs, [m["seconds"][s] for m in points]) for s in STAGES}
        lines["round"] = fit_line(xs, [round_seconds(m) for m in points])
        laws[factor] = {"x": key, "xs": xs, "unit": unit, "lines": lines,
                        "slope": lines["round"].slope * scale, "fixed_seconds": lines["round"].intercept}
    return laws


def fixed_share(measurements: Sequence[dict], laws: dict[str, dict]) -> dict | None:
    """The part of a round that does not grow with the queries (the "queries" line's intercept)
    as a share of the measured round at the most queries; None without a "queries" law. Split in
    two (the round's line is the sum of its stages', so the intercepts add up): the evaluation's
    intercept, the work of evaluating a held-out set that does not grow with the training queries,
    and the overhead, the other stages' intercepts (what each sample, score, train and refresh
    call costs besides its work: dispatch, start of the trainer's round, the refresh, the
    bookkeeping), which `overhead_share` puts against the round."""
    if "queries" not in laws:
        return None
    largest = factor_points(measurements, "queries")[-1]
    fixed = laws["queries"]["fixed_seconds"]
    evaluation = laws["queries"]["lines"]["eval"].intercept
    total = round_seconds(largest)
    return {"queries": largest["queries"], "fixed_seconds": fixed, "round_seconds": total,
            "share": fixed / total, "eval_seconds": evaluation, "overhead_seconds": fixed - evaluation,
            "overhead_share": (fixed - evaluation) / total}


# --------------------------------------------------------------------------- printing


def table(measurements: Sequence[dict]) -> str:
    """One Markdown row per measured round: its work, each stage's seconds, the round's seconds
    and its milliseconds per token (prompt and candidate tokens of the training queries)."""
    head = ["factor", "queries", "k", "prompt tok", "candidates", "tokens", *STAGES, "round s", "ms / token"]
    rows = ["| " + " | ".join(head) + " |", "| --- | " + " | ".join("---:" for _ in head[1:]) + " |"]
    for m in measurements:
        tokens = m["prompt_tokens"] + m["candidate_tokens"]
        total = round_seconds(m)
        cells = [", ".join(m["factors"]), str(m["queries"]), str(m["k"]), f"{m['prompt_len']:.0f}",
                 str(m["candidates"]), f"{tokens:,}", *(f"{m['seconds'][s]:.2f}" for s in STAGES),
                 f"{total:.2f}", f"{1000 * total / tokens:.2f}"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _num(value: float) -> str:
    """Three significant digits; what is left of a zero slope by rounding (the stages' seconds are
    recorded to 10 ms) prints as 0."""
    return f"{value:.3g}" if abs(value) >= 5e-4 else "0"


def summary(laws: dict[str, dict], share: dict | None) -> str:
    """The growth laws in words: each factor's slope and fixed part, each stage's slope and
    intercept, and the fixed part's share of the round at the most queries."""
    lines = []
    for factor, law in laws.items():
        scale = FACTORS[factor][2]
        fit = law["lines"]["round"]
        lines.append(f"{factor:<8} round: {_num(law['slope'])} {law['unit']}, fixed {law['fixed_seconds']:.2f} s "
                     f"(R² {fit.r2:.3f}, x = {law['x']} {', '.join(f'{x:g}' for x in law['xs'])})")
        lines.append("         per stage (slope | fixed s): " + ", ".join(
            f"{s} {_num(law['lines'][s].slope * scale)} | {law['lines'][s].intercept:.2f}" for s in STAGES))
    if share is not None:
        lines.append(f"fixed part of a round at {share['queries']} queries: {share['fixed_seconds']:.2f} s of "
                     f"{share['round_seconds']:.2f} s = {share['share']:.1%}: the held-out evaluation "
                     f"{share['eval_seconds']:.2f} s (work on a set of its own); overhead (the other stages' "
                     f"fixed parts) {share['overhead_seconds']:.2f} s = {share['overhead_share']:.1%} "
                     f"(target ≤ 5 %)")
    return "\n".join(lines)


def plot(measurements: Sequence[dict], laws: dict[str, dict], path: str) -> None:
    """One panel per factor: each stage's seconds (and the round's) against the factor's x, with
    the round's fitted line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    factors = list(laws)
    fig, axes = plt.subplots(1, len(factors), figsize=(4.5 * len(factors), 3.8), squeeze=False)
    for ax, factor in zip(axes[0], factors):
        law = laws[factor]
        points = factor_points(measurements, factor)
        xs = law["xs"]
        for stage in STAGES:
            ax.plot(xs, [m["seconds"][stage] for m in points], marker="o", label=stage)
        ax.plot(xs, [round_seconds(m) for m in points], marker="s", color="black", label="round")
        fit = law["lines"]["round"]
        ax.plot([0, xs[-1]], [fit.at(0), fit.at(xs[-1])], ls="--", color="gray", label="round, fitted")
        ax.set_title(f"{factor} (fixed {fit.intercept:.1f} s)")
        ax.set_xlabel(law["x"].replace("_", " "))
        ax.set_ylabel("seconds")
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
