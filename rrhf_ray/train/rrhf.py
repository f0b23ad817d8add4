"""The RRHF update on Ray Train.

`train_loop_per_worker(config)` is the whole training loop of one worker. It runs on its own in
a single process (tests, debugging) and, unchanged, inside `ray.train.torch.TorchTrainer`
(`fit` below), which starts W workers with a process group (gloo on CPU, NCCL on GPU). The loop
(optimizer, accumulation, checkpoints, resume) is `rrhf_ray.train.loop.run_worker`, shared with
the SFT and reward-model trainers; this module adds the candidates' forward and the loss.

The loss is `train.loss` (`rrhf_ray.config.LossConfig`): `LOSSES[cfg.loss.name]` with the loss's
own settings; everything after it (the chunked backward, `measure`, the logs, the metrics) reads
only the loss-independent `LossOutput`. DPO's reference log-probabilities come with the pool
(`QueryGroup.ref_logprobs`, written by `rrhf_ray.train.reference`: the workflow's stage
round<r>/reference, or `rrhf-ray train` from `--model` before it trains); a pool without them is
refused.
`train.shuffle_rewards` (a control) shuffles each group's rewards before anything is encoded.

Batching, exactly: an optimizer step covers `queries_per_step` query groups over all workers;
worker w takes the step's groups w, w+W, …, in micro-batches of `micro_batch_queries` queries
(all their candidates in one forward, or in chunks of `candidate_chunk_size`). Each micro-batch
adds Σ_q L_q · W / |step| to the gradient, so after DDP's mean over workers the step's gradient
is that of the mean loss over the step's queries, however it was split.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from pydantic import Field

from rrhf_ray.config import TrainConfig
from rrhf_ray.loss import LOSSES, LossOutput
from rrhf_ray.train.encoding import (
    EncodedGroup,
    Encoder,
    GroupTensors,
    end_token_ids,
    group_tensors,
    per_group,
)
from rrhf_ray.train.jobs import FitJob
from rrhf_ray.train.launch import fit_job
from rrhf_ray.train.loop import Measured, MicroBatch, Recipe, run_worker
from rrhf_ray.train.prefix import (
    PackedQueries,
    candidate_logprobs_padded,
    candidate_logprobs_shared,
    prefix_kernel,
    supports_prefix_sharing,
)
from rrhf_ray.train.worker import load_policy
from rrhf_ray.types import DataError, QueryGroup, read_groups

if TYPE_CHECKING:
    from rrhf_ray.mirror import RunStore

logger = logging.getLogger(__name__)


class TrainJob(FitJob):
    """An RRHF fit: the policy to start from (ρ*) and the round's ranked pools."""

    train: TrainConfig = Field(default_factory=TrainConfig)
    data_paths: list[str] = Field(min_length=1, description="Reference JSONL or Parquet pool files.")


# --------------------------------------------------------------------------- forward + loss


def use_prefix_sharing(model: torch.nn.Module, setting: str) -> bool:
    """Whether the prompt-shared forward runs for `train.prefix_sharing` on this model: "auto"
    where `supports_prefix_sharing`, "on" must be supported, "off" never."""
    if setting == "off":
        return False
    supported = supports_prefix_sharing(model)
    if setting == "on" and not supported:
        raise ValueError(
            "train.prefix_sharing is 'on' but this model cannot share the prompt (architecture "
            f"{getattr(getattr(model, 'config', None), 'model_type', '?')} or its attention kernel "
            "is not among the tested ones): use 'auto' or 'off'"
        )
    return supported


def candidate_logprobs(model: torch.nn.Module, groups: Sequence[EncodedGroup], shared: bool,
                       spans: Sequence[tuple[int, int, int]] | None = None,
                       attention: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ log π over response tokens, response lengths) of the candidates of `groups`, query-major,
    in one forward: the prompt once per query (`shared`, its attention kernel per
    `train.prefix_attention` = `attention`) or once per candidate (padded).
    `spans`: only candidates lo…hi−1 of group g for each (g, lo, hi)."""
    spans = spans or [(g, 0, len(e.responses)) for g, e in enumerate(groups)]
    batch = PackedQueries([groups[g].prompt for g, _, _ in spans],
                          [groups[g].responses[lo:hi] for g, lo, hi in spans])
    if shared:
        return candidate_logprobs_shared(model, batch, attention)
    return candidate_logprobs_padded(model, batch)


def _chunks(groups: Sequence[EncodedGroup], size: int) -> list[list[tuple[int, int, int]]]:
    """Candidates cut into forwards of at most `size` candidates, in query-major order."""
    out, current, n = [], [], 0
    for g, e in enumerate(groups):
        lo = 0
        while lo < len(e.responses):
            take = min(size - n, len(e.responses) - lo)
            current.append((g, lo, lo + take))
            n, lo = n + take, lo + take
            if n == size:
                out.append(current)
                current, n = [], 0
    if current:
        out.append(current)
    return out


def micro_batch_loss(model: torch.nn.Module, groups: Sequence[EncodedGroup], cfg: TrainConfig,
                     mb: MicroBatch, *, shared: bool = False, kl_coef: float = 0.0) -> tuple[LossOutput, int]:
    """Forward + backward of one micro-batch (`groups`, the examples `mb.indices`); adds
    `mb.scale · Σ_q L_q` to the gradients, L the loss `cfg.loss` names (`loss_function`), under
    `mb.autocast` and `mb.sync_ctx` (gradients all-reduced once per optimizer step).

    With `candidate_chunk_size` (or a query over `micro_batch_tokens`), the candidates go through
    the model in chunks: a no-grad pass gives every p_i, the loss gives dL/d(logp_sum_i), and each
    chunk is run again with grad and back-propagated with those coefficients. The gradient is
    exact (the loss depends on the model only through logp_sum), at the price of one extra
    forward; activation memory is that of one chunk.
    `kl_coef` > 0: the online policy's KL term is added to each query's loss (`with_kl_term`).
    Returns the loss output and the number of response tokens.
    """
    loss_fn = loss_function(cfg, groups, mb.device, kl_coef)
    chunk = _chunk_size(groups, cfg, shared)
    if chunk >= sum(len(g.responses) for g in groups):
        with mb.sync_ctx(last=True):
            with mb.autocast():
                logp, lengths = candidate_logprobs(model, groups, shared, attention=cfg.prefix_attention)
            out = loss_fn(group_tensors(groups, logp, lengths))
            (out.per_query_loss.sum() * mb.scale).backward()
        return out, int(lengths.sum())

    chunks = _chunks(groups, chunk)
    with torch.no_grad(), mb.autocast():
        parts = [candidate_logprobs(model, groups, shared, c, cfg.prefix_attention) for c in chunks]
    logp = torch.cat([p[0] for p in parts]).requires_grad_(True)
    lengths = torch.cat([p[1] for p in parts])
    out = loss_fn(group_tensors(groups, logp, lengths))
    (coeff,) = torch.autograd.grad(out.per_query_loss.sum() * mb.scale, logp)
    start = 0
    for i, c in enumerate(chunks):
        size = sum(hi - lo for _, lo, hi in c)
        with mb.sync_ctx(last=i == len(chunks) - 1):
            with mb.autocast():
                lp, _ = candidate_logprobs(model, groups, shared, c, cfg.prefix_attention)
            (lp * coeff[start : start + size]).sum().backward()
        start += size
    return out, int(lengths.sum())


def loss_function(cfg: TrainConfig, groups: Sequence[EncodedGroup], device: torch.device,
                  kl_coef: float = 0.0) -> Callable[[GroupTensors], LossOutput]:
    """`train.loss` as a function of the [B, K] tensors of `groups`: `LOSSES[cfg.loss.name]` with
    the loss's own settings and, for DPO, the groups' reference log-probabilities
    (`EncodedGroup.refs`) as `ref_logp_sum`; with `kl_coef` > 0 plus the online policy's KL term
    (`with_kl_term`, the references from `EncodedGroup.refs` too)."""
    options = cfg.loss.model_dump(exclude={"name"})
    if cfg.loss.name == "dpo" or kl_coef > 0:
        ref = reference_tensor(groups, device)
    if cfg.loss.name == "dpo":
        options["ref_logp_sum"] = ref
    fn = LOSSES[cfg.loss.name]

    def call(t: GroupTensors) -> LossOutput:
        out = fn(t.logp_sum, t.lengths, t.rewards, t.valid, **options)
        return with_kl_term(out, t.logp_sum, ref, t.valid, kl_coef) if kl_coef > 0 else out

    return call


def with_kl_term(out: LossOutput, logp_sum: torch.Tensor, ref_logp_sum: torch.Tensor, valid: torch.Tensor,
                 kl_coef: float) -> LossOutput:
    """`out` with β · KL added to each query's loss (`online.kl_in: loss`), KL taken as the mean
    over the query's valid candidates of ½ (Σ log π − Σ log π_ref)². On responses sampled by π its
    gradient, (log π − log π_ref) ∇ log π, is the gradient of KL(π ‖ π_ref) in expectation; k1 as a
    loss (Σ log π − Σ log π_ref) has an expected gradient of zero there (E ∇ log π = 0), so it would
    not pull π back to π_ref. [B, K] inputs, `valid` bool."""
    mask = valid.to(logp_sum.dtype)
    kl = (0.5 * (logp_sum - ref_logp_sum) ** 2 * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    per_query = out.per_query_loss + kl_coef * kl * out.query_mask.to(kl.dtype)
    kept = out.query_mask.to(kl.dtype)
    loss = (per_query * kept).sum() / kept.sum().clamp(min=1)
    return dataclasses.replace(out, loss=loss, per_query_loss=per_query)


def reference_tensor(groups: Sequence[EncodedGroup], device: torch.device) -> torch.Tensor:
    """[B, K] Σ log π_ref of each candidate of `groups` (0 in empty slots), for `dpo_loss`."""
    missing = sum(g.refs is None for g in groups)
    if missing:
        raise ValueError(
            f"train.loss dpo: {missing} query group(s) carry no reference log-probabilities "
            "(QueryGroup.ref_logprobs): `rrhf-ray run` computes them in the stage round<r>/reference "
            "(rounds/<r>/pool_ref.parquet), `rrhf-ray train` before it trains")
    return per_group(groups, [g.refs for g in groups], device)


@torch.no_grad()
def encoded_logprobs(model: torch.nn.Module, groups: Sequence[EncodedGroup], cfg: TrainConfig,
                     shared: bool,
                     autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                     ) -> list[list[float]]:
    """Σ log π of every response of `groups` as the trainer's forward computes it (the same
    tokens, prompt-shared when `shared`, candidates in the chunks `micro_batch_loss` would use),
    `cfg.micro_batch_queries` groups a forward, no gradient. One list per group."""
    out: list[list[float]] = []
    for s in range(0, len(groups), cfg.micro_batch_queries):
        batch = groups[s : s + cfg.micro_batch_queries]
        with autocast():
            parts = [candidate_logprobs(model, batch, shared, c, cfg.prefix_attention)
                     for c in _chunks(batch, _chunk_size(batch, cfg, shared))]
        flat = torch.cat([p[0] for p in parts]).float().cpu().tolist()
        start = 0
        for g in batch:
            out.append(flat[start : start + len(g.responses)])
            start += len(g.responses)
    return out


def shuffled_rewards(groups: Sequence[QueryGroup], seed: int) -> list[QueryGroup]:
    """`train.shuffle_rewards`, a control: each group's rewards permuted among its candidates,
    seeded by (seed, query), so the ranking the trainer sees carries no signal."""
    out = []
    for g in groups:
        scores = list(g.scores)
        random.Random(f"{seed}:{g.query}").shuffle(scores)
        out.append(g.model_copy(update={"scores": scores}))
    return out


def _chunk_size(groups: Sequence[EncodedGroup], cfg: TrainConfig, shared: bool) -> int:
    """Candidates per forward: `candidate_chunk_size`, or as many as fit `micro_batch_tokens`
    (a micro-batch is packed to the budget, so only a single query over it is chunked)."""
    n = sum(len(g.responses) for g in groups)
    size = cfg.candidate_chunk_size or n
    if cfg.micro_batch_tokens is not None and sum(g.tokens(shared) for g in groups) > cfg.micro_batch_tokens:
        longest = max(len(g.prompt) + max(len(r) for r in g.responses) for g in groups)
        size = min(size, max(1, cfg.micro_batch_tokens // longest))
    return size


def measure(out: LossOutput, tokens: int) -> Measured:
    """The loss terms weighted by queries, ranking accuracy by pairs (for the epoch's `Meter`)."""
    q = float(out.query_mask.sum())
    pairs = float(out.num_pairs)
    return Measured({
        "loss": (float(out.loss.detach()) * q, q),
        "rank_loss": (float(out.rank_loss.detach()) * q, q),
        "sft_loss": (float(out.sft_loss.detach()) * q, q),
        "rank_accuracy": (round(float(out.rank_accuracy) * pairs) if pairs else 0.0, pairs),
    }, tokens, {"queries": q})


def _log_line(s: dict[str, float]) -> str:
    return (f"loss {s['loss']:.4f} rank {s['rank_loss']:.4f} sft {s['sft_loss']:.4f} "
            f"acc {s['rank_accuracy']:.3f} {s['tokens_per_s']:.0f} tok/s")


def rrhf_recipe(cfg: TrainConfig, data_paths: Sequence[str], tokenizer: Any, device: torch.device,
                model: torch.nn.Module, *, kl_coef: float = 0.0) -> Recipe:
    """The RRHF (or family) recipe for `run_worker` / the warm trainer: the pools at
    `data_paths`, encoded with `tokenizer` (the sampler's token ids where they match it).
    `kl_coef`: β of the online policy's KL term in the loss (`with_kl_term`; 0 = none)."""
    groups = [g for path in data_paths for g in read_groups(path)]
    if cfg.shuffle_rewards:
        logger.info("train.shuffle_rewards: the rewards are shuffled within each group (a control)")
        groups = shuffled_rewards(groups, cfg.seed)
    encoder = Encoder(tokenizer, cfg.max_length, cfg.truncated, ends=end_token_ids(model))
    encoded = [e for e in map(encoder, groups) if e is not None]
    if encoder.cut:
        logger.info("train.max_length %d: cut %d response(s) from the right (no EOS) to fit after "
                    "their prompt", cfg.max_length, encoder.cut)
    if encoder.dropped:
        logger.info("train.truncated=drop: left out %d truncated candidate(s), %d group(s) empty",
                    encoder.dropped, len(groups) - len(encoded))
    shared = use_prefix_sharing(model, cfg.prefix_sharing)
    if not shared and cfg.prefix_sharing == "auto":
        logger.info("prefix sharing: not supported by this model here (%s); the prompt is "
                    "computed once per candidate", getattr(model.config, "model_type", "?"))
    if shared:
        logger.info("prefix sharing: %s attention", prefix_kernel(model, cfg.prefix_attention))

    def micro_batch(model: torch.nn.Module, mb: MicroBatch) -> Measured:
        return measure(*micro_batch_loss(model, [encoded[i] for i in mb.indices], cfg, mb, shared=shared,
                                         kl_coef=kl_coef))

    return Recipe(cfg.loss.name.upper(), len(encoded), micro_batch, _log_line,
                  example_length=lambda i: encoded[i].tokens(shared),
                  example_tokens=lambda i: encoded[i].tokens(shared), token_budget=cfg.micro_batch_tokens)


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, float]:
    """Train one worker's share of a `TrainJob` (`config["job"]`, a dict).

    Without Ray (`config.get("ray")` false) it trains in this process and writes the model to
    `job.output_dir`. Under `TorchTrainer` it reports metrics every epoch and a checkpoint
    (an HF directory) through `ray.train.report`, resuming from `ray.train.get_checkpoint()`.
    Returns the last epoch's metrics. The loop itself is `rrhf_ray.train.loop.run_worker`.
    """
    job = TrainJob.model_validate(config["job"])

    def recipe(tokenizer: Any, device: torch.device, model: torch.nn.Module) -> Recipe:
        return rrhf_recipe(job.train, job.data_paths, tokenizer, device, model)

    return run_worker(job, bool(config.get("ray")), load_policy, recipe)


def check_pools(paths: Sequence[str], cfg: TrainConfig) -> None:
    """Read every pool before any worker starts: a malformed row costs nothing to report here."""
    for path in paths:
        groups = read_groups(path)
        if cfg.loss.name == "dpo" and any(g.ref_logprobs is None for g in groups):
            raise DataError(f"{path}: train.loss dpo needs ref_logprobs in every query group "
                            "(rrhf_ray.train.reference computes them)")


# --------------------------------------------------------------------------- Ray Train


def fit(job: TrainJob, *, name: str = "rrhf", storage_path: str | None = None, max_failures: int = 0,
        store: RunStore | None = None) -> dict[str, float]:
    """Run `job` under `TorchTrainer` on the connected Ray cluster; install the final checkpoint
    (an HF directory) at `job.output_dir` and return the final metrics."""
    check_pools(job.data_paths, job.train)
    return fit_job(train_loop_per_worker, job, name=name, storage_path=storage_path,
                   max_failures=max_failures, store=store)
