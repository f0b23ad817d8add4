"""What a fit receives from the driver: a job, one pydantic model that crosses the driver →
worker boundary as a dict (`train_loop_config["job"]`). `FitJob` is what every fit needs; each
trainer's job adds its data (`rrhf_ray.train.rrhf.TrainJob`, `PairJob` for SFT and the reward
model, `rrhf_ray.train.warm.WarmJob`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from rrhf_ray.config import FitConfig
from rrhf_ray.data.pairs import PairFormat
from rrhf_ray.data.queries import hold_out

T = TypeVar("T")


class FitJob(BaseModel):
    """What every fit needs (RRHF, SFT, reward model): the model to start from, where the trained
    one goes, and the fit's settings."""

    model_config = ConfigDict(extra="forbid")

    model_path: str = Field(description="HF directory or hub id of the model to start from.")
    output_dir: str = Field(description="Where the trained HF model (safetensors) is written.")
    train: FitConfig = Field(default_factory=FitConfig)
    tokenizer_path: str | None = None
    trust_remote_code: bool = False
    resume_from: str | None = Field(None, description="A checkpoint of an interrupted fit (no Ray).")
    log_dir: str | None = Field(None, description="Where Ray Train workers write their stdout and "
                                "stderr (`rrhf_ray.logs.redirect_process_output`); None: Ray's logs.")
    save_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="The dtype of the saved weights (the samplers' dtype); None: the model's (fp32).")


class PairJob(FitJob):
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
