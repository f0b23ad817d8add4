"""The Python API: what `rrhf-ray run` and `rrhf-ray train --no-ray` do, called from a script.

    import rrhf_ray

    rows = rrhf_ray.run("builtin:demo", rounds=2, **{"output.dir": "outputs/api"})
    print(rows[-1]["sampled_reward_mean"])

    metrics = rrhf_ray.train_ranked("ranked.jsonl", "models/base", "models/rrhf", epochs=1,
                                    loss={"name": "raft"})

Both check their inputs as the command line does (`rrhf_ray.preflight`) and raise
`rrhf_ray.config.ConfigError` / `rrhf_ray.types.DataError` with the same one-line messages
before anything expensive starts.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any

from rrhf_ray import registry
from rrhf_ray.config import ConfigError, RunConfig, TrainConfig, build, read_yaml
from rrhf_ray.config.loading import parent_section

logger = logging.getLogger(__name__)


def _set(data: dict[str, Any], key: str, value: Any) -> None:
    """`key` (dotted, or with `__` for keyword arguments: `train__epochs`) set to `value`; a dict
    value is merged into the section it names instead of replacing it."""
    parts = key.replace("__", ".").split(".")
    node = parent_section(data, parts, key)
    last = parts[-1]
    if isinstance(value, dict) and isinstance(node.get(last), dict):
        for k, v in value.items():
            _set(node[last], k, v)
    else:
        node[last] = value


def resolve_config(config: RunConfig | dict[str, Any] | str | os.PathLike, **overrides: Any) -> RunConfig:
    """A validated `RunConfig` from a RunConfig, a dict in the YAML layout, or the path of a YAML
    file (or a `builtin:<name>` config), with `overrides` applied: `rounds=2`,
    `**{"train.epochs": 1}`, `train__epochs=1` or `train={"epochs": 1}` (merged)."""
    if isinstance(config, RunConfig):
        data, origin = config.model_dump(mode="json"), "(RunConfig)"
    elif isinstance(config, dict):
        data, origin = copy.deepcopy(config), "(dict)"
    elif isinstance(config, (str, os.PathLike)):
        path = str(config)
        if registry.is_builtin(path):
            try:
                path = str(registry.lookup("config", path))
            except registry.UnknownBuiltinError as err:
                raise ConfigError(str(err)) from None
        data, origin = read_yaml(path), f"in {path}"
    else:
        raise ConfigError(f"config: expected a RunConfig, a dict or a path, got {type(config).__name__}")
    for key, value in overrides.items():
        _set(data, key, value)
    if overrides:
        origin += " with overrides " + " ".join(f"{k}={v!r}" for k, v in overrides.items())
    return build(RunConfig, data, origin)


def run(config: RunConfig | dict[str, Any] | str | os.PathLike, **overrides: Any) -> list[dict[str, Any]]:
    """Run (or resume) the round-based RRHF workflow of `config`, as `rrhf-ray run` does, and
    return its metrics rows: one dict per round, round 0 (the starting model) first, with the
    keys of `<output.dir>/metrics.jsonl` (docs/metrics.md: `sampled_reward_mean`,
    `eval_reward_mean`, `sampled_reward_delta_vs_round0`, their `_ci95` intervals, …; a NaN is
    None). `config` and `overrides` as in `resolve_config`. Ray is joined (`ray.address`,
    RAY_ADDRESS, or an already initialised `ray.init`) or started locally, and left running."""
    from rrhf_ray.logs import stop_run_logs
    from rrhf_ray.workflow import run as run_workflow

    resolved = resolve_config(config, **overrides)
    try:
        return run_workflow(resolved)
    finally:
        stop_run_logs()  # close <output.dir>/logs/driver.log


def ranked_train_job(data: str | os.PathLike, model: str | os.PathLike, output: str | os.PathLike,
                     train: TrainConfig, *, trust_remote_code: bool = False, name: str = "model") -> Any:
    """The `rrhf_ray.train.rrhf.TrainJob` of training `model` on the ranked file `data` into
    `output`, after the checks `rrhf-ray train` makes (the model directory as preflight checks
    it, every row of the file); for DPO the reference log-probabilities are computed first
    (once, next to `output`). `name`: what an error calls the model (`--model` on the command
    line). Shared by `rrhf-ray train` and `train_ranked`."""
    from rrhf_ray.preflight import check_model_arg
    from rrhf_ray.train.rrhf import TrainJob
    from rrhf_ray.types import read_groups

    model, out = str(model), Path(output).resolve()
    if Path(model).exists():
        model = str(Path(model).resolve())
    check_model_arg(name, model)
    source = str(Path(data).resolve()) if Path(data).exists() else str(data)
    try:
        groups = read_groups(source)  # validates every line before anything starts
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as err:
        raise ConfigError(f"{err.strerror}: {err.filename}") from None
    logger.info("read %d query groups (%d candidates) from %s", len(groups), sum(g.k for g in groups), source)
    if train.loss.name == "dpo" and any(g.ref_logprobs is None for g in groups):
        # DPO's reference is the model training starts from: its log-probabilities, computed once.
        from rrhf_ray.train.reference import write_reference_pool

        source = str(out.with_name(out.name + ".pool_ref.parquet"))
        write_reference_pool(groups, model, train, Path(source), trust_remote_code=trust_remote_code)
    return TrainJob(model_path=model, data_paths=[source], output_dir=str(out), train=train,
                    trust_remote_code=trust_remote_code)


def train_ranked(data: str | os.PathLike, model: str | os.PathLike, output: str | os.PathLike, *,
                 trust_remote_code: bool = False, **train_options: Any) -> dict[str, float]:
    """RRHF-train `model` (a Hugging Face directory or hub id) on a ranked file in this process,
    without Ray (`rrhf-ray train --no-ray`), and save the trained model (safetensors and its
    tokenizer) to `output`. `data`: reference-format JSONL rows {query, responses, scores} or a
    Parquet pool. `train_options`: keys of `TrainConfig` (the `train:` section: `epochs=1`,
    `lr=1e-4`, `loss={"name": "raft"}`, `**{"loss.name": "pro"}`).

    Returns the last epoch's metrics: float values keyed by name (`loss`, `rank_loss`,
    `sft_loss`, `rank_accuracy`, …, as the command prints them)."""
    from rrhf_ray.train.rrhf import train_loop_per_worker

    options: dict[str, Any] = {}
    for key, value in train_options.items():
        _set(options, key, value)
    origin = "(train options " + " ".join(f"{k}={v!r}" for k, v in train_options.items()) + ")"
    job = ranked_train_job(data, model, output, build(TrainConfig, options, origin),
                           trust_remote_code=trust_remote_code)
    return train_loop_per_worker({"job": job.model_dump(mode="json")})
