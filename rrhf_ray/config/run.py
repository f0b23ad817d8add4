"""The run config's sections, one pydantic model per component, composed into `RunConfig`, and
the paths the driver makes absolute before it hands the config to Ray actors and workers. The
trainers' settings (`TrainConfig`, `FitConfig`, the losses) are `rrhf_ray.config.training`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from rrhf_ray.config.base import Resources, Section, Switch
from rrhf_ray.config.training import FitConfig, TrainConfig

BUILTIN_PREFIX = "builtin:"  # a name `rrhf_ray.registry` resolves, never a path

# The turn markers a reply must not run into (the HH dialogue format, the paper's evaluation cut
# "at the next Human: / Assistant: turn"). The blank-line forms are the format's own; the
# single-newline forms also catch a turn the policy opens after one newline (and, being their
# suffixes, the blank-line forms too: the cut then keeps one more "\n", which is whitespace).
DEFAULT_STOP = ("\n\nHuman:", "\n\nAssistant:", "\nHuman:", "\nAssistant:")


class ModelConfig(Section):
    """The policy ρ that round 1 starts from."""

    name_or_path: str = Field(
        min_length=1,
        description="HF hub id, local directory of an AutoModelForCausalLM (ρ), or builtin:<name>.",
    )
    tokenizer: str | None = Field(None, description="Tokenizer id or path; default: the model's.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Weights dtype of the models loaded for inference: the evaluation's perplexities "
        "and held-out ranking accuracy, DPO's reference log-probabilities; auto = float32 on CPU, "
        "bfloat16 on GPU. The trainer always keeps float32 master weights (bf16 autocast: "
        "train.bf16); the samplers load sampling.dtype.",
    )
    trust_remote_code: bool = Field(
        False, description="Allow model code from the hub. Off: only code shipped with transformers runs."
    )


class DataConfig(Section):
    """Where the queries (and the data set's own responses) come from (`rrhf_ray.data.queries`)."""

    source: str = Field(
        min_length=1,
        description="Data set: hub id (load_dataset), local .jsonl/.parquet file, a directory "
        "(data files, or one written by save_to_disk), or 'builtin:<name>'.",
    )
    format: Literal["auto", "rm-static", "hh-rlhf", "reference", "prompts", "prompt-only", "prompt-completion",
                    "preference", "implicit-preference", "messages"] = Field(
        "auto",
        description="Row layout: rm-static (prompt, chosen, rejected), hh-rlhf (chosen, rejected as "
        "whole dialogues), reference (query, responses, scores), prompts (query); TRL's prompt-only "
        "(prompt), prompt-completion, preference (prompt, chosen, rejected), implicit-preference "
        "(chosen, rejected conversations), messages: strings or lists of {role, content} messages "
        "(docs/chat.md); auto = from the fields.",
    )
    chat_template: Switch = Field(
        "auto",
        description="Render prompts with the policy tokenizer's chat template "
        "(apply_chat_template, add_generation_prompt): auto = conversations when the tokenizer has "
        "a template (else they are written as raw '\\n\\nHuman:' text), on = every query (raw "
        "text as one user turn; a tokenizer without a template is an error), off = never.",
    )
    chat_template_path: str | None = Field(
        None,
        description="A Jinja chat template file that replaces the policy tokenizer's own wherever a "
        "prompt is rendered (sampler engines, trainer, evaluation, SFT): the run saves the tokenizer "
        "with it to <output.dir>/tokenizer and uses that as model.tokenizer, so its fingerprint (and "
        "whether recorded prompt ids are reused) follows the file's content (docs/chat.md). "
        "chat_template auto / on then render with it; off is an error.",
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
        "the left at a '\\n\\nHuman:' turn (a conversation: at a user turn, its system message "
        "kept); prompts that cannot be cut to fit are dropped. "
        "Default 63: with sampling.max_new_tokens 128 and the EOS, the paper's 192 tokens "
        "(train.max_length) hold the longest prompt and reply whole.",
    )
    max_response_tokens: int | None = Field(
        None, ge=1,
        description="Cap the data set's own responses of the training queries (HH chosen/rejected, "
        "the reference format's responses: the D candidates) at this many policy tokens when they "
        "load, cut from the right and marked cut off (no EOS). null: no cap (the trainer then cuts "
        "a response that does not fit train.max_length, its prompt kept at max_length // 2 at least).",
    )
    seed: int = Field(0, description="Shuffling and split seed.")

    @model_validator(mode="after")
    def _template_used(self) -> DataConfig:
        if self.chat_template_path and self.chat_template == "off":
            raise ValueError("data.chat_template is off but data.chat_template_path is set: the template "
                             "would never render a prompt; use auto or on, or drop chat_template_path")
        return self



class SamplingConfig(Section):
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
    chunk_timeout_s: float | None = Field(
        None, gt=0, description="Seconds a replica may spend on one request (chunk_prompts queries) "
        "before it counts as hung: it is killed (Ray restarts it), its chunks go to the other replicas, "
        "and the call fails naming it when none is left. null = derived from the work: 10× the slowest "
        "pace of the call's finished chunks, at least 300 s (1,800 s before the first chunk ends).")
    refresh_timeout_s: float | None = Field(
        None, gt=0, description="Seconds a round's refresh may take (every replica loading the round's "
        "weights, then answering the refresh probe) before the stage fails naming the replicas that did "
        "not answer. null = derived from the work: 10× the longest earlier refresh of the run, at least "
        "300 s (7,200 s for the first). Not part of the run's fingerprint: raise it and resume.")
    resources: Resources = Field(
        default_factory=dict, description="Ray custom resources each replica asks for beside its CPUs / "
        "GPUs ({name: amount}): it runs only on a node that declares them (docs/cluster.md, Placement).")
    refresh_tolerance: float | None = Field(
        None, gt=0,
        description="After each weight refresh every replica's log-probs of a probe (the best and "
        "the worst reply of a few of the round's queries) must be within this many nats per token "
        "(mean absolute difference) of the trainer's, and nearer the new weights than the round's "
        "starting ones; a replica serving old or half-loaded weights fails the round. None: set "
        "from the served dtype (rrhf_ray/refresh.py DTYPE_TOLERANCE).")
    refresh_transport: Literal["disk", "memory"] = Field(
        "disk",
        description="How each round's weights reach the samplers: disk = every replica reloads the "
        "round's checkpoint directory (or downloads the bucket's copy to its node); memory = the driver "
        "reads the checkpoint it installed once, puts the state dict (in the served dtype) in Ray's "
        "object store and every replica loads it from there in place. The checkpoint is written either "
        "way (resume reads it) and the refresh probe checks both alike; docs/training.md says which "
        "is faster when.")
    preset: str = Field(
        "IP", description="Candidate sources (docs/algorithm.md, sampling policies): BP, DP, D, P, IP / IP-n, "
        "or OP (online: sampled by the current π, refreshed every online.refresh_every optimizer steps)."
    )
    external: list[str] = Field(
        default_factory=list,
        description="JSONL files of extra responses {query, responses, source} joining each group.",
    )

    @model_validator(mode="after")
    def _preset_known(self) -> SamplingConfig:
        if not re.fullmatch(r"BP|DP|D|P|OP|IP(-[1-9]\d*)?", self.preset):
            raise ValueError(f"sampling.preset {self.preset!r} is not one of BP, DP, D, P, IP, IP-n, OP")
        return self


class OnlineConfig(Section):
    """The paper's online policy OP-k (`sampling.preset: OP`; docs/algorithm.md, "Online sampling"):
    the query set is streamed in segments of refresh_every × train.queries_per_step queries, each
    sampled by the current weights, scored, trained for refresh_every optimizer steps and loaded
    into the samplers before the next one; `rounds` is the number of passes over the query set.
    One AdamW and one LR schedule run over every segment of the run (IP starts a fresh one each
    round). Only sampling.preset OP reads this section."""

    refresh_every: int = Field(
        1, ge=1, description="k of OP-k: optimizer steps between two refreshes of the samplers (a "
        "segment samples k × train.queries_per_step queries; the query set's last one may be shorter).")
    kl_coef: float = Field(
        0.0, ge=0.0, description="β of the KL penalty to ρ (the initial / SFT model); 0 = off (the KL is "
        "still measured and reported). The paper's OP-32 hacks the reward without it.")
    kl_estimator: Literal["k1", "k3"] = Field(
        "k1", description="Per candidate, over its response tokens: k1 = Σ_t (log π − log π_ref); "
        "k3 = Σ_t (ρ_t − 1) − log ρ_t with ρ_t = π_ref / π (non-negative, lower variance). π = the "
        "weights that sampled the segment.")
    kl_in: Literal["reward", "loss"] = Field(
        "reward", description="reward = rank by score − β·KL (the paper's OP setting); loss = rank by "
        "the score and add β · the mean over each query's candidates of ½ (Σ log π − Σ log π_ref)², "
        "π the policy being trained, to the query's loss: on sampled responses its gradient is the "
        "KL's (rrhf_ray/train/rrhf.py, with_kl_term). kl_estimator then only names the KL reported.")
    max_staleness: Literal[0, 1] = Field(
        0, description="0 = each segment is sampled by the weights the segment before it trained; 1 = "
        "one-step overlap: segment s+1 is sampled by segment s−1's weights while segment s trains, so "
        "every candidate is at most one policy version behind the weights it trains (its `versions` in "
        "the pool say which). Overlaps the sampler and the trainer; on a machine whose cores both "
        "already use it is not faster (docs/algorithm.md, \"One-step overlap\").")


class RewardConfig(Section):
    """Where the rewards r_i come from: a reward model or a rule function."""

    kind: Literal["model", "rule"] = "rule"
    model: str | None = Field(None, description="AutoModelForSequenceClassification path (kind=model).")
    rule: str | None = Field(
        None, description="`package.module:function(queries, responses)`, `path/to/file.py:function` "
        "(relative to the working directory) or builtin:<name> (kind=rule).",
    )
    num_workers: int = Field(1, ge=1)
    batch_size: int = Field(16, ge=1)
    max_length: int = Field(512, ge=8)
    chat_template: Switch = Field(
        "auto",
        description="A conversation's query and reply rendered by the reward model's own chat "
        "template (kind=model): auto = when its tokenizer has one, on = required, off = as the "
        "paper's raw '\\n\\nHuman:' text. Raw-text queries are read as they always were.",
    )
    chat_template_path: str | None = Field(
        None,
        description="A Jinja chat template file that replaces the reward model's own (kind=model) "
        "for rendering (conversation + reply); chat_template auto / on then render with it, off is "
        "an error (docs/chat.md).",
    )
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
    chunk_timeout_s: float | None = Field(
        None, gt=0, description="Seconds a reward actor (or rule task) may spend on one request before "
        "it counts as hung: an actor is killed and its chunks rescored by the others; a rule task is "
        "cancelled and the stage fails naming it. null = derived as sampling.chunk_timeout_s.")
    resources: Resources = Field(
        default_factory=dict, description="Ray custom resources each reward actor (or rule task) asks "
        "for ({name: amount}; docs/cluster.md, Placement).")


    @model_validator(mode="after")
    def _source_named(self) -> RewardConfig:
        if self.kind == "model" and not self.model:
            raise ValueError("reward.kind is 'model' but reward.model is not set")
        if self.kind == "rule" and not self.rule:
            raise ValueError("reward.kind is 'rule' but reward.rule is not set")
        if self.chat_template_path and self.kind == "rule":
            raise ValueError("reward.chat_template_path is set but reward.kind is 'rule': a rule reads a "
                             "conversation as raw text, no template renders it; drop chat_template_path")
        if self.chat_template_path and self.chat_template == "off":
            raise ValueError("reward.chat_template is off but reward.chat_template_path is set: the "
                             "template would never render a conversation; use auto or on, or drop "
                             "chat_template_path")
        return self


class EvalConfig(Section):
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
    task_timeout_s: float | None = Field(
        None, gt=0, description="Seconds the driver waits for a round's evaluation tasks (reference "
        "and judge perplexity, held-out ranking) once its sampling and scoring are done; past it they "
        "are cancelled and the stage fails naming them. null = derived from the work: 10× the longest "
        "earlier evaluation of the run, at least 300 s (7,200 s for round 0's). Not part of the run's "
        "fingerprint: raise it and resume.")
    resources: Resources = Field(
        default_factory=dict, description="Ray custom resources of the driver's model tasks: the "
        "evaluation's perplexity and ranking tasks and DPO's reference log-probabilities "
        "({name: amount}; docs/cluster.md, Placement).")


class RayConfig(Section):
    address: str | None = Field(
        None, description="Ray cluster to join ('auto', 'ray://…'); null = RAY_ADDRESS or a new local one."
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a locally started cluster.")


class OutputConfig(Section):
    dir: str = Field("outputs/run", description="Where rounds, checkpoints and metrics are written.")
    storage_path: str | None = Field(
        None, description="Ray Train storage (shared on multi-node clusters); default <dir>/ray_train."
    )


# --------------------------------------------------------------------------- experiment tracking
# `rrhf_ray.tracking` writes to these; none of it is part of the run's fingerprint (tracking may be
# turned on or changed when a run resumes).


class MLflowTrackingConfig(Section):
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


class TensorBoardTrackingConfig(Section):
    """TensorBoard event files, written with tensorboardX (installed with Ray Train): on by default."""

    enabled: bool = True
    log_dir: str | None = Field(None, description="Event file directory; null = <output.dir>/tensorboard.")


class WandbTrackingConfig(Section):
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


class TrackingConfig(Section):
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


class PairStageConfig(Section):
    """What the stages before round 1 share: pairs to learn from, held-out pairs, the fit settings
    (`FitConfig`: no RRHF-only key) and where the model goes. A stage's `train` keys override
    that stage's own defaults (`TRAIN_DEFAULTS`), not FitConfig's: `sft.train.epochs=1` changes one
    key of the SFT defaults."""

    TRAIN_DEFAULTS: ClassVar[dict[str, Any]] = {}

    format: Literal["auto", "pairs", "rm-static", "hh-rlhf", "reference", "prompt-completion", "preference",
                    "implicit-preference", "messages"] = Field(
        "auto", description="Layout of `data`; auto = from the fields of the first row."
    )

    @classmethod
    def default_train(cls) -> FitConfig:
        return FitConfig(**cls.TRAIN_DEFAULTS)

    @field_validator("train", mode="before", check_fields=False)
    @classmethod
    def _over_stage_defaults(cls, value: Any) -> Any:
        return {**cls.default_train().model_dump(), **value} if isinstance(value, dict) else value


def _held_out_share(default: float) -> Any:
    return Field(default, ge=0.0, lt=1.0, description="Without eval_data: share of the pairs held out (seeded).")


class SFTStageConfig(PairStageConfig):
    """Supervised fine-tuning of ρ before round 1 (`rrhf_ray.train.sft`); its output becomes ρ."""

    # Alpaca-style SFT: 3 epochs, lr 2e-5, warm-up 3 % then cosine, 128 pairs a step.
    TRAIN_DEFAULTS: ClassVar[dict[str, Any]] = {
        "epochs": 3, "lr": 2e-5, "queries_per_step": 128, "micro_batch_queries": 4, "max_length": 512,
        "packing": "auto"}  # pairs packed into rows without padding where the model supports it

    data: str = Field(
        description="Pairs JSONL/Parquet {query, response}, or an HH-layout source (rm-static, "
        "hh-rlhf, reference JSONL, hub id, directory) whose best (chosen) responses are learned."
    )
    eval_data: str | None = Field(None, description="Held-out pairs; their response NLL is reported each epoch.")
    eval_fraction: float = _held_out_share(0.0)
    train: FitConfig = Field(
        default_factory=lambda: SFTStageConfig.default_train(),
        description="Optimiser and batching; queries_per_step counts (query, response) pairs.",
    )
    output_subdir: str = Field("sft", description="Directory under output.dir for the fine-tuned model.")


class RewardModelStageConfig(PairStageConfig):
    """Reward-model training before round 1 (`rrhf_ray.train.reward_model`); its output scores the
    rounds."""

    # InstructGPT-style reward model: one epoch (more overfits), lr 1e-5, 64 pairs a step.
    TRAIN_DEFAULTS: ClassVar[dict[str, Any]] = {
        "epochs": 1, "lr": 1e-5, "queries_per_step": 64, "micro_batch_queries": 4, "max_length": 512}

    data: str = Field(
        description="Preference JSONL/Parquet {query, chosen, rejected}, or an HH-layout source "
        "(rm-static, hh-rlhf, reference JSONL: best vs worst response)."
    )
    eval_data: str | None = Field(None, description="Held-out pairs; pairwise accuracy is reported each epoch.")
    eval_fraction: float = _held_out_share(0.05)
    base_model: str = Field(
        "", description="Backbone (causal LM or encoder, hub id or directory); empty = model.name_or_path."
    )
    train: FitConfig = Field(
        default_factory=lambda: RewardModelStageConfig.default_train(),
        description="Optimiser and batching; queries_per_step counts preference pairs, max_length the "
        "query + response tokens (the query cut from the left).",
    )
    output_subdir: str = Field("reward_model", description="Directory under output.dir for the reward model.")


class RunConfig(Section):
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
    online: OnlineConfig | None = Field(
        None, description="The online policy's settings (sampling.preset OP only; null there = the defaults)."
    )

    @model_validator(mode="after")
    def _online_only_under_op(self) -> RunConfig:
        preset = self.sampling.preset
        if preset != "OP":
            if self.online is not None:
                given = sorted(self.online.model_fields_set) or ["refresh_every"]
                raise ValueError(
                    f"online.{given[0]}: sampling.preset is {preset}, and only sampling.preset OP "
                    "(online sampling) reads the online section; remove it, or set sampling.preset: OP")
            return self
        if self.online is None:
            self.online = OnlineConfig()
        if self.train.epochs != 1:
            raise ValueError(
                f"train.epochs: {self.train.epochs} with sampling.preset OP: a segment's pool is trained "
                "once (online.refresh_every optimizer steps, then the samplers refresh); set train.epochs: 1")
        if self.train.lora.enabled:
            raise ValueError("train.lora.enabled: LoRA with sampling.preset OP is not supported (the adapters "
                             "are merged and replaced each round, the online policy keeps one optimizer)")
        if self.train.loss.name == "dpo":
            raise ValueError("train.loss.name: dpo with sampling.preset OP is not supported (its reference "
                             "stage runs per round); use rrhf or another ranking loss")
        return self

    @model_validator(mode="after")
    def _rounds_and_lengths(self) -> RunConfig:
        preset = self.sampling.preset
        if self.rounds > 1 and not (preset.startswith("IP") or preset == "OP"):
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


def absolute_path(value: str | None) -> str | None:
    """An existing local path made absolute (Ray actors and Ray Train workers do not share the
    driver's working directory); hub ids, `builtin:` names and URIs unchanged."""
    if value and "://" not in value and not value.startswith(BUILTIN_PREFIX) and Path(value).exists():
        return str(Path(value).resolve())
    return value


def absolute_rule(rule: str | None) -> str | None:
    """A rule `path/to/file.py:function` with its file made absolute (`absolute_path`)."""
    if rule and not rule.startswith(BUILTIN_PREFIX):
        path, sep, fn = rule.rpartition(":")
        if sep and path.endswith(".py"):
            return f"{absolute_path(path)}:{fn}"
    return rule


def with_absolute_paths(config: RunConfig) -> RunConfig:
    """The config with every local input path absolute, and output.dir absolute (a URI as it is)."""
    update: dict[str, Any] = {
        "model": config.model.model_copy(update={
            "name_or_path": absolute_path(config.model.name_or_path),
            "tokenizer": absolute_path(config.model.tokenizer)}),
        "data": config.data.model_copy(update={"source": absolute_path(config.data.source),
                                               "chat_template_path": absolute_path(config.data.chat_template_path)}),
        "reward": config.reward.model_copy(update={"model": absolute_path(config.reward.model),
                                                   "rule": absolute_rule(config.reward.rule),
                                                   "chat_template_path": absolute_path(
                                                       config.reward.chat_template_path)}),
        "eval": config.eval.model_copy(update={"judge_model": absolute_path(config.eval.judge_model)}),
        "sampling": config.sampling.model_copy(update={
            "external": [absolute_path(p) for p in config.sampling.external]}),
        "output": config.output.model_copy(update={"dir": config.output.dir if "://" in config.output.dir
                                                   else str(Path(config.output.dir).resolve())}),
    }
    if config.sft is not None:
        update["sft"] = config.sft.model_copy(update={
            "data": absolute_path(config.sft.data), "eval_data": absolute_path(config.sft.eval_data)})
    if config.reward_model is not None:
        update["reward_model"] = config.reward_model.model_copy(update={
            f: absolute_path(getattr(config.reward_model, f)) for f in ("data", "eval_data", "base_model")})
    return config.model_copy(update=update)
