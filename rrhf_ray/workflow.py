"""The driver: rounds of sample → score → rank-train → refresh → evaluate (RRHF's IP-n policy).

Round 0 evaluates the untouched base model ρ. Round r samples k candidates per training query
from ρ* (the model round r−1 trained; IP-1 ≡ DP), scores them, writes the round's pool, trains
from ρ* for `train.epochs` with Ray Train, refreshes the samplers in place with the new
checkpoint, and evaluates it on held-out queries. Round r's evaluation and round r+1's sampling
use the same weights: they run as one batched engine pass (`eval.batch_with_sampling`, where the
preset samples from ρ*), recorded as the two stages they are.

Resume: `state.json` in the output directory records each finished stage. Started again with
the same output directory, the driver skips every finished stage whose output exists and
continues at the first unfinished one. Every output is written under a temporary name and
renamed when whole. More `rounds` than a finished run had continues from its last round; any
other config change is refused.

Layout of the output directory:
    state.json  metrics.jsonl  summary.md  report.png
    base/                    the built base model (builtin models only), sft/ reward_model/ stages
    rounds/<r>/candidates.jsonl  pool.parquet  pool.jsonl  checkpoint/  metrics.json  eval.jsonl
               pool_ref.parquet  (DPO only: the pool with each candidate's reference log-prob,
                                  stage round<r>/reference between score and train)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

from rrhf_ray import registry
from rrhf_ray.config import RunConfig, SamplingConfig
from rrhf_ray.state import RunState, timed_stage, timed_stages
from rrhf_ray.types import write_jsonl

logger = logging.getLogger(__name__)

PROBE_QUERIES = 4  # query groups in the weight-refresh probe
# A small local cluster runs more processes (engines, trainer, tasks) than it has CPUs, and Ray
# kills idle task workers beyond that count after 1 s: every round's scoring and evaluation tasks
# then paid a new Python process (2 s a round on the demo). Idle workers live 10 minutes here.
LOCAL_SYSTEM_CONFIG = {"idle_worker_killing_time_threshold_ms": 600_000}

def connect_ray(config: RunConfig) -> None:
    """Join the configured cluster (`ray.address` or RAY_ADDRESS) or start a local one. The run's
    logs go to `<output.dir>/logs/` from here on (`rrhf_ray.logs`): the driver's log, and the
    output of the actors and Ray processes, kept off the console unless `--verbose`."""
    import ray

    from rrhf_ray import logs
    from rrhf_ray.remote import is_remote

    if not is_remote(config.output.dir):  # run() calls this with the local mirror of a bucket
        logs.start_run_logs(Path(config.output.dir) / "logs")
    log_to_driver = logs.ray_log_to_driver()
    if not ray.is_initialized():  # else joined already (a notebook's or a test's ray.init)
        address = config.ray.address or os.environ.get("RAY_ADDRESS")
        if address:
            logger.info("joining the Ray cluster at %s", address)
            ray.init(address=address, log_to_driver=log_to_driver)
        else:
            ray.init(num_cpus=config.ray.num_cpus, include_dashboard=False, log_to_driver=log_to_driver,
                     _system_config=LOCAL_SYSTEM_CONFIG)
            logger.info("started a local Ray cluster: %s", ray.cluster_resources())
    if logs.quiet():
        logs.quiet_library_loggers()  # ray.init configured Ray's loggers anew
        if log_to_driver:
            logs.route_worker_output()


def path_stage(state: RunState, stage: str, make: Callable[[], Path]) -> str:
    """A stage whose output is a directory `make` returns; skipped while that directory exists."""
    info = state.data["stages"].get(stage)
    if info and Path(info["path"]).exists():
        logger.info("%s: done already (%s), skipped", stage, info["path"])
        return info["path"]
    state.data["stages"].pop(stage, None)
    timed_stage(state, stage, [], lambda: {"path": str(make())})
    return state.data["stages"][stage]["path"]


def base_model(config: RunConfig, out: Path, state: RunState,
               before_sft: Callable[[str], None] | None = None) -> str:
    """ρ's path: a built-in model is built into `base/`, then the optional SFT stage runs.
    `before_sft(base path)` is called when the SFT stage is about to run (not when it is done)."""
    path = config.model.name_or_path
    if registry.is_builtin(path):
        build = registry.lookup("model", path)
        path = path_stage(state, "base", lambda: build(out / "base"))
    if config.sft is not None:
        from rrhf_ray.train.sft import run_sft_stage

        if before_sft is not None and "sft" not in state.data["stages"]:
            before_sft(path)
        # The SFT workers read the base model from the bucket with output.dir on object storage.
        with_base = config.model_copy(update={"model": config.model.model_copy(update={"name_or_path": hand_off(path)})})
        path = path_stage(state, "sft", lambda: run_sft_stage(with_base, out, store=_STORE))
    return path


def fits_beside_sft(config: RunConfig) -> bool:
    """Whether the cluster has room for the sampler engines and the SFT stage's workers at once
    (then the engines start during SFT, from the base model; else after it)."""
    import ray

    s, t = config.sampling, config.sft.train
    need_cpu = s.num_replicas * s.cpus_per_replica + t.num_workers * t.cpus_per_worker
    free = ray.available_resources()
    if free.get("GPU", 0) > 0 or t.use_gpu:
        need_gpu = s.num_replicas * s.tensor_parallel_size + (t.num_workers if t.use_gpu else 0)
        return free.get("GPU", 0) >= need_gpu and free.get("CPU", 0) >= need_cpu
    return free.get("CPU", 0) >= need_cpu


def reward_config(config: RunConfig, out: Path, state: RunState):
    """The reward settings, pointing at the trained reward model when that stage is configured."""
    if config.reward_model is None:
        return config.reward
    from rrhf_ray.train.reward_model import run_reward_model_stage

    rm_dir = path_stage(state, "reward_model", lambda: run_reward_model_stage(config, out, store=_STORE))
    return config.reward.model_copy(update={"kind": "model", "model": hand_off(rm_dir)})


# --------------------------------------------------------------------------- one round's stages


def build_pools(config: RunConfig, preset, rho: str, current: str, version: int) -> dict:
    """The sampler pools a preset needs: "current" (ρ*, the weights at `current`, labelled
    `version`) for IP, "initial" (the frozen ρ at `rho`) for BP / DP / D; none for P. Used by
    both `run` and `rrhf-ray sample`, so the two build the same engines. The engines get the
    bucket's URIs with output.dir on object storage (`hand_off`). Inside `keep_engines` a pool
    that the previous run left with the same settings loads the weights in place instead."""
    pools = {}
    if preset.policy == "current":
        pools["current"] = _pool(config, "policy", hand_off(current), version)
    elif preset.policy == "initial":
        pools["initial"] = _pool(config, "initial", hand_off(rho), 0)
    return pools


# The bucket mirror of the run in progress (None: a local output.dir). Temporary: the round's
# restructuring passes it explicitly.
_STORE = None


def hand_off(path) -> str:
    from rrhf_ray import mirror

    return mirror.hand_off(path, _STORE)


# Engines kept between the runs of one process (`keep_engines`): tag → (settings, pool).
_KEPT: dict[str, tuple[str, object]] | None = None


@contextlib.contextmanager
def keep_engines() -> Iterator[None]:
    """Runs one after another in this process (`rrhf-ray compare`) share their sampler engines:
    a run that ends leaves its pools here, and the next run whose model and sampling settings
    are the same loads its own weights into them (`SamplerPool.load_weights`, prefix cache
    reset) instead of starting engines (about 10 s each on a small CPU, mostly importing vLLM).
    Every request is seeded, so a kept engine samples what a new one would. Shut down at the end."""
    global _KEPT
    _KEPT = {}
    try:
        yield
    finally:
        kept, _KEPT = _KEPT, None
        for _, pool in kept.values():
            pool.shutdown()


def _engine_settings(config: RunConfig, tag: str) -> str:
    """What an engine is built from: the pool's tag, the model and every sampling setting (the
    pool's defaults too); a kept pool serves a run only when these are equal."""
    return json.dumps([tag, config.model.model_dump(mode="json"), config.sampling.model_dump(mode="json")],
                      sort_keys=True)


def _pool(config: RunConfig, tag: str, weights: str, version: int):
    import ray

    from rrhf_ray.actors.sampler import SamplerPool
    from rrhf_ray.logs import current_log_dir

    settings = _engine_settings(config, tag)
    if _KEPT is not None and tag in _KEPT:
        kept_settings, pool = _KEPT.pop(tag)
        if kept_settings == settings:
            logger.info("sampler engines (%s) kept from the previous run: loading %s in place", tag, weights)
            ray.get(pool.redirect_logs(current_log_dir()) + pool.load_weights(weights, version))
            return pool
        pool.shutdown()
    model = config.model
    return SamplerPool(weights, config.sampling, tag=tag, version=version, tokenizer=model.tokenizer,
                       trust_remote_code=model.trust_remote_code, store=_STORE)


def release_pools(config: RunConfig, pools: dict, *, keep: bool) -> None:
    """The end of a run: inside `keep_engines` a run that finished leaves its pools for the next
    run; otherwise (or after a failure, when an engine may be broken) they are shut down."""
    for pool in pools.values():
        if keep and _KEPT is not None and pool.tag not in _KEPT:
            _KEPT[pool.tag] = (_engine_settings(config, pool.tag), pool)
        else:
            pool.shutdown()


def round_sampling(sampling: SamplingConfig, preset, round_index: int) -> SamplingConfig:
    """The sampling settings of training round `round_index`: beam search where the preset says
    so, and the seed mixed with the round (`round_seed`), so that round r's pool is a new draw and
    not round r−1's seeds replayed on ρ*. Query i still gets `query_seed(that seed, i)`."""
    from rrhf_ray.actors.sampler import round_seed

    return sampling.model_copy(update={"use_beam_search": preset.beam or sampling.use_beam_search,
                                       "seed": round_seed(sampling.seed, round_index)})


def sample_stage(pools: dict, preset, records, queries: list[str], sampling: SamplingConfig,
                 external: list[dict], path: Path, round_index: int = 1) -> dict:
    """k candidates per query from the preset's sources (the policy pool the preset names, the
    data set's responses, `external` maps read by `read_external`), duplicates merged, written
    unscored to `path`. The policy samples with the seeds of round `round_index` (`round_sampling`)."""
    from rrhf_ray.actors.sampler import get_samples

    policy: list = []
    busy = 0.0
    if preset.policy is not None:
        cfg = round_sampling(sampling, preset, round_index)
        before = pools[preset.policy].busy_seconds()
        policy = get_samples(pools[preset.policy], queries, cfg)
        busy = pools[preset.policy].busy_seconds() - before
    return {**write_candidates(preset, records, queries, policy, external, path), "seconds_compute": busy}


def write_candidates(preset, records, queries: list[str], policy: list, external: list[dict], path: Path) -> dict:
    """A round's candidates file from the policy's samples (`policy`: k per query; [] when the
    preset samples nothing) and the preset's other sources, duplicates merged."""
    from rrhf_ray.data.candidates import combine, dataset_candidates
    from rrhf_ray.types import write_groups

    sources: list = [policy] if preset.policy is not None else []
    if preset.dataset and records:
        sources.append([dataset_candidates(r) for r in records])
    groups = combine(queries, sources + external)
    write_groups([g.to_group() for g in groups], path)
    return {"groups": len(groups), "candidates": sum(len(g.candidates) for g in groups)}


def score_stage(rewards, candidates_path: Path, pool_dir: Path) -> dict:
    """Score the round's candidates into pool.jsonl + pool.parquet; returns the reward statistics
    per source (`reward_stats`) and the pool's shape (`pool_summary`: k histogram, groups without a
    strict pair, reward mean before / after merging duplicates)."""
    import ray

    from rrhf_ray.data.candidates import pool_summary
    from rrhf_ray.types import CandidateGroup, read_groups, reward_stats, write_groups

    groups = [CandidateGroup.from_group(g) for g in read_groups(candidates_path, scored=False)]
    scored = ray.get(rewards.score(groups))
    write_groups(scored, pool_dir / "pool.jsonl")
    write_groups(scored, pool_dir / "pool.parquet")
    return {"pool_stats": reward_stats(scored), "pool": pool_summary(scored)}


def reference_stage(config: RunConfig, ref_model: str, start_model: str, pool: Path, out_path: Path) -> dict:
    """DPO's reference log-probabilities of every candidate of `pool` under `ref_model`
    (`train.reference`: ρ or the round's starting ρ*), over the tokens the trainer of a round
    starting from `start_model` scores; the pool with `ref_logprobs` goes to `out_path`
    (`rrhf_ray.train.reference`)."""
    from rrhf_ray.train.reference import write_reference_pool
    from rrhf_ray.types import read_groups

    return write_reference_pool(read_groups(pool), hand_off(ref_model), config.train, out_path,
                                tokenizer_path=hand_off(start_model), trust_remote_code=config.model.trust_remote_code,
                                store=_STORE)


def train_stage(trainer, r: int, pool: Path, checkpoint: Path, probe: list) -> dict:
    """Train round r on `pool` (`pool.parquet`, or for DPO `pool_ref.parquet`) with the warm
    trainer (`rrhf_ray.train.warm`), which holds round r−1's policy; install its checkpoint at
    `checkpoint` and the per-step history at `train_history.jsonl` beside it. The probe's
    log-probabilities under the new weights come back for `verify_refresh`."""
    from rrhf_ray.train.checkpoints import install_checkpoint

    result = trainer.train(r, [hand_off(pool)], probe)  # the bucket's URI on object storage
    metrics = {k: v for k, v in result["metrics"].items() if isinstance(v, (int, float))}
    write_jsonl(result["history"], checkpoint.parent / "train_history.jsonl")
    install_checkpoint(result["checkpoint"], checkpoint, metrics)
    return {"train": metrics, "seconds_compute": metrics.get("seconds_compute", 0.0),
            "probe_logprobs": result["probe"]}


def probe_sequences(pool: Path, tokenizer, n: int = PROBE_QUERIES) -> list[tuple[list[int], list[int]]]:
    """The refresh probe: the best reply of the first `n` query groups of a round's pool, as
    (prompt ids, reply ids): the sampler's own ids when the pool kept them, else tokenized."""
    from rrhf_ray.types import read_groups

    probe = []
    for g in read_groups(pool)[:n]:
        best = max(range(len(g.responses)), key=lambda i: g.scores[i])
        prompt = list(g.prompt_ids) if g.prompt_ids else tokenizer(g.query)["input_ids"]
        reply = (list(g.token_ids[best]) if g.token_ids and g.token_ids[best]
                 else tokenizer(g.responses[best], add_special_tokens=False)["input_ids"])
        if reply:
            probe.append((prompt, reply))
    return probe


def refresh_stage(pool, checkpoint: Path, r: int, probe: list, expected: list[float], tolerance: float) -> dict:
    """Load round r's checkpoint into every replica in place (no engine restart), then check that
    each serves it (`verify_refresh`). With output.dir on object storage the replicas load the
    bucket's copy (`publish_checkpoint` put it there); what they downloaded, summed over replicas,
    is recorded (`checkpoint_download_bytes` / `_seconds` in the round's row)."""
    import ray

    before = pool.busy_seconds()
    ray.get(pool.load_weights(hand_off(checkpoint), r))
    gap = verify_refresh(pool, probe, expected, tolerance, r)
    logger.info("samplers now serve round %d's policy (log-prob gap to the trainer %.4f nats/token)", r, gap)
    info = {"logprob_gap": gap, "seconds_compute": pool.busy_seconds() - before}
    if downloads := [d for d in pool.downloads() if d is not None]:
        info["checkpoint_download"] = {"bytes": sum(d["bytes"] for d in downloads), "replicas": len(downloads),
                                       "seconds": round(sum(d["seconds"] for d in downloads), 3)}
    return info


class StaleWeightsError(RuntimeError):
    """A sampler replica does not serve the weights the trainer just saved."""


def verify_refresh(pool, probe: list, expected: list[float], tolerance: float, r: int) -> float:
    """Compare every replica's log-probabilities of the probe with the trainer's (`expected`):
    the largest gap in mean log-prob per token over probes and replicas. Over `tolerance` the
    round fails naming the replica: it serves old or half-loaded weights."""
    import ray

    if not probe:
        return float("nan")
    worst = 0.0
    for i, ref in enumerate(pool.sequence_logprobs(probe)):
        got = ray.get(ref)
        gap = max(abs(a - b) / len(reply) for a, b, (_, reply) in zip(got, expected, probe))
        if gap > tolerance:
            raise StaleWeightsError(
                f"sampler replica {i} does not serve round {r}'s weights: its log-probs of the "
                f"refresh probe differ from the trainer's by {gap:.3f} nats/token "
                f"(sampling.refresh_tolerance {tolerance})")
        worst = max(worst, gap)
    return worst


def read_eval(path: Path) -> tuple[list[float], list[list[float]]]:
    """(greedy reward, sampled rewards) per held-out query from a round's eval.jsonl."""
    rows = [json.loads(line) for line in path.open() if line.strip()]
    return [r["greedy_reward"] for r in rows], [r.get("sampled_rewards", []) for r in rows]


def eval_stage(pools: dict, rewards, eval_queries, references, model_path: str, config: RunConfig,
               round0: tuple[list[float], list[list[float]]] | None, round_dir: Path,
               judge: str | None = None) -> dict:
    """Round r's evaluation stage: `_evaluate`'s stage info (its metrics and compute seconds)."""
    return _evaluate(pools, rewards, eval_queries, references, model_path, config, round0, round_dir,
                     judge)[0]


def _evaluate(pools: dict, rewards, eval_queries, references, model_path: str, config: RunConfig,
              round0: tuple[list[float], list[list[float]]] | None, round_dir: Path,
              judge: str | None = None, also: list = ()) -> tuple[dict, object, float]:
    """Evaluate the policy at `model_path` (served by the "current" pool) on the held-out queries:
    eval.jsonl (every greedy and sampled reply with its reward) and the metrics, compared per query
    with round 0's (`round0`: `read_eval` of round 0; None for round 0 itself). The sampled replies
    use the same seeds in every round (`rrhf_ray.evaluation.eval_sampling`). `judge`: the model
    whose perplexity of the greedy replies is `judge_perplexity` (`eval.judge_model`, else ρ)."""
    from rrhf_ray.evaluation import evaluate

    before = pools["current"].busy_seconds()
    result = evaluate(pools["current"], rewards, eval_queries, references, hand_off(model_path),
                      config.sampling, config.eval, config.train.max_length,
                      judge=hand_off(judge) if judge is not None else None, also=also, store=_STORE)
    busy = pools["current"].busy_seconds() - before
    write_jsonl(({"query": q, "greedy_reply": reply, "greedy_reward": g, "sampled_replies": texts,
                  "sampled_rewards": s}
                 for q, reply, g, texts, s in zip(eval_queries, result.greedy_replies, result.greedy,
                                                  result.sampled_replies, result.sampled)),
                round_dir / "eval.jsonl")
    greedy0, sampled0 = round0 if round0 is not None else (None, None)
    # The perplexity tasks run beside the sampling; only what outlasts it adds to the compute.
    compute = busy + result.seconds_ranking + max(0.0, result.seconds_perplexity - busy)
    return ({"eval": result.metrics(greedy0, sampled0, resamples=config.eval.bootstrap_resamples,
                                    seed=config.sampling.seed),
             "seconds_compute": compute}, result, busy)


def batches_next_sampling(config: RunConfig, preset, r: int) -> bool:
    """Whether round r's evaluation and round r+1's sampling run as one engine pass: both use
    the weights round r made, when the round samples from ρ* (the "current" pool the
    evaluation uses) without beam search, and `eval.batch_with_sampling` is on."""
    return (config.eval.batch_with_sampling and r < config.rounds and preset.policy == "current"
            and not round_sampling(config.sampling, preset, r + 1).use_beam_search)


def eval_and_sample_stage(pools: dict, rewards, eval_queries, references, model_path: str,
                          config: RunConfig, round0, round_dir: Path, judge: str | None, *, preset,
                          records, queries: list[str], external: list[dict], next_round: int,
                          candidates_path: Path) -> dict[str, dict]:
    """Round r's evaluation (`eval_stage`) and round r+1's sampling (`sample_stage`) in one
    batched engine pass (`SamplerPool.sample_many`): the same replies and candidates as two
    passes, since every request keeps its own seed. The engine seconds are split between the
    two stages by the tokens each generated; the sampling's share is its wall time too."""
    cfg = round_sampling(config.sampling, preset, next_round)
    info, result, busy = _evaluate(pools, rewards, eval_queries, references, model_path, config,
                                   round0, round_dir, judge, also=[(queries, cfg)])
    policy = result.also[0]
    sampled_tokens = sum(len(c.token_ids) for group in policy for c in group)
    eval_tokens = sum(result.greedy_lengths) + sum(n for ns in result.sampled_lengths for n in ns)
    share = busy * sampled_tokens / max(1, sampled_tokens + eval_tokens)
    candidates_path.parent.mkdir(parents=True, exist_ok=True)
    sample = write_candidates(preset, records, queries, policy, external, candidates_path)
    info["seconds_compute"] = max(0.0, info["seconds_compute"] - share)
    return {f"round{next_round - 1}/eval": info,
            f"round{next_round}/sample": {**sample, "seconds_compute": share, "seconds": share}}


# --------------------------------------------------------------------------- the loop


def run(config: RunConfig) -> list[dict]:
    """Run (or resume) the whole workflow; returns one metrics row per round, round 0 first."""
    global _STORE
    from rrhf_ray.mirror import mirrored
    from rrhf_ray.remote import is_remote

    if is_remote(config.output.dir):
        with mirrored(config) as (local, store):
            _STORE = store
            try:
                return run(local)
            finally:
                _STORE = None

    from rrhf_ray.preflight import check_run

    # Every static mistake (models, data rows, reward rule, lengths) stops here: before Ray
    # starts, before anything trains, before output.dir is written.
    checked = check_run(config)
    state = RunState(Path(config.output.dir), config)  # the config as given: its fingerprint
    config = checked.config  # local paths absolute (with_absolute_paths)
    out = Path(config.output.dir)
    preset, external = checked.preset, checked.external
    connect_ray(config)
    logger.info("output directory: %s", out.resolve())
    from rrhf_ray.tracking import open_tracking

    # One tracking run per output directory: a resumed run continues it (ids kept in state.json).
    tracker = open_tracking(config.tracking, out, state.data.get("tracking"))
    state.data["tracking"] = tracker.ids
    with tracker:
        tracker.log_params(config)
        return _run_rounds(config, state, out, preset, external, tracker)


def _run_rounds(config: RunConfig, state: RunState, out: Path, preset, external, tracker) -> list[dict]:
    from rrhf_ray.actors.scorer import RewardPool
    from rrhf_ray.data.candidates import get_preset
    from rrhf_ray.data.queries import load_data
    from rrhf_ray.report import write_metrics, write_report

    early: dict = {}

    def start_engines(base: str) -> None:
        """The engines start now from the base model, beside the SFT stage, and load ρ in place
        when SFT has made it (engine start-up, mostly importing vLLM, is 10–25 s on a small CPU)."""
        if fits_beside_sft(config):
            from rrhf_ray.evaluation import warm_up_workers

            logger.info("sampler engines start beside the SFT stage (from %s)", base)
            # Round 0's evaluation tasks then find their Python processes ready.
            warm_up_workers(rule=config.reward.rule if config.reward.kind == "rule" else None, store=_STORE)
            early.update(build_pools(config, preset, base, base, 0))
            if "current" not in early:
                early.update(build_pools(config, get_preset("IP"), base, base, 0))

    try:
        rho = base_model(config, out, state, before_sft=start_engines)
        reward_cfg = reward_config(config, out, state)
    except BaseException:
        for pool in early.values():
            pool.shutdown()
        raise
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.model.tokenizer or rho)
    data = load_data(config.data, tokenizer)
    queries = [r.query for r in data.train]
    eval_queries = [r.query for r in data.eval]
    references = [(r.query, r.responses[0]) for r in data.eval if r.responses]

    def checkpoint(r: int) -> Path:
        return out / "rounds" / str(r) / "checkpoint"

    last = max([r for r in range(1, config.rounds + 1) if state.done(f"round{r}/train", checkpoint(r))],
               default=0)
    current_path = str(checkpoint(last)) if last else rho
    # Evaluation samples from ρ* whatever the preset, so "current" always exists.
    if early:  # started during SFT (nothing trained yet: ρ everywhere, version 0)
        pools = early
        import ray

        ray.get([ref for pool in pools.values() for ref in pool.load_weights(hand_off(rho), 0)])
    else:
        pools = build_pools(config, preset, rho, current_path, last)
        if "current" not in pools:
            pools.update(build_pools(config, get_preset("IP"), rho, current_path, last))
    rewards = RewardPool(reward_cfg, store=_STORE)
    judge = config.eval.judge_model or rho  # one fixed judge for every round (docs/metrics.md)
    # The warm trainer starts now, beside the engines and round 0's evaluation, holding the
    # policy the next round trains from; it lives until the last round (rrhf_ray.train.warm).
    trainer = None
    if last < config.rounds:
        from rrhf_ray.actors.engine import served_dtype
        from rrhf_ray.train.checkpoints import start_state
        from rrhf_ray.train.warm import WarmJob, WarmTrainer

        trainer = WarmTrainer(
            WarmJob(model_path=hand_off(current_path), output_dir=str(out / "rounds"), train=config.train,
                trust_remote_code=config.model.trust_remote_code,
                save_dtype=served_dtype(config.sampling.dtype, current_path)),  # what the samplers load
            last, storage_path=config.output.storage_path or str((out / "ray_train").resolve()),
            global_step=start_state(current_path), store=_STORE)

    def evaluate_round(r: int, model_path: str, rd: Path, round0) -> None:
        """Round r's evaluation; with round r+1's sampling in the same engine pass where the
        config allows (`batches_next_sampling`) and neither is done yet."""
        name, outputs = f"round{r}/eval", [rd / "eval.jsonl"]
        args = (pools, rewards, eval_queries, references, model_path, config, round0, rd, judge)
        following = out / "rounds" / str(r + 1) / "candidates.jsonl"
        if (batches_next_sampling(config, preset, r) and not state.done(name, *outputs)
                and not state.done(f"round{r + 1}/sample", following)):
            timed_stages(state, {name: outputs, f"round{r + 1}/sample": [following]},
                         partial(eval_and_sample_stage, *args, preset=preset, records=data.train,
                                 queries=queries, external=external, next_round=r + 1,
                                 candidates_path=following))
        else:
            timed_stage(state, name, outputs, partial(eval_stage, *args))

    finished = False
    try:
        round0_dir = out / "rounds" / "0"
        round0_dir.mkdir(parents=True, exist_ok=True)
        if last == 0:
            evaluate_round(0, rho, round0_dir, None)
        round0 = read_eval(round0_dir / "eval.jsonl")
        track_round(tracker, state, out, write_metrics(out, state.data["stages"], 0), 0)

        for r in range(1, config.rounds + 1):
            rd = out / "rounds" / str(r)
            rd.mkdir(parents=True, exist_ok=True)
            logger.info("── round %d/%d ──", r, config.rounds)
            start_model = str(checkpoint(r - 1)) if r > 1 else rho
            timed_stage(state, f"round{r}/sample", [rd / "candidates.jsonl"],
                        partial(sample_stage, pools, preset, data.train, queries, config.sampling,
                                external, rd / "candidates.jsonl", r))
            timed_stage(state, f"round{r}/score", [rd / "pool.parquet", rd / "pool.jsonl"],
                        partial(score_stage, rewards, rd / "candidates.jsonl", rd))
            train_pool = rd / "pool.parquet"
            if config.train.loss.name == "dpo":  # π_ref of each candidate, once: pool_ref.parquet
                train_pool = rd / "pool_ref.parquet"
                ref_model = rho if config.train.reference == "initial" else start_model
                timed_stage(state, f"round{r}/reference", [train_pool],
                            partial(reference_stage, config, ref_model, start_model, rd / "pool.parquet",
                                    train_pool))
            probe = probe_sequences(rd / "pool.parquet", tokenizer)
            timed_stage(state, f"round{r}/train", [checkpoint(r)],
                        partial(train_stage, trainer, r, train_pool, checkpoint(r), probe))
            publish_checkpoint(state, r)
            if pools["current"].version < r:  # refresh ρ* in place: no engine restart
                timed_stage(state, f"round{r}/refresh", [],
                            partial(refresh_stage, pools["current"], checkpoint(r), r, probe,
                                    state.data["stages"][f"round{r}/train"].get("probe_logprobs", []),
                                    config.sampling.refresh_tolerance))
            evaluate_round(r, str(checkpoint(r)), rd, round0)
            track_round(tracker, state, out, write_metrics(out, state.data["stages"], r), r)
        finished = True
    finally:
        started = time.perf_counter()
        if trainer is not None:
            trainer.close()
        closed = time.perf_counter()
        release_pools(config, pools, keep=finished)
        rewards.shutdown()
        logger.debug("shut down the trainer in %.1f s, the engines and scorers in %.1f s",
                     closed - started, time.perf_counter() - closed)
    rows = write_metrics(out, state.data["stages"], config.rounds)
    started = time.perf_counter()
    write_report(out, rows)
    logger.debug("wrote summary.md and report.png in %.1f s", time.perf_counter() - started)
    for name in ("summary.md", "report.png"):
        tracker.log_artifact(out / name)
    return rows


def publish_checkpoint(state: RunState, r: int) -> None:
    """With `output.dir` on object storage: put round r's checkpoint in the bucket now (before the
    samplers load it; the background sync would take up to its period), and record its size and
    upload time with the train stage (`checkpoint_upload_bytes` / `_seconds` in the round's row)."""
    store = _STORE
    info = state.data["stages"].get(f"round{r}/train")
    if store is None or info is None or "checkpoint_upload" in info:
        return
    store.sync()
    moved = store.uploaded(f"rounds/{r}/checkpoint")
    info["checkpoint_upload"] = {"bytes": moved.bytes, "seconds": round(moved.seconds, 3)}
    logger.info("round %d's checkpoint: %s", r, moved.describe("uploaded"))


def track_round(tracker, state: RunState, out: Path, rows: list[dict], r: int) -> None:
    """Round r to the experiment trackers: its metrics row, the training steps it ran
    (`train_history.jsonl`, on the global step), its sample replies as a table. What a resumed
    run logged already is skipped by the tracker."""
    from rrhf_ray.report import sample_table
    from rrhf_ray.types import iter_jsonl

    if not tracker.enabled:
        return
    tracker.log_rounds(rows)
    history = out / "rounds" / str(r) / "train_history.jsonl"
    if history.exists():
        tracker.log_train_steps([row for _, row in iter_jsonl(history)], prefix="train")
    samples = sample_table(out, [r])
    if samples:
        tracker.log_table(f"samples_round{r}", samples, step=r)
    state.data["tracking"] = tracker.ids  # saved with the next stage
