"""DPO's reference log-probabilities: Σ log π_ref of every candidate of a round's pool, computed
once by the frozen reference policy and stored with the pool (`QueryGroup.ref_logprobs`).

The reference is `train.reference`: `initial` = ρ (the base model, or the SFT model when an SFT
stage runs) in every round; `previous_round` = ρ*, the model the round starts from. The workflow
runs this as the stage `round<r>/reference` between score and train, only when
`train.loss.name` is `dpo`; it writes `rounds/<r>/pool_ref.parquet` (the scored pool, unchanged,
with `ref_logprobs` added; `pool.parquet` stays as the scorer wrote it) and the trainer reads that
file. A resumed run finds the stage finished and does not recompute it.

The same tokens as the trainer, so h = logp − logp_ref is exact: the trainer's `Encoder`
(`train.max_length`, `train.truncated`) with the tokenizer the trainer loads (the starting
model's), the trainer's forward (`encoded_logprobs`: prompt-shared where `train.prefix_sharing`
allows it, the same candidate chunks) and its autocast rule (bf16 on a GPU unless `train.bf16` says
otherwise). The reference model's weights are loaded in `model.dtype` (`dtype`: auto = float32
on a CPU, where h at the first step is then exactly 0, bfloat16 on a GPU). At the first step of a round that starts from the reference model, h = 0 and each
strict pair's DPO loss is log 2. A candidate the trainer leaves out (`train.truncated: drop`) gets
None.

As a Ray task (1 CPU, and a GPU when the cluster has one) when Ray is connected, else in this
process.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rrhf_ray.config import TrainConfig
from rrhf_ray.train.encoding import EncodedGroup, Encoder, end_token_ids
from rrhf_ray.train.prefix import PackedQueries, candidate_token_logprobs
from rrhf_ray.train.rrhf import encoded_logprobs, use_prefix_sharing
from rrhf_ray.train.worker import bf16_autocast, inference_dtype, load_tokenizer
from rrhf_ray.types import QueryGroup, write_groups

if TYPE_CHECKING:
    from rrhf_ray.mirror import RunStore

logger = logging.getLogger(__name__)


def reference_logprobs(ref_model: str, groups: Sequence[QueryGroup], cfg: TrainConfig, *,
                       tokenizer_path: str | None = None, trust_remote_code: bool = False,
                       dtype: str = "auto", per_token: bool = False) -> list[list[Any]]:
    """Σ log π_ref(y_i | x) of every candidate of `groups` under the model at `ref_model` (its
    weights in `dtype`, `model.dtype`), over the tokens the trainer (`cfg`, tokenizer at
    `tokenizer_path`, default the model's) scores; one list per group, None for a candidate the
    trainer leaves out. `per_token`: each candidate's per-token log-probabilities instead of their
    sum (`candidate_token_logprobs`, the padded forward: the online policy's KL estimators)."""
    from transformers import AutoModelForCausalLM

    from rrhf_ray.remote import materialize

    # URIs (output.dir on object storage): the models from this node's cache, downloaded once.
    ref_model = materialize(ref_model)
    tokenizer_path = materialize(tokenizer_path) if tokenizer_path else None
    tokenizer = load_tokenizer(tokenizer_path or ref_model, trust_remote_code)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(
        ref_model, dtype=inference_dtype(dtype, device), trust_remote_code=trust_remote_code,
        use_safetensors=True,
    ).to(device).eval()
    autocast = functools.partial(bf16_autocast, cfg, device)

    encoder = Encoder(tokenizer, cfg.max_length, cfg.truncated, ends=end_token_ids(model))
    encoded = [encoder(g) for g in groups]
    present = [e for e in encoded if e is not None]
    if per_token:
        values = iter(_token_logprobs(model, present, cfg.micro_batch_queries, autocast))
    else:
        values = iter(encoded_logprobs(model, present, cfg, use_prefix_sharing(model, cfg.prefix_sharing),
                                       autocast))
    out: list[list[Any]] = []
    for g, e in zip(groups, encoded):
        refs: list[Any] = [None] * g.k
        if e is not None:
            for i, v in zip(e.kept or range(g.k), next(values)):
                refs[i] = v
        out.append(refs)
    return out


def _token_logprobs(model: torch.nn.Module, groups: Sequence[EncodedGroup], per_forward: int,
                    autocast: Callable[[], contextlib.AbstractContextManager]) -> list[list[list[float]]]:
    """Per-token log π of every response of `groups`, `per_forward` groups a forward; one list of
    candidates per group."""
    out: list[list[list[float]]] = []
    for s in range(0, len(groups), per_forward):
        batch = groups[s : s + per_forward]
        with autocast():
            flat = candidate_token_logprobs(model, PackedQueries([g.prompt for g in batch],
                                                                 [g.responses for g in batch]))
        start = 0
        for g in batch:
            out.append(flat[start : start + len(g.responses)])
            start += len(g.responses)
    return out


def compute_reference(ref_model: str, groups: Sequence[QueryGroup], cfg: TrainConfig, *,
                      tokenizer_path: str | None = None, trust_remote_code: bool = False,
                      dtype: str = "auto", store: RunStore | None = None,
                      resources: dict[str, float] | None = None, per_token: bool = False) -> list[list[Any]]:
    """`reference_logprobs` as a Ray task (num_cpus=1; num_gpus=1 when the cluster has a GPU;
    the custom `resources` of `eval.resources`; the options of `store`, the run's bucket mirror)
    when Ray is connected, else in this process."""
    (values,) = compute_references([ref_model], groups, cfg, tokenizer_path=tokenizer_path,
                                   trust_remote_code=trust_remote_code, dtype=dtype, store=store,
                                   resources=resources, per_token=per_token)
    return values


def compute_references(models: Sequence[str], groups: Sequence[QueryGroup], cfg: TrainConfig, *,
                       tokenizer_path: str | None = None, trust_remote_code: bool = False,
                       dtype: str = "auto", store: RunStore | None = None,
                       resources: dict[str, float] | None = None, per_token: bool = False) -> list[list[list[Any]]]:
    """`compute_reference` under each of `models` (the online policy's KL reads ρ's and the
    sampling policy's), the Ray tasks side by side; one result per model, in order."""
    import ray

    kwargs = {"tokenizer_path": tokenizer_path, "trust_remote_code": trust_remote_code, "dtype": dtype,
              "per_token": per_token}
    if not ray.is_initialized():
        return [reference_logprobs(m, groups, cfg, **kwargs) for m in models]
    from rrhf_ray.mirror import actor_options

    gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    task = ray.remote(num_cpus=1, num_gpus=gpus, resources=dict(resources or {}),
                      **actor_options(store))(reference_logprobs)
    shared = ray.put(list(groups))
    return ray.get([task.remote(m, shared, cfg, **kwargs) for m in models])


def with_reference(groups: Sequence[QueryGroup], refs: Sequence[Sequence[float | None]]) -> list[QueryGroup]:
    """The groups with `ref_logprobs` set (validated: one value per candidate, finite)."""
    return [QueryGroup.model_validate({**g.model_dump(), "ref_logprobs": list(r)})
            for g, r in zip(groups, refs, strict=True)]


def write_reference_pool(groups: Sequence[QueryGroup], ref_model: str, cfg: TrainConfig, out: Path, *,
                         tokenizer_path: str | None = None, trust_remote_code: bool = False,
                         dtype: str = "auto", store: RunStore | None = None,
                         resources: dict[str, float] | None = None) -> dict:
    """Compute the reference log-probabilities of `groups` and write the groups with them to
    `out` (Parquet or JSONL, atomically); returns what the run state records."""
    refs = compute_reference(ref_model, groups, cfg, tokenizer_path=tokenizer_path,
                             trust_remote_code=trust_remote_code, dtype=dtype, store=store, resources=resources)
    write_groups(with_reference(groups, refs), out)
    n = sum(r is not None for rs in refs for r in rs)
    logger.info("reference log-probabilities of %d candidates under %s written to %s", n, ref_model, out)
    return {"reference": {"model": ref_model, "candidates": n}}
