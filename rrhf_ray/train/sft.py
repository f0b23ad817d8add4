"""Supervised fine-tuning of the initial policy ρ on Ray Train (the stage before RRHF).

Causal-LM fine-tuning on (query, response) pairs with the prompt masked: the loss is the
per-token mean of −log π(y_t | x, y_<t) over the response tokens and the EOS that closes the
response, never over the query or the padding. Tokenisation is RRHF's own policy sequence
(`rrhf_ray.train.tokens.encode`): query and response tokenized apart, the query cut from the left
to fit `max_length`, so the policy is fine-tuned on exactly the token layout the RRHF trainer
scores later.

The loop (DDP / FSDP, accumulation, LR schedule, clipping, LoRA, bf16, checkpoints, resume) is
`rrhf_ray.train.loop.run_worker`. A step's gradient is that of the mean NLL over all response
tokens of the step's pairs, whatever the split over workers and micro-batches.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rrhf_ray.config import FitConfig
from rrhf_ray.data.pairs import SFTPair, read_sft_pairs
from rrhf_ray.train.jobs import PairJob
from rrhf_ray.train.launch import fit_pairs, train_once
from rrhf_ray.train.loop import Measured, MicroBatch, Recipe, run_pair_worker
from rrhf_ray.train.prefix import packed_nll_sum, supports_prefix_sharing
from rrhf_ray.train.tokens import IGNORE, Batch, collate, encode
from rrhf_ray.train.worker import inference_dtype, load_policy, load_tokenizer

if TYPE_CHECKING:
    from rrhf_ray.mirror import RunStore

logger = logging.getLogger(__name__)


class SFTJob(PairJob):
    """An SFT fit on (query, response) pairs; `eval_path` / `eval_fraction`: held-out NLL."""


def load_job_pairs(job: SFTJob) -> tuple[list[SFTPair], list[SFTPair]]:
    """(training, held-out) pairs of `job`, every row validated."""
    return job.split_pairs(read_sft_pairs)


# --------------------------------------------------------------------------- tokens and loss


def encode_pair(tokenizer: Any, pair: SFTPair, max_length: int) -> tuple[list[int], int]:
    """(token ids of query + response + EOS, index of the first response token)."""
    return encode(tokenizer, pair.query, pair.response, max_length)


def nll_sum(model: torch.nn.Module, batch: Batch, device: torch.device) -> tuple[torch.Tensor, int]:
    """(Σ −log π over the response tokens, their number). Position t predicts token t + 1."""
    batch = batch.to(device)
    labels = batch.labels()
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    target = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), target.reshape(-1),
        ignore_index=IGNORE, reduction="sum",
    )
    return loss, int((target != IGNORE).sum())


def _mean_nll(model: torch.nn.Module, encoded: Sequence[tuple[list[int], int]], pad_id: int,
              device: torch.device, batch_size: int) -> float:
    total, tokens = 0.0, 0
    for s in range(0, len(encoded), batch_size):
        loss, n = nll_sum(model, collate(encoded[s : s + batch_size], pad_id), device)
        total += float(loss)
        tokens += n
    return total / max(tokens, 1)


# --------------------------------------------------------------------------- the worker loop


def use_packing(model: torch.nn.Module | None, setting: str) -> bool:
    """Whether SFT packs its pairs (`FitConfig.packing`) for `model`: `on` refuses a model the
    packed attention is not tested with, `auto` falls back to padded rows (and says so)."""
    if setting == "off" or model is None:
        return False
    if supports_prefix_sharing(model):
        return True
    if setting == "on":
        raise ValueError(f"sft packing: not supported for this model "
                         f"({getattr(getattr(model, 'config', None), 'model_type', '?')}); use packing: auto or off")
    logger.info("sft packing: not supported by this model here; padded rows")
    return False


def sft_recipe(cfg: FitConfig, train_pairs: Sequence[SFTPair], eval_pairs: Sequence[SFTPair], tokenizer: Any,
               device: torch.device, model: torch.nn.Module | None = None) -> Recipe:
    """The SFT recipe for `run_worker`: the summed response NLL of a micro-batch, a step weighed
    by its response tokens (so its gradient is the per-token mean), the held-out NLL each epoch."""
    encoded = [encode_pair(tokenizer, p, cfg.max_length) for p in train_pairs]
    held = [encode_pair(tokenizer, p, cfg.max_length) for p in eval_pairs]
    pad_id = tokenizer.pad_token_id
    packed = use_packing(model, cfg.packing)

    def micro_batch(model: torch.nn.Module, mb: MicroBatch) -> Measured:
        with mb.sync_ctx():
            with mb.autocast():
                if packed:
                    loss, tokens = packed_nll_sum(model, [encoded[i] for i in mb.indices], cfg.max_length,
                                                  cfg.prefix_attention)
                else:
                    loss, tokens = nll_sum(model, collate([encoded[i] for i in mb.indices], pad_id), mb.device)
            (loss * mb.scale).backward()
        return Measured({"loss": (float(loss.detach()), tokens)}, tokens, {"pairs": len(mb.indices)})

    def step_weight(indices: Sequence[int]) -> float:
        return float(sum(len(encoded[i][0]) - encoded[i][1] for i in indices))

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        return {"eval_nll": _mean_nll(model, held, pad_id, device, cfg.micro_batch_queries)}

    return Recipe(
        "SFT", len(encoded), micro_batch,
        lambda s: f"nll {s['loss']:.4f} {s['tokens_per_s']:.0f} tok/s",
        step_weight=step_weight, evaluate=evaluate if held else None,
        example_length=lambda i: len(encoded[i][0]),
    )


def sft_loop_per_worker(config: dict[str, Any]) -> dict[str, float]:
    """Fine-tune one worker's share of an `SFTJob` (`config["job"]`, a dict); without Ray
    (`config.get("ray")` false) in this process, writing the model to `job.output_dir`."""
    return run_pair_worker(config, SFTJob, read_sft_pairs, sft_recipe, load_policy)


def fit_sft(job: SFTJob, *, name: str, storage_path: str | None = None, max_failures: int = 0,
            store: RunStore | None = None) -> dict[str, float]:
    """Run `job` under `TorchTrainer` on the connected Ray cluster; install the fine-tuned model
    (an HF directory) at `job.output_dir` and return the final metrics."""
    return fit_pairs(sft_loop_per_worker, job, read_sft_pairs, what="SFT", name=name,
                     storage_path=storage_path, max_failures=max_failures, store=store)


# --------------------------------------------------------------------------- measurement


@torch.no_grad()
def heldout_nll(model_path: str | Path, pairs: Sequence[SFTPair | tuple[str, str] | tuple[str, str, bool]],
                max_length: int = 192, batch_size: int = 8, dtype: str = "auto",
                tokenizer_path: str | Path | None = None) -> float:
    """Mean per-token NLL of the responses (+ EOS) of `pairs` under the model at `model_path`, on
    a GPU when there is one, its weights in `dtype` (`model.dtype`: auto = float32 on a CPU,
    bfloat16 on a GPU). A pair (query, response, False) is a response that did not end (cut off
    at a length limit): its tokens are scored without an EOS. `tokenizer_path`: the run's
    tokenizer (`model.tokenizer`), default the model's."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(str(tokenizer_path or model_path), False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=inference_dtype(dtype, device),
                                                 use_safetensors=True)
    model = model.to(device).eval()
    device = next(model.parameters()).device
    encoded = [encode_pair(tokenizer, p, max_length) if isinstance(p, SFTPair)
               else encode(tokenizer, p[0], p[1], max_length, closed=p[2] if len(p) > 2 else True)
               for p in pairs]
    return _mean_nll(model, encoded, tokenizer.pad_token_id, device, batch_size)


# --------------------------------------------------------------------------- the workflow stage


def run_sft_stage(run_config: Any, out_dir: str | Path, store: RunStore | None = None,
                  log_dir: str | None = None) -> Path:
    """Fine-tune `run_config.model` on `run_config.sft` into `out_dir/<sft.output_subdir>`; the
    driver starts RRHF from the returned directory. A finished model already there is kept (a
    resumed run never redoes the stage). Trains under Ray Train when Ray is connected, else here."""
    stage = run_config.sft
    if stage is None:
        raise ValueError("run_sft_stage: the run config has no `sft` section")
    job = SFTJob(
        model_path=run_config.model.name_or_path, data_path=stage.data,
        output_dir=str(Path(out_dir) / stage.output_subdir),
        train=stage.train, data_format=stage.format, eval_path=stage.eval_data,
        eval_fraction=stage.eval_fraction, tokenizer_path=run_config.model.tokenizer,
        trust_remote_code=run_config.model.trust_remote_code, log_dir=log_dir,
    )
    return train_once(job, sft_loop_per_worker, fit_sft, what="SFT", name=f"{Path(out_dir).name}-sft",
                      storage_path=run_config.output.storage_path, store=store)
