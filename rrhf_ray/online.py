"""The online policy's segment stages (OP-k, `sampling.preset: OP`): sample → score → kl → train
→ refresh, each a function of `(ctx, seg)` (`rrhf_ray.segments.Segment`) recorded in state.json
as `round<r>/seg<i>/<stage>` and writing under `rounds/<r>/seg<i>/` (`rrhf_ray.context`).

A segment samples its queries from the weights the previous segment trained (policy version
seg.number − 1; ρ for the first; with `online.max_staleness: 1` the version before that, while
the previous segment trains: `rrhf_ray.segments.sampler_version`), trains the next version for
`online.refresh_every` optimizer steps with the run's one AdamW (`rrhf_ray.train.warm`,
`WarmJob.online_steps`) and loads it into the samplers. Between score and train, `kl` measures
each candidate's KL to ρ with the per-token log-probabilities of DPO's reference task
(`rrhf_ray.train.reference`) under ρ and under the sampling policy, and writes the pool the
trainer reads (pool_kl.parquet): rewards r − β·KL (`online.kl_in: reward`, the paper's OP
setting), or the rewards as scored with Σ log ρ of each candidate for the trainer's KL term
(`kl_in: loss`). The score, train and refresh stages are the round's (`rrhf_ray.stages`) on the
segment's files.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch

from rrhf_ray import stages
from rrhf_ray.config import OnlineConfig
from rrhf_ray.context import RunContext
from rrhf_ray.loss import kl_to_reference
from rrhf_ray.segments import Segment
from rrhf_ray.types import QueryGroup

logger = logging.getLogger(__name__)


def sample(ctx: RunContext, seg: Segment) -> dict:
    """The segment's candidates (unscored), drawn by the weights the samplers serve (version
    `ctx.sampler_version(seg)`) with the seeds of policy version seg.number (`stages.round_sampling`)."""
    from rrhf_ray.waits import Wait

    if (served := ctx.pools["current"].version) != ctx.sampler_version(seg):  # the driver's order broken
        raise RuntimeError(f"{seg.name}: the samplers serve policy version {served}, the segment is "
                           f"sampled by version {ctx.sampler_version(seg)}")
    with Wait(ctx.state, "the sampler replicas (each request under sampling.chunk_timeout_s)", None,
              "sampling.chunk_timeout_s") as wait:
        return stages.sample_candidates(
            ctx.pools, ctx.preset, records=[ctx.data.train[i] for i in seg.queries],
            queries=[ctx.data.queries[i] for i in seg.queries], sampling=ctx.config.sampling,
            external=ctx.external, path=ctx.segment_outputs(seg, "sample")[0], round_index=seg.number, wait=wait)


def score(ctx: RunContext, seg: Segment) -> dict:
    return stages.score_candidates(ctx, ctx.segment_outputs(seg, "sample")[0], ctx.segment_outputs(seg, "score"),
                                   f"{seg.round} segment {seg.index}")


def candidate_kl(policy: Sequence[Sequence[float] | None], reference: Sequence[Sequence[float] | None],
                 estimator: str) -> list[float | None]:
    """Each candidate's KL estimate (`kl_to_reference`) from its per-token log-probs under the
    sampling policy and under ρ; None where the trainer leaves the candidate out."""
    out: list[float | None] = []
    for lp, ref in zip(policy, reference, strict=True):
        if lp is None or ref is None:
            out.append(None)
            continue
        t = torch.tensor([lp], dtype=torch.float64), torch.tensor([ref], dtype=torch.float64)
        out.append(float(kl_to_reference(*t, torch.ones_like(t[0], dtype=torch.bool), estimator)[0]))
    return out


def penalized(groups: Sequence[QueryGroup], kls: Sequence[Sequence[float | None]],
              refs: Sequence[Sequence[float | None]], online: OnlineConfig) -> tuple[list[QueryGroup], dict]:
    """The pool the trainer reads and the segment's numbers: with `kl_in: reward` each candidate's
    reward becomes r − β·KL; with `kl_in: loss` the rewards stay and `ref_logprobs` = Σ log ρ (the
    trainer's KL term). Numbers: means over the candidates the trainer keeps of the reward, the KL,
    r − β·KL and the response length (tokens)."""
    beta = online.kl_coef
    out, rewards, kl_values, lengths = [], [], [], []
    for g, kl, ref in zip(groups, kls, refs, strict=True):
        update: dict = {}
        if online.kl_in == "reward":
            update["scores"] = [s - beta * k if k is not None else s for s, k in zip(g.scores, kl)]
        else:
            update["ref_logprobs"] = [sum(r) if r is not None else None for r in ref]
        out.append(QueryGroup.model_validate({**g.model_dump(), **update}))
        for i, k in enumerate(kl):
            if k is not None:
                rewards.append(g.scores[i])
                kl_values.append(k)
                lengths.append(len(ref[i]))
    n = len(kl_values)

    def mean(xs: Sequence[float]) -> float:
        return sum(xs) / n if n else math.nan

    numbers = {"candidates": n, "reward_mean": mean(rewards), "kl_mean": mean(kl_values),
               "reward_minus_kl_mean": mean([r - beta * k for r, k in zip(rewards, kl_values)]),
               "response_length_mean": mean(lengths), "kl_coef": beta, "kl_estimator": online.kl_estimator,
               "kl_in": online.kl_in}
    return out, numbers


def kl(ctx: RunContext, seg: Segment) -> dict:
    """Each candidate's KL to ρ (`online.kl_estimator`) under the weights that sampled the segment,
    from per-token log-probs of DPO's reference task (two Ray tasks, side by side), and the pool
    the trainer reads (`penalized`) in pool_kl.parquet. Measured whatever β (0 = the KL reported,
    not applied)."""
    from rrhf_ray.train.reference import compute_references
    from rrhf_ray.types import read_groups, write_groups

    cfg = ctx.config
    groups = read_groups(ctx.segment_outputs(seg, "score")[0])
    sampler = ctx.version_policy(ctx.sampler_version(seg))
    policy_lp, ref_lp = compute_references(
        [ctx.hand_off(sampler), ctx.hand_off(ctx.rho)], groups, cfg.train,
        tokenizer_path=ctx.hand_off(cfg.model.tokenizer or sampler),  # the run's, as `stages.reference`
        trust_remote_code=cfg.model.trust_remote_code, dtype=cfg.model.dtype, store=ctx.store,
        resources=cfg.eval.resources, per_token=True)
    kls = [candidate_kl(p, r, cfg.online.kl_estimator) for p, r in zip(policy_lp, ref_lp, strict=True)]
    pool, numbers = penalized(groups, kls, ref_lp, cfg.online)
    write_groups(pool, ctx.segment_outputs(seg, "kl")[0])
    logger.info("%s: reward %.3f, KL to ρ %.4f (%s), reward − %.3g·KL %.3f over %d candidates", seg.name,
                numbers["reward_mean"], numbers["kl_mean"], cfg.online.kl_estimator, cfg.online.kl_coef,
                numbers["reward_minus_kl_mean"], numbers["candidates"])
    return {"online": numbers}


def train(ctx: RunContext, seg: Segment) -> dict:
    """Policy version seg.number: `online.refresh_every` steps on the segment's pool_kl.parquet."""
    d = ctx.segment_dir(seg)
    return stages.train_version(ctx, seg.number, ctx.segment_outputs(seg, "kl")[0], d, d / "checkpoint")


def refresh(ctx: RunContext, seg: Segment) -> dict:
    """The samplers load the segment's checkpoint in place and are checked (`stages.refresh`)."""
    d = ctx.segment_dir(seg)
    return stages.refresh_version(ctx, seg.number, d / "checkpoint", d, f"{seg.name}/train")
