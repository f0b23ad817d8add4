"""The driver: `setup` builds a run's context, `run_rounds` runs the paper's round once per round.

Round 0 evaluates the untouched base model ρ. Round r samples k candidates per training query
from ρ* (the model round r−1 trained; IP-1 ≡ DP), scores them, writes the round's pool, trains
from ρ* for `train.epochs` with Ray Train, refreshes the samplers in place with the new
checkpoint and evaluates it on held-out queries (the stages: `rrhf_ray.stages`; the output
directory's layout: `rrhf_ray.context`).

Resume: `state.json` in the output directory records each finished stage. Started again with
the same output directory, the driver skips every finished stage whose output exists and
continues at the first unfinished one. Every output is written under a temporary name and
renamed when whole. More `rounds` than a finished run had continues from its last round; any
other config change is refused.

Faults during a run (docs/faults.md): one driver per output directory (`DriverLock`); SIGTERM
and SIGINT stop the run between two Python steps of the driver (`stop_signals`): the running
stage is recorded as interrupted, the trainer and the actors are shut down, and the next start
resumes at that stage; a finished round's checkpoint is verified against its manifest before
anything loads it (`drop_damaged_checkpoints`).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from rrhf_ray import registry, stages
from rrhf_ray.config import RewardConfig, RunConfig
from rrhf_ray.connection import connect_ray
from rrhf_ray.context import RunContext, RunData
from rrhf_ray.state import DriverLock, RunState, timed_stage, timed_stages

if TYPE_CHECKING:
    from rrhf_ray.actors.pools import EngineCache
    from rrhf_ray.mirror import RunStore
    from rrhf_ray.preflight import Preflight
    from rrhf_ray.segments import Segment

logger = logging.getLogger(__name__)

INTERRUPT_CLOSE_SECONDS = 5.0  # a stop signal: what the warm trainer gets to end its fit


def run(config: RunConfig, engines: EngineCache | None = None) -> list[dict]:
    """Run (or resume) the whole workflow; returns one metrics row per round, round 0 first.
    With `output.dir` on object storage the run works in a local mirror of the bucket
    (`rrhf_ray.mirror.mirrored`). `engines`: sampler engines shared with other runs of this
    process (`rrhf_ray.actors.pools.EngineCache`)."""
    from rrhf_ray.mirror import mirrored
    from rrhf_ray.remote import is_remote

    if is_remote(config.output.dir):
        with mirrored(config) as (local, store):
            return drive(local, store, engines)
    return drive(config, None, engines)


def drive(config: RunConfig, store: RunStore | None, engines: EngineCache | None) -> list[dict]:
    """Check everything static, take the output directory's lock (one driver per directory:
    `DriverLock`), connect, set up, run the rounds, release, report."""
    from rrhf_ray.preflight import check_run

    # Every static mistake (models, data rows, reward rule, lengths) stops here: before Ray
    # starts, before anything trains, before output.dir is written.
    checked = check_run(config)
    with DriverLock(Path(config.output.dir)):
        state = RunState(Path(config.output.dir), config)  # the config as given: its fingerprint
        log_dir = connect_ray(checked.config)
        # After ray.init, which installs a crash handler of its own for SIGTERM (it would abort).
        with stop_signals():
            return _run(checked, state, store, engines, log_dir)


def _run(checked: Preflight, state: RunState, store: RunStore | None, engines: EngineCache | None,
         log_dir: str | None) -> list[dict]:
    """The run itself, once the driver holds the output directory and is connected."""
    from rrhf_ray.tracking import open_tracking

    config = checked.config  # local paths absolute (with_absolute_paths)
    logger.info("output directory: %s", Path(config.output.dir).resolve())
    # One tracking run per output directory: a resumed run continues it (ids kept in state.json).
    tracker = open_tracking(config.tracking, Path(config.output.dir), state.data.get("tracking"))
    state.data["tracking"] = tracker.ids
    ctx = RunContext(config=config, state=state, preset=checked.preset, external=checked.external,
                     tracker=tracker, store=store, log_dir=log_dir, engines=engines)
    with tracker:
        tracker.log_params(config)
        finished = interrupted = False
        try:
            setup(ctx)
            run_rounds(ctx)
            finished = True
        except KeyboardInterrupt:
            interrupted = True
            raise
        finally:
            release(ctx, keep=finished, interrupted=interrupted)
        return report(ctx)


class StopSignal(KeyboardInterrupt):
    """SIGTERM (`ray job stop`, Kubernetes) raised in the driver's main thread, as Ctrl-C's
    SIGINT raises KeyboardInterrupt: the running stage is recorded with `interrupted: true`."""


@contextlib.contextmanager
def stop_signals() -> Iterator[None]:
    """While the driver runs: SIGTERM and SIGINT raise `StopSignal` / KeyboardInterrupt in the
    main thread (Ray's `ray.get` and the trainer's queue polls wake up for it). Once one has
    arrived, a repeated SIGTERM is ignored while the driver shuts the run down (a second Ctrl-C
    still interrupts). Nothing changes outside the main thread (a notebook's worker thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        logger.warning("%s received: stopping the run", name, extra={"console": True})
        raise StopSignal(name) if signum == signal.SIGTERM else KeyboardInterrupt(name)

    before = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


# --------------------------------------------------------------------------- setup


def path_stage(state: RunState, stage: str, make, *args) -> str:
    """A stage whose output is the directory `make(*args)` returns; skipped while it exists."""
    info = state.data["stages"].get(stage)
    if info and Path(info["path"]).exists():
        logger.info("%s: done already (%s), skipped", stage, info["path"])
        return info["path"]
    state.data["stages"].pop(stage, None)
    timed_stage(state, stage, [], _path_info, make, *args)
    return state.data["stages"][stage]["path"]


def _path_info(make, *args) -> dict:
    return {"path": str(make(*args))}


def base_model(config: RunConfig, out: Path, state: RunState) -> str:
    """The model SFT starts from: a built-in model is built into `base/`; else the configured one."""
    path = config.model.name_or_path
    if registry.is_builtin(path):
        path = path_stage(state, "base", registry.lookup("model", path), out / "base")
    return path


def sft_model(config: RunConfig, out: Path, state: RunState, base: str, store: RunStore | None,
              log_dir: str | None = None) -> str:
    """ρ: the SFT stage's model from `base` when `sft` is configured, else `base`."""
    if config.sft is None:
        return base
    from rrhf_ray.mirror import hand_off
    from rrhf_ray.train.sft import run_sft_stage

    # The SFT workers read the base model from the bucket with output.dir on object storage.
    with_base = config.model_copy(update={"model": config.model.model_copy(update={"name_or_path": hand_off(base, store)})})
    return path_stage(state, "sft", run_sft_stage, with_base, out, store, log_dir)


def reward_config(config: RunConfig, out: Path, state: RunState, store: RunStore | None,
                  log_dir: str | None = None) -> RewardConfig:
    """The reward settings, pointing at the trained reward model when that stage is configured."""
    if config.reward_model is None:
        return config.reward
    from rrhf_ray.mirror import hand_off
    from rrhf_ray.train.reward_model import run_reward_model_stage

    rm_dir = path_stage(state, "reward_model", run_reward_model_stage, config, out, store, log_dir)
    return config.reward.model_copy(update={"kind": "model", "model": hand_off(rm_dir, store)})


def with_run_tokenizer(config: RunConfig, base: str, out: Path) -> RunConfig:
    """`config` whose `model.tokenizer` is the run's tokenizer: the policy's (`model.tokenizer`, else
    the base model's) with `data.chat_template_path`'s template in place of its own, saved to
    <output.dir>/tokenizer. Every reader of the policy's tokenizer loads it (the sampler engines,
    the trainer, whose checkpoints keep it, the reference and evaluation tasks, SFT), so all render
    a prompt to the same ids. Written at every start: a changed template file changes the
    tokenizer's fingerprint (`rrhf_ray.train.tokens.tokenizer_fingerprint`), and prompt ids that
    a pool recorded under the old one are rendered anew by the trainer, as after any tokenizer change."""
    import shutil

    from transformers import AutoTokenizer

    from rrhf_ray.preflight import read_chat_template

    tokenizer = AutoTokenizer.from_pretrained(config.model.tokenizer or base,
                                              trust_remote_code=config.model.trust_remote_code)
    read_chat_template("data.chat_template_path", config.data.chat_template_path, tokenizer)  # sets it
    target, tmp = out / "tokenizer", out / ".tokenizer.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    logger.info("the run's tokenizer, with the chat template of %s: %s", config.data.chat_template_path, target)
    return config.model_copy(update={"model": config.model.model_copy(update={"tokenizer": str(target)})})


def start_engines_beside_sft(ctx: RunContext, base: str) -> None:
    """The engines start now from the base model, beside the SFT stage, and load ρ in place when
    SFT has made it (an engine's start-up, mostly importing vLLM, is long on a small CPU); round
    0's evaluation tasks then find their Python processes ready too."""
    from rrhf_ray.actors.pools import build_pools
    from rrhf_ray.evaluation import warm_up_workers

    logger.info("sampler engines start beside the SFT stage (from %s)", base)
    cfg = ctx.config
    warm_up_workers(rule=cfg.reward.rule if cfg.reward.kind == "rule" else None, store=ctx.store,
                    resources=cfg.eval.resources)
    weights = ctx.hand_off(base)
    ctx.pools = build_pools(cfg, ctx.preset, weights, weights, 0, store=ctx.store, engines=ctx.engines,
                            log_dir=ctx.log_dir, with_current=True)


def setup(ctx: RunContext) -> None:
    """Build what the rounds use: ρ (base model, SFT), the reward, the data, the sampler pools,
    the reward pool and the warm trainer, which starts now beside the engines and round 0's
    evaluation and holds the policy the next round trains from (`rrhf_ray.train.warm`)."""
    import ray
    from transformers import AutoTokenizer

    from rrhf_ray.actors.engine import served_dtype
    from rrhf_ray.actors.pools import (
        actor_nodes,
        build_pools,
        fits_beside_sft,
        role_actors,
        this_node,
    )
    from rrhf_ray.actors.scorer import RewardPool
    from rrhf_ray.data.queries import load_data
    from rrhf_ray.segments import last_trained, plan_segments, serving_version, total_steps
    from rrhf_ray.train.checkpoints import start_state
    from rrhf_ray.train.warm import WarmJob, WarmTrainer

    cfg, out, state = ctx.config, ctx.out, ctx.state
    base = base_model(cfg, out, state)
    if cfg.data.chat_template_path:
        cfg = ctx.config = with_run_tokenizer(cfg, base, out)
    if cfg.sft is not None and "sft" not in state.data["stages"] and fits_beside_sft(cfg):
        start_engines_beside_sft(ctx, base)
    ctx.rho = sft_model(cfg, out, state, base, ctx.store, ctx.log_dir)
    ctx.reward = reward_config(cfg, out, state, ctx.store, ctx.log_dir)
    ctx.tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer or ctx.rho)
    ctx.data = RunData.of(load_data(cfg.data, ctx.tokenizer))
    drop_damaged_checkpoints(ctx)
    if ctx.preset.name == "OP":  # the online policy: segments, each a policy version
        ctx.segments = plan_segments(len(ctx.data.train), cfg.train.queries_per_step, cfg.online.refresh_every,
                                     cfg.rounds, cfg.data.seed, cfg.train.num_workers)
        drop_damaged_segments(ctx)
        ctx.last_trained = last_trained(ctx.segments, {f"{s.name}/train" for s in ctx.segments
                                                       if ctx.segment_done(s, "train")})
    else:
        ctx.last_trained = max([r for r in range(1, cfg.rounds + 1) if ctx.done(r, "train")], default=0)
    versions = len(ctx.segments) or cfg.rounds
    current = ctx.version_policy(ctx.last_trained)  # what the trainer starts from
    serve = ctx.last_trained  # what the samplers serve: with one-step overlap, maybe the version before
    if ctx.segments:
        serve = serving_version(ctx.segments, {f"{s.name}/kl" for s in ctx.segments if ctx.segment_done(s, "kl")},
                                ctx.last_trained, cfg.online.max_staleness)
    if ctx.pools:  # started beside SFT from the base model: ρ everywhere now, version 0
        ray.get([ref for pool in ctx.pools.values() for ref in pool.load_weights_refs(ctx.hand_off(ctx.rho), 0)])
    else:
        ctx.pools = build_pools(cfg, ctx.preset, ctx.hand_off(ctx.rho), ctx.hand_off(ctx.version_policy(serve)),
                                serve, store=ctx.store, engines=ctx.engines, log_dir=ctx.log_dir, with_current=True)
    ctx.rewards = RewardPool(ctx.reward, store=ctx.store, log_dir=ctx.log_dir)
    ctx.judge = cfg.eval.judge_model or ctx.rho  # one fixed judge for every round (docs/metrics.md)
    ctx.served_dtype = served_dtype(cfg.sampling.dtype, current, trust_remote_code=cfg.model.trust_remote_code)
    if ctx.last_trained < versions:
        online = {} if not ctx.segments else {  # one AdamW and schedule over every segment
            "online_steps": total_steps(ctx.segments),
            "kl_loss_coef": cfg.online.kl_coef if cfg.online.kl_in == "loss" else 0.0}
        job = WarmJob(model_path=ctx.hand_off(current), output_dir=str(out / "rounds"), train=cfg.train,
                      tokenizer_path=ctx.hand_off(cfg.model.tokenizer) if cfg.model.tokenizer else None,
                      trust_remote_code=cfg.model.trust_remote_code,
                      save_dtype=ctx.served_dtype, log_dir=ctx.log_dir, **online)  # saved as the samplers load
        ctx.trainer = WarmTrainer(job, ctx.last_trained, global_step=start_state(current), store=ctx.store,
                                  storage_path=cfg.output.storage_path or str((out / "ray_train").resolve()))
    record_placement(ctx, {"driver": this_node(), **actor_nodes(role_actors(ctx.pools, ctx.rewards))})


def record_placement(ctx: RunContext, nodes: dict[str, dict[str, str]]) -> None:
    """The node the driver and each actor run on ({name: {"node_id", "ip"}}) into driver.log and state.json's
    `placement` (saved with the next stage); a name seen on another node before is replaced."""
    placement = ctx.state.data.setdefault("placement", {})
    for name, where in nodes.items():
        if placement.get(name) != where:
            logger.info("%s runs on node %s (%s)", name, where["node_id"], where["ip"])
        placement[name] = where


def drop_damaged_checkpoints(ctx: RunContext) -> None:
    """Verify the checkpoint the run continues from (the last trained round's) by its manifest
    (`rrhf_ray.train.checkpoints.checkpoint_problem`) before the trainer or an engine loads it.
    A damaged one is named, removed, and its round's training and every stage after it are
    forgotten, so they are redone; the round before is verified in turn. A checkpoint without a
    manifest that an earlier version installed (no manifest, but its model files) is used as it is."""
    import shutil

    from rrhf_ray.train.checkpoints import MANIFEST_FILE, checkpoint_problem, is_finished_model

    stages = ctx.state.data["stages"]
    for r in range(ctx.config.rounds, 0, -1):
        if not ctx.done(r, "train"):
            continue
        path = ctx.checkpoint(r)
        if not (path / MANIFEST_FILE).exists() and is_finished_model(path):
            logger.warning("round %d's checkpoint %s has no manifest (installed by an earlier version): "
                           "not verified", r, path)
            return
        problem = checkpoint_problem(path)
        if problem is None:
            return
        redone = [name for name in stages if _round_of(name) > r
                  or name in (f"round{r}/train", f"round{r}/refresh", f"round{r}/eval")]
        logger.warning("round %d's checkpoint is damaged: %s; it is removed, and %s are redone", r, problem,
                       ", ".join(redone), extra={"console": True})
        for name in redone:
            del stages[name]
        ctx.state.save()
        shutil.rmtree(path)


def drop_damaged_segments(ctx: RunContext) -> None:
    """`drop_damaged_checkpoints` for the online policy's segments: the last trained segment's
    checkpoint (the one the run continues from) is verified by its manifest; a damaged one is named
    and removed, and its training, refresh and every stage after it are forgotten (redone); the
    segment before is verified in turn."""
    import shutil

    from rrhf_ray.segments import redone_with
    from rrhf_ray.train.checkpoints import checkpoint_problem

    stages = ctx.state.data["stages"]
    for seg in reversed(ctx.segments):
        if not ctx.segment_done(seg, "train"):
            continue
        path = ctx.segment_dir(seg) / "checkpoint"
        problem = checkpoint_problem(path)
        if problem is None:
            return
        redone = redone_with(seg, ctx.segments, list(stages))
        logger.warning("%s's checkpoint is damaged: %s; it is removed, and %s are redone", seg.name, problem,
                       ", ".join(redone), extra={"console": True})
        for name in redone:
            del stages[name]
        ctx.state.save()
        shutil.rmtree(path)


def _round_of(stage: str) -> int:
    head = stage.split("/", 1)[0]
    return int(head[5:]) if head.startswith("round") and head[5:].isdigit() else -1


# --------------------------------------------------------------------------- the rounds


def run_rounds(ctx: RunContext) -> None:
    """Round 0's evaluation, then the paper's round once per round (the online policy: each
    pass's segments, then the pass's evaluation)."""
    from rrhf_ray.actors.pools import actor_nodes, role_actors
    from rrhf_ray.report import write_metrics

    if ctx.last_trained == 0:  # else round 0 is evaluated already, and the pool serves ρ* now
        evaluate_round(ctx, 0)
    ctx.round0 = stages.read_eval(ctx.outputs(0, "eval")[0])
    track_round(ctx, write_metrics(ctx.out, ctx.state.data["stages"], 0), 0)
    if ctx.segments:
        run_passes(ctx)
        return
    for r in range(1, ctx.config.rounds + 1):
        logger.info("── round %d/%d ──", r, ctx.config.rounds)
        if ctx.done(r, "sample") and ctx.state.data["stages"][f"round{r}/sample"].get("batched_with"):
            logger.info("round%d/sample: sampled in round %d's evaluation pass", r, r - 1)
        else:
            ctx.run_stage(r, "sample", stages.sample)
        ctx.run_stage(r, "score", stages.score)
        if ctx.config.train.loss.name == "dpo":  # π_ref of each candidate, once: pool_ref.parquet
            ctx.run_stage(r, "reference", stages.reference)
        ctx.run_stage(r, "train", stages.train)
        if ctx.trainer is not None:  # where the trainer ran, and where restarted actors run now
            record_placement(ctx, {**{f"train{rank}": where for rank, where in ctx.trainer.nodes.seen().items()},
                                   **actor_nodes(role_actors(ctx.pools, ctx.rewards))})
        publish_checkpoint(ctx, r)
        if ctx.pools["current"].version < r:  # refresh ρ* in place: no engine restart
            ctx.run_stage(r, "refresh", stages.refresh)
        evaluate_round(ctx, r)
        track_round(ctx, write_metrics(ctx.out, ctx.state.data["stages"], r), r)


def run_passes(ctx: RunContext) -> None:
    """The online policy (OP-k, `rrhf_ray.online`): each pass over the queries streams its
    segments (sample → score → KL → train k steps → refresh), then evaluates the weights it ends
    with as round r. A resumed run skips every finished segment stage.

    With `online.max_staleness: 1` segment s+1's sample, score and KL stages run while segment s
    trains (in a thread of this process: `beside`), from the weights of segment s − 1; segment
    s's weights reach the samplers before segment s+2 samples (or before its pass's evaluation)."""
    overlap = ctx.config.online.max_staleness > 0
    training: Segment | None = None  # trained beside the next segment's sampling
    for seg in ctx.segments:
        serve_version(ctx, ctx.sampler_version(seg))
        if training is None:
            front_segment(ctx, seg)
        else:
            beside(partial(train_segment, ctx, training), partial(front_segment, ctx, seg))
            end_segment(ctx, training)
        if overlap:
            training = seg
        else:
            train_segment(ctx, seg)
            end_segment(ctx, seg)
    if training is not None:
        train_segment(ctx, training)
        end_segment(ctx, training)


def front_segment(ctx: RunContext, seg: Segment) -> None:
    """A segment's stages before its training: its candidates, their rewards and their KL to ρ."""
    from rrhf_ray import online

    logger.info("── round %d/%d, segment %d/%d (sampled by policy version %d) ──", seg.round, ctx.config.rounds,
                seg.index, sum(1 for s in ctx.segments if s.round == seg.round), ctx.sampler_version(seg))
    ctx.run_segment_stage(seg, "sample", online.sample)
    ctx.run_segment_stage(seg, "score", online.score)
    ctx.run_segment_stage(seg, "kl", online.kl)


def train_segment(ctx: RunContext, seg: Segment) -> None:
    """Policy version seg.number, trained and its checkpoint published."""
    from rrhf_ray import online

    ctx.run_segment_stage(seg, "train", online.train)
    publish(ctx, f"{seg.name}/train", f"rounds/{seg.round}/seg{seg.index}/checkpoint", seg.name)


def serve_version(ctx: RunContext, version: int) -> None:
    """The samplers serve policy `version` (no older): segment `version`'s refresh stage loads it in
    place (no engine restart). A refresh finished by an earlier driver whose engines are gone is
    done again without a record (the resumed samplers started from an older version)."""
    from rrhf_ray import online

    if ctx.pools["current"].version >= version:
        return
    seg = ctx.segments[version - 1]
    if not ctx.run_segment_stage(seg, "refresh", online.refresh):
        online.refresh(ctx, seg)


def end_segment(ctx: RunContext, seg: Segment) -> None:
    """After a segment's training: at the end of its pass, the samplers take its weights, and the
    pass is evaluated and tracked as round seg.round."""
    from rrhf_ray.report import write_metrics

    if seg is not [s for s in ctx.segments if s.round == seg.round][-1]:
        return
    serve_version(ctx, seg.number)
    if ctx.trainer is not None:  # where the trainer ran, as a round records it
        record_placement(ctx, {f"train{rank}": where for rank, where in ctx.trainer.nodes.seen().items()})
    evaluate_round(ctx, seg.round)
    track_round(ctx, write_metrics(ctx.out, ctx.state.data["stages"], seg.round), seg.round)


def beside(first: Callable[[], None], second: Callable[[], None]) -> None:
    """`first` in a thread of its own while `second` runs here (the driver's thread, where SIGINT
    and SIGTERM land); returns when both have. An error of either is raised once both are over
    (`second`'s first), so that the other's stage ends recorded; an interrupt of `second` is raised
    at once, `first` left to the run's release (which stops the trainer it waits on)."""
    errors: list[BaseException] = []

    def run_first() -> None:
        try:
            first()
        except BaseException as error:  # noqa: BLE001 - handed to the driver's thread
            errors.append(error)

    thread = threading.Thread(target=run_first, name="rrhf-ray-train", daemon=True)
    thread.start()
    try:
        second()
    except KeyboardInterrupt:
        raise
    except BaseException:
        thread.join()
        raise
    thread.join()
    if errors:
        raise errors[0]


def evaluate_round(ctx: RunContext, r: int) -> None:
    """Round r's evaluation; with round r+1's sampling in the same engine pass where the config
    allows (`stages.batches_next_sampling`) and neither is done yet."""
    if stages.batches_next_sampling(ctx, r) and not ctx.done(r, "eval") and not ctx.done(r + 1, "sample"):
        ctx.round_dir(r).mkdir(parents=True, exist_ok=True)
        timed_stages(ctx.state, [f"round{r}/eval", f"round{r + 1}/sample"], stages.eval_and_sample, ctx, r)
    else:
        ctx.run_stage(r, "eval", stages.evaluate)


def publish_checkpoint(ctx: RunContext, r: int) -> None:
    """With `output.dir` on object storage: put round r's checkpoint in the bucket now (before the
    samplers load it; the background sync would take up to its period), and record its size and
    upload time with the train stage (`checkpoint_upload_bytes` / `_seconds` in the round's row)."""
    publish(ctx, f"round{r}/train", f"rounds/{r}/checkpoint", f"round {r}")


def publish(ctx: RunContext, trained: str, checkpoint: str, label: str) -> None:
    """`publish_checkpoint`'s work for the stage `trained` whose checkpoint is `checkpoint` (relative
    to the output directory; `label` names it in the log): a round's, or an online segment's."""
    info = ctx.state.data["stages"].get(trained)
    if ctx.store is None or info is None or "checkpoint_upload" in info:
        return
    ctx.store.sync()
    moved = ctx.store.uploaded(checkpoint)
    with ctx.state.lock:  # (an online segment publishes from the training thread: `beside`)
        info["checkpoint_upload"] = {"bytes": moved.bytes, "seconds": round(moved.seconds, 3)}
    logger.info("%s's checkpoint: %s", label, moved.describe("uploaded"))


def track_round(ctx: RunContext, rows: list[dict], r: int) -> None:
    """Round r to the experiment trackers: its metrics row, the training steps it ran
    (`train_history.jsonl`, on the global step), its sample replies as a table. What a resumed
    run logged already is skipped by the tracker."""
    from rrhf_ray.report import sample_table
    from rrhf_ray.types import iter_jsonl

    tracker = ctx.tracker
    if not tracker.enabled:
        return
    tracker.log_rounds(rows)
    history = ctx.round_dir(r) / "train_history.jsonl"
    if history.exists():
        tracker.log_train_steps([row for _, row in iter_jsonl(history)], prefix="train")
    samples = sample_table(ctx.out, [r])
    if samples:
        tracker.log_table(f"samples_round{r}", samples, step=r)
    ctx.state.data["tracking"] = tracker.ids  # saved with the next stage


# --------------------------------------------------------------------------- the end


def release(ctx: RunContext, *, keep: bool, interrupted: bool = False) -> None:
    """Stop the trainer, the engines (or leave them in `ctx.engines` for the next run, when this
    one finished: `keep`) and the reward workers. After a stop signal (`interrupted`) the trainer
    gets a few seconds to stop (a round it trains ends with the driver process, which owns its
    worker group)."""
    from rrhf_ray.actors.pools import release_pools

    started = time.perf_counter()
    if ctx.trainer is not None:
        ctx.trainer.close(**({"timeout_s": INTERRUPT_CLOSE_SECONDS} if interrupted else {}))
    closed = time.perf_counter()
    release_pools(ctx.config, ctx.pools, ctx.engines, keep=keep)
    if ctx.rewards is not None:
        ctx.rewards.shutdown()
    logger.debug("shut down the trainer in %.1f s, the engines and scorers in %.1f s",
                 closed - started, time.perf_counter() - closed)


def report(ctx: RunContext) -> list[dict]:
    """metrics.jsonl, summary.md and report.png of every round; returns the metrics rows."""
    from rrhf_ray.report import write_metrics, write_report

    rows = write_metrics(ctx.out, ctx.state.data["stages"], ctx.config.rounds)
    started = time.perf_counter()
    write_report(ctx.out, rows)
    logger.debug("wrote summary.md and report.png in %.1f s", time.perf_counter() - started)
    for name in ("summary.md", "report.png"):
        ctx.tracker.log_artifact(ctx.out / name)
    return rows
