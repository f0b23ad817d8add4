"""The training loop every trainer shares (RRHF, SFT, reward model), knowing nothing of losses.

A trainer hands it a `Recipe` (how many examples it has, how to run one micro-batch forward +
backward, what to measure) and gets AdamW + LR schedule, accumulation with `no_sync`, clipping,
bf16 autocast and held-out metrics each epoch (`train_epochs`); `run_worker` adds the model
set-up (`rrhf_ray.train.worker`), per-epoch checkpoints through `ray.train.report`, resume from
`ray.train.get_checkpoint()` (or a directory without Ray) and the final install of an HF
directory (`rrhf_ray.train.checkpoints`). It runs alone in one process (tests, debugging) and,
unchanged, under `TorchTrainer` (`rrhf_ray.train.launch`).

Batching, exactly: an optimizer step covers `queries_per_step` examples over all workers
(for RRHF an example is a query group; for SFT a (query, response) pair; for a reward model a
preference pair); worker w takes the step's examples w, w+W, …, in micro-batches of
`micro_batch_queries`. The recipe's micro-batch adds `scale · Σ loss` to the gradient with
`scale = W / step_weight(step)`, so after DDP's mean over workers the step's gradient is that
of the mean over the step (per example, or per token for SFT), however it was split.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rrhf_ray.config import FitConfig
from rrhf_ray.logs import redirect_process_output, worker_progress
from rrhf_ray.train.checkpoints import (
    read_optimizer_state,
    read_train_state,
    report_with_checkpoint,
    resume_checkpoint,
    save_final_local,
)
from rrhf_ray.train.jobs import FitJob, PairJob
from rrhf_ray.train.worker import Worker
from rrhf_ray.types import DataError

logger = logging.getLogger(__name__)


class NonFiniteTraining(RuntimeError):
    """An optimizer step whose loss or gradient is not finite (with `train.skip_nonfinite` off);
    the message names the step, the loss parts and the learning rate. The step was not applied."""


def _step_is_finite(loss_parts: dict[str, float], grad_norm: float, device: torch.device) -> bool:
    """Whether the step's loss (this worker's part) and gradient norm are finite, agreed by every
    worker (so that all of them skip or stop at the same step)."""
    import torch.distributed as dist

    finite = math.isfinite(grad_norm) and all(math.isfinite(v) for v in loss_parts.values())
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flag = torch.tensor([0.0 if finite else 1.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        finite = flag.item() == 0.0
    return finite


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
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None
    sync_last: bool = True
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext

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
    - `example_tokens(i)` and `token_budget`: optional tokens example i computes and a budget
      (RRHF's `train.micro_batch_tokens`); with both, micro-batches are packed up to the budget
      instead of `micro_batch_queries` examples;
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
    token_budget: int | None = None


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


def round_train_seed(seed: int, round_index: int) -> int:
    """The training seed of round `round_index` of a run (`train.seed` mixed with the round): the
    seed of its batch order (`plan_steps`) and of its torch RNG. Round 1 (and a one-off
    `rrhf-ray train`, a round 1 of its own) uses `seed` as it is; later rounds draw a new order,
    so no two rounds feed their pools in the same sequence of positions."""
    if round_index <= 1:
        return seed
    digest = hashlib.blake2b(f"{seed}:train-round:{round_index}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x3FFFFFFF


def micro_batches(indices: Sequence[int], size: int, tokens: Callable[[int], int] | None = None,
                  budget: int | None = None) -> list[list[int]]:
    """A worker's share of one step cut into micro-batches: `size` examples each, or, with a
    token `budget` (and `tokens(i)`, what example i computes), as many consecutive examples as
    fit the budget (an example alone over it is a micro-batch of its own; the recipe runs it in
    chunks). The step's gradient is a sum over examples: the cut changes memory and speed, not
    the gradient."""
    if budget is None or tokens is None:
        return [list(indices[i : i + size]) for i in range(0, len(indices), size)]
    out: list[list[int]] = []
    used = 0
    for i in indices:
        t = tokens(i)
        if out and used + t <= budget:
            out[-1].append(i)
            used += t
        else:
            out.append([i])
            used = t
    return out


_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass
class Optimizer:
    """AdamW and its LR schedule over `total_steps` (a fit's, or one round's)."""

    params: list[torch.nn.Parameter]
    optimizer: Any
    scheduler: Any

    @classmethod
    def build(cls, model: torch.nn.Module, cfg: FitConfig, total_steps: int) -> Optimizer:
        from transformers import get_scheduler

        params = [p for p in model.parameters() if p.requires_grad]
        # PyTorch's fused AdamW kernel (one pass per tensor): about 3x faster than its default
        # per-tensor loop on a 2-core CPU (benchmarks/optimizer.py), the same update up to float
        # rounding. Where it does not apply, the default loop.
        fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.dtype in _FUSED_DTYPES
                                     for p in params)
        optimizer = torch.optim.AdamW(
            params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay,
            fused=fused or None,
        )
        scheduler = get_scheduler(
            "constant_with_warmup" if cfg.lr_scheduler == "constant" else cfg.lr_scheduler,
            optimizer,
            num_warmup_steps=math.ceil(cfg.warmup_ratio * total_steps),
            num_training_steps=total_steps,
        )
        return cls(params, optimizer, scheduler)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def steps_per_epoch(recipe: Recipe, cfg: FitConfig, world: int) -> int:
    return len(plan_steps(recipe.num_examples, cfg.queries_per_step, world, cfg.seed))


def train_epochs(
    w: Worker, recipe: Recipe, opt: Optimizer, *, start_epoch: int = 0, global_step: int = 0,
    history: list[dict[str, float]] | None = None,
    on_epoch_end: Callable[[int, bool, dict[str, float]], None] | None = None,
    seed: int | None = None,
) -> dict[str, float]:
    """Epochs `start_epoch` … `cfg.epochs − 1` of `recipe` on worker `w`: steps of
    `queries_per_step` examples over all workers, micro-batches with `no_sync`, clipping, AdamW,
    the schedule; held-out metrics after each epoch when the recipe has them. `global_step`
    numbers the steps (it keeps increasing across a warm trainer's rounds); `history`, when
    given, receives one row per optimizer step on rank 0 (loss, rank / SFT loss, ranking
    accuracy, lr, grad norm, tokens/s). `on_epoch_end(epoch, final, metrics)` reports or
    checkpoints. `seed` (default `cfg.seed`) seeds the batch order, epoch e with `seed + e`
    (`round_train_seed` gives a round's). Returns the last epoch's metrics."""
    cfg = w.cfg
    base_seed = cfg.seed if seed is None else seed
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
    skipped = 0  # steps not applied for a non-finite loss or gradient (train.skip_nonfinite)
    bar = worker_progress(per_epoch * (cfg.epochs - start_epoch), f"{recipe.name} training", "step") \
        if w.rank == 0 else None
    for epoch in range(start_epoch, cfg.epochs):
        meter = Meter()
        for step in plan_steps(recipe.num_examples, cfg.queries_per_step, w.world, base_seed + epoch):
            if recipe.example_length is not None:
                step = sorted(step, key=recipe.example_length, reverse=True)
            mine = step[w.rank :: w.world]
            micro = micro_batches(mine, cfg.micro_batch_queries, recipe.example_tokens, recipe.token_budget)
            scale = w.world / recipe.step_weight(step)
            step_meter, step_measured = Meter(), []
            for m, idx in enumerate(micro):
                mb = MicroBatch(idx, scale, w.device, no_sync, m == len(micro) - 1, w.autocast)
                step_measured.append(recipe.micro_batch(w.ddp_model, mb))
                step_meter.add(step_measured[-1])
            # The norm is measured without clipping too (an infinite bound clips nothing): a step
            # whose gradient is not finite is never applied.
            bound = cfg.max_grad_norm if cfg.max_grad_norm is not None else math.inf
            if hasattr(w.ddp_model, "clip_grad_norm_"):
                grad_norm = float(w.ddp_model.clip_grad_norm_(bound))
            else:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(opt.params, bound))
            lr = opt.scheduler.get_last_lr()[0]
            summary = step_meter.summary()
            parts = {k: v for k, v in summary.items() if k.endswith("loss")}
            finite = _step_is_finite(parts, grad_norm, w.device)
            if not finite and not cfg.skip_nonfinite:
                shown = ", ".join(f"{k} {v:.4g}" for k, v in parts.items())
                raise NonFiniteTraining(
                    f"{recipe.name} training: step {global_step - first_step + 1} of {total_steps} (global step "
                    f"{global_step + 1}, epoch {epoch + 1}) is not finite: {shown}, grad norm {grad_norm:.4g}, "
                    f"lr {lr:.3g}; the step was not applied (lower train.lr, or set "
                    "train.skip_nonfinite=true to skip such steps)")
            if finite:
                opt.optimizer.step()
                for measured in step_measured:  # a skipped step is left out of the epoch's means
                    meter.add(measured)
            else:
                skipped += 1
                for measured in step_measured:  # its names, without weight (NaN if nothing else)
                    meter.add(Measured(dict.fromkeys(measured.values, (0.0, 0.0))))
                if w.rank == 0:
                    logger.warning("%s training: step %d skipped, not finite (grad norm %.4g, lr %.3g)",
                                   recipe.name, global_step - first_step + 1, grad_norm, lr)
            opt.scheduler.step()
            opt.optimizer.zero_grad(set_to_none=True)
            global_step += 1
            if history is not None and w.rank == 0:
                history.append({"global_step": float(global_step), "lr": lr, "grad_norm": grad_norm,
                                "skipped": 0.0 if finite else 1.0, **summary})
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
        if cfg.skip_nonfinite:
            metrics["nonfinite_steps_skipped"] = float(skipped)
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
    job: FitJob,
    in_ray: bool,
    load_model: Callable[[str, FitConfig, bool, Any], torch.nn.Module],
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
    with resume_checkpoint(job.resume_from, in_ray) as resume_dir:
        state = read_train_state(resume_dir) if resume_dir else None
        w = Worker.load(resume_dir or job.model_path, cfg, in_ray, job.trust_remote_code, load_model,
                        tokenizer_path=job.tokenizer_path, require_eos=require_eos)
        recipe = build_recipe(w.tokenizer, w.device, w.model)
        per_epoch = steps_per_epoch(recipe, cfg, w.world)
        opt = Optimizer.build(w.ddp_model, cfg, per_epoch * cfg.epochs)
        start_epoch = 0
        if state is not None:
            start_epoch = state["epoch"] + 1
            saved = read_optimizer_state(resume_dir)
            if saved is not None:
                opt.load_state_dict(saved)
            logger.info("resuming at epoch %d of %d", start_epoch + 1, cfg.epochs)

    def epoch_end(epoch: int, final: bool, metrics: dict[str, float]) -> None:
        if in_ray and (final or cfg.checkpoint_every_epoch):
            # A final checkpoint carries no optimizer: the next round starts a fresh one.
            report_with_checkpoint(w.ddp_model, w.tokenizer, cfg, metrics, epoch=epoch, final=final,
                                   optimizer_state=None if final else opt.state_dict())
        elif in_ray:
            import ray.train

            ray.train.report(metrics)

    metrics = train_epochs(w, recipe, opt, start_epoch=start_epoch, global_step=start_epoch * per_epoch,
                           on_epoch_end=epoch_end)
    if not in_ray:
        save_final_local(w.ddp_model, w.tokenizer, Path(job.output_dir), cfg, metrics)
    return metrics


def run_pair_worker(
    config: dict[str, Any],
    job_type: type[PairJob],
    read_pairs: Callable[..., list[Any]],
    build_recipe: Callable[[FitConfig, list[Any], list[Any], Any, torch.device, torch.nn.Module], Recipe],
    load_model: Callable[[str, FitConfig, bool, Any], torch.nn.Module],
    *,
    require_eos: bool = True,
) -> dict[str, float]:
    """`run_worker` for a fit on pairs (SFT, reward model): the job `config["job"]` (a dict;
    `config.get("ray")`: under Ray Train), its pairs read by `read_pairs` and split into training
    and held-out pairs on the worker, and the recipe
    `build_recipe(train_config, train_pairs, held_pairs, tokenizer, device, model)`."""
    job = job_type.model_validate(config["job"])

    def recipe(tokenizer: Any, device: torch.device, model: torch.nn.Module) -> Recipe:
        train_pairs, held_pairs = job.split_pairs(read_pairs)
        return build_recipe(job.train, train_pairs, held_pairs, tokenizer, device, model)

    return run_worker(job, bool(config.get("ray")), load_model, recipe, require_eos=require_eos)
