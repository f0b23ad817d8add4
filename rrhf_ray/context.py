"""The run context: everything one run's rounds read, built once by `rrhf_ray.workflow.setup`.

Every round stage is a function of `(ctx, r)` (`rrhf_ray.stages`); it finds its inputs and its
output paths here, so the loop that calls the stages names nothing but the stages. Runtime
handles (the store of a run on object storage, the engine cache of `rrhf-ray compare`) are
fields of the context, never module state.

Layout of the output directory (`out`):
    state.json  metrics.jsonl  summary.md  report.png  logs/
    base/                    the built base model (builtin models only), sft/ reward_model/ stages
    rounds/<r>/candidates.jsonl  pool.parquet  pool.jsonl  checkpoint/  metrics.json  eval.jsonl
               pool_ref.parquet  (DPO only: the pool with each candidate's reference log-prob,
                                  stage round<r>/reference between score and train)
    rounds/<r>/seg<i>/candidates.jsonl  pool.parquet  pool.jsonl  pool_kl.parquet  checkpoint/
               train_history.jsonl   (sampling.preset OP: pass r's segment i, stages
                                      round<r>/seg<i>/sample, score, kl, train, refresh; round r's
                                      metrics.json and eval.jsonl stay in rounds/<r>/)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rrhf_ray.config import RewardConfig, RunConfig
from rrhf_ray.state import RunState, timed_stage

if TYPE_CHECKING:
    from rrhf_ray.actors.pools import EngineCache
    from rrhf_ray.actors.sampler import SamplerPool
    from rrhf_ray.actors.scorer import RewardPool
    from rrhf_ray.data.candidates import Preset
    from rrhf_ray.data.queries import LoadedData, QueryRecord
    from rrhf_ray.mirror import RunStore
    from rrhf_ray.segments import Segment
    from rrhf_ray.tracking import Tracker
    from rrhf_ray.train.warm import WarmTrainer

# What each round stage writes: a stage is done when state.json names it and these exist.
STAGE_OUTPUTS: dict[str, tuple[str, ...]] = {
    "sample": ("candidates.jsonl",),
    "score": ("pool.parquet", "pool.jsonl"),
    "reference": ("pool_ref.parquet",),
    "train": ("checkpoint",),
    "refresh": (),
    "eval": ("eval.jsonl",),
}

# What each stage of an online segment writes (sampling.preset OP; `rrhf_ray.online`): a round's
# files, and the KL stage's pool between score and train.
SEGMENT_OUTPUTS: dict[str, tuple[str, ...]] = {
    stage: ("pool_kl.parquet",) if stage == "kl" else STAGE_OUTPUTS[stage]
    for stage in ("sample", "score", "kl", "train", "refresh")}


@dataclass
class RunData:
    """The run's queries: the training records (with their data-set responses) and queries, the
    held-out queries, and the held-out (query, reference response) pairs for the perplexity."""

    train: list[QueryRecord]
    queries: list[str]
    eval_queries: list[str]
    references: list[tuple[str, str]]

    @classmethod
    def of(cls, loaded: LoadedData) -> RunData:
        """The run's queries from a data set as `rrhf_ray.data.queries.load_data` returns it."""
        return cls(train=loaded.train, queries=[r.query for r in loaded.train],
                   eval_queries=[r.query for r in loaded.eval],
                   references=[(r.query, r.responses[0]) for r in loaded.eval if r.responses])


@dataclass
class RunContext:
    """One run: its config and output directory, and what `setup` built for its rounds."""

    config: RunConfig  # local paths absolute; for a bucket run, output.dir is the local mirror
    state: RunState
    preset: Preset
    external: list[dict]  # `sampling.external` files, read by the preflight
    tracker: Tracker
    store: RunStore | None = None  # the bucket mirror of a run on object storage
    log_dir: str | None = None  # the run's logs/, where the actors and trainers write their output
    engines: EngineCache | None = None  # engines shared with the previous / next run of this process
    rho: str = ""  # ρ: the model the rounds start from (after SFT)
    reward: RewardConfig | None = None  # pointing at the trained reward model when there is one
    tokenizer: Any = None
    data: RunData | None = None
    pools: dict[str, SamplerPool] = field(default_factory=dict)
    rewards: RewardPool | None = None
    trainer: WarmTrainer | None = None  # None when every round is trained already
    judge: str = ""  # the fixed model whose perplexity of the greedy replies is reported
    served_dtype: str = "bfloat16"  # the samplers' weights dtype (the trainer saves checkpoints in it)
    last_trained: int = 0  # the last round whose checkpoint existed when the run (re)started
    round0: tuple[list[float], list[list[float]]] | None = None  # round 0's eval, for comparisons
    segments: list[Segment] = field(default_factory=list)  # sampling.preset OP: the run's segments

    @property
    def out(self) -> Path:
        return Path(self.config.output.dir)

    def round_dir(self, r: int) -> Path:
        return self.out / "rounds" / str(r)

    def checkpoint(self, r: int) -> Path:
        """Round r's checkpoint; with segments (sampling.preset OP), that of pass r's last segment."""
        if self.segments:
            return self.segment_dir([s for s in self.segments if s.round == r][-1]) / "checkpoint"
        return self.round_dir(r) / "checkpoint"

    def policy(self, r: int) -> str:
        """The policy round r ends with: ρ for round 0, round r's checkpoint after it."""
        return str(self.checkpoint(r)) if r > 0 else self.rho

    def version_policy(self, version: int) -> str:
        """Policy version `version` (what the samplers' `policy@<version>` tags name): ρ for 0,
        else round `version`'s, or with segments segment number `version`'s checkpoint."""
        if self.segments and version > 0:
            return str(self.segment_dir(self.segments[version - 1]) / "checkpoint")
        return self.policy(version)

    def sampler_version(self, seg: Segment) -> int:
        """The policy version that samples `seg` (`rrhf_ray.segments.sampler_version`)."""
        from rrhf_ray.segments import sampler_version

        return sampler_version(seg.number, self.config.online.max_staleness)

    def segment_dir(self, seg: Segment) -> Path:
        return self.round_dir(seg.round) / f"seg{seg.index}"

    def segment_outputs(self, seg: Segment, stage: str) -> list[Path]:
        return [self.segment_dir(seg) / name for name in SEGMENT_OUTPUTS[stage]]

    def segment_done(self, seg: Segment, stage: str) -> bool:
        return self.state.done(f"{seg.name}/{stage}", *self.segment_outputs(seg, stage))

    def run_segment_stage(self, seg: Segment, stage: str, work: Callable[[RunContext, Segment], dict]) -> bool:
        """`work(self, seg)` as stage <seg.name>/<stage>, timed and recorded, unless it is done."""
        self.segment_dir(seg).mkdir(parents=True, exist_ok=True)
        return timed_stage(self.state, f"{seg.name}/{stage}", self.segment_outputs(seg, stage), work, self, seg)

    def outputs(self, r: int, stage: str) -> list[Path]:
        return [self.round_dir(r) / name for name in STAGE_OUTPUTS[stage]]

    def done(self, r: int, stage: str) -> bool:
        return self.state.done(f"round{r}/{stage}", *self.outputs(r, stage))

    def hand_off(self, path: str | Path) -> str:
        """`path` as another process should get it (`rrhf_ray.mirror.hand_off` with this run's store)."""
        from rrhf_ray.mirror import hand_off

        return hand_off(path, self.store)

    def run_stage(self, r: int, stage: str, work: Callable[[RunContext, int], dict]) -> bool:
        """`work(self, r)` as stage round<r>/<stage>, timed and recorded, unless it is done."""
        self.round_dir(r).mkdir(parents=True, exist_ok=True)
        return timed_stage(self.state, f"round{r}/{stage}", self.outputs(r, stage), work, self, r)
