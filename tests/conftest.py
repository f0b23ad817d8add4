"""Shared fixtures: tiny models built locally (no hub) and one real local Ray cluster."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# The session's cluster is this machine alone, as the local cluster `rrhf-ray run` starts, which
# runs without Ray Train's preemption watcher (rrhf_ray.connection.PREEMPTION_WATCHER): nor do the
# drivers and fits of the suite, which join the session's cluster by its address.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


@pytest.fixture(scope="session", autouse=True)
def vllm_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """vLLM's cache (VLLM_CACHE_ROOT) for the whole session, in its tmp dirs: set before the
    session's cluster starts, so its engines inherit it, and passed on to the sandboxed clusters
    (`tests.helpers.sandbox_env` keeps it beside their fresh HOME). vLLM learns what a model class
    supports in a subprocess of its own (~8 s of CPU: it imports vLLM and torch again) unless this
    cache has it; with the cache shared, the session pays that once per model class, not once
    more in every sandbox."""
    path = os.environ.get("VLLM_CACHE_ROOT")
    if path is None:
        path = str(tmp_path_factory.mktemp("vllm-cache"))
        os.environ["VLLM_CACHE_ROOT"] = path
    return Path(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama (hidden 128, 2 heads → head_dim 64) with a locally trained BPE tokenizer."""
    from rrhf_ray.demo.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama", seed=0)


@pytest.fixture
def flex_backward_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lets FlexAttention back-propagate on this CPU, for tests that compare its gradients.

    PyTorch refuses a CPU backward at FlexAttention's entry (`_validate_device`), but its eager
    path (a dense reference: the full score matrix with the mask applied element by element,
    forward and backward) is device-agnostic and runs here once that check is lifted. What such
    a test checks is our part: the block mask, the segments, how heads and outputs are laid out.
    The fused CUDA kernels are PyTorch's and run only where a GPU is.
    """
    import torch.nn.attention.flex_attention as flex

    monkeypatch.setattr(flex, "_validate_device", lambda query, key, value: None)


@pytest.fixture(scope="session")
def node_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cluster node's RRHF_RAY_CACHE: where its Ray workers (samplers, trainers, tasks)
    download what a run on object storage hands them (`rrhf_ray.remote.fetch`)."""
    return tmp_path_factory.mktemp("node-cache")


@pytest.fixture(scope="session")
def ray_cluster(node_cache: Path):
    """One real single-node Ray cluster for the whole session. Its raylet, and so every worker
    process, gets RRHF_RAY_CACHE=`node_cache`, as a node's own environment would give it; the
    test process (a driver) keeps its own."""
    import ray

    if not ray.is_initialized():
        from rrhf_ray.connection import LOCAL_SYSTEM_CONFIG

        before = os.environ.get("RRHF_RAY_CACHE")
        os.environ["RRHF_RAY_CACHE"] = str(node_cache)  # inherited by the raylet started now
        try:
            ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, _system_config=LOCAL_SYSTEM_CONFIG,
                     runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
        finally:
            if before is None:
                os.environ.pop("RRHF_RAY_CACHE")
            else:
                os.environ["RRHF_RAY_CACHE"] = before
    yield ray
    ray.shutdown()


REPO_OUTPUTS = Path(__file__).resolve().parents[1] / "outputs"


def _tree(root: Path) -> dict[str, tuple[int, int]] | None:
    """Every file under `root` with its size and modification time (None: no such directory)."""
    if not root.exists():
        return None
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session", autouse=True)
def repository_outputs_untouched():
    """Tests write only into their tmp dirs: the checkout's `outputs/` (a user's demo run lands
    there) is the same after the session as before it, file for file."""
    before = _tree(REPO_OUTPUTS)
    yield
    after = _tree(REPO_OUTPUTS)
    if after != before:
        changed = sorted(set(before or {}) ^ set(after or {})
                         | {k for k in set(before or {}) & set(after or {}) if before[k] != after[k]})
        pytest.fail(f"the suite wrote into {REPO_OUTPUTS}: {', '.join(changed) or 'the directory itself'}")


# --------------------------------------------------------------------------- sandboxed scenarios
# The tests that run a cluster of their own inside private network, PID and mount namespaces
# (tests/integration/test_multinode.py, test_autoscale.py, test_job_submit.py) define
# `run_sandboxed(tmp_path) -> Any`, which runs the scenario to its end; their tests read its value
# through `sandboxed_result`, once per module. (Run beside the rest of the suite on a thread, they
# made the suite no shorter on 2 cores: the work is CPU-bound, process start-up above all.)


@pytest.fixture(scope="module")
def sandboxed_result(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """What this module's `run_sandboxed` returned, run once for the module's tests."""
    module = request.module
    started = time.monotonic()
    value = module.run_sandboxed(tmp_path_factory.mktemp(module.__name__.rsplit(".", 1)[-1]))
    print(f"\n{module.__name__}: sandboxed scenario {time.monotonic() - started:.0f} s")
    return value
