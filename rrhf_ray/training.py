"""The RRHF update on Ray Train.

`train_loop_per_worker(config)` is the whole training loop of one worker. It runs on its own in
a single process (tests, debugging) and, unchanged, inside `ray.train.torch.TorchTrainer`
(`fit` below), which starts W workers with a process group (gloo on CPU, NCCL on GPU).

Batching, exactly: an optimizer step covers `queries_per_step` query groups over all workers;
worker w takes the step's groups w, w+W, …, in micro-batches of `micro_batch_queries` queries
(all their candidates in one forward, or in chunks of `candidate_chunk_size`). Each micro-batch
adds Σ_q L_q · W / |step| to the gradient, so after DDP's mean over workers the step's gradient
is that of the mean loss over the step's queries, however it was split.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from rrhf_ray.config import TrainConfig
from rrhf_ray.loss import RRHFLossOutput, rrhf_loss, sequence_logprobs
from rrhf_ray.pool import DataError, QueryGroup, read_groups

logger = logging.getLogger(__name__)

STATE_FILE = "rrhf_train_state.json"  # epoch reached; present in every checkpoint we write
OPTIMIZER_FILE = "optimizer.pt"  # optimizer + scheduler; only in non-final (resumable) checkpoints


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
    """Tokenize query and each response separately (no BPE merge across the boundary), close each
    response with EOS, and fit query + response into `max_length` by cutting the query from the
    left; a response longer than the budget is cut from the right (then it has no EOS)."""
    query_ids = tokenizer(group.query, add_special_tokens=True)["input_ids"]
    eos = tokenizer.eos_token_id
    ids, starts = [], []
    for response in group.responses:
        resp = tokenizer(response, add_special_tokens=False)["input_ids"] + [eos]
        resp = resp[: max_length - 1]  # at least one query token predicts the first response token
        q = query_ids[-(max_length - len(resp)) :]
        ids.append(q + resp)
        starts.append(len(q))
    return EncodedGroup(ids=ids, starts=starts, rewards=list(group.scores))


def collate(
    candidates: Sequence[tuple[list[int], int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad candidates → input_ids, attention_mask, response_mask, each [N, T]."""
    width = max(len(ids) for ids, _ in candidates)
    n = len(candidates)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    response = torch.zeros((n, width), dtype=torch.bool)
    for row, (ids, start) in enumerate(candidates):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention[row, : len(ids)] = 1
        response[row, start : len(ids)] = True
    return input_ids, attention, response


# --------------------------------------------------------------------------- forward + loss


def candidate_logprobs(
    model: torch.nn.Module, candidates: Sequence[tuple[list[int], int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ log π over response tokens, response lengths) of each candidate, in one forward."""
    input_ids, attention, response = (t.to(device) for t in collate(candidates, pad_id))
    logits = model(input_ids=input_ids, attention_mask=attention, use_cache=False).logits
    return sequence_logprobs(logits, input_ids, response)


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
    loss_kwargs = dict(
        rank_weight=cfg.rank_weight, length_penalty=cfg.length_penalty, sft_reduction=cfg.sft_reduction
    )

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


def plan_steps(n: int, queries_per_step: int, num_workers: int, seed: int) -> list[list[int]]:
    """Shuffled group indices of one epoch, cut into optimizer steps. A last step too small to
    give every worker a query joins the step before it."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    steps = [perm[i : i + queries_per_step] for i in range(0, n, queries_per_step)]
    if len(steps) > 1 and len(steps[-1]) < num_workers:
        steps[-2].extend(steps.pop())
    if len(steps[0]) < num_workers:
        raise DataError(f"{n} query groups cannot feed {num_workers} workers")
    return steps


# --------------------------------------------------------------------------- model set-up


def _load_tokenizer(path: str, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer {path} has no EOS token; RRHF closes every response with it")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _load_model(path: str, cfg: TrainConfig, trust_remote_code: bool) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, trust_remote_code=trust_remote_code, use_safetensors=None
    )
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.lora.enabled:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        if cfg.gradient_checkpointing:
            model.enable_input_require_grads()
        model = get_peft_model(
            model,
            PeftLoraConfig(
                r=cfg.lora.r,
                lora_alpha=cfg.lora.alpha,
                lora_dropout=cfg.lora.dropout,
                target_modules=cfg.lora.target_modules,
                task_type="CAUSAL_LM",
            ),
        )
    return model


def _wrap_distributed(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.nn.Module:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return model
    if cfg.strategy == "fsdp":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
        import functools

        layer_names = set(getattr(model, "_no_split_modules", None) or [])
        layer_cls = {m.__class__ for m in model.modules() if m.__class__.__name__ in layer_names}
        policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=layer_cls)
        return FSDP(model, auto_wrap_policy=policy, device_id=device, use_orig_params=True)
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "no_sync") and hasattr(model, "module") else model


def save_hf_checkpoint(model: torch.nn.Module, tokenizer: Any, directory: Path, cfg: TrainConfig) -> None:
    """Write the policy as a plain HF directory (safetensors), LoRA merged, FSDP gathered.
    Collective under FSDP: every rank must call it; only rank 0 writes."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    state_dict = None
    if cfg.strategy == "fsdp" and dist.is_initialized() and dist.get_world_size() > 1:
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.state_dict_type(
            model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=True, rank0_only=True)
        ):
            state_dict = model.state_dict()
    if rank != 0:
        return
    inner = _unwrap(model)
    if cfg.lora.enabled:
        inner = copy.deepcopy(inner).merge_and_unload()
    inner.save_pretrained(directory, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(directory)


# --------------------------------------------------------------------------- the loop


def _device(cfg: TrainConfig, in_ray: bool) -> torch.device:
    if cfg.use_gpu and torch.cuda.is_available():
        if in_ray:
            import ray.train.torch

            return ray.train.torch.get_device()
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if cfg.use_gpu:
        raise RuntimeError("train.use_gpu is true but torch sees no CUDA device")
    return torch.device("cpu")


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _EpochMeter:
    """Query-weighted means of the loss terms, pair-weighted ranking accuracy, tokens/s."""

    def __init__(self) -> None:
        self.queries = self.pairs = self.correct = self.tokens = 0
        self.loss = self.rank = self.sft = 0.0
        self.start = time.perf_counter()

    def add(self, out: RRHFLossOutput, tokens: int) -> None:
        q = int(out.query_mask.sum())
        self.queries += q
        self.loss += float(out.loss.detach()) * q
        self.rank += float(out.rank_loss.detach()) * q
        self.sft += float(out.sft_loss.detach()) * q
        pairs = int(out.num_pairs)
        self.pairs += pairs
        if pairs:
            self.correct += round(float(out.rank_accuracy) * pairs)
        self.tokens += tokens

    def summary(self) -> dict[str, float]:
        q = max(self.queries, 1)
        seconds = time.perf_counter() - self.start
        return {
            "loss": self.loss / q,
            "rank_loss": self.rank / q,
            "sft_loss": self.sft / q,
            "rank_accuracy": self.correct / self.pairs if self.pairs else float("nan"),
            "tokens_per_s": self.tokens / seconds if seconds > 0 else 0.0,
            "response_tokens": float(self.tokens),
            "queries": float(self.queries),
        }


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, float]:
    """Train one worker's share of a `TrainJob` (`config["job"]`, a dict).

    Without Ray (`config.get("ray")` false) it trains in this process and writes the model to
    `job.output_dir`. Under `TorchTrainer` it reports metrics every epoch and a checkpoint
    (an HF directory) through `ray.train.report`, resuming from `ray.train.get_checkpoint()`.
    Returns the last epoch's metrics.
    """
    job = TrainJob.model_validate(config["job"])
    cfg = job.train
    in_ray = bool(config.get("ray"))
    rank, world = _rank_world()
    if world != cfg.num_workers:
        logger.warning("train.num_workers is %d but %d processes run; using %d", cfg.num_workers, world, world)
    device = _device(cfg, in_ray)
    torch.manual_seed(cfg.seed)

    with _resume_checkpoint(job, in_ray) as resume_dir:
        state = json.loads((Path(resume_dir) / STATE_FILE).read_text()) if resume_dir else None
        start_path = resume_dir or job.model_path
        tokenizer = _load_tokenizer(job.tokenizer_path or start_path, job.trust_remote_code)
        model = _load_model(start_path, cfg, job.trust_remote_code).to(device)
        groups = [g for path in job.data_paths for g in read_groups(path)]
        encoded = [encode_group(tokenizer, g, cfg.max_length) for g in groups]
        steps_per_epoch = len(plan_steps(len(encoded), cfg.queries_per_step, world, cfg.seed))
        total_steps = steps_per_epoch * cfg.epochs
        model.train()
        ddp_model = _wrap_distributed(model, cfg, device)
        params = [p for p in ddp_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay
        )
        from transformers import get_scheduler

        scheduler = get_scheduler(
            "constant_with_warmup" if cfg.lr_scheduler == "constant" else cfg.lr_scheduler,
            optimizer,
            num_warmup_steps=math.ceil(cfg.warmup_ratio * total_steps),
            num_training_steps=total_steps,
        )
        start_epoch = 0
        if state is not None:
            start_epoch = state["epoch"] + 1
            opt_file = Path(resume_dir) / OPTIMIZER_FILE
            if opt_file.exists():
                saved = torch.load(opt_file, map_location="cpu", weights_only=True)
                optimizer.load_state_dict(saved["optimizer"])
                scheduler.load_state_dict(saved["scheduler"])
            logger.info("resuming at epoch %d of %d", start_epoch + 1, cfg.epochs)

    use_bf16 = cfg.bf16 if cfg.bf16 is not None else device.type == "cuda"
    def autocast_ctx() -> contextlib.AbstractContextManager:
        if use_bf16:
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    no_sync = getattr(ddp_model, "no_sync", None)
    pad_id = tokenizer.pad_token_id
    if rank == 0:
        logger.info(
            "RRHF training: %d query groups, %d epochs × %d steps, %d queries/step, %d worker(s), device %s",
            len(encoded), cfg.epochs, steps_per_epoch, cfg.queries_per_step, world, device,
        )
    metrics: dict[str, float] = {}
    global_step = start_epoch * steps_per_epoch
    for epoch in range(start_epoch, cfg.epochs):
        meter = _EpochMeter()
        for step in plan_steps(len(encoded), cfg.queries_per_step, world, cfg.seed + epoch):
            mine = step[rank::world]
            micro = [mine[i : i + cfg.micro_batch_queries] for i in range(0, len(mine), cfg.micro_batch_queries)]
            scale = world / len(step)
            for m, idx in enumerate(micro):
                out, tokens = micro_batch_loss(
                    ddp_model, [encoded[i] for i in idx], cfg, pad_id, device, scale,
                    no_sync=no_sync, sync_last=m == len(micro) - 1, autocast=autocast_ctx,
                )
                meter.add(out, tokens)
            if cfg.max_grad_norm is not None:
                if hasattr(ddp_model, "clip_grad_norm_"):
                    ddp_model.clip_grad_norm_(cfg.max_grad_norm)
                else:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            global_step += 1
            if rank == 0 and (global_step % cfg.log_every == 0 or global_step == total_steps):
                s = meter.summary()
                logger.info(
                    "epoch %d step %d/%d loss %.4f rank %.4f sft %.4f acc %.3f lr %.2e %.0f tok/s",
                    epoch + 1, global_step, total_steps, s["loss"], s["rank_loss"], s["sft_loss"],
                    s["rank_accuracy"], scheduler.get_last_lr()[0], s["tokens_per_s"],
                )
        metrics = {"epoch": float(epoch + 1), "step": float(global_step), **meter.summary()}
        final = epoch == cfg.epochs - 1
        if in_ray and (final or cfg.checkpoint_every_epoch):
            _report_with_checkpoint(ddp_model, tokenizer, optimizer, scheduler, epoch, final, cfg, metrics)
        elif in_ray:
            import ray.train

            ray.train.report(metrics)
    if not in_ray:
        _save_final_local(ddp_model, tokenizer, Path(job.output_dir), cfg, metrics)
    return metrics


def _resume_checkpoint(job: TrainJob, in_ray: bool) -> contextlib.AbstractContextManager:
    """A context giving the directory of the checkpoint to resume from, or None."""
    if in_ray:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is not None:
            return ckpt.as_directory()
    elif job.resume_from:
        return contextlib.nullcontext(job.resume_from)
    return contextlib.nullcontext(None)


def _write_checkpoint(
    model: torch.nn.Module, tokenizer: Any, optimizer: Any, scheduler: Any,
    epoch: int, final: bool, cfg: TrainConfig, directory: Path,
) -> None:
    save_hf_checkpoint(model, tokenizer, directory, cfg)
    rank, _ = _rank_world()
    if rank == 0:
        (directory / STATE_FILE).write_text(json.dumps({"epoch": epoch, "final": final}))
        if not final:  # the next round starts a fresh optimizer; only a mid-fit resume needs it
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                       directory / OPTIMIZER_FILE)


def _report_with_checkpoint(model, tokenizer, optimizer, scheduler, epoch, final, cfg, metrics) -> None:
    import ray.train

    rank, _ = _rank_world()
    with tempfile.TemporaryDirectory() as tmp:
        _write_checkpoint(model, tokenizer, optimizer, scheduler, epoch, final, cfg, Path(tmp))
        ckpt = ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None
        ray.train.report(metrics, checkpoint=ckpt)


def _save_final_local(model, tokenizer, out: Path, cfg: TrainConfig, metrics: dict[str, float]) -> None:
    rank, _ = _rank_world()
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _write_checkpoint(model, tokenizer, None, None, cfg.epochs - 1, True, cfg, tmp)
    if rank == 0:
        (tmp / "train_metrics.json").write_text(json.dumps(metrics, indent=2))
        install_dir(tmp, out)


def install_dir(src: Path, dst: Path) -> None:
    """Move a finished directory into place; an existing `dst` is replaced only after `src` is whole."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


# --------------------------------------------------------------------------- Ray Train


def fit(job: TrainJob, *, name: str = "rrhf", storage_path: str | None = None, max_failures: int = 0) -> dict[str, float]:
    """Run `job` under `TorchTrainer` on the connected Ray cluster; install the final checkpoint
    (an HF directory) at `job.output_dir` and return the final metrics."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = job.train
    # Validate the data before any worker starts: a malformed row costs nothing to report here.
    for path in job.data_paths:
        read_groups(path)
    storage = storage_path or str(Path(job.output_dir).resolve().parent / "ray_train")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job.model_dump(mode="json"), "ray": True},
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            failure_config=FailureConfig(max_failures=max_failures),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {name!r} finished without a checkpoint")
    out = Path(job.output_dir)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with result.checkpoint.as_directory() as d:
        shutil.copytree(d, tmp)
    (tmp / "train_metrics.json").write_text(json.dumps(result.metrics, indent=2))
    install_dir(tmp, out)
    return dict(result.metrics)


# --------------------------------------------------------------------------- measurement


@torch.no_grad()
def ranking_metrics(model_path: str, groups: Sequence[QueryGroup], max_length: int = 192,
                    micro_batch_queries: int = 8) -> dict[str, float]:
    """How well a model's p_i follow the rewards of `groups`: pairwise ranking accuracy, and the
    mean per-token NLL of each query's best candidate. No gradients, CPU/GPU as loaded."""
    from transformers import AutoModelForCausalLM

    tokenizer = _load_tokenizer(model_path, False)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
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

