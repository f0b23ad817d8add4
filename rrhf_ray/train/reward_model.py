"""Reward-model training on Ray Train: the R(x, y) that scores RRHF's candidates.

The model is an `AutoModelForSequenceClassification` with one logit on a causal (Llama, GPT-2)
or encoder (BERT) backbone; `config.pad_token_id` is set so that the model reads its score at
the last non-pad token. It learns from preference pairs with the Bradley-Terry loss
(Ouyang et al. 2022, arXiv 2203.02155, eq. 1):

    L = −log σ(r(x, y_chosen) − r(x, y_rejected)),   averaged over the pairs of a step.

The text scored is query + response, tokenized apart and concatenated, the query cut from the
left to fit `max_length`, exactly as `rrhf_ray.actors.scorer.RewardScorer` reads it at scoring time
(both use `rrhf_ray.train.tokens.encode` with `policy=False`):
no EOS is appended, special tokens wrap the whole (e.g. <s> … for Llama, [CLS] … [SEP] for BERT).
The saved directory (safetensors + tokenizer) loads with a plain
`AutoModelForSequenceClassification.from_pretrained(dir)`.

The loop is `rrhf_ray.train.loop.run_worker` (DDP / FSDP, accumulation, schedule, clipping, LoRA,
bf16, checkpoints, resume); held-out pairwise accuracy is reported at each epoch's end.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import Field

from rrhf_ray.config import FitConfig
from rrhf_ray.data.pairs import PreferencePair, read_preference_pairs
from rrhf_ray.train.jobs import PairJob
from rrhf_ray.train.launch import fit_pairs, train_once
from rrhf_ray.train.loop import Measured, MicroBatch, Recipe, run_pair_worker
from rrhf_ray.train.tokens import collate, encode
from rrhf_ray.train.worker import load_tokenizer, prepare_model
from rrhf_ray.types import Query

if TYPE_CHECKING:
    from rrhf_ray.mirror import RunStore

class RewardModelJob(PairJob):
    """A reward-model fit on (query, chosen, rejected) pairs from a backbone (`model_path`: a
    causal LM, an encoder, or a reward model); held-out pairwise accuracy each epoch."""

    eval_fraction: float = Field(
        0.05, ge=0.0, lt=1.0, description="Without eval_path: share of the pairs held out (seeded)."
    )


def load_job_pairs(job: RewardModelJob) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(training, held-out) preference pairs of `job`, every row validated."""
    return job.split_pairs(read_preference_pairs)


# --------------------------------------------------------------------------- loss


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """−log σ(r_chosen − r_rejected) per pair ([P] rewards in, [P] losses out), computed as
    softplus(r_rejected − r_chosen), which stays finite for any margin."""
    return torch.nn.functional.softplus(rejected.float() - chosen.float())


# --------------------------------------------------------------------------- tokens


def encode_text(tokenizer: Any, query: Query, response: str, max_length: int) -> list[int]:
    """Token ids of query + response within `max_length`, the query cut from the left; the
    tokenizer's special tokens (BOS / CLS … SEP) wrap the whole. Same ids as RewardScorer.encode."""
    return encode(tokenizer, query, response, max_length, policy=False)[0]


def rewards(model: torch.nn.Module, rows: Sequence[list[int]], pad_id: int, device: torch.device) -> torch.Tensor:
    """One forward over `rows` (token ids, right-padded; the model reads the last non-pad
    token): the [N] rewards."""
    batch = collate(rows, pad_id).to(device)
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, 0]


def load_reward_backbone(path: str, cfg: FitConfig, trust_remote_code: bool, tokenizer: Any) -> torch.nn.Module:
    """A one-logit sequence classifier on `path`, reading its score at the last non-pad token."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, dtype=torch.float32, trust_remote_code=trust_remote_code, use_safetensors=True
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    return prepare_model(model, cfg, "SEQ_CLS")


def _accuracy(model: torch.nn.Module, encoded: Sequence[tuple[list[int], list[int]]], pad_id: int,
              device: torch.device, batch_size: int) -> tuple[float, float]:
    """(pairwise accuracy, mean margin) of `model` on encoded (chosen, rejected) pairs."""
    correct, margin = 0, 0.0
    for s in range(0, len(encoded), batch_size):
        part = encoded[s : s + batch_size]
        r = rewards(model, [c for c, _ in part] + [x for _, x in part], pad_id, device).float()
        diff = r[: len(part)] - r[len(part) :]
        correct += int((diff > 0).sum())
        margin += float(diff.sum())
    return correct / max(len(encoded), 1), margin / max(len(encoded), 1)


# --------------------------------------------------------------------------- the worker loop


def reward_model_recipe(cfg: FitConfig, train_pairs: Sequence[PreferencePair],
                        eval_pairs: Sequence[PreferencePair], tokenizer: Any, device: torch.device,
                        model: torch.nn.Module | None = None) -> Recipe:
    """The reward-model recipe for `run_worker`: the Bradley-Terry loss of each pair, chosen and
    rejected in one forward; held-out pairwise accuracy and margin each epoch."""

    def enc(p: PreferencePair) -> tuple[list[int], list[int]]:
        return (encode_text(tokenizer, p.query, p.chosen, cfg.max_length),
                encode_text(tokenizer, p.query, p.rejected, cfg.max_length))

    encoded = [enc(p) for p in train_pairs]
    held = [enc(p) for p in eval_pairs]
    pad_id = tokenizer.pad_token_id

    def micro_batch(model: torch.nn.Module, mb: MicroBatch) -> Measured:
        part = [encoded[i] for i in mb.indices]
        with mb.sync_ctx():
            with mb.autocast():  # chosen and rejected in one forward: one DDP sync per pass
                r = rewards(model, [c for c, _ in part] + [x for _, x in part], pad_id, mb.device)
            chosen, rejected = r[: len(part)], r[len(part) :]
            losses = bradley_terry_loss(chosen, rejected)
            (losses.sum() * mb.scale).backward()
        tokens = sum(len(c) + len(x) for c, x in part)
        n = float(len(part))
        diff = (chosen - rejected).detach().float()
        return Measured({"loss": (float(losses.detach().sum()), n),
                         "accuracy": (float((diff > 0).sum()), n),
                         "margin": (float(diff.sum()), n)}, tokens, {"pairs": n})

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        acc, margin = _accuracy(model, held, pad_id, device, cfg.micro_batch_queries)
        return {"eval_accuracy": acc, "eval_margin": margin}

    return Recipe(
        "reward-model", len(encoded), micro_batch,
        lambda s: f"loss {s['loss']:.4f} acc {s['accuracy']:.3f} margin {s['margin']:.3f}",
        evaluate=evaluate if held else None,
    )


def rm_loop_per_worker(config: dict[str, Any]) -> dict[str, float]:
    """Train one worker's share of a `RewardModelJob` (`config["job"]`, a dict); without Ray
    (`config.get("ray")` false) in this process, writing the model to `job.output_dir`."""
    return run_pair_worker(config, RewardModelJob, read_preference_pairs, reward_model_recipe,
                           load_reward_backbone, require_eos=False)


def fit_reward_model(job: RewardModelJob, *, name: str, storage_path: str | None = None,
                     max_failures: int = 0, store: RunStore | None = None) -> dict[str, float]:
    """Run `job` under `TorchTrainer` on the connected Ray cluster; install the reward model
    (an HF directory) at `job.output_dir` and return the final metrics."""
    return fit_pairs(rm_loop_per_worker, job, read_preference_pairs, what="reward model", name=name,
                     storage_path=storage_path, max_failures=max_failures, store=store)


# --------------------------------------------------------------------------- measurement


@torch.no_grad()
def pairwise_accuracy(model_path: str | Path, pairs: Sequence[PreferencePair | tuple[str, str, str]],
                      max_length: int = 512, batch_size: int = 16) -> float:
    """Share of `pairs` whose chosen response the reward model at `model_path` scores higher."""
    from transformers import AutoModelForSequenceClassification

    tokenizer = load_tokenizer(str(model_path), False, require_eos=False)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path, dtype=torch.float32, use_safetensors=True).eval()
    device = next(model.parameters()).device
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else tokenizer.pad_token_id
    encoded = []
    for p in pairs:
        q, c, r = (p.query, p.chosen, p.rejected) if isinstance(p, PreferencePair) else p
        encoded.append((encode_text(tokenizer, q, c, max_length), encode_text(tokenizer, q, r, max_length)))
    return _accuracy(model, encoded, pad_id, device, batch_size)[0]


# --------------------------------------------------------------------------- the workflow stage


def run_reward_model_stage(run_config: Any, out_dir: str | Path, store: RunStore | None = None,
                           log_dir: str | None = None) -> Path:
    """Train a reward model on `run_config.reward_model` into `out_dir/<output_subdir>`; the
    driver scores the rounds with the returned directory (reward.kind: model). A finished model
    already there is kept. Trains under Ray Train when Ray is connected, else in this process."""
    stage = run_config.reward_model
    if stage is None:
        raise ValueError("run_reward_model_stage: the run config has no `reward_model` section")
    job = RewardModelJob(
        model_path=stage.base_model or run_config.model.name_or_path, data_path=stage.data,
        output_dir=str(Path(out_dir) / stage.output_subdir), train=stage.train,
        data_format=stage.format, eval_path=stage.eval_data, eval_fraction=stage.eval_fraction,
        trust_remote_code=run_config.model.trust_remote_code, log_dir=log_dir,
    )
    return train_once(job, rm_loop_per_worker, fit_reward_model, what="reward-model",
                      name=f"{Path(out_dir).name}-reward-model", storage_path=run_config.output.storage_path,
                      store=store)
