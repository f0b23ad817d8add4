"""The run configuration: one pydantic model per component, composed into `RunConfig`.

A config comes from a YAML file plus `dotted.key=value` overrides from the command line.
Every model forbids unknown keys, so a typo is an error that names the key and the file
instead of a setting silently ignored. Cross-field checks live in validators, once.

This module imports nothing of the project: every other module depends on it, never the reverse.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

BUILTIN_PREFIX = "builtin:"  # a name `rrhf_ray.registry` resolves, never a path

# The turn markers a reply must not run into (the HH dialogue format, the paper's evaluation cut
# "at the next Human: / Assistant: turn"). The blank-line forms are the format's own; the
# single-newline forms also catch a turn the policy opens after one newline (and, being their
# suffixes, the blank-line forms too: the cut then keeps one more "\n", which is whitespace).
DEFAULT_STOP = ("\n\nHuman:", "\n\nAssistant:", "\nHuman:", "\nAssistant:")


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and the offending key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    """The policy ρ that round 1 starts from."""

    name_or_path: str = Field(
        min_length=1,
        description="HF hub id, local directory of an AutoModelForCausalLM (ρ), or builtin:<name>.",
    )
    tokenizer: str | None = Field(None, description="Tokenizer id or path; default: the model's.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype for loading; auto = float32 on CPU, bfloat16 on GPU."
    )
    trust_remote_code: bool = Field(
        False, description="Allow model code from the hub. Off: only code shipped with transformers runs."
    )


class DataConfig(_Section):
    """Where the queries (and the data set's own responses) come from (`rrhf_ray.data.queries`)."""

    source: str = Field(
        min_length=1,
        description="Data set: hub id (load_dataset), local .jsonl/.parquet file, a directory "
        "(data files, or one written by save_to_disk), or 'builtin:<name>'.",
    )
    format: Literal["auto", "rm-static", "hh-rlhf", "reference", "prompts"] = Field(
        "auto",
        description="Row layout: rm-static (prompt, chosen, rejected), hh-rlhf (chosen, rejected as "
        "whole dialogues), reference (query, responses, scores), prompts (query); auto = from the fields.",
    )
    split: str = Field("train", description="Split used for training queries.")
    eval_split: str | None = Field(
        "test",
        description="Held-out split for evaluation, if the source has one; otherwise (or when null) "
        "a seeded eval_fraction of the training queries is held out.",
    )
    eval_fraction: float = Field(
        0.05, ge=0.0, lt=1.0,
        description="Share of queries held out for evaluation when the source has no eval split.",
    )
    max_prompts: int | None = Field(None, ge=1, description="Keep at most this many training queries.")
    max_eval_prompts: int | None = Field(None, ge=1, description="Keep at most this many held-out queries.")
    max_prompt_tokens: int = Field(
        63, ge=1,
        description="Prompts longer than this (policy tokens, special tokens included) are cut from "
        "the left at a '\\n\\nHuman:' turn; prompts that cannot be cut to fit are dropped. "
        "Default 63: with sampling.max_new_tokens 128 and the EOS, the paper's 192 tokens "
        "(train.max_length) hold the longest prompt and reply whole.",
    )
    seed: int = Field(0, description="Shuffling and split seed.")


class SamplingConfig(_Section):
    """How the samplers draw k candidates per query (vLLM `SamplingParams`)."""

    num_replicas: int = Field(1, ge=1, description="Number of vLLM sampler actors.")
    n: int = Field(4, ge=1, description="Candidates sampled per query by the policy.")
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, description="-1 disables top-k.")
    max_new_tokens: int = Field(128, ge=1)
    stop: list[str] = Field(
        default_factory=lambda: list(DEFAULT_STOP),
        description="A reply is cut before the first of these: the next dialogue turn, with a blank "
        "line (the HH format) or a single newline before it; see DEFAULT_STOP.",
    )
    seed: int = Field(0, description="Base seed; query i is seeded from (seed, i), so results do "
                      "not depend on how queries are split across replicas. Training round r samples "
                      "with round_seed(seed, r) (a new draw each round); evaluation with seed + 10000 "
                      "in every round (the same draw: rounds are compared on paired samples).")
    use_beam_search: bool = Field(False, description="Beam search of width n instead of sampling (BP).")
    length_penalty: float = Field(1.0, description="Beam search length penalty.")
    return_logprobs: bool = Field(True, description="Keep each candidate's cumulative log-prob.")
    enforce_eager: bool = Field(True, description="Skip vLLM's graph compilation (faster start).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Engine dtype; auto = the checkpoint's."
    )
    kv_cache_gib: float | None = Field(
        None, gt=0, description="CPU only: KV cache size (VLLM_CPU_KVCACHE_SPACE); null = env or 1."
    )
    tensor_parallel_size: int = Field(1, ge=1)
    max_model_len: int = Field(512, ge=16)
    cpus_per_replica: int = Field(1, ge=1)
    use_gpu: bool | None = Field(
        None, description="Replicas on GPUs (tensor_parallel_size each); null = if the cluster has GPUs."
    )
    chunk_prompts: int = Field(
        32, ge=1, description="Queries per request to a replica: the unit of balancing, retry and progress."
    )
    max_restarts: int = Field(1, ge=0, description="Ray restarts of a crashed replica.")
    refresh_tolerance: float = Field(
        0.05, gt=0,
        description="After each weight refresh every replica's mean log-prob per token of a fixed "
        "probe (a few of the round's prompts and replies) must be within this many nats of the "
        "trainer's; a replica serving old or half-loaded weights fails the round. 0.05 allows "
        "bf16 serving of fp32 weights (measured gap on the demo: see README).")
    preset: str = Field(
        "IP", description="Candidate sources (docs/algorithm.md, sampling policies): BP, DP, D, P, or IP / IP-n."
    )
    external: list[str] = Field(
        default_factory=list,
        description="JSONL files of extra responses {query, responses, source} joining each group.",
    )

    @model_validator(mode="after")
    def _preset_known(self) -> SamplingConfig:
        if not re.fullmatch(r"BP|DP|D|P|IP(-[1-9]\d*)?", self.preset):
            raise ValueError(f"sampling.preset {self.preset!r} is not one of BP, DP, D, P, IP, IP-n")
        return self


class RewardConfig(_Section):
    """Where the rewards r_i come from: a reward model or a rule function."""

    kind: Literal["model", "rule"] = "rule"
    model: str | None = Field(None, description="AutoModelForSequenceClassification path (kind=model).")
    rule: str | None = Field(
        None, description="`package.module:function(queries, responses)` or builtin:<name> (kind=rule)."
    )
    num_workers: int = Field(1, ge=1)
    batch_size: int = Field(16, ge=1)
    max_length: int = Field(512, ge=8)
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Reward model weights and forward dtype."
    )
    cpus_per_worker: int = Field(1, ge=1, description="CPUs per reward actor (its torch threads).")
    gpus_per_worker: float | None = Field(
        None, ge=0.0, description="GPU share per reward actor; null = 0.5 if the cluster has GPUs, else 0."
    )
    chunk_queries: int = Field(
        16, ge=1, description="Queries per request to a worker: the unit of balancing and progress."
    )

    @model_validator(mode="after")
    def _source_named(self) -> RewardConfig:
        if self.kind == "model" and not self.model:
            raise ValueError("reward.kind is 'model' but reward.model is not set")
        if self.kind == "rule" and not self.rule:
            raise ValueError("reward.kind is 'rule' but reward.rule is not set")
        return self


class LoraConfig(_Section):
    enabled: bool = False
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | str = Field(
        "all-linear", description="Module names to adapt; 'all-linear' = every linear layer."
    )


# --------------------------------------------------------------------------- the loss (train.loss)
# One class per function of `rrhf_ray.loss.LOSSES`, its fields the function's keyword options with
# the defaults documented there; `name` picks the class (`train: {loss: {name: simpo, beta: 2.0}}`,
# or `train.loss.name=pro`). A new loss is one function in loss.py + one class here, added to
# `LossConfig` (tests/unit/test_config.py checks that the two cover the same names).


class RRHFLoss(_Section):
    """RRHF, eq. 1-5 (docs/algorithm.md): w_rank · L_rank + L_ft."""

    name: Literal["rrhf"] = "rrhf"
    rank_weight: float = Field(1.0, ge=0.0, description="w_rank; 0 = fine-tune on the best only (= raft).")
    length_penalty: float = Field(1.0, ge=0.0, description="α in p_i = logp / |y_i|^α.")
    sft_reduction: Literal["mean", "sum"] = Field(
        "mean", description="L_ft per token of the best response (mean) or summed (sum, eq. 4 literally).")


class RAFTLoss(_Section):
    """RAFT / best-of-k fine-tuning: L_ft of the best candidate only (RRHF with w_rank = 0)."""

    name: Literal["raft"] = "raft"
    length_penalty: float = Field(1.0, ge=0.0, description="α of the reported ranking accuracy only.")
    sft_reduction: Literal["mean", "sum"] = "mean"


class PROLoss(_Section):
    """PRO: a listwise softmax over the ranking, reward-gap temperatures, + sft_weight · L_ft."""

    name: Literal["pro"] = "pro"
    sft_weight: float = Field(0.05, ge=0.0)
    length_penalty: float = Field(1.0, ge=0.0)


class SimPOLoss(_Section):
    """SimPO over all strict pairs: −log σ(β(p_j − p_i) − γ), + sft_weight · L_ft."""

    name: Literal["simpo"] = "simpo"
    beta: float = Field(2.0, gt=0.0)
    gamma: float = Field(1.0, ge=0.0)
    sft_weight: float = Field(0.0, ge=0.0)
    length_penalty: float = Field(1.0, ge=0.0)


class SLiCLoss(_Section):
    """SLiC-HF rank calibration: max(0, δ − logp_best + logp_i) over worse i, + sft_weight · L_ft."""

    name: Literal["slic"] = "slic"
    margin: float = Field(1.0, ge=0.0, description="δ, on sequence log-likelihoods.")
    sft_weight: float = Field(0.5, ge=0.0)


class DPOLoss(_Section):
    """DPO over all strict pairs: −log σ(β(h_j − h_i)), h = logp − logp_ref, + sft_weight · L_ft.
    The reference log-probabilities come from `train.reference` (a stage of the workflow)."""

    name: Literal["dpo"] = "dpo"
    beta: float = Field(0.1, gt=0.0)
    sft_weight: float = Field(0.0, ge=0.0)


LossConfig = Annotated[
    RRHFLoss | RAFTLoss | PROLoss | SimPOLoss | SLiCLoss | DPOLoss, Field(discriminator="name")
]
LOSS_CONFIGS: dict[str, type[_Section]] = {
    c.model_fields["name"].default: c for c in (RRHFLoss, RAFTLoss, PROLoss, SimPOLoss, SLiCLoss, DPOLoss)
}
"""The loss settings by name: `rrhf_ray.loss.LOSSES` has the same keys."""

_MOVED_TO_LOSS = ("rank_weight", "length_penalty", "sft_reduction")


class TrainConfig(_Section):
    """The RRHF update: loss settings (docs/algorithm.md, eq. 1-5) and the optimiser (paper §4.1)."""

    epochs: int = Field(3, ge=1, description="Epochs over the round's pool.")
    lr: float = Field(2e-5, gt=0.0, description="Peak learning rate of AdamW.")
    lr_scheduler: Literal["linear", "cosine", "constant"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0)
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0)
    max_grad_norm: float | None = Field(1.0, gt=0.0, description="Gradient clipping; null disables.")
    queries_per_step: int = Field(
        64, ge=1, description="Queries per optimizer step over all workers (paper: 64)."
    )
    micro_batch_queries: int = Field(
        1, ge=1, description="Queries per forward pass on one worker; the rest is accumulation."
    )
    candidate_chunk_size: int | None = Field(
        None, ge=1,
        description="Forward at most this many candidates at once (exact gradient, one extra "
        "forward); null = all candidates of the micro-batch together.",
    )
    micro_batch_tokens: int | None = Field(
        None, ge=1,
        description="Pack each worker's queries into micro-batches by the tokens a forward "
        "computes (prefix-shared: P + ΣR per query; padded: Σ(P + R)) instead of "
        "micro_batch_queries; a query over the budget runs its candidates in chunks (exact "
        "gradient). E.g. 640-1024 on a 2-core CPU (HH-shaped queries: P + ΣR ≈ 590).",
    )
    prefix_sharing: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Compute each query's prompt once for its k candidates: one packed row per "
        "query with a block mask (exact; tested for Llama, Qwen2, Mistral, GPT-NeoX with "
        "eager/sdpa attention). auto = where supported (the log says when it falls back); "
        "on = refuse a model that cannot; off = one padded row per candidate.",
    )
    truncated: Literal["keep", "drop"] = Field(
        "keep",
        description="Candidates the sampler cut off at max_new_tokens: keep (ranked and "
        "fine-tuned on, with no EOS appended) or drop (left out of the ranking and the SFT target).",
    )
    max_length: int = Field(192, ge=8, description="Query + response tokens; the query is cut from the left.")
    loss: LossConfig = Field(
        default_factory=RRHFLoss,
        description="The loss and its own settings, by name: rrhf (default), raft, pro, simpo, slic, "
        "dpo (rrhf_ray/loss.py). A bare name (`train.loss=pro`) is that loss with its defaults.",
    )
    reference: Literal["initial", "previous_round"] = Field(
        "initial",
        description="DPO's reference policy: initial = ρ (the base or SFT model) in every round; "
        "previous_round = ρ*, the model each round starts from. Its log-probabilities are computed "
        "once per round (stage round<r>/reference, rounds/<r>/pool_ref.parquet).",
    )
    shuffle_rewards: bool = Field(
        False,
        description="A control, not a method: the trainer shuffles the rewards within each query "
        "group (seeded by train.seed and the query) before training, so the ranking carries no "
        "signal; the held-out reward must not rise. The pool files keep the true rewards.",
    )
    bf16: bool | None = Field(None, description="bf16 autocast; null = on when training on GPU.")
    gradient_checkpointing: bool = False
    lora: LoraConfig = Field(default_factory=LoraConfig)
    strategy: Literal["ddp", "fsdp"] = Field("ddp", description="fsdp needs GPUs.")
    num_workers: int = Field(1, ge=1, description="Ray Train workers.")
    use_gpu: bool = False
    cpus_per_worker: int = Field(1, ge=1)
    seed: int = 0
    log_every: int = Field(10, ge=1, description="Log training metrics every this many optimizer steps.")
    checkpoint_every_epoch: bool = Field(
        True, description="Report a resumable checkpoint after each epoch (else only at the end)."
    )

    @field_validator("loss", mode="before")
    @classmethod
    def _loss_by_name(cls, value: Any) -> Any:
        # `train.loss=pro` (a bare name) and `train: {loss: {rank_weight: 0}}` (no name: rrhf).
        if isinstance(value, str):
            return {"name": value}
        if isinstance(value, dict) and "name" not in value:
            return {"name": "rrhf", **value}
        return value

    @model_validator(mode="before")
    @classmethod
    def _loss_keys_moved(cls, data: Any) -> Any:
        moved = [k for k in _MOVED_TO_LOSS if isinstance(data, dict) and k in data]
        if moved:
            raise ValueError(
                ", ".join(f"train.{k}" for k in moved) + " moved into train.loss (the loss's own "
                "settings): write " + ", ".join(f"train.loss.{k}" for k in moved)
                + " (train.loss.name rrhf, the default, or raft / pro / simpo)")
        return data

    @field_validator("prefix_sharing", mode="before")
    @classmethod
    def _on_off(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare on / off as a boolean.
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _batching(self) -> TrainConfig:
        if self.strategy == "fsdp" and not self.use_gpu:
            raise ValueError("train.strategy 'fsdp' needs train.use_gpu: true (FSDP runs on GPUs only)")
        if self.micro_batch_queries * self.num_workers > self.queries_per_step:
            raise ValueError(
                f"train.queries_per_step ({self.queries_per_step}) is smaller than "
                f"train.micro_batch_queries × train.num_workers "
                f"({self.micro_batch_queries} × {self.num_workers})"
            )
        return self

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per worker per optimizer step."""
        return math.ceil(self.queries_per_step / (self.micro_batch_queries * self.num_workers))


class EvalConfig(_Section):
    """Held-out evaluation each round (`rrhf_ray.evaluation`, docs/metrics.md)."""

    max_new_tokens: int = Field(128, ge=1)
    num_samples: int = Field(4, ge=1, description="Sampled continuations per held-out query.")
    judge_model: str | None = Field(
        None,
        description="A fixed causal LM (hub id or directory) whose perplexity of each round's greedy "
        "replies is judge_perplexity (the paper used gpt2-medium); null = the run's ρ (the SFT model "
        "when an sft stage runs), the same judge in every round.",
    )
    bootstrap_resamples: int = Field(
        1000, ge=100, description="Resamples of the held-out queries for the 95 % intervals."
    )
    batch_with_sampling: bool = Field(
        True,
        description="Round r's evaluation replies and round r+1's candidates (the same weights, "
        "ρ* after round r) are generated in one batched engine pass. Each request keeps its own "
        "seed, so the replies and candidates are those of two passes; false: two passes. Applies "
        "where the round samples from ρ* without beam search (presets IP / IP-n).",
    )


class RayConfig(_Section):
    address: str | None = Field(
        None, description="Ray cluster to join ('auto', 'ray://…'); null = RAY_ADDRESS or a new local one."
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a locally started cluster.")


class OutputConfig(_Section):
    dir: str = Field("outputs/run", description="Where rounds, checkpoints and metrics are written.")
    storage_path: str | None = Field(
        None, description="Ray Train storage (shared on multi-node clusters); default <dir>/ray_train."
    )


# --------------------------------------------------------------------------- experiment tracking
# `rrhf_ray.tracking` writes to these; none of it is part of the run's fingerprint (tracking may be
# turned on or changed when a run resumes).


class MLflowTrackingConfig(_Section):
    """MLflow: a local SQLite store under the output directory unless `tracking_uri` says otherwise."""

    enabled: bool = False
    tracking_uri: str | None = Field(
        None, description="Any MLflow tracking URI (http://…, sqlite:///…, databricks); "
        "null = sqlite:///<output.dir>/mlruns/mlflow.db, artifacts in <output.dir>/mlruns/artifacts.")
    artifact_location: str | None = Field(
        None, description="Artifact root of a newly created experiment; null = the store's default "
        "(<output.dir>/mlruns/artifacts for the default local store).")
    experiment: str = Field("rrhf-ray", min_length=1, description="Experiment name (created if missing).")
    run_name: str | None = Field(None, description="Run name; null = the output directory's name.")
    tags: dict[str, str] = Field(default_factory=dict, description="Tags set on the run.")


class TensorBoardTrackingConfig(_Section):
    """TensorBoard event files, written with tensorboardX (installed with Ray Train): on by default."""

    enabled: bool = True
    log_dir: str | None = Field(None, description="Event file directory; null = <output.dir>/tensorboard.")


class WandbTrackingConfig(_Section):
    """Weights & Biases: offline by default (no network; `wandb sync` uploads later)."""

    enabled: bool = False
    mode: Literal["offline", "online"] = Field(
        "offline", description="offline: files under <dir>/wandb only; online: streamed to the W&B server.")
    project: str = Field("rrhf-ray", min_length=1)
    entity: str | None = Field(None, description="W&B user or team; null = the account's default.")
    name: str | None = Field(None, description="Run display name; null = the output directory's name.")
    group: str | None = None
    tags: list[str] = Field(default_factory=list)
    dir: str | None = Field(None, description="Where W&B writes its wandb/ folder; null = <output.dir>.")


class TrackingConfig(_Section):
    """Experiment tracking (`rrhf_ray.tracking`): the resolved config as parameters, each round's
    metrics (step = round), the trainers' per-step scalars (step = a global step over all rounds),
    summary.md, report.png and sample replies. A resumed run continues the same tracking runs (their
    ids are kept in state.json). Only TensorBoard is on by default (it needs no extra package);
    MLflow and W&B need `pip install 'rrhf-ray[tracking]'`. For example:

        tracking:
          tensorboard: {enabled: true}          # <output.dir>/tensorboard
          mlflow:
            enabled: true                       # sqlite:///<output.dir>/mlruns/mlflow.db
            experiment: rrhf-demo
            # tracking_uri: http://mlflow.example:5000
          wandb:
            enabled: true
            mode: offline                       # <output.dir>/wandb; `wandb sync` uploads it
            project: rrhf-ray
            # entity: my-team
            # name: demo-seed0
    """

    mlflow: MLflowTrackingConfig = Field(default_factory=MLflowTrackingConfig)
    tensorboard: TensorBoardTrackingConfig = Field(default_factory=TensorBoardTrackingConfig)
    wandb: WandbTrackingConfig = Field(default_factory=WandbTrackingConfig)


def _sft_train_defaults() -> TrainConfig:
    # Alpaca-style SFT: 3 epochs, lr 2e-5, warm-up 3 % then cosine, 128 pairs a step.
    return TrainConfig(epochs=3, lr=2e-5, queries_per_step=128, micro_batch_queries=4, max_length=512)


def _reward_model_train_defaults() -> TrainConfig:
    # InstructGPT-style reward model: one epoch (more overfits), lr 1e-5, 64 pairs a step.
    return TrainConfig(epochs=1, lr=1e-5, queries_per_step=64, micro_batch_queries=4, max_length=512)


class SFTStageConfig(_Section):
    """Supervised fine-tuning of ρ before round 1 (`rrhf_ray.sft`); its output becomes ρ."""

    data: str = Field(
        description="Pairs JSONL/Parquet {query, response}, or an HH-layout source (rm-static, "
        "hh-rlhf, reference JSONL, hub id, directory) whose best (chosen) responses are learned."
    )
    format: Literal["auto", "pairs", "rm-static", "hh-rlhf", "reference"] = Field(
        "auto", description="Layout of `data`; auto = from the fields of the first row."
    )
    eval_data: str | None = Field(None, description="Held-out pairs; their response NLL is reported each epoch.")
    eval_fraction: float = Field(
        0.0, ge=0.0, lt=1.0, description="Without eval_data: share of the pairs held out (seeded)."
    )
    train: TrainConfig = Field(
        default_factory=_sft_train_defaults,
        description="Optimiser and batching; queries_per_step counts (query, response) pairs. The "
        "RRHF-only keys (loss, reference, shuffle_rewards, candidate_chunk_size) are unused.",
    )
    output_subdir: str = Field("sft", description="Directory under output.dir for the fine-tuned model.")

    @field_validator("train", mode="before")
    @classmethod
    def _over_sft_defaults(cls, value: Any) -> Any:
        # `sft.train.epochs=1` changes one key of the SFT defaults, not of TrainConfig's.
        return {**_sft_train_defaults().model_dump(), **value} if isinstance(value, dict) else value


class RewardModelStageConfig(_Section):
    """Reward-model training before round 1 (`rrhf_ray.reward_model`); its output scores the rounds."""

    data: str = Field(
        description="Preference JSONL/Parquet {query, chosen, rejected}, or an HH-layout source "
        "(rm-static, hh-rlhf, reference JSONL: best vs worst response)."
    )
    format: Literal["auto", "pairs", "rm-static", "hh-rlhf", "reference"] = Field(
        "auto", description="Layout of `data`; auto = from the fields of the first row."
    )
    eval_data: str | None = Field(None, description="Held-out pairs; pairwise accuracy is reported each epoch.")
    eval_fraction: float = Field(
        0.05, ge=0.0, lt=1.0, description="Without eval_data: share of the pairs held out (seeded)."
    )
    base_model: str = Field(
        "", description="Backbone (causal LM or encoder, hub id or directory); empty = model.name_or_path."
    )
    train: TrainConfig = Field(
        default_factory=_reward_model_train_defaults,
        description="Optimiser and batching; queries_per_step counts preference pairs, max_length the "
        "query + response tokens (the query cut from the left). RRHF-only keys are unused.",
    )
    output_subdir: str = Field("reward_model", description="Directory under output.dir for the reward model.")

    @field_validator("train", mode="before")
    @classmethod
    def _over_rm_defaults(cls, value: Any) -> Any:
        return {**_reward_model_train_defaults().model_dump(), **value} if isinstance(value, dict) else value


class RunConfig(_Section):
    """A whole RRHF run: `rounds` of sample → score → rank-train → refresh."""

    rounds: int = Field(3, ge=1)
    model: ModelConfig
    data: DataConfig
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    reward: RewardConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    tracking: TrackingConfig = Field(
        default_factory=TrackingConfig,
        description="Experiment tracking: TensorBoard (on), MLflow and W&B (off); not fingerprinted.",
    )
    sft: SFTStageConfig | None = Field(
        None, description="If set, fine-tune model.name_or_path on these pairs first; RRHF starts from the result."
    )
    reward_model: RewardModelStageConfig | None = Field(
        None, description="If set, train a reward model on these preference pairs first and score with it."
    )

    @model_validator(mode="after")
    def _rounds_and_lengths(self) -> RunConfig:
        preset = self.sampling.preset
        if self.rounds > 1 and not preset.startswith("IP"):
            raise ValueError(
                f"rounds: {self.rounds} with sampling.preset {preset}: {preset} never samples from "
                "ρ* (the last round's model), so each extra round would retrain on a pool drawn "
                "from the same frozen ρ: more epochs, not a setting of the paper; use "
                "sampling.preset IP (IP-n), or rounds: 1")
        prompt, reply = self.data.max_prompt_tokens, self.sampling.max_new_tokens
        if self.train.max_length < prompt + reply + 1:
            raise ValueError(
                f"train.max_length {self.train.max_length} < data.max_prompt_tokens + "
                f"sampling.max_new_tokens + 1 (EOS) = {prompt} + {reply} + 1 = {prompt + reply + 1}: "
                "the trainer would cut the longest prompt (from the left) or reply (from the right) "
                "it samples; raise train.max_length or lower data.max_prompt_tokens / "
                "sampling.max_new_tokens")
        return self


# --------------------------------------------------------------------------- paths


def local_path(value: str | None) -> str | None:
    """An existing local path made absolute (Ray actors and Ray Train workers do not share the
    driver's working directory); hub ids, `builtin:` names and URIs unchanged."""
    if value and "://" not in value and not value.startswith(BUILTIN_PREFIX) and Path(value).exists():
        return str(Path(value).resolve())
    return value


def with_absolute_paths(config: RunConfig) -> RunConfig:
    """The config with every local input path absolute, and output.dir absolute (a URI as it is)."""
    update: dict[str, Any] = {
        "model": config.model.model_copy(update={
            "name_or_path": local_path(config.model.name_or_path),
            "tokenizer": local_path(config.model.tokenizer)}),
        "data": config.data.model_copy(update={"source": local_path(config.data.source)}),
        "reward": config.reward.model_copy(update={"model": local_path(config.reward.model)}),
        "eval": config.eval.model_copy(update={"judge_model": local_path(config.eval.judge_model)}),
        "sampling": config.sampling.model_copy(update={
            "external": [local_path(p) for p in config.sampling.external]}),
        "output": config.output.model_copy(update={"dir": config.output.dir if "://" in config.output.dir
                                                   else str(Path(config.output.dir).resolve())}),
    }
    if config.sft is not None:
        update["sft"] = config.sft.model_copy(update={
            "data": local_path(config.sft.data), "eval_data": local_path(config.sft.eval_data)})
    if config.reward_model is not None:
        update["reward_model"] = config.reward_model.model_copy(update={
            f: local_path(getattr(config.reward_model, f)) for f in ("data", "eval_data", "base_model")})
    return config.model_copy(update=update)


# --------------------------------------------------------------------------- loading

_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` → (["a", "b", "c"], value), the value parsed as YAML (so 3, 1e-4, true, [a, b])."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
    value = yaml.safe_load(raw) if raw.strip() else ""
    # YAML 1.1 reads '1e-4' (no dot) as a string; users mean a number.
    if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        value = float(value)
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each `dotted.key=value` into a nested dict (in place) and return it."""
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if not e["loc"] and e["type"] == "value_error":  # a cross-section rule: its message names the keys
            lines.append(f"  {e['msg'].removeprefix('Value error, ')}")
        elif e["type"] == "extra_forbidden":
            lines.append(f"  {loc}: unknown key")
        elif e["type"] == "missing":
            lines.append(f"  {loc}: required, not set")
        else:
            lines.append(f"  {loc}: {e['msg']} (got {e.get('input')!r})")
    return f"invalid config {origin}:\n" + "\n".join(lines)


def build(model: type[BaseModel], data: dict[str, Any], origin: str) -> Any:
    """Validate `data` as `model`, turning pydantic's errors into one readable ConfigError."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, origin)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config (or defaults when `path` is None) and apply `key=value` overrides."""
    data = read_yaml(path) if path is not None else {}
    apply_overrides(data, list(overrides or []))
    origin = f"in {path}" if path is not None else "(defaults)"
    if overrides:
        origin += f" with overrides {' '.join(overrides)}"
    return build(RunConfig, data, origin)


def dump_config(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
