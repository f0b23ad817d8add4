"""Checkpoint I/O of every trainer: a checkpoint is a plain HF directory (safetensors, LoRA
merged, FSDP gathered) plus the train state (`STATE_FILE`: the epoch reached, whether the fit
finished, and for the warm trainer its round and global step), and, only in a checkpoint a fit
may resume from, the optimizer and schedule (`OPTIMIZER_FILE`). The one writer of a checkpoint is
`write_checkpoint`; `install_checkpoint` copies a reported one to where the driver keeps it.

An installed checkpoint is whole or absent: `MANIFEST_FILE` (every other file's name, size and
SHA-256) is written last into it, and `checkpoint_problem` tells a whole one from one cut short
or damaged later (a crashed node, a full disk, a partial copy), naming the file."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from rrhf_ray.config import FitConfig
from rrhf_ray.train.worker import rank_world, unwrap
from rrhf_ray.types import atomic_path

STATE_FILE = "rrhf_train_state.json"  # epoch reached; present in every checkpoint we write
OPTIMIZER_FILE = "optimizer.pt"  # optimizer + scheduler; only in non-final (resumable) checkpoints
METRICS_FILE = "train_metrics.json"
MANIFEST_FILE = "rrhf_manifest.json"  # written last: {"files": {name: {"bytes", "sha256"}}}


class CheckpointError(RuntimeError):
    """A checkpoint that is not whole; the message names the directory and the file."""


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(directory: str | Path) -> None:
    """The manifest of every file under `directory` (sizes and checksums), written last."""
    d = Path(directory)
    files = {str(p.relative_to(d)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(d.rglob("*")) if p.is_file() and p.name != MANIFEST_FILE}
    (d / MANIFEST_FILE).write_text(json.dumps({"files": files}, indent=1, sort_keys=True))


def checkpoint_problem(directory: str | Path, *, checksums: bool = True) -> str | None:
    """None when `directory` is whole by its manifest; else what is wrong, naming the file (a
    missing manifest included: an installed checkpoint always has one). `checksums=False` checks
    names and sizes only."""
    d = Path(directory)
    manifest = d / MANIFEST_FILE
    try:
        files = json.loads(manifest.read_text())["files"]
    except FileNotFoundError:
        return f"{manifest} is missing (the checkpoint was not installed whole)"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{manifest} is unreadable ({err})"
    for name, want in files.items():
        path = d / name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != want["bytes"]:
            return f"{path} has {size} bytes, its manifest says {want['bytes']}"
        if checksums and _sha256(path) != want["sha256"]:
            return f"{path} does not match its checksum in {manifest}"
    return None


def check_checkpoint(directory: str | Path, *, checksums: bool = True) -> None:
    """Raise `CheckpointError` naming the file unless `directory` is whole (`checkpoint_problem`)."""
    problem = checkpoint_problem(directory, checksums=checksums)
    if problem is not None:
        raise CheckpointError(f"damaged checkpoint {directory}: {problem}")


def save_hf_checkpoint(model: torch.nn.Module, tokenizer: Any, directory: Path, cfg: FitConfig,
                       dtype: str | None = None) -> None:
    """Write the model as a plain HF directory (safetensors), LoRA merged, FSDP gathered.
    Collective under FSDP: every rank must call it; only rank 0 writes. `dtype` (e.g. the
    samplers' "bfloat16"): the saved copy's floating-point dtype; the model in memory is unchanged."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    state_dict = None
    if cfg.strategy == "fsdp" and dist.is_initialized() and dist.get_world_size() > 1:
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.state_dict_type(
            model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=True, rank0_only=True)
        ):
            state_dict = model.state_dict()
    if rank != 0:
        return
    inner = unwrap(model)
    if cfg.lora.enabled:
        inner = copy.deepcopy(inner).merge_and_unload()
    cast = dtype is not None and dtype != "float32"
    if cast:
        state_dict = cast_state_dict(state_dict if state_dict is not None else inner.state_dict(),
                                     getattr(torch, dtype))
    inner.save_pretrained(directory, state_dict=state_dict, safe_serialization=True)
    if cast:  # config.json names the saved dtype (what vLLM's `auto` reads)
        _set_saved_dtype(directory, dtype)
    tokenizer.save_pretrained(directory)


def cast_state_dict(state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating-point tensors cast to `dtype`; tensors that share storage (tied embeddings) stay
    shared, so `save_pretrained` still writes them once."""
    done: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}
    out = {}
    for name, t in state_dict.items():
        if not t.is_floating_point() or t.dtype == dtype:
            out[name] = t
            continue
        key = (t.data_ptr(), tuple(t.shape))
        if key not in done:
            done[key] = t.detach().to(dtype)
        out[name] = done[key]
    return out


def read_state_dict(directory: str | Path, dtype: str) -> dict[str, torch.Tensor]:
    """The weights of the HF checkpoint at `directory` (its *.safetensors files), floating-point
    tensors in `dtype` (a no-op for a checkpoint saved in it), named as the files name them: what
    a refresh through memory hands the samplers."""
    from safetensors.torch import load_file

    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory} holds no *.safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return cast_state_dict(state, getattr(torch, dtype))


def _set_saved_dtype(directory: Path, dtype: str) -> None:
    path = Path(directory) / "config.json"
    config = json.loads(path.read_text())
    key = "dtype" if "dtype" in config or "torch_dtype" not in config else "torch_dtype"
    config[key] = dtype
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_checkpoint(directory: Path, model: torch.nn.Module, tokenizer: Any, cfg: FitConfig, *,
                     epoch: int, final: bool, optimizer_state: dict[str, Any] | None = None,
                     dtype: str | None = None, **state: Any) -> None:
    """The checkpoint at `directory`: the HF model (`save_hf_checkpoint`, in `dtype`), the train
    state {epoch, final, **state} and, when given, the optimizer and schedule. Collective under
    FSDP (every rank gathers); rank 0 writes."""
    save_hf_checkpoint(model, tokenizer, directory, cfg, dtype)
    rank, _ = rank_world()
    if rank == 0:
        (directory / STATE_FILE).write_text(json.dumps({"epoch": epoch, "final": final, **state}))
        if optimizer_state is not None:
            torch.save(optimizer_state, directory / OPTIMIZER_FILE)


def read_train_state(directory: str | Path) -> dict[str, Any]:
    """The train state `write_checkpoint` wrote at `directory`."""
    return json.loads((Path(directory) / STATE_FILE).read_text())


def read_optimizer_state(directory: str | Path) -> dict[str, Any] | None:
    """The optimizer and schedule saved with a resumable checkpoint; None in a final one."""
    path = Path(directory) / OPTIMIZER_FILE
    return torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None


def resume_checkpoint(resume_from: str | None, in_ray: bool) -> contextlib.AbstractContextManager:
    """A context giving the directory of the checkpoint to resume from, or None: under Ray Train
    the last one reported (`ray.train.get_checkpoint()`, after a worker group restart), without
    Ray `resume_from`."""
    if in_ray:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is not None:
            return ckpt.as_directory()
    elif resume_from:
        return contextlib.nullcontext(resume_from)
    return contextlib.nullcontext(None)


def report_with_checkpoint(model: torch.nn.Module, tokenizer: Any, cfg: FitConfig, metrics: dict[str, float],
                           *, epoch: int, final: bool, optimizer_state: dict[str, Any] | None) -> None:
    """`ray.train.report(metrics)` with this epoch's checkpoint (rank 0 hands it over)."""
    import ray.train

    rank, _ = rank_world()
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(Path(tmp), model, tokenizer, cfg, epoch=epoch, final=final,
                         optimizer_state=optimizer_state)
        ckpt = ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None
        ray.train.report(metrics, checkpoint=ckpt)


def save_final_local(model: torch.nn.Module, tokenizer: Any, out: Path, cfg: FitConfig,
                     metrics: dict[str, float]) -> None:
    """The finished model as an HF directory at `out`, written whole or not at all. Collective
    under FSDP (every rank gathers); rank 0 writes."""
    rank, _ = rank_world()
    if rank != 0:
        write_checkpoint(out, model, tokenizer, cfg, epoch=cfg.epochs - 1, final=True)
        return
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        write_checkpoint(tmp, model, tokenizer, cfg, epoch=cfg.epochs - 1, final=True)
        (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
        write_manifest(tmp)


def install_checkpoint(checkpoint: Any, out: Path, metrics: dict[str, Any]) -> None:
    """Copy a reported checkpoint (a `ray.train.Checkpoint`, local or remote storage) to `out`
    with its metrics and its manifest (last), whole or not at all; a full disk names `out`."""
    from rrhf_ray.state import no_space

    with no_space(out), atomic_path(out) as tmp, checkpoint.as_directory() as d:
        shutil.copytree(d, tmp)
        (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
        write_manifest(tmp)


def is_finished_model(directory: str | Path) -> bool:
    """True when `directory` holds a model this package installed at the end of a fit."""
    d = Path(directory)
    state = d / STATE_FILE
    if not (state.is_file() and (d / "config.json").is_file()):
        return False
    try:
        return bool(json.loads(state.read_text()).get("final"))
    except (OSError, ValueError):
        return False


def start_state(model_dir: str) -> int:
    """The global step a checkpoint directory was saved at (0 for a model this package did not
    train in rounds)."""
    state = Path(model_dir) / STATE_FILE
    try:
        return int(json.loads(state.read_text()).get("global_step", 0))
    except (OSError, ValueError):
        return 0
