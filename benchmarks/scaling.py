"""How a round's cost grows with its work: one round's stages (sample, score, train, refresh,
evaluate) at growing queries, candidates per query k and prompt length, one factor at a time from
a base point, with a least-squares line per factor (`growth.py`).

The run's own components, built once by the driver's `rrhf_ray.workflow.setup` (one Ray session,
one vLLM engine, the rule reward's workers, the warm Ray Train trainer) and its own stage functions
(`rrhf_ray.stages`), timed as the driver times them (`RunContext.run_stage`). The model has the
demo's shapes (`rrhf_ray.demo.task.build_demo_model`: a 2-layer Llama, hidden 128, its tokenizer),
built with 1,024 positions so that 512-token prompts and their replies fit, and is not fine-tuned
(no SFT stage): its replies mostly run to `max_new_tokens`, so the work is what the point says.
The reward is the demo's rule. Each sweep point is one more round of the same run (IP-n: it
samples from the policy the round before trained), with its own synthetic queries: a demo question
after earlier help-desk turns, cut to the point's prompt length. The held-out set has a fixed
number of queries at the point's prompt length. The base point is measured first and again last
(both rows enter the fits; their difference shows how far the machine and the policy drifted).
Evaluation is timed apart from the next round's sampling (the driver batches the two into one
engine pass where it can).

Start-up (Ray, the engine, the reward workers, the trainer's launch) and a warm-up round (round 0's
evaluation and round 1 at the base point; the trainer's worker group starts in it) are measured once
and reported apart from the fitted rounds.

    .venv/bin/python benchmarks/scaling.py            # the full sweep (≤ 10 min on 2 quiet cores)
    .venv/bin/python benchmarks/scaling.py --quick    # a small sweep, for development
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

import growth  # beside this script (its directory is the first on sys.path)

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Sweep:
    """The base point and the values each factor takes (the base's value among them)."""

    queries: int
    k: int
    prompt_len: int
    query_scales: tuple[int, ...]
    ks: tuple[int, ...]
    prompt_lens: tuple[int, ...]
    max_new_tokens: int
    eval_queries: int
    eval_samples: int

    def points(self) -> list[dict]:
        """The base point (in every factor), one factor varied at a time, and the base point
        again: measured first and last, it shows how far the machine and the policy drifted."""
        base = {"queries": self.queries, "k": self.k, "prompt_len": self.prompt_len,
                "factors": ["queries", "k", "prompt"]}
        points = [base]
        points += [{**base, "queries": self.queries * s, "factors": ["queries"]} for s in self.query_scales if s != 1]
        points += [{**base, "k": k, "factors": ["k"]} for k in self.ks if k != self.k]
        points += [{**base, "prompt_len": p, "factors": ["prompt"]} for p in self.prompt_lens if p != self.prompt_len]
        return [*points, base]


FULL = Sweep(queries=16, k=4, prompt_len=64, query_scales=(1, 4, 16), ks=(2, 4, 8, 16),
             prompt_lens=(64, 128, 256, 512), max_new_tokens=48, eval_queries=16, eval_samples=4)
QUICK = Sweep(queries=8, k=2, prompt_len=64, query_scales=(1, 4), ks=(2, 4), prompt_lens=(64, 128),
              max_new_tokens=16, eval_queries=4, eval_samples=2)


# --------------------------------------------------------------------------- queries


def padded_query(tok, question: str, target: int, rng: random.Random) -> str:
    """`question` (a demo prompt, ending in "Assistant:") after earlier help-desk turns, as many of
    their words as keep the whole at most `target` tokens."""
    from rrhf_ray.demo.task import sft_pairs

    words = "".join(p["query"] + p["response"] for p in sft_pairs(40, seed=rng.randrange(10**6))).split(" ")
    lo, hi = 0, len(words)  # the most words that fit: binary search on the token count
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(tok(" ".join(words[-mid:]) + question)["input_ids"]) <= target:
            lo = mid
        else:
            hi = mid - 1
    return (" ".join(words[-lo:]) if lo else "") + question


def point_data(tok, point: dict, sweep: Sweep, seed: int):
    """The point's training queries and held-out queries (with the ideal reply as reference)."""
    from rrhf_ray.context import RunData
    from rrhf_ray.data.queries import QueryRecord
    from rrhf_ray.demo.task import EVAL_PHRASINGS, TOPICS, TRAIN_PHRASINGS, prompt, reply

    rng = random.Random(seed)
    queries = [padded_query(tok, prompt(TOPICS[i % len(TOPICS)][0], TRAIN_PHRASINGS[i // len(TOPICS) % 6]),
                            point["prompt_len"], rng) for i in range(point["queries"])]
    held_out = [padded_query(tok, prompt(TOPICS[i % len(TOPICS)][0], EVAL_PHRASINGS[i % 2]), point["prompt_len"],
                             rng) for i in range(sweep.eval_queries)]
    ideal = [reply(i % len(TOPICS), "polite", "helpful", "polite", rng) for i in range(sweep.eval_queries)]
    return RunData(train=[QueryRecord(q) for q in queries], queries=queries, eval_queries=held_out,
                   references=list(zip(held_out, ideal)))


# --------------------------------------------------------------------------- the run


def open_run(model_dir: Path, out: Path, sweep: Sweep, rounds: int):
    """The driver's run context, built by `rrhf_ray.workflow.setup` from the demo's config."""
    from rrhf_ray.config import load_config
    from rrhf_ray.connection import connect_ray
    from rrhf_ray.context import RunContext
    from rrhf_ray.demo import DEMO_CONFIG
    from rrhf_ray.preflight import check_run
    from rrhf_ray.state import RunState
    from rrhf_ray.tracking import open_tracking
    from rrhf_ray.workflow import setup

    longest = max(sweep.prompt_lens)
    config = load_config(DEMO_CONFIG, [
        "sft=null", f"model.name_or_path={model_dir}", f"rounds={rounds}", "train.epochs=1",
        f"data.max_prompt_tokens={longest}", f"data.max_response_tokens={sweep.max_new_tokens}",
        f"sampling.max_new_tokens={sweep.max_new_tokens}",
        f"sampling.max_model_len={longest + 2 * sweep.max_new_tokens}",
        f"train.max_length={longest + sweep.max_new_tokens + 1}", f"eval.max_new_tokens={sweep.max_new_tokens}",
        f"eval.num_samples={sweep.eval_samples}", "tracking.tensorboard.enabled=false", f"output.dir={out}"])
    checked = check_run(config)
    state = RunState(out, config)
    log_dir = connect_ray(checked.config)
    ctx = RunContext(config=checked.config, state=state, preset=checked.preset, external=checked.external,
                     tracker=open_tracking(checked.config.tracking, out), log_dir=log_dir)
    setup(ctx)
    return ctx


def run_round(ctx, r: int, point: dict, data) -> dict:
    """Round r at `point` with the driver's stages; returns the point with its work and seconds."""
    from rrhf_ray import stages
    from rrhf_ray.types import read_groups
    from rrhf_ray.workflow import publish_checkpoint

    ctx.data = data
    ctx.config = ctx.config.model_copy(
        update={"sampling": ctx.config.sampling.model_copy(update={"n": point["k"]})})
    for stage, work in (("sample", stages.sample), ("score", stages.score), ("train", stages.train)):
        ctx.run_stage(r, stage, work)
    publish_checkpoint(ctx, r)
    ctx.run_stage(r, "refresh", stages.refresh)
    ctx.run_stage(r, "eval", stages.evaluate)
    groups = read_groups(ctx.round_dir(r) / "pool.parquet")
    return {**point, "round": r,
            "candidates": sum(len(g.responses) for g in groups),
            "prompt_tokens": sum(len(g.prompt_ids or ()) for g in groups),
            "candidate_tokens": sum(len(ids or ()) for g in groups for ids in g.token_ids or ()),
            "seconds": {s: ctx.state.seconds(f"round{r}/{s}") for s in growth.STAGES}}


def sweep_rounds(sweep: Sweep, work_dir: Path) -> dict:
    """Start-up, the warm-up round and one round per sweep point, on one run."""
    import ray
    from transformers import AutoTokenizer

    from rrhf_ray import stages
    from rrhf_ray.demo.task import corpus
    from rrhf_ray.demo.tiny import build_tiny_llama
    from rrhf_ray.workflow import release

    model_dir = build_tiny_llama(work_dir / "model", corpus(), vocab_size=1000, hidden_size=128, num_layers=2,
                                 num_heads=2, max_position_embeddings=1024)
    tok = AutoTokenizer.from_pretrained(model_dir)
    points = sweep.points()
    ours = not ray.is_initialized()  # else joined: the caller's session stays up
    started = time.perf_counter()
    ctx = open_run(model_dir, work_dir / "run", sweep, rounds=len(points) + 1)
    start_seconds = time.perf_counter() - started
    try:
        base = points[0]
        started = time.perf_counter()
        ctx.data = point_data(tok, base, sweep, seed=0)
        ctx.run_stage(0, "eval", stages.evaluate)
        ctx.round0 = stages.read_eval(ctx.outputs(0, "eval")[0])
        run_round(ctx, 1, base, ctx.data)
        warm_up = time.perf_counter() - started
        measured = []
        for r, point in enumerate(points, start=2):
            measured.append(run_round(ctx, r, point, point_data(tok, point, sweep, seed=r)))
            print(f"round {r}: {point['queries']} queries × k = {point['k']}, prompt ≤ {point['prompt_len']} "
                  f"tokens: {growth.round_seconds(measured[-1]):.1f} s", flush=True)
    finally:
        release(ctx, keep=False)
        if ours:
            ray.shutdown()
    return {"start_seconds": start_seconds, "warm_up_seconds": warm_up, "measurements": measured}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small sweep (development, the smoke test)")
    parser.add_argument("--json", default=str(REPO / "outputs" / "scaling.json"), help="all measurements")
    parser.add_argument("--plot", default=str(REPO / "docs" / "img" / "scaling.png"))
    args = parser.parse_args(argv)
    sweep = QUICK if args.quick else FULL

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = sweep_rounds(sweep, Path(tmp))
    measurements = result["measurements"]
    laws = growth.growth(measurements)
    share = growth.fixed_share(measurements, laws)
    print(f"\nfixed start cost: {result['start_seconds']:.1f} s (Ray, engine, reward workers, trainer launch) "
          f"+ {result['warm_up_seconds']:.1f} s warm-up round (round 0's eval, round 1; trainer workers start)")
    print(f"{os.cpu_count()} CPUs; {sweep.max_new_tokens} new tokens per candidate, 1 epoch; held-out: "
          f"{sweep.eval_queries} queries, greedy + {sweep.eval_samples} samples each\n")
    print(growth.table(measurements))
    print()
    print(growth.summary(laws, share))
    report = {"sweep": asdict(sweep), "cpus": os.cpu_count(), **result,
              "laws": {f: {**{k: v for k, v in law.items() if k != "lines"},
                           "lines": {s: asdict(line) for s, line in law["lines"].items()}}
                       for f, law in laws.items()},
              "fixed_share": share, "seconds_total": time.perf_counter() - started}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1))
    growth.plot(measurements, laws, args.plot)
    print(f"\n{report['seconds_total']:.0f} s in all; wrote {args.json} and {args.plot}")
    return report


if __name__ == "__main__":  # vLLM spawns processes: the guard keeps them from re-running this
    main()
