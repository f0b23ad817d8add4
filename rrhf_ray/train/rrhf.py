"""The RRHF update on Ray Train.

`train_loop_per_worker(config)` is the whole training loop of one worker. It runs on its own in
a single process (tests, debugging) and, unchanged, inside `ray.train.torch.TorchTrainer`
(`fit` below), which starts W workers with a process group (gloo on CPU, NCCL on GPU). The loop
(optimizer, accumulation, checkpoints, resume) is `rrhf_ray.train.core.run_worker`, shared with
the SFT and reward-model trainers; this module adds the RRHF forward and loss.

Batching, exactly: an optimizer step covers `queries_per_step` query groups over all workers;
worker w takes the step's groups w, w+W, …, in micro-batches of `micro_batch_queries` queries
(all their candidates in one forward, or in chunks of `candidate_chunk_size`). Each micro-batch
adds Σ_q L_q · W / |step| to the gradient, so after DDP's mean over workers the step's gradient
is that of the mean loss over the step's queries, however it was split.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from rrhf_ray.config import TrainConfig
from rrhf_ray.loss import RRHFLossOutput, rrhf_loss, sequence_logprobs
from rrhf_ray.train.core import (
    Measured,
    MicroBatch,
    Recipe,
    fit_job,
    load_causal_lm,
    load_tokenizer,
    run_worker,
)
from rrhf_ray.train.tokens import collate, encode
from rrhf_ray.types import QueryGroup, read_groups

logger = logging.getLogger(__name__)


class TrainJob(BaseModel):
    """Everything one `fit()` needs; crosses the driver → worker boundary as a dict."""

    model_config = ConfigDict(extra="forbid")

    model_path: str = Field(description="HF directory or hub id of the policy to start from (ρ*).")
    data_paths: list[str] = Field(min_length=1, description="Reference JSONL or Parquet pool files.")
    output_dir: str = Field(description="Where the trained HF model (safetensors) is written.")
    train: TrainConfig = Field(default_factory=TrainConfig)
    tokenizer_path: str | None = None
    trust_remote_code: bool = False
    resume_from: str | None = Field(None, description="A checkpoint of an interrupted fit (no Ray).")


# --------------------------------------------------------------------------- tokenisation


@dataclass
class EncodedGroup:
    """One query group as token ids: candidate i is `ids[i]`, its response starts at `starts[i]`."""

    ids: list[list[int]]
    starts: list[int]
    rewards: list[float]


def encode_group(tokenizer: Any, group: QueryGroup, max_length: int) -> EncodedGroup:
    """Each candidate as a policy sequence (`rrhf_ray.train.tokens.encode`): query and response
    tokenized apart, the response closed with EOS, the query cut from the left to fit."""
    ids, starts = [], []
    for response in group.responses:
        row, start = encode(tokenizer, group.query, response, max_length)
        ids.append(row)
        starts.append(start)
    return EncodedGroup(ids=ids, starts=starts, rewards=list(group.scores))


# --------------------------------------------------------------------------- forward + loss


def candidate_logprobs(
    model: torch.nn.Module, candidates: Sequence[tuple[list[int], int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ log π over response tokens, response lengths) of each candidate, in one forward."""
    batch = collate(candidates, pad_id).to(device)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    return sequence_logprobs(logits, batch.input_ids, batch.response_mask)


def _batch_layout(groups: Sequence[EncodedGroup]) -> tuple[list[tuple[list[int], int]], list[tuple[int, int]], int]:
    flat, where = [], []
    for b, g in enumerate(groups):
        for i, (ids, start) in enumerate(zip(g.ids, g.starts)):
            flat.append((ids, start))
            where.append((b, i))
    return flat, where, max(len(g.ids) for g in groups)


def _to_bk(values: torch.Tensor, where: list[tuple[int, int]], b: int, k: int) -> torch.Tensor:
    out = torch.zeros((b, k), dtype=values.dtype, device=values.device)
    rows = torch.tensor([w[0] for w in where], device=values.device)
    cols = torch.tensor([w[1] for w in where], device=values.device)
    return out.index_put((rows, cols), values)


def micro_batch_loss(
    model: torch.nn.Module,
    groups: Sequence[EncodedGroup],
    cfg: TrainConfig,
    pad_id: int,
    device: torch.device,
    scale: float,
    *,
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
    sync_last: bool = True,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> tuple[RRHFLossOutput, int]:
    """Forward + backward of one micro-batch; adds `scale · Σ_q L_q` to the gradients.

    With `candidate_chunk_size`, the candidates go through the model in chunks: a no-grad pass
    gives every p_i, the loss gives dL/d(logp_sum_i), and each chunk is run again with grad and
    back-propagated with those coefficients. The gradient is exact (the loss depends on the
    model only through logp_sum), at the price of one extra forward; activation memory is that
    of one chunk.

    `no_sync` (DDP's / FSDP's) wraps each forward + backward, except the last one when
    `sync_last`, so that gradients are all-reduced once per optimizer step.
    Returns the loss output and the number of response tokens.
    """
    flat, where, k = _batch_layout(groups)
    b = len(groups)
    rewards = torch.zeros((b, k), dtype=torch.float32, device=device)
    valid = torch.zeros((b, k), dtype=torch.bool, device=device)
    for bi, i in where:
        rewards[bi, i] = groups[bi].rewards[i]
        valid[bi, i] = True
    loss_kwargs = {
        "rank_weight": cfg.rank_weight, "length_penalty": cfg.length_penalty, "sft_reduction": cfg.sft_reduction
    }

    def sync_ctx(last: bool) -> contextlib.AbstractContextManager:
        if no_sync is None or (last and sync_last):
            return contextlib.nullcontext()
        return no_sync()

    chunk = cfg.candidate_chunk_size or len(flat)
    if chunk >= len(flat):
        with sync_ctx(last=True):
            with autocast():
                logp, lengths = candidate_logprobs(model, flat, pad_id, device)
            out = rrhf_loss(
                _to_bk(logp, where, b, k), _to_bk(lengths, where, b, k), rewards, valid, **loss_kwargs
            )
            (out.per_query_loss.sum() * scale).backward()
        return out, int(lengths.sum())

    spans = [(s, min(s + chunk, len(flat))) for s in range(0, len(flat), chunk)]
    with torch.no_grad(), autocast():
        parts = [candidate_logprobs(model, flat[s:e], pad_id, device) for s, e in spans]
    logp = torch.cat([p[0] for p in parts]).requires_grad_(True)
    lengths = torch.cat([p[1] for p in parts])
    out = rrhf_loss(_to_bk(logp, where, b, k), _to_bk(lengths, where, b, k), rewards, valid, **loss_kwargs)
    (coeff,) = torch.autograd.grad(out.per_query_loss.sum() * scale, logp)
    for n, (s, e) in enumerate(spans):
        with sync_ctx(last=n == len(spans) - 1):
            with autocast():
                lp, _ = candidate_logprobs(model, flat[s:e], pad_id, device)
            (lp * coeff[s:e]).sum().backward()
    return out, int(lengths.sum())


def measure(out: RRHFLossOutput, tokens: int) -> Measured:
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


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, float]:
    """Train one worker's share of a `TrainJob` (`config["job"]`, a dict).

    Without Ray (`config.get("ray")` false) it trains in this process and writes the model to
    `job.output_dir`. Under `TorchTrainer` it reports metrics every epoch and a checkpoint
    (an HF directory) through `ray.train.report`, resuming from `ray.train.get_checkpoint()`.
    Returns the last epoch's metrics. The loop itself is `rrhf_ray.train.core.run_worker`.
    """
    job = TrainJob.model_validate(config["job"])
    cfg = job.train

    def recipe(tokenizer: Any, device: torch.device) -> Recipe:
        groups = [g for path in job.data_paths for g in read_groups(path)]
        encoded = [encode_group(tokenizer, g, cfg.max_length) for g in groups]
        pad_id = tokenizer.pad_token_id

        def micro_batch(model: torch.nn.Module, mb: MicroBatch) -> Measured:
            return measure(*micro_batch_loss(
                model, [encoded[i] for i in mb.indices], cfg, pad_id, mb.device, mb.scale,
                no_sync=mb.no_sync, sync_last=mb.sync_last, autocast=mb.autocast,
            ))

        return Recipe("RRHF", len(encoded), micro_batch, _log_line,
                      example_length=lambda i: max(len(ids) for ids in encoded[i].ids))

    def load(path: str, cfg: TrainConfig, trust_remote_code: bool, tokenizer: Any) -> torch.nn.Module:
        return load_causal_lm(path, cfg, trust_remote_code)

    return run_worker(job, bool(config.get("ray")), load, recipe)


# --------------------------------------------------------------------------- Ray Train


def fit(job: TrainJob, *, name: str = "rrhf", storage_path: str | None = None, max_failures: int = 0) -> dict[str, float]:
    """Run `job` under `TorchTrainer` on the connected Ray cluster; install the final checkpoint
    (an HF directory) at `job.output_dir` and return the final metrics."""
    # Validate the data before any worker starts: a malformed row costs nothing to report here.
    for path in job.data_paths:
        read_groups(path)
    return fit_job(train_loop_per_worker, job, name=name, storage_path=storage_path,
                   max_failures=max_failures)


# --------------------------------------------------------------------------- measurement


@torch.no_grad()
def ranking_metrics(model_path: str, groups: Sequence[QueryGroup], max_length: int = 192,
                    micro_batch_queries: int = 8) -> dict[str, float]:
    """How well a model's p_i follow the rewards of `groups`: pairwise ranking accuracy, and the
    mean per-token NLL of each query's best candidate. No gradients, CPU/GPU as loaded."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(model_path, False)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, use_safetensors=True).eval()
    device = next(model.parameters()).device
    encoded = [encode_group(tokenizer, g, max_length) for g in groups]
    pairs = correct = 0
    nll, n = 0.0, 0
    for s in range(0, len(encoded), micro_batch_queries):
        batch = encoded[s : s + micro_batch_queries]
        flat, where, k = _batch_layout(batch)
        logp, lengths = candidate_logprobs(model, flat, tokenizer.pad_token_id, device)
        rewards = torch.zeros((len(batch), k))
        valid = torch.zeros((len(batch), k), dtype=torch.bool)
        for bi, i in where:
            rewards[bi, i] = batch[bi].rewards[i]
            valid[bi, i] = True
        out = rrhf_loss(_to_bk(logp, where, len(batch), k), _to_bk(lengths, where, len(batch), k), rewards, valid)
        p = int(out.num_pairs)
        pairs += p
        correct += round(float(out.rank_accuracy) * p) if p else 0
        nll += float(out.sft_loss) * int(out.query_mask.sum())
        n += int(out.query_mask.sum())
    return {"rank_accuracy": correct / pairs if pairs else float("nan"), "best_nll": nll / max(n, 1)}

