"""One training worker's model set-up: its rank and device, the tokenizer, the model loaded
(gradient checkpointing, LoRA) and wrapped for the process group (DDP / FSDP), and bf16
autocast. Also the dtype of a model loaded for inference only (`inference_dtype`)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from rrhf_ray.config import FitConfig

logger = logging.getLogger(__name__)


def load_tokenizer(path: str, trust_remote_code: bool, require_eos: bool = True) -> Any:
    """A tokenizer with a pad token (the EOS when it has none). `require_eos`: a policy closes
    every response with EOS; a reward model on an encoder backbone (BERT) may have none."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if require_eos and tok.eos_token_id is None:
        raise ValueError(f"tokenizer {path} has no EOS token; RRHF closes every response with it")
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ValueError(f"tokenizer {path} has neither a pad nor an EOS token to pad with")
        tok.pad_token = tok.eos_token
    return tok


def prepare_model(model: torch.nn.Module, cfg: FitConfig, task_type: str) -> torch.nn.Module:
    """Gradient checkpointing and LoRA (peft `task_type`: CAUSAL_LM, SEQ_CLS) on a loaded model."""
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.lora.enabled:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        if cfg.gradient_checkpointing:
            model.enable_input_require_grads()
        # SEQ_CLS: peft trains the fresh score head in full (modules_to_save) beside the adapters.
        model = get_peft_model(
            model,
            PeftLoraConfig(
                r=cfg.lora.r,
                lora_alpha=cfg.lora.alpha,
                lora_dropout=cfg.lora.dropout,
                target_modules=cfg.lora.target_modules,
                task_type=task_type,
            ),
        )
    return model


def load_causal_lm(path: str, cfg: FitConfig, trust_remote_code: bool) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, trust_remote_code=trust_remote_code, use_safetensors=True
    )
    return prepare_model(model, cfg, "CAUSAL_LM")


def load_policy(path: str, cfg: FitConfig, trust_remote_code: bool, tokenizer: Any) -> torch.nn.Module:
    """`load_causal_lm` as a `Worker.load` model loader (the policy of RRHF and SFT)."""
    return load_causal_lm(path, cfg, trust_remote_code)


def wrap_distributed(model: torch.nn.Module, cfg: FitConfig, device: torch.device) -> torch.nn.Module:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return model
    if cfg.strategy == "fsdp":
        import functools

        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

        layer_names = set(getattr(model, "_no_split_modules", None) or [])
        layer_cls = {m.__class__ for m in model.modules() if m.__class__.__name__ in layer_names}
        policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=layer_cls)
        return FSDP(model, auto_wrap_policy=policy, device_id=device, use_orig_params=True)
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "no_sync") and hasattr(model, "module") else model


def device_for(cfg: FitConfig, in_ray: bool) -> torch.device:
    if cfg.use_gpu and torch.cuda.is_available():
        if in_ray:
            import ray.train.torch

            return ray.train.torch.get_device()
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if cfg.use_gpu:
        raise RuntimeError("train.use_gpu is true but torch sees no CUDA device")
    return torch.device("cpu")


def rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def bf16_autocast(cfg: FitConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """The trainer's autocast: bf16 over its float32 weights when `train.bf16` (null: on a GPU),
    else a null context."""
    use_bf16 = cfg.bf16 if cfg.bf16 is not None else device.type == "cuda"
    if use_bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def inference_dtype(setting: str, device: torch.device | str) -> torch.dtype:
    """`model.dtype` for a model loaded for inference on `device`: "auto" is float32 on a CPU
    and bfloat16 on CUDA; any other value is that dtype."""
    if setting == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return getattr(torch, setting)


@dataclass
class Worker:
    """One training worker's state that outlives a fit: its rank, device, tokenizer and model
    (`model` the plain module, `ddp_model` its DDP / FSDP wrap). The warm round trainer
    (`rrhf_ray.train.warm`) keeps one across rounds; `run_worker` builds one per fit."""

    cfg: FitConfig
    rank: int
    world: int
    device: torch.device
    tokenizer: Any
    model: torch.nn.Module
    ddp_model: torch.nn.Module

    @classmethod
    def load(cls, path: str, cfg: FitConfig, in_ray: bool, trust_remote_code: bool,
             load_model: Callable[[str, FitConfig, bool, Any], torch.nn.Module], *,
             tokenizer_path: str | None = None, require_eos: bool = True) -> Worker:
        from rrhf_ray.remote import materialize

        # A URI (output.dir on object storage): the model from this node's cache, downloaded once.
        path = materialize(path)
        tokenizer_path = materialize(tokenizer_path) if tokenizer_path else None
        rank, world = rank_world()
        if world != cfg.num_workers:
            logger.warning("train.num_workers is %d but %d processes run; using %d", cfg.num_workers, world, world)
        device = device_for(cfg, in_ray)
        torch.manual_seed(cfg.seed)
        tokenizer = load_tokenizer(tokenizer_path or path, trust_remote_code, require_eos)
        model = load_model(path, cfg, trust_remote_code, tokenizer).to(device)
        model.train()
        return cls(cfg, rank, world, device, tokenizer, model, wrap_distributed(model, cfg, device))

    def fresh_adapters(self) -> None:
        """LoRA: merge the trained adapters into the weights and start new ones, as a fit that
        starts from the saved (merged) checkpoint would. A no-op without LoRA."""
        if not self.cfg.lora.enabled:
            return
        merged = unwrap(self.ddp_model).merge_and_unload()
        self.model = prepare_model(merged, self.cfg, "CAUSAL_LM").to(self.device)
        self.model.train()
        self.ddp_model = wrap_distributed(self.model, self.cfg, self.device)

    def autocast(self) -> contextlib.AbstractContextManager:
        return bf16_autocast(self.cfg, self.device)
