"""One round's stages (RRHF's IP-n policy): sample → score → (reference) → train → refresh → evaluate.

Each stage is a function of `(ctx, r)` (`rrhf_ray.context.RunContext`, round r) that writes its
outputs (`RunContext.outputs`) and returns what `state.json` records for it: its numbers and
`seconds_compute`, the engine, trainer or task seconds it used (docs/metrics.md). Its wall time
is measured around the call (`rrhf_ray.state.StageTimer`).

Round r samples from ρ*, the model round r−1 trained (IP-1 ≡ DP), and its evaluation uses the
weights round r made, the same weights round r+1 samples from: where the preset samples from
ρ* without beams, round r's evaluation and round r+1's sampling run as one batched engine pass
(`eval_and_sample`, `eval.batch_with_sampling`), recorded as the two stages they are.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rrhf_ray.config import SamplingConfig
from rrhf_ray.context import RunContext
from rrhf_ray.types import query_json, write_jsonl

if TYPE_CHECKING:
    from rrhf_ray.actors.sampler import SamplerPool
    from rrhf_ray.data.candidates import Preset
    from rrhf_ray.waits import Wait

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- sample


def round_sampling(sampling: SamplingConfig, preset: Preset, round_index: int) -> SamplingConfig:
    """The sampling settings of training round `round_index`: beam search where the preset says
    so, and the seed mixed with the round (`round_seed`), so that round r's pool is a new draw and
    not round r−1's seeds replayed on ρ*. Query i still gets `query_seed(that seed, i)`."""
    from rrhf_ray.actors.sampler import round_seed

    return sampling.model_copy(update={"use_beam_search": preset.beam or sampling.use_beam_search,
                                       "seed": round_seed(sampling.seed, round_index)})


def sample_candidates(pools: dict[str, SamplerPool], preset: Preset, *, records: Sequence[Any],
                      queries: list[str], sampling: SamplingConfig, external: list[dict], path: Path,
                      round_index: int, wait: Wait | None = None) -> dict:
    """k candidates per query from the preset's sources (the policy pool the preset names, the
    data set's responses `records`, `external` maps read by `read_external`), duplicates merged,
    written unscored to `path`; the policy samples with the seeds of round `round_index`
    (`round_sampling`). Shared by the driver's sample stage and `rrhf-ray sample`. `wait`
    (`rrhf_ray.waits.Wait`): where the driver records that it waits on the replicas."""
    from rrhf_ray.actors.sampler import get_samples

    policy: list = []
    busy = 0.0
    if preset.policy is not None:
        pool = pools[preset.policy]
        with pool.engine_seconds() as engine:
            policy = get_samples(pool, queries, round_sampling(sampling, preset, round_index), wait=wait)
        busy = engine.seconds
    return {**write_candidates(preset, records, queries, policy, external, path), "seconds_compute": busy}


def write_candidates(preset: Preset, records: Sequence[Any], queries: list[str], policy: list,
                     external: list[dict], path: Path) -> dict:
    """A round's candidates file from the policy's samples (`policy`: k per query; [] when the
    preset samples nothing) and the preset's other sources, duplicates merged."""
    from rrhf_ray.data.candidates import combine, dataset_candidates
    from rrhf_ray.types import write_groups

    sources: list = [policy] if preset.policy is not None else []
    if preset.dataset and records:
        sources.append([dataset_candidates(r) for r in records])
    groups = combine(queries, sources + external)
    write_groups([g.to_group() for g in groups], path)
    # A sampled reply without token ids (its stop string starts inside a token, see
    # rrhf_ray/actors/engine.py:tokens_before_stop) is re-tokenized from its text by the trainer:
    # tokens the policy may not have sampled.
    retokenized = sum(1 for g in groups for c in g.candidates if c.tokenizer and c.text and not c.token_ids)
    if retokenized:
        logger.warning("%d sampled candidates of %s lost their token ids at a stop string; the trainer "
                       "re-tokenizes their text", retokenized, path)
    return {"groups": len(groups), "candidates": sum(len(g.candidates) for g in groups),
            "retokenized": retokenized}


def sample(ctx: RunContext, r: int) -> dict:
    """Round r's candidates (unscored) in candidates.jsonl. state.json names the wait on the
    replicas (each request has its own limit, `rrhf_ray.actors.dispatch`)."""
    from rrhf_ray.waits import Wait

    with Wait(ctx.state, "the sampler replicas (each request under sampling.chunk_timeout_s)", None,
              "sampling.chunk_timeout_s") as wait:
        return sample_candidates(ctx.pools, ctx.preset, records=ctx.data.train, queries=ctx.data.queries,
                                 sampling=ctx.config.sampling, external=ctx.external,
                                 path=ctx.outputs(r, "sample")[0], round_index=r, wait=wait)


# --------------------------------------------------------------------------- score, reference


def score(ctx: RunContext, r: int) -> dict:
    """Score round r's candidates into pool.jsonl + pool.parquet; returns the reward statistics
    per source (`reward_stats`) and the pool's shape (`pool_summary`: k histogram, groups without a
    strict pair, reward mean before / after merging duplicates)."""
    return score_candidates(ctx, ctx.outputs(r, "sample")[0], ctx.outputs(r, "score"), str(r))


def score_candidates(ctx: RunContext, candidates: Path, outputs: Sequence[Path], label: str) -> dict:
    """`score`'s work on the candidates file `candidates`, the pool written to each of `outputs`;
    `label` names the round (and segment) in its warning."""
    from rrhf_ray.data.candidates import pool_summary
    from rrhf_ray.types import CandidateGroup, read_groups, reward_stats, write_groups

    groups = [CandidateGroup.from_group(g) for g in read_groups(candidates, scored=False)]
    from rrhf_ray.state import no_space
    from rrhf_ray.waits import Wait

    what = f"the reward {'rule tasks' if ctx.rewards.workers is None else 'scorers'} (each request under " \
           "reward.chunk_timeout_s)"
    with Wait(ctx.state, what, None, "reward.chunk_timeout_s") as wait:
        [scored] = wait.get([ctx.rewards.score_refs(groups)], [what])
    for path in outputs:
        with no_space(path):  # a full disk: "no space left" and the pool's path
            write_groups(scored, path)
    pool = pool_summary(scored)
    if (warning := no_pair_warning(label, pool)) is not None:
        logger.warning("%s", warning)  # once per round: the score stage runs once
    return {"pool_stats": reward_stats(scored), "pool": pool}


def no_pair_warning(r: int | str, pool: dict) -> str | None:
    """The warning for a round none of whose groups has a strict pair (`pool_summary`): the
    ranking term has nothing to rank; None while at least one group has a pair."""
    groups, without = pool.get("groups", 0), pool.get("groups_without_pair", 0)
    if not groups or without < groups:
        return None
    return (f"round {r}: {without} of {groups} groups have no strict pair (k = 1, or every candidate's "
            "reward tied): nothing to rank, the update only fine-tunes; check that the reward varies "
            "across a query's candidates, and sampling.n / sampling.temperature")


def reference(ctx: RunContext, r: int) -> dict:
    """DPO's reference log-probability of every candidate of round r's pool under π_ref
    (`train.reference`: ρ, or ρ* the round starts from), over the tokens the trainer scores;
    the pool with `ref_logprobs` goes to pool_ref.parquet (`rrhf_ray.train.reference`)."""
    from rrhf_ray.train.reference import write_reference_pool
    from rrhf_ray.types import read_groups

    start = ctx.policy(r - 1)
    ref_model = ctx.rho if ctx.config.train.reference == "initial" else start
    return write_reference_pool(read_groups(ctx.round_dir(r) / "pool.parquet"), ctx.hand_off(ref_model),
                                ctx.config.train, ctx.outputs(r, "reference")[0],
                                tokenizer_path=ctx.hand_off(ctx.config.model.tokenizer or start),
                                trust_remote_code=ctx.config.model.trust_remote_code,
                                dtype=ctx.config.model.dtype, store=ctx.store, resources=ctx.config.eval.resources)


# --------------------------------------------------------------------------- train, refresh


def train_pool(ctx: RunContext, r: int) -> Path:
    """What round r trains on: the scored pool, or for DPO the pool with reference log-probs."""
    name = "pool_ref.parquet" if ctx.config.train.loss.name == "dpo" else "pool.parquet"
    return ctx.round_dir(r) / name


def train(ctx: RunContext, r: int) -> dict:
    """Train round r with the warm trainer (`rrhf_ray.train.warm`), which holds round r−1's
    policy; install its checkpoint and the per-step history (`train_history.jsonl`) beside it.
    The refresh probe's log-probabilities under the new weights are recorded for `refresh`.
    The round is waited for under `train.round_timeout_s` (`rrhf_ray.waits`)."""
    return train_version(ctx, r, train_pool(ctx, r), ctx.round_dir(r), ctx.checkpoint(r))


def train_version(ctx: RunContext, version: int, pool: Path, work_dir: Path, checkpoint: Path) -> dict:
    """`train`'s work: the warm trainer trains policy `version` (round r, or the online policy's
    segment) on `pool`; the probe comes from `work_dir`'s pool.parquet, the step history goes to
    `work_dir`/train_history.jsonl and the checkpoint is installed at `checkpoint`."""
    from rrhf_ray.refresh import probe_sequences
    from rrhf_ray.train.checkpoints import install_checkpoint
    from rrhf_ray.waits import Wait, stage_limit

    probe = probe_sequences(work_dir / "pool.parquet", ctx.tokenizer)
    limit = stage_limit(ctx.state.data["stages"], "train", ctx.config.train.round_timeout_s)
    with Wait(ctx.state, "the trainer worker group", limit, "train.round_timeout_s") as wait:
        result = ctx.trainer.train(version, [ctx.hand_off(pool)], probe, wait=wait)
    metrics = {k: v for k, v in result["metrics"].items() if isinstance(v, (int, float))}
    write_jsonl(result["history"], work_dir / "train_history.jsonl")
    install_checkpoint(result["checkpoint"], checkpoint, metrics)
    return {"train": metrics, "seconds_compute": metrics.get("seconds_compute", 0.0),
            "probe_logprobs": result["probe"], "probe_start_logprobs": result["probe_start"]}


def refresh(ctx: RunContext, r: int) -> dict:
    """Load round r's checkpoint into every sampler replica in place (no engine restart), then
    check that each serves it (`rrhf_ray.refresh.verify_refresh`). With
    `sampling.refresh_transport: disk` each replica reads the checkpoint directory (for a run on
    object storage the bucket's copy, downloaded to its node); with `memory` the driver reads the
    checkpoint it has just installed once, puts its state dict in the object store, and every
    replica loads that. What the replicas fetched, summed over replicas, is recorded: from a
    bucket as `checkpoint_download` (`checkpoint_download_bytes` / `_seconds` in the round's row),
    from the object store as `state_dict_fetch` (state.json only). Loading and checking together
    are waited for under `sampling.refresh_timeout_s` (`rrhf_ray.waits`)."""
    return refresh_version(ctx, r, ctx.checkpoint(r), ctx.round_dir(r), f"round{r}/train")


def refresh_version(ctx: RunContext, r: int, checkpoint: Path, work_dir: Path, trained: str) -> dict:
    """`refresh`'s work: every replica loads policy version `r` from `checkpoint` (round r's, or the
    online policy's segment r's) and is checked with the probe of `work_dir`'s pool.parquet against
    what the stage `trained` recorded."""
    from rrhf_ray.refresh import probe_sequences, recorded_probe, tolerance_for, verify_refresh
    from rrhf_ray.train.checkpoints import check_checkpoint
    from rrhf_ray.waits import Wait, stage_limit

    # Whole by its manifest (names and sizes: the driver checksummed it when it installed it the
    # moment before), or no engine loads it.
    check_checkpoint(checkpoint, checksums=False)
    pool = ctx.pools["current"]
    probe = probe_sequences(work_dir / "pool.parquet", ctx.tokenizer)
    recorded = recorded_probe(ctx.state.data["stages"][trained], probe)
    tolerance = tolerance_for(ctx.served_dtype, ctx.config.sampling.refresh_tolerance)
    transport = ctx.config.sampling.refresh_transport
    limit = stage_limit(ctx.state.data["stages"], "refresh", ctx.config.sampling.refresh_timeout_s)
    with pool.engine_seconds() as engine, \
            Wait(ctx.state, "the sampler replicas", limit, "sampling.refresh_timeout_s") as wait:
        if transport == "memory":
            from rrhf_ray.train.checkpoints import read_state_dict

            state = read_state_dict(checkpoint, ctx.served_dtype)
            loads = pool.load_state_dict_refs(state, ctx.hand_off(checkpoint), r)
        else:
            loads = pool.load_weights_refs(ctx.hand_off(checkpoint), r)
        wait.get(loads, [f"sampler replica {i} (loading round {r}'s weights)" for i in range(len(loads))])
        if recorded is None:
            logger.warning("round %d was trained before the refresh check compared per-token "
                           "log-probs: its refresh is not verified", r)
            check = {"logprob_gap": float("nan"), "logprob_separation": float("nan")}
        else:
            check = verify_refresh(pool, probe, *recorded, tolerance, r, wait=wait)
    logger.info("samplers now serve round %d's policy (log-prob gap to the trainer %.4f nats/token; "
                "the round moved the probe by %.4f)", r, check["logprob_gap"], check["logprob_separation"])
    info = {**check, "seconds_compute": engine.seconds, "transport": transport}
    if downloads := [d for d in pool.downloads() if d is not None]:
        key = "state_dict_fetch" if transport == "memory" else "checkpoint_download"
        info[key] = {"bytes": sum(d["bytes"] for d in downloads), "replicas": len(downloads),
                     "seconds": round(sum(d["seconds"] for d in downloads), 3)}
    return info


# --------------------------------------------------------------------------- evaluate


def read_eval(path: Path) -> tuple[list[float], list[list[float]]]:
    """(greedy reward, sampled rewards) per held-out query from a round's eval.jsonl."""
    rows = [json.loads(line) for line in path.open() if line.strip()]
    return [r["greedy_reward"] for r in rows], [r.get("sampled_rewards", []) for r in rows]


def batches_next_sampling(ctx: RunContext, r: int) -> bool:
    """Whether round r's evaluation and round r+1's sampling run as one engine pass: both use
    the weights round r made when the round samples from ρ* (the "current" pool the evaluation
    uses) without beam search, and `eval.batch_with_sampling` is on."""
    config = ctx.config
    return (config.eval.batch_with_sampling and r < config.rounds and ctx.preset.policy == "current"
            and ctx.preset.name != "OP"  # the next pass samples segment by segment, each from its own weights
            and not round_sampling(config.sampling, ctx.preset, r + 1).use_beam_search)


def _evaluate(ctx: RunContext, r: int, also: list = ()) -> tuple[dict, Any, float]:
    """Evaluate round r's policy (served by the "current" pool) on the held-out queries: write
    eval.jsonl (every greedy and sampled reply with its reward) and return (the stage's info,
    the `EvalResult`, the engine seconds). Rounds after 0 compare per query with round 0. The
    sampled replies use the same seeds in every round (`rrhf_ray.evaluation.eval_sampling`). Its
    Ray tasks are waited for under `eval.task_timeout_s` (`rrhf_ray.waits`)."""
    from rrhf_ray.evaluation import evaluate
    from rrhf_ray.waits import Wait, stage_limit

    config, data, pool = ctx.config, ctx.data, ctx.pools["current"]
    limit = stage_limit(ctx.state.data["stages"], "eval", config.eval.task_timeout_s)
    with pool.engine_seconds() as engine, \
            Wait(ctx.state, "the evaluation's tasks", limit, "eval.task_timeout_s") as wait:
        result = evaluate(pool, ctx.rewards, data.eval_queries, data.references, ctx.hand_off(ctx.policy(r)),
                          config.sampling, config.eval, config.train.max_length, judge=ctx.hand_off(ctx.judge),
                          also=also, store=ctx.store, model_dtype=config.model.dtype, wait=wait,
                          tokenizer_path=ctx.hand_off(config.model.tokenizer) if config.model.tokenizer else None)
    busy = engine.seconds
    write_jsonl(({"query": query_json(q), "greedy_reply": reply, "greedy_reward": g, "sampled_replies": texts,
                  "sampled_rewards": s}
                 for q, reply, g, texts, s in zip(data.eval_queries, result.greedy_replies, result.greedy,
                                                  result.sampled_replies, result.sampled)),
                ctx.outputs(r, "eval")[0])
    greedy0, sampled0 = ctx.round0 if r > 0 else (None, None)
    # The perplexity tasks run beside the sampling; only what outlasts it adds to the compute.
    compute = busy + result.seconds_ranking + max(0.0, result.seconds_perplexity - busy)
    return ({"eval": result.metrics(greedy0, sampled0, resamples=config.eval.bootstrap_resamples,
                                    seed=config.sampling.seed),
             "seconds_compute": compute}, result, busy)


def evaluate(ctx: RunContext, r: int) -> dict:
    """Round r's evaluation stage: eval.jsonl and the held-out metrics (docs/metrics.md)."""
    return _evaluate(ctx, r)[0]


def eval_and_sample(ctx: RunContext, r: int) -> dict[str, dict]:
    """Round r's evaluation (`evaluate`) and round r+1's sampling (`sample`) in one batched engine
    pass (`SamplerPool.sample_many_refs`): the same replies and candidates as two passes, since
    every request keeps its own seed. The engine seconds are split between the two stages by the
    tokens each generated; the sampling's share is its wall time too."""
    nxt = r + 1
    cfg = round_sampling(ctx.config.sampling, ctx.preset, nxt)
    info, result, busy = _evaluate(ctx, r, also=[(ctx.data.queries, cfg)])
    policy = result.also[0]
    sampled_tokens = sum(len(c.token_ids) for group in policy for c in group)
    eval_tokens = sum(result.greedy_lengths) + sum(n for ns in result.sampled_lengths for n in ns)
    share = busy * sampled_tokens / max(1, sampled_tokens + eval_tokens)
    ctx.round_dir(nxt).mkdir(parents=True, exist_ok=True)
    candidates = write_candidates(ctx.preset, ctx.data.train, ctx.data.queries, policy, ctx.external,
                                  ctx.outputs(nxt, "sample")[0])
    info["seconds_compute"] = max(0.0, info["seconds_compute"] - share)
    return {f"round{r}/eval": info,
            f"round{nxt}/sample": {**candidates, "seconds_compute": share, "seconds": share}}
