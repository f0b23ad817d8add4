"""The trainers' settings: `FitConfig` (what every fit reads: the optimiser, batching, LoRA, the
workers) and `TrainConfig`, the RRHF update, which adds the loss (one settings class per loss of
`rrhf_ray.loss.LOSSES`) and what only the ranking trainer reads. The SFT and reward-model stages
take a `FitConfig`, so an RRHF-only key there is an unknown-key error instead of a setting
silently ignored."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from rrhf_ray.config.base import Resources, Section, Switch


class LoraConfig(Section):
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


Pairs = Literal["all", "best_worst", "best_rest"]


def _pairs_field() -> Any:
    # The pairwise losses' `pairs` (rrhf_ray/loss.py, `_select_pairs`); the values are
    # `rrhf_ray.loss.Pairs`, repeated here because the config imports nothing of the project.
    return Field(
        "all", description="The strict pairs (worse i, better j) of a query the loss reads: all "
        "(every pair), best_worst (the worst candidate against the best, one pair; the first index "
        "on tied rewards; none when all rewards tie) or best_rest (the best against every strictly "
        "worse one). SimPO's on-policy recipe is best_worst.")


class RRHFLoss(Section):
    """RRHF, eq. 1-5 (docs/algorithm.md): w_rank · L_rank + L_ft."""

    name: Literal["rrhf"] = "rrhf"
    rank_weight: float = Field(1.0, ge=0.0, description="w_rank; 0 = fine-tune on the best only (= raft).")
    length_penalty: float = Field(1.0, ge=0.0, description="α in p_i = logp / |y_i|^α.")
    sft_reduction: Literal["mean", "sum"] = Field(
        "mean", description="L_ft per token of the best response (mean) or summed (sum, eq. 4 literally).")


class RAFTLoss(Section):
    """RAFT / best-of-k fine-tuning: L_ft of the best candidate only (RRHF with w_rank = 0)."""

    name: Literal["raft"] = "raft"
    length_penalty: float = Field(1.0, ge=0.0, description="α of the reported ranking accuracy only.")
    sft_reduction: Literal["mean", "sum"] = "mean"


class PROLoss(Section):
    """PRO: a listwise softmax over the ranking, reward-gap temperatures, + sft_weight · L_ft."""

    name: Literal["pro"] = "pro"
    sft_weight: float = Field(0.05, ge=0.0)
    length_penalty: float = Field(1.0, ge=0.0)


class SimPOLoss(Section):
    """SimPO over the selected strict pairs: −log σ(β(p_j − p_i) − γ), + sft_weight · L_ft."""

    name: Literal["simpo"] = "simpo"
    beta: float = Field(2.0, gt=0.0)
    gamma: float = Field(1.0, ge=0.0)
    sft_weight: float = Field(0.0, ge=0.0)
    length_penalty: float = Field(1.0, ge=0.0)
    pairs: Pairs = _pairs_field()


class SLiCLoss(Section):
    """SLiC-HF rank calibration: max(0, δ − logp_best + logp_i) over worse i, + sft_weight · L_ft
    (pairs all and best_rest: every strictly worse i, the same loss; best_worst: the worst alone)."""

    name: Literal["slic"] = "slic"
    margin: float = Field(1.0, ge=0.0, description="δ, on sequence log-likelihoods.")
    sft_weight: float = Field(0.5, ge=0.0)
    pairs: Pairs = _pairs_field()


class DPOLoss(Section):
    """DPO over the selected strict pairs: −log σ(β(h_j − h_i)), h = logp − logp_ref, + sft_weight ·
    L_ft. The reference log-probabilities come from `train.reference` (a stage of the workflow)."""

    name: Literal["dpo"] = "dpo"
    beta: float = Field(0.1, gt=0.0)
    sft_weight: float = Field(0.0, ge=0.0)
    pairs: Pairs = _pairs_field()


LossConfig = Annotated[
    RRHFLoss | RAFTLoss | PROLoss | SimPOLoss | SLiCLoss | DPOLoss, Field(discriminator="name")
]
LOSS_CONFIGS: dict[str, type[Section]] = {
    c.model_fields["name"].default: c for c in (RRHFLoss, RAFTLoss, PROLoss, SimPOLoss, SLiCLoss, DPOLoss)
}
"""The loss settings by name: `rrhf_ray.loss.LOSSES` has the same keys."""

_MOVED_TO_LOSS = ("rank_weight", "length_penalty", "sft_reduction")


# --------------------------------------------------------------------------- the trainers


class FitConfig(Section):
    """What every fit reads (RRHF, SFT, reward model: `rrhf_ray.train.loop`): the optimiser
    (paper §4.1), batching, precision, LoRA and the Ray Train workers."""

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
    max_length: int = Field(
        192, ge=8, description="Query + response tokens. RRHF: a longer response is cut from the right "
        "(no EOS) and the query kept (at least max_length // 2 of it); SFT / reward model: the query "
        "is cut from the left.")
    bf16: bool | None = Field(
        None, description="bf16 autocast over float32 master weights (the trainer always loads and "
        "updates float32 weights; model.dtype does not apply to it); null = on when training on GPU.")
    gradient_checkpointing: bool = False
    lora: LoraConfig = Field(default_factory=LoraConfig)
    strategy: Literal["ddp", "fsdp"] = Field("ddp", description="fsdp needs GPUs.")
    num_workers: int = Field(1, ge=1, description="Ray Train workers.")
    use_gpu: bool = False
    cpus_per_worker: int = Field(1, ge=1)
    resources: Resources = Field(
        default_factory=dict, description="Ray custom resources each Ray Train worker asks for "
        "({name: amount}; docs/cluster.md, Placement).")
    seed: int = 0
    log_every: int = Field(10, ge=1, description="Log training metrics every this many optimizer steps.")
    checkpoint_every_epoch: bool = Field(
        True, description="Report a resumable checkpoint after each epoch (else only at the end)."
    )
    packing: Switch = Field(
        "off", description="SFT: pack a micro-batch's pairs into rows of up to max_length tokens, each "
        "attending only to itself with positions restarting per pair, and compute only the logits "
        "that predict a response token (the same loss and gradients as padded rows; "
        "rrhf_ray.train.prefix.packed_nll_sum). auto = where the model supports the packed "
        "attention (as train.prefix_sharing); off = one padded row per pair. The RRHF update and "
        "the reward model ignore it.")
    prefix_attention: Literal["auto", "sdpa", "flex"] = Field(
        "auto", description="The attention kernel of the packed rows (train.prefix_sharing, SFT "
        "packing): flex = PyTorch's FlexAttention with one block mask per forward (a fused kernel "
        "that skips the masked blocks, compiled on CUDA); sdpa = SDPA once over each prompt and once "
        "per response (SFT packing: a dense block-diagonal mask); auto = flex when training on GPU, "
        "sdpa elsewhere. The same log-probs and gradients either way up to float rounding, so not "
        "part of the run's fingerprint. flex needs use_gpu: FlexAttention has no backward on CPU.")
    # Added later: off, it is left out of the run's fingerprint (rrhf_ray.state.ADDED_LATER).
    skip_nonfinite: bool = Field(
        False,
        description="An optimizer step whose loss or gradient is not finite: skipped (not "
        "applied, counted as `nonfinite_steps_skipped`) instead of stopping the fit naming the step "
        "(docs/faults.md).")

    @model_validator(mode="after")
    def _batching(self) -> FitConfig:
        if self.strategy == "fsdp" and not self.use_gpu:
            raise ValueError("train.strategy 'fsdp' needs train.use_gpu: true (FSDP runs on GPUs only)")
        if self.prefix_attention == "flex" and not self.use_gpu:
            raise ValueError("train.prefix_attention 'flex' needs train.use_gpu: true (PyTorch's "
                             "FlexAttention has no backward on CPU); use auto or sdpa")
        if self.micro_batch_queries * self.num_workers > self.queries_per_step:
            raise ValueError(
                f"train.queries_per_step ({self.queries_per_step}) is smaller than "
                f"train.micro_batch_queries × train.num_workers "
                f"({self.micro_batch_queries} × {self.num_workers})"
            )
        return self


class TrainConfig(FitConfig):
    """The RRHF update (`rrhf_ray.train.rrhf`): a fit plus the loss (docs/algorithm.md, eq. 1-5)
    and what only the ranking trainer reads (candidate chunks, token budgets, prefix sharing,
    truncated candidates, DPO's reference, the shuffled-reward control)."""

    round_timeout_s: float | None = Field(
        None, gt=0, description="Seconds the driver waits for a round's training (the warm trainer's "
        "worker group: loading the pool, the epochs, saving and reporting the checkpoint) before the "
        "stage fails naming the worker group. null = derived from the work: 10× the longest earlier "
        "round's training in the run, at least 300 s (7,200 s for the first, which also starts the "
        "group). Not part of the run's fingerprint: raise it and resume.")
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
    prefix_sharing: Switch = Field(
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

