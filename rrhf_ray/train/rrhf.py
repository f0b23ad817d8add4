"""The RRHF update on Ray Train.

`train_loop_per_worker(config)` is the whole training loop of one worker. It runs on its own in
a single process (tests, debugging) and, unchanged, inside `ray.train.torch.TorchTrainer`
(`fit` below), which starts W workers with a process group (gloo on CPU, NCCL on GPU). The loop
(optimizer, accumulation, checkpoints, resume) is `rrhf_ray.train.core.run_worker`, shared with
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
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from pydantic import Field

from rrhf_ray.config import TrainConfig
from rrhf_ray.loss import LOSSES, LossOutput, rrhf_loss
from rrhf_ray.train.core import (
    Job,
    Measured,
    MicroBatch,
    Recipe,
    fit_job,
    load_causal_lm,
    load_tokenizer,
    run_worker,
)
from rrhf_ray.train.prefix import (
    PackedQueries,
    candidate_logprobs_padded,
    candidate_logprobs_shared,
    supports_prefix_sharing,
    tokens_computed,
)
from rrhf_ray.train.tokens import special_split, tokenizer_fingerprint
from rrhf_ray.types import DataError, QueryGroup, read_groups

if TYPE_CHECKING:
    from rrhf_ray.mirror import RunStore

logger = logging.getLogger(__name__)


class TrainJob(Job):
    """An RRHF fit: the policy to start from (ρ*) and the round's ranked pools."""

    data_paths: list[str] = Field(min_length=1, description="Reference JSONL or Parquet pool files.")


# --------------------------------------------------------------------------- tokenisation


@dataclass
class EncodedGroup:
    """One query group as token ids: the prompt once, then each candidate's response (the EOS
    that closes it included when it stopped). Candidate i is `prompt + responses[i]`."""

    prompt: list[int]
    responses: list[list[int]]
    rewards: list[float]
    kept: list[int] | None = None  # the group's candidate index of each response (None: all, in order)
    refs: list[float] | None = None  # DPO: Σ log π_ref of each response (QueryGroup.ref_logprobs)

    @property
    def ids(self) -> list[list[int]]:
        """Each candidate as one row, prompt included (the padded layout)."""
        return [self.prompt + r for r in self.responses]

    @property
    def starts(self) -> list[int]:
        return [len(self.prompt)] * len(self.responses)

    def tokens(self, shared: bool) -> int:
        """Tokens one forward computes for this group (`rrhf_ray.train.prefix.tokens_computed`)."""
        return tokens_computed(len(self.prompt), [len(r) for r in self.responses], shared)


@dataclass
class Encoder:
    """Query groups → `EncodedGroup`s for one tokenizer (one per trainer).

    Token ids a sampler recorded are used as they are when the group's tokenizer fingerprint is
    this tokenizer's; other candidates (data set responses, files, another tokenizer) are
    tokenized from their text. EOS closes a response that stopped; a response cut off by the
    sampler's length limit (`finish_reason: length`) gets none, so the fine-tuning term never
    teaches the model to stop mid-sentence; with `truncated="drop"` such candidates leave the
    group (ranking and fine-tuning alike). One prompt per group: when a group exceeds
    `max_length`, responses longer than the budget are cut from the right, then the query is
    cut from the left (its special prefix, e.g. BOS, kept) once for all k candidates, so every
    candidate is scored against the same context.
    """

    tokenizer: Any
    max_length: int
    truncated: str = "keep"
    dropped: int = 0  # candidates left out (truncated="drop")

    def __post_init__(self) -> None:
        prefix, _, suffix = special_split(self.tokenizer, "x")
        self.n_prefix, self.n_suffix = len(prefix), len(suffix)
        self.fingerprint = tokenizer_fingerprint(self.tokenizer)
        self.eos = self.tokenizer.eos_token_id

    def __call__(self, group: QueryGroup) -> EncodedGroup | None:
        own = group.tokenizer == self.fingerprint
        if own and group.prompt_ids:
            prompt = list(group.prompt_ids)
        else:
            prompt = self.tokenizer(group.query)["input_ids"]
        token_ids = group.token_ids if own and group.token_ids else [None] * group.k
        finish = group.finish_reasons or [None] * group.k
        responses, rewards, kept = [], [], []
        for i, text in enumerate(group.responses):
            truncated = finish[i] == "length"
            if truncated and self.truncated == "drop":
                self.dropped += 1
                continue
            ids = list(token_ids[i]) if token_ids[i] else self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if not truncated and (not ids or ids[-1] != self.eos):
                ids.append(self.eos)
            responses.append(ids)
            rewards.append(group.scores[i])
            kept.append(i)
        if not responses:
            return None
        refs = None
        if group.ref_logprobs is not None:
            refs = [group.ref_logprobs[i] for i in kept]
            if any(r is None for r in refs):
                raise ValueError(f"query {group.query[:60]!r}: ref_logprobs is null for a candidate the "
                                 "trainer scores (computed with another train.truncated?)")
        return EncodedGroup(self._fit(prompt, responses), responses, rewards, kept, refs)

    def _fit(self, prompt: list[int], responses: list[list[int]]) -> list[int]:
        """Cut responses (in place) and the prompt so every candidate fits `max_length`."""
        fixed = self.n_prefix + self.n_suffix
        cap = max(1, self.max_length - max(fixed, 1))  # a response needs one token before it
        for r in responses:
            del r[cap:]
        room = self.max_length - max(len(r) for r in responses) - fixed
        body = prompt[self.n_prefix : len(prompt) - self.n_suffix]
        if len(body) > room:
            body = body[len(body) - max(room, 0):] if room > 0 else []
            return prompt[: self.n_prefix] + body + prompt[len(prompt) - self.n_suffix :]
        return prompt


def encode_group(tokenizer: Any, group: QueryGroup, max_length: int) -> EncodedGroup:
    """`Encoder(tokenizer, max_length)(group)` for one group (tests, measurement)."""
    encoded = Encoder(tokenizer, max_length)(group)
    assert encoded is not None  # keep mode never drops a candidate
    return encoded


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
                       spans: Sequence[tuple[int, int, int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ log π over response tokens, response lengths) of the candidates of `groups`, query-major,
    in one forward: the prompt once per query (`shared`) or once per candidate (padded).
    `spans`: only candidates lo…hi−1 of group g for each (g, lo, hi)."""
    spans = spans or [(g, 0, len(e.responses)) for g, e in enumerate(groups)]
    batch = PackedQueries([groups[g].prompt for g, _, _ in spans],
                          [groups[g].responses[lo:hi] for g, lo, hi in spans])
    if shared:
        return candidate_logprobs_shared(model, batch)
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


def micro_batch_loss(
    model: torch.nn.Module,
    groups: Sequence[EncodedGroup],
    cfg: TrainConfig,
    device: torch.device,
    scale: float,
    *,
    shared: bool = False,
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
    sync_last: bool = True,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> tuple[LossOutput, int]:
    """Forward + backward of one micro-batch; adds `scale · Σ_q L_q` to the gradients, L the
    loss `cfg.loss` names (`loss_function`).

    With `candidate_chunk_size` (or a query over `micro_batch_tokens`), the candidates go through
    the model in chunks: a no-grad pass gives every p_i, the loss gives dL/d(logp_sum_i), and each
    chunk is run again with grad and back-propagated with those coefficients. The gradient is
    exact (the loss depends on the model only through logp_sum), at the price of one extra
    forward; activation memory is that of one chunk.

    `no_sync` (DDP's / FSDP's) wraps each forward + backward, except the last one when
    `sync_last`, so that gradients are all-reduced once per optimizer step.
    Returns the loss output and the number of response tokens.
    """
    b, k = len(groups), max(len(g.responses) for g in groups)
    rewards = torch.zeros((b, k), dtype=torch.float32, device=device)
    valid = torch.zeros((b, k), dtype=torch.bool, device=device)
    for bi, g in enumerate(groups):
        rewards[bi, : len(g.rewards)] = torch.tensor(g.rewards, dtype=torch.float32)
        valid[bi, : len(g.rewards)] = True
    loss_fn = loss_function(cfg, groups, device)

    def sync_ctx(last: bool) -> contextlib.AbstractContextManager:
        if no_sync is None or (last and sync_last):
            return contextlib.nullcontext()
        return no_sync()

    def to_bk(flat: torch.Tensor) -> torch.Tensor:
        return flat.new_zeros((b, k)).masked_scatter(valid, flat)

    chunk = _chunk_size(groups, cfg, shared)
    n = int(valid.sum())
    if chunk >= n:
        with sync_ctx(last=True):
            with autocast():
                logp, lengths = candidate_logprobs(model, groups, shared)
            out = loss_fn(to_bk(logp), to_bk(lengths), rewards, valid)
            (out.per_query_loss.sum() * scale).backward()
        return out, int(lengths.sum())

    chunks = _chunks(groups, chunk)
    with torch.no_grad(), autocast():
        parts = [candidate_logprobs(model, groups, shared, c) for c in chunks]
    logp = torch.cat([p[0] for p in parts]).requires_grad_(True)
    lengths = torch.cat([p[1] for p in parts])
    out = loss_fn(to_bk(logp), to_bk(lengths), rewards, valid)
    (coeff,) = torch.autograd.grad(out.per_query_loss.sum() * scale, logp)
    start = 0
    for i, c in enumerate(chunks):
        size = sum(hi - lo for _, lo, hi in c)
        with sync_ctx(last=i == len(chunks) - 1):
            with autocast():
                lp, _ = candidate_logprobs(model, groups, shared, c)
            (lp * coeff[start : start + size]).sum().backward()
        start += size
    return out, int(lengths.sum())


def loss_function(cfg: TrainConfig, groups: Sequence[EncodedGroup],
                  device: torch.device) -> Callable[..., LossOutput]:
    """`train.loss` as a function of (logp_sum, lengths, rewards, valid), all [B, K] over `groups`:
    `LOSSES[cfg.loss.name]` with the loss's own settings and, for DPO, the groups' reference
    log-probabilities (`EncodedGroup.refs`) as `ref_logp_sum`."""
    options = cfg.loss.model_dump(exclude={"name"})
    if cfg.loss.name == "dpo":
        options["ref_logp_sum"] = reference_tensor(groups, device)
    fn = LOSSES[cfg.loss.name]

    def call(logp_sum: torch.Tensor, lengths: torch.Tensor, rewards: torch.Tensor,
             valid: torch.Tensor) -> LossOutput:
        return fn(logp_sum, lengths, rewards, valid, **options)

    return call


def reference_tensor(groups: Sequence[EncodedGroup], device: torch.device) -> torch.Tensor:
    """[B, K] Σ log π_ref of each candidate of `groups` (0 in empty slots), for `dpo_loss`."""
    missing = sum(g.refs is None for g in groups)
    if missing:
        raise ValueError(
            f"train.loss dpo: {missing} query group(s) carry no reference log-probabilities "
            "(QueryGroup.ref_logprobs): `rrhf-ray run` computes them in the stage round<r>/reference "
            "(rounds/<r>/pool_ref.parquet), `rrhf-ray train` before it trains")
    ref = torch.zeros((len(groups), max(len(g.responses) for g in groups)), dtype=torch.float32,
                      device=device)
    for bi, g in enumerate(groups):
        ref[bi, : len(g.refs)] = torch.tensor(g.refs, dtype=torch.float32)
    return ref


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
            parts = [candidate_logprobs(model, batch, shared, c)
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
                model: torch.nn.Module) -> Recipe:
    """The RRHF (or family) recipe for `run_worker` / the warm trainer: the pools at
    `data_paths`, encoded with `tokenizer` (the sampler's token ids where they match it)."""
    groups = [g for path in data_paths for g in read_groups(path)]
    if cfg.shuffle_rewards:
        logger.info("train.shuffle_rewards: the rewards are shuffled within each group (a control)")
        groups = shuffled_rewards(groups, cfg.seed)
    encoder = Encoder(tokenizer, cfg.max_length, cfg.truncated)
    encoded = [e for e in map(encoder, groups) if e is not None]
    if encoder.dropped:
        logger.info("train.truncated=drop: left out %d truncated candidate(s), %d group(s) empty",
                    encoder.dropped, len(groups) - len(encoded))
    shared = use_prefix_sharing(model, cfg.prefix_sharing)
    if not shared and cfg.prefix_sharing == "auto":
        logger.info("prefix sharing: not supported by this model here (%s); the prompt is "
                    "computed once per candidate", getattr(model.config, "model_type", "?"))

    def micro_batch(model: torch.nn.Module, mb: MicroBatch) -> Measured:
        return measure(*micro_batch_loss(
            model, [encoded[i] for i in mb.indices], cfg, mb.device, mb.scale, shared=shared,
            no_sync=mb.no_sync, sync_last=mb.sync_last, autocast=mb.autocast,
        ))

    return Recipe(cfg.loss.name.upper(), len(encoded), micro_batch, _log_line,
                  example_length=lambda i: encoded[i].tokens(shared),
                  example_tokens=lambda i: encoded[i].tokens(shared))


def load_policy(path: str, cfg: TrainConfig, trust_remote_code: bool, tokenizer: Any) -> torch.nn.Module:
    return load_causal_lm(path, cfg, trust_remote_code)


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, float]:
    """Train one worker's share of a `TrainJob` (`config["job"]`, a dict).

    Without Ray (`config.get("ray")` false) it trains in this process and writes the model to
    `job.output_dir`. Under `TorchTrainer` it reports metrics every epoch and a checkpoint
    (an HF directory) through `ray.train.report`, resuming from `ray.train.get_checkpoint()`.
    Returns the last epoch's metrics. The loop itself is `rrhf_ray.train.core.run_worker`.
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


# --------------------------------------------------------------------------- measurement


@torch.no_grad()
def ranking_metrics(model_path: str, groups: Sequence[QueryGroup], max_length: int = 192,
                    micro_batch_queries: int = 8) -> dict[str, float]:
    """How well a model's p_i follow the rewards of `groups`: pairwise ranking accuracy, and the
    mean per-token NLL of each query's best candidate. No gradients, CPU/GPU as loaded."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(model_path, False)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, use_safetensors=True).eval()
    encoder = Encoder(tokenizer, max_length)
    encoded = [encoder(g) for g in groups]
    shared = supports_prefix_sharing(model)
    pairs = correct = 0
    nll, n = 0.0, 0
    for s in range(0, len(encoded), micro_batch_queries):
        batch = encoded[s : s + micro_batch_queries]
        logp, lengths = candidate_logprobs(model, batch, shared)
        k = max(len(g.responses) for g in batch)
        valid = torch.zeros((len(batch), k), dtype=torch.bool)
        rewards = torch.zeros((len(batch), k))
        for bi, g in enumerate(batch):
            valid[bi, : len(g.rewards)] = True
            rewards[bi, : len(g.rewards)] = torch.tensor(g.rewards)
        out = rrhf_loss(logp.new_zeros(valid.shape).masked_scatter(valid, logp),
                        lengths.new_zeros(valid.shape).masked_scatter(valid, lengths), rewards, valid)
        p = int(out.num_pairs)
        pairs += p
        correct += round(float(out.rank_accuracy) * p) if p else 0
        nll += float(out.sft_loss) * int(out.query_mask.sum())
        n += int(out.query_mask.sum())
    return {"rank_accuracy": correct / pairs if pairs else float("nan"), "best_nll": nll / max(n, 1)}
