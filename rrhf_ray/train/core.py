"""The training machinery shared by the RRHF, SFT and reward-model trainers.

One worker's loop (`run_worker`) and its `TorchTrainer` wrapper (`fit_job`) know nothing about
losses: a trainer hands them a `Recipe` (how to load its model, how many examples it has, how
to run one micro-batch forward + backward, what to measure) and gets model loading, the
process group wrap (DDP / FSDP), AdamW + LR schedule, accumulation with `no_sync`, clipping,
bf16 autocast, per-epoch checkpoints through `ray.train.report`, resume from
`ray.train.get_checkpoint()` (or a directory without Ray) and the final install of an HF
directory (safetensors, LoRA merged).

Batching, exactly: an optimizer step covers `queries_per_step` examples over all workers
(for RRHF an example is a query group; for SFT a (query, response) pair; for a reward model a
preference pair); worker w takes the step's examples w, w+W, …, in micro-batches of
`micro_batch_queries`. The recipe's micro-batch adds `scale · Σ loss` to the gradient with
`scale = W / step_weight(step)`, so after DDP's mean over workers the step's gradient is that
of the mean over the step (per example, or per token for SFT), however it was split.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from rrhf_ray.config import TrainConfig
from rrhf_ray.data.pairs import PairFormat
from rrhf_ray.data.queries import hold_out
from rrhf_ray.logs import current_log_dir, redirect_process_output, worker_progress
from rrhf_ray.types import DataError, atomic_path

if TYPE_CHECKING:
    from rrhf_ray.mirror import RunStore

logger = logging.getLogger(__name__)
T = TypeVar("T")

STATE_FILE = "rrhf_train_state.json"  # epoch reached; present in every checkpoint we write
OPTIMIZER_FILE = "optimizer.pt"  # optimizer + scheduler; only in non-final (resumable) checkpoints
METRICS_FILE = "train_metrics.json"


class Job(BaseModel):
    """What every fit needs (RRHF, SFT, reward model); crosses the driver → worker boundary as a
    dict. Each trainer's job adds its data."""

    model_config = ConfigDict(extra="forbid")

    model_path: str = Field(description="HF directory or hub id of the model to start from.")
    output_dir: str = Field(description="Where the trained HF model (safetensors) is written.")
    train: TrainConfig = Field(default_factory=TrainConfig)
    tokenizer_path: str | None = None
    trust_remote_code: bool = False
    resume_from: str | None = Field(None, description="A checkpoint of an interrupted fit (no Ray).")
    log_dir: str | None = Field(None, description="Where Ray Train workers write their stdout and "
                                "stderr (`rrhf_ray.logs.redirect_process_output`); None: Ray's logs.")
    save_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="The dtype of the saved weights (the samplers' dtype); None: the model's (fp32).")


class PairJob(Job):
    """A fit on pairs (SFT: query, response; reward model: query, chosen, rejected)."""

    data_path: str = Field(
        description="Pairs JSONL/Parquet, or an HH-layout source (rm-static, hh-rlhf, reference "
        "JSONL, hub id, directory) read by `rrhf_ray.data.pairs`."
    )
    data_format: PairFormat = Field("auto", description="Layout of data_path; auto = from the fields.")
    eval_path: str | None = Field(None, description="Held-out pairs, measured after each epoch.")
    eval_fraction: float = Field(
        0.0, ge=0.0, lt=1.0, description="Without eval_path: share of the pairs held out (seeded)."
    )

    def split_pairs(self, read: Callable[..., list[T]]) -> tuple[list[T], list[T]]:
        """(training, held-out) pairs read by `read(source, format=...)`, every row validated."""
        pairs = read(self.data_path, format=self.data_format)
        if self.eval_path:
            return pairs, read(self.eval_path, format=self.data_format)
        return hold_out(pairs, self.eval_fraction, self.train.seed)


@dataclass
class MicroBatch:
    """What the loop hands a recipe for one micro-batch: the example indices and how to run them.

    The recipe adds `scale · Σ loss` to the gradients. `no_sync` (DDP's / FSDP's) wraps each
    forward + backward except the last one when `sync_last`, so gradients are all-reduced once
    per optimizer step; `autocast` is bf16 autocast or a null context.
    """

    indices: list[int]
    scale: float
    device: torch.device
    no_sync: Callable[[], contextlib.AbstractContextManager] | None
    sync_last: bool
    autocast: Callable[[], contextlib.AbstractContextManager]

    def sync_ctx(self, last: bool = True) -> contextlib.AbstractContextManager:
        if self.no_sync is None or (last and self.sync_last):
            return contextlib.nullcontext()
        return self.no_sync()


@dataclass
class Measured:
    """What one micro-batch measured: for each named value, (sum, weight) so that an epoch's
    value is Σ sum / Σ weight (a query-, pair- or token-weighted mean); `counts` are summed
    (queries, pairs); `tokens` are the response tokens it scored (for tokens/s)."""

    values: dict[str, tuple[float, float]]
    tokens: int = 0
    counts: dict[str, float] = field(default_factory=dict)


@dataclass
class Meter:
    """Weighted means of what the micro-batches of one epoch measured, and tokens/s."""

    sums: dict[str, float] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)
    tokens: int = 0
    start: float = field(default_factory=time.perf_counter)

    def add(self, measured: Measured) -> None:
        for name, (total, weight) in measured.values.items():
            self.sums[name] = self.sums.get(name, 0.0) + total
            self.weights[name] = self.weights.get(name, 0.0) + weight
        for name, n in measured.counts.items():
            self.counts[name] = self.counts.get(name, 0.0) + n
        self.tokens += measured.tokens

    def summary(self) -> dict[str, float]:
        seconds = time.perf_counter() - self.start
        out = {name: self.sums[name] / w if (w := self.weights[name]) > 0 else float("nan")
               for name in self.sums}
        out.update(self.counts)
        out["tokens_per_s"] = self.tokens / seconds if seconds > 0 else 0.0
        out["response_tokens"] = float(self.tokens)
        return out


@dataclass
class Recipe:
    """What one trainer adds to the shared loop. Built on every worker after the tokenizer loads.

    - `num_examples`: examples per epoch (indices 0 … n−1 are what `micro_batch` receives);
    - `micro_batch(model, mb)`: forward + backward of examples `mb.indices`; returns what it
      `Measured` (the epoch's `Meter` averages it);
    - `step_weight(indices)`: the denominator of the step's mean loss (default: the number of
      examples; SFT: their response tokens);
    - `log_line(summary)`: the one-line progress of the meter's summary;
    - `evaluate(model)`: optional held-out metrics at each epoch's end (all ranks call it);
    - `example_tokens(i)`: optional tokens example i computes; with `train.micro_batch_tokens`
      micro-batches are packed up to that budget instead of `micro_batch_queries` examples;
    - `example_length(i)`: optional padded width of example i. Within each optimizer step the
      examples are then ordered by it before they are dealt to workers and micro-batches, so a
      micro-batch pads to similar lengths; the step's gradient (a sum) is the same in any order.
    """

    name: str
    num_examples: int
    micro_batch: Callable[[torch.nn.Module, MicroBatch], Measured]
    log_line: Callable[[dict[str, float]], str]
    step_weight: Callable[[Sequence[int]], float] = len
    evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None
    example_length: Callable[[int], int] | None = None
    example_tokens: Callable[[int], int] | None = None


# --------------------------------------------------------------------------- steps


def plan_steps(n: int, queries_per_step: int, num_workers: int, seed: int) -> list[list[int]]:
    """Shuffled example indices of one epoch, cut into optimizer steps. A last step too small to
    give every worker an example joins the step before it."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    steps = [perm[i : i + queries_per_step] for i in range(0, n, queries_per_step)]
    if len(steps) > 1 and len(steps[-1]) < num_workers:
        steps[-2].extend(steps.pop())
    if not steps or len(steps[0]) < num_workers:
        raise DataError(f"{n} query groups cannot feed {num_workers} workers")
    return steps


def micro_batches(indices: Sequence[int], cfg: TrainConfig,
                  tokens: Callable[[int], int] | None) -> list[list[int]]:
    """A worker's share of one step cut into micro-batches: `micro_batch_queries` examples each,
    or, with `micro_batch_tokens` (and a recipe that counts tokens), as many consecutive
    examples as fit the budget (an example alone over it is a micro-batch of its own; the
    recipe runs it in chunks). The step's gradient is a sum over examples: the cut changes
    memory and speed, not the gradient."""
    if cfg.micro_batch_tokens is None or tokens is None:
        n = cfg.micro_batch_queries
        return [list(indices[i : i + n]) for i in range(0, len(indices), n)]
    out: list[list[int]] = []
    used = 0
    for i in indices:
        t = tokens(i)
        if out and used + t <= cfg.micro_batch_tokens:
            out[-1].append(i)
            used += t
        else:
            out.append([i])
            used = t
    return out


# --------------------------------------------------------------------------- model set-up


def load_tokenizer(path: str, trust_remote_code: bool, require_eos: bool = True) -> Any:
    """A tokenizer with a pad token (the EOS when it has none). `require_eos`: a policy closes
    every response with EOS; a reward model on an encoder backbone (BERT) may have none."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if require_eos and tok.eos_token_id is None:
        raise ValueError(f"tokenizer {path} has no EOS token; RRHF closes every response with it")
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ValueError(f"tokenizer {path} has neither a pad nor an EOS token to pad with")
        tok.pad_token = tok.eos_token
    return tok


def prepare_model(model: torch.nn.Module, cfg: TrainConfig, task_type: str) -> torch.nn.Module:
    """Gradient checkpointing and LoRA (peft `task_type`: CAUSAL_LM, SEQ_CLS) on a loaded model."""
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.lora.enabled:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        if cfg.gradient_checkpointing:
            model.enable_input_require_grads()
        # SEQ_CLS: peft trains the fresh score head in full (modules_to_save) beside the adapters.
        model = get_peft_model(
            model,
            PeftLoraConfig(
                r=cfg.lora.r,
                lora_alpha=cfg.lora.alpha,
                lora_dropout=cfg.lora.dropout,
                target_modules=cfg.lora.target_modules,
                task_type=task_type,
            ),
        )
    return model


def load_causal_lm(path: str, cfg: TrainConfig, trust_remote_code: bool) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, trust_remote_code=trust_remote_code, use_safetensors=True
    )
    return prepare_model(model, cfg, "CAUSAL_LM")


def wrap_distributed(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.nn.Module:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return model
    if cfg.strategy == "fsdp":
        import functools

        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

        layer_names = set(getattr(model, "_no_split_modules", None) or [])
        layer_cls = {m.__class__ for m in model.modules() if m.__class__.__name__ in layer_names}
        policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=layer_cls)
        return FSDP(model, auto_wrap_policy=policy, device_id=device, use_orig_params=True)
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "no_sync") and hasattr(model, "module") else model


def save_hf_checkpoint(model: torch.nn.Module, tokenizer: Any, directory: Path, cfg: TrainConfig,
                       dtype: str | None = None) -> None:
    """Write the model as a plain HF directory (safetensors), LoRA merged, FSDP gathered.
    Collective under FSDP: every rank must call it; only rank 0 writes. `dtype` (e.g. the
    samplers' "bfloat16"): the saved copy's floating-point dtype; the model in memory is unchanged."""
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
    inner = unwrap(model)
    if cfg.lora.enabled:
        inner = copy.deepcopy(inner).merge_and_unload()
    cast = dtype is not None and dtype != "float32"
    if cast:
        state_dict = cast_state_dict(state_dict if state_dict is not None else inner.state_dict(),
                                     getattr(torch, dtype))
    inner.save_pretrained(directory, state_dict=state_dict, safe_serialization=True)
    if cast:  # config.json names the saved dtype (what vLLM's `auto` reads)
        _set_saved_dtype(directory, dtype)
    tokenizer.save_pretrained(directory)


def cast_state_dict(state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating-point tensors cast to `dtype`; tensors that share storage (tied embeddings) stay
    shared, so `save_pretrained` still writes them once."""
    done: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}
    out = {}
    for name, t in state_dict.items():
        if not t.is_floating_point() or t.dtype == dtype:
            out[name] = t
            continue
        key = (t.data_ptr(), tuple(t.shape))
        if key not in done:
            done[key] = t.detach().to(dtype)
        out[name] = done[key]
    return out


def _set_saved_dtype(directory: Path, dtype: str) -> None:
    path = Path(directory) / "config.json"
    config = json.loads(path.read_text())
    key = "dtype" if "dtype" in config or "torch_dtype" not in config else "torch_dtype"
    config[key] = dtype
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def device_for(cfg: TrainConfig, in_ray: bool) -> torch.device:
    if cfg.use_gpu and torch.cuda.is_available():
        if in_ray:
            import ray.train.torch

            return ray.train.torch.get_device()
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if cfg.use_gpu:
        raise RuntimeError("train.use_gpu is true but torch sees no CUDA device")
    return torch.device("cpu")


def rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# --------------------------------------------------------------------------- the loop


@dataclass
class Worker:
    """One training worker's state that outlives a fit: its rank, device, tokenizer and model
    (`model` the plain module, `ddp_model` its DDP / FSDP wrap). The warm round trainer
    (`rrhf_ray.train.warm`) keeps one across rounds; `run_worker` builds one per fit."""

    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    tokenizer: Any
    model: torch.nn.Module
    ddp_model: torch.nn.Module

    @classmethod
    def load(cls, path: str, cfg: TrainConfig, in_ray: bool, trust_remote_code: bool,
             load_model: Callable[[str, TrainConfig, bool, Any], torch.nn.Module], *,
             tokenizer_path: str | None = None, require_eos: bool = True) -> Worker:
        from rrhf_ray.remote import materialize

        # A URI (output.dir on object storage): the model from this node's cache, downloaded once.
        path = materialize(path)
        tokenizer_path = materialize(tokenizer_path) if tokenizer_path else None
        rank, world = rank_world()
        if world != cfg.num_workers:
            logger.warning("train.num_workers is %d but %d processes run; using %d", cfg.num_workers, world, world)
        device = device_for(cfg, in_ray)
        torch.manual_seed(cfg.seed)
        tokenizer = load_tokenizer(tokenizer_path or path, trust_remote_code, require_eos)
        model = load_model(path, cfg, trust_remote_code, tokenizer).to(device)
        model.train()
        return cls(cfg, rank, world, device, tokenizer, model, wrap_distributed(model, cfg, device))

    def fresh_adapters(self) -> None:
        """LoRA: merge the trained adapters into the weights and start new ones, as a fit that
        starts from the saved (merged) checkpoint would. A no-op without LoRA."""
        if not self.cfg.lora.enabled:
            return
        merged = unwrap(self.ddp_model).merge_and_unload()
        self.model = prepare_model(merged, self.cfg, "CAUSAL_LM").to(self.device)
        self.model.train()
        self.ddp_model = wrap_distributed(self.model, self.cfg, self.device)

    def autocast(self) -> contextlib.AbstractContextManager:
        use_bf16 = self.cfg.bf16 if self.cfg.bf16 is not None else self.device.type == "cuda"
        if use_bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


@dataclass
class Optimizer:
    """AdamW and its LR schedule over `total_steps` (a fit's, or one round's)."""

    params: list[torch.nn.Parameter]
    optimizer: Any
    scheduler: Any

    @classmethod
    def build(cls, model: torch.nn.Module, cfg: TrainConfig, total_steps: int) -> Optimizer:
        from transformers import get_scheduler

        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay
        )
        scheduler = get_scheduler(
            "constant_with_warmup" if cfg.lr_scheduler == "constant" else cfg.lr_scheduler,
            optimizer,
            num_warmup_steps=math.ceil(cfg.warmup_ratio * total_steps),
            num_training_steps=total_steps,
        )
        return cls(params, optimizer, scheduler)


def steps_per_epoch(recipe: Recipe, cfg: TrainConfig, world: int) -> int:
    return len(plan_steps(recipe.num_examples, cfg.queries_per_step, world, cfg.seed))


def train_epochs(
    w: Worker, recipe: Recipe, opt: Optimizer, *, start_epoch: int = 0, global_step: int = 0,
    history: list[dict[str, float]] | None = None,
    on_epoch_end: Callable[[int, bool, dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """Epochs `start_epoch` … `cfg.epochs − 1` of `recipe` on worker `w`: steps of
    `queries_per_step` examples over all workers, micro-batches with `no_sync`, clipping, AdamW,
    the schedule; held-out metrics after each epoch when the recipe has them. `global_step`
    numbers the steps (it keeps increasing across a warm trainer's rounds); `history`, when
    given, receives one row per optimizer step on rank 0 (loss, rank / SFT loss, ranking
    accuracy, lr, grad norm, tokens/s). `on_epoch_end(epoch, final, metrics)` reports or
    checkpoints. Returns the last epoch's metrics."""
    cfg = w.cfg
    per_epoch = steps_per_epoch(recipe, cfg, w.world)
    total_steps = per_epoch * cfg.epochs
    first_step = global_step - start_epoch * per_epoch  # the fit's step 0 on the global axis
    no_sync = getattr(w.ddp_model, "no_sync", None)
    if w.rank == 0:
        logger.info(
            "%s training: %d examples, %d epochs × %d steps, %d examples/step, %d worker(s), device %s",
            recipe.name, recipe.num_examples, cfg.epochs, per_epoch, cfg.queries_per_step, w.world, w.device,
        )
    metrics: dict[str, float] = {}
    bar = worker_progress(per_epoch * (cfg.epochs - start_epoch), f"{recipe.name} training", "step") \
        if w.rank == 0 else None
    for epoch in range(start_epoch, cfg.epochs):
        meter = Meter()
        for step in plan_steps(recipe.num_examples, cfg.queries_per_step, w.world, cfg.seed + epoch):
            if recipe.example_length is not None:
                step = sorted(step, key=recipe.example_length, reverse=True)
            mine = step[w.rank :: w.world]
            micro = micro_batches(mine, cfg, recipe.example_tokens)
            scale = w.world / recipe.step_weight(step)
            step_meter = Meter()
            for m, idx in enumerate(micro):
                mb = MicroBatch(idx, scale, w.device, no_sync, m == len(micro) - 1, w.autocast)
                measured = recipe.micro_batch(w.ddp_model, mb)
                meter.add(measured)
                step_meter.add(measured)
            grad_norm = float("nan")
            if cfg.max_grad_norm is not None:
                if hasattr(w.ddp_model, "clip_grad_norm_"):
                    grad_norm = float(w.ddp_model.clip_grad_norm_(cfg.max_grad_norm))
                else:
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(opt.params, cfg.max_grad_norm))
            lr = opt.scheduler.get_last_lr()[0]
            opt.optimizer.step()
            opt.scheduler.step()
            opt.optimizer.zero_grad(set_to_none=True)
            global_step += 1
            if history is not None and w.rank == 0:
                history.append({"global_step": float(global_step), "lr": lr, "grad_norm": grad_norm,
                                **step_meter.summary()})
            done = global_step - first_step
            if bar is not None:
                bar.update(1)
            if w.rank == 0 and (done % cfg.log_every == 0 or done == total_steps):
                logger.info(
                    "epoch %d step %d/%d %s lr %.2e", epoch + 1, done, total_steps,
                    recipe.log_line(meter.summary()), lr,
                )
        metrics = {"epoch": float(epoch + 1), "step": float(global_step - first_step),
                   "resumed_at_epoch": float(start_epoch), **meter.summary()}
        if recipe.evaluate is not None:
            w.ddp_model.eval()
            with torch.no_grad(), w.autocast():
                metrics.update(recipe.evaluate(w.ddp_model))
            w.ddp_model.train()
            if w.rank == 0:
                logger.info("epoch %d held-out: %s", epoch + 1,
                            ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k.startswith("eval_")))
        if on_epoch_end is not None:
            on_epoch_end(epoch, epoch == cfg.epochs - 1, metrics)
    if bar is not None:
        bar.close()
    return metrics


def run_worker(
    job: Job,
    in_ray: bool,
    load_model: Callable[[str, TrainConfig, bool, Any], torch.nn.Module],
    build_recipe: Callable[[Any, torch.device, torch.nn.Module], Recipe],
    *,
    require_eos: bool = True,
) -> dict[str, float]:
    """Train one worker's share of `job` with the recipe `build_recipe(tokenizer, device, model)`;
    `load_model(path, train_config, trust_remote_code, tokenizer)` loads the model to train.

    Without Ray it trains in this process and installs the model at `job.output_dir`. Under
    `TorchTrainer` it reports metrics every epoch and a checkpoint (an HF directory) through
    `ray.train.report`, resuming from `ray.train.get_checkpoint()`. Returns the last epoch's metrics.
    """
    cfg = job.train
    if in_ray:
        redirect_process_output(job.log_dir, "train")
    with _resume_checkpoint(job, in_ray) as resume_dir:
        state = json.loads((Path(resume_dir) / STATE_FILE).read_text()) if resume_dir else None
        w = Worker.load(resume_dir or job.model_path, cfg, in_ray, job.trust_remote_code, load_model,
                        tokenizer_path=job.tokenizer_path, require_eos=require_eos)
        recipe = build_recipe(w.tokenizer, w.device, w.model)
        per_epoch = steps_per_epoch(recipe, cfg, w.world)
        opt = Optimizer.build(w.ddp_model, cfg, per_epoch * cfg.epochs)
        start_epoch = 0
        if state is not None:
            start_epoch = state["epoch"] + 1
            opt_file = Path(resume_dir) / OPTIMIZER_FILE
            if opt_file.exists():
                saved = torch.load(opt_file, map_location="cpu", weights_only=True)
                opt.optimizer.load_state_dict(saved["optimizer"])
                opt.scheduler.load_state_dict(saved["scheduler"])
            logger.info("resuming at epoch %d of %d", start_epoch + 1, cfg.epochs)

    def epoch_end(epoch: int, final: bool, metrics: dict[str, float]) -> None:
        if in_ray and (final or cfg.checkpoint_every_epoch):
            _report_with_checkpoint(w.ddp_model, w.tokenizer, opt.optimizer, opt.scheduler, epoch, final,
                                    cfg, metrics)
        elif in_ray:
            import ray.train

            ray.train.report(metrics)

    metrics = train_epochs(w, recipe, opt, start_epoch=start_epoch, global_step=start_epoch * per_epoch,
                           on_epoch_end=epoch_end)
    if not in_ray:
        save_final_local(w.ddp_model, w.tokenizer, Path(job.output_dir), cfg, metrics)
    return metrics


def _resume_checkpoint(job: Job, in_ray: bool) -> contextlib.AbstractContextManager:
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
    rank, _ = rank_world()
    if rank == 0:
        (directory / STATE_FILE).write_text(json.dumps({"epoch": epoch, "final": final}))
        if not final:  # the next round starts a fresh optimizer; only a mid-fit resume needs it
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                       directory / OPTIMIZER_FILE)


def _report_with_checkpoint(model, tokenizer, optimizer, scheduler, epoch, final, cfg, metrics) -> None:
    import ray.train

    rank, _ = rank_world()
    with tempfile.TemporaryDirectory() as tmp:
        _write_checkpoint(model, tokenizer, optimizer, scheduler, epoch, final, cfg, Path(tmp))
        ckpt = ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None
        ray.train.report(metrics, checkpoint=ckpt)


def save_final_local(model, tokenizer, out: Path, cfg: TrainConfig, metrics: dict[str, float]) -> None:
    """The finished model as an HF directory at `out`, written whole or not at all. Collective
    under FSDP (every rank gathers); rank 0 writes."""
    rank, _ = rank_world()
    if rank != 0:
        _write_checkpoint(model, tokenizer, None, None, cfg.epochs - 1, True, cfg, out)
        return
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        _write_checkpoint(model, tokenizer, None, None, cfg.epochs - 1, True, cfg, tmp)
        (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2))


def is_finished_model(directory: str | Path) -> bool:
    """True when `directory` holds a model this package installed at the end of a fit."""
    d = Path(directory)
    state = d / STATE_FILE
    if not (state.is_file() and (d / "config.json").is_file()):
        return False
    try:
        return bool(json.loads(state.read_text()).get("final"))
    except (OSError, ValueError):
        return False


# --------------------------------------------------------------------------- Ray Train


# Ray Train's controller polls its workers every 2 s by default: a fit then ends up to 2 s after
# its workers return (the warm trainer's close, every SFT / reward-model stage) and a dead worker
# is seen up to 2 s late. Polled every 0.5 s here (the variable set in the environment wins); the
# driver passes it to the controller and workers (Ray Train's ENV_VARS_TO_PROPAGATE).
HEALTH_CHECK_INTERVAL = ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


def poll_workers_often() -> None:
    """Set Ray Train's health-check interval (`HEALTH_CHECK_INTERVAL`) unless the user did."""
    os.environ.setdefault(*HEALTH_CHECK_INTERVAL)


def fit_job(
    loop: Callable[[dict[str, Any]], dict[str, float]],
    job: Job,
    *,
    name: str,
    storage_path: str | None = None,
    max_failures: int = 0,
    store: RunStore | None = None,
) -> dict[str, float]:
    """Run `loop` (a `*_loop_per_worker`) on `job` under `TorchTrainer` on the connected Ray
    cluster; install the final checkpoint (an HF directory) at `job.output_dir`; return the final
    metrics. Validate the job's data before calling this: a bad row costs nothing to report here."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from rrhf_ray.mirror import actor_options

    cfg = job.train
    job = job.model_copy(update={"log_dir": job.log_dir or current_log_dir()})
    storage = storage_path or str(Path(job.output_dir).resolve().parent / "ray_train")
    poll_workers_often()
    trainer = TorchTrainer(
        loop,
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
            # The bucket's credentials when job.model_path is a URI (rrhf_ray.mirror.actor_options).
            worker_runtime_env=actor_options(store).get("runtime_env"),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {name!r} finished without a checkpoint")
    with atomic_path(job.output_dir) as tmp, result.checkpoint.as_directory() as d:
        shutil.copytree(d, tmp)
        (tmp / METRICS_FILE).write_text(json.dumps(result.metrics, indent=2))
    return dict(result.metrics)


def train_once(job: Job, loop: Callable[[dict[str, Any]], dict[str, float]],
               fit: Callable[..., dict[str, float]], *, what: str, name: str,
               storage_path: str | None, store: RunStore | None = None) -> Path:
    """A workflow stage that trains `job` into `job.output_dir` unless a finished model is there
    already (a resumed run never redoes it): under Ray Train (`fit`) when Ray is connected, else
    `loop` in this process. Returns the model directory."""
    import ray

    out = Path(job.output_dir)
    if is_finished_model(out):
        logger.info("%s stage: using the finished model at %s", what, out)
        return out
    if ray.is_initialized():
        fit(job, name=name, storage_path=storage_path, store=store)
    else:
        loop({"job": job.model_dump(mode="json")})
    return out

