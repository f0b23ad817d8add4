"""Shared fixtures: tiny models built locally (no hub) and one real local Ray cluster."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama (hidden 128, 2 heads → head_dim 64) with a locally trained BPE tokenizer."""
    from rrhf_ray.demo.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama", seed=0)


@pytest.fixture(scope="session")
def ray_cluster():
    """One real single-node Ray cluster for the whole session."""
    import ray

    if not ray.is_initialized():
        from rrhf_ray.workflow import LOCAL_SYSTEM_CONFIG

        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, _system_config=LOCAL_SYSTEM_CONFIG,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()
