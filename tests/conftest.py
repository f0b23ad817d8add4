"""Shared fixtures: tiny models built locally (no hub) and one real local Ray cluster."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

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


# --------------------------------------------------------------------------- background scenarios
# The longest tests (tests/integration/test_multinode.py, test_autoscale.py, test_job_submit.py)
# each run a cluster of their own inside private network, PID and mount namespaces: nothing they
# do touches the session's cluster or another test. Much of their time is waiting (raylets and
# engines starting, Ray's health checks finding a lost node, the autoscaler's timers). So they
# are marked `background`: the session starts their scenarios at once, one after another in a
# thread, while the rest of the suite runs, and their tests run last, each checking what its
# scenario left. A module marked so defines `run_in_background(tmp_path) -> Any`, which runs the
# scenario to its end; its tests read the value with the `background_result` fixture.


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    """The background scenarios' tests last, in their order (their scenarios ran meanwhile)."""
    items.sort(key=lambda item: item.get_closest_marker("background") is not None)  # stable


class BackgroundScenarios:
    """Runs each module's `run_in_background` in turn on a daemon thread; `result` waits for one
    and returns its value or raises what it raised (a failed assertion, a skip)."""

    def __init__(self, modules: list, tmp_path_factory: pytest.TempPathFactory) -> None:
        self._done = {m.__name__: threading.Event() for m in modules}
        self._outcome: dict[str, tuple[bool, Any, float]] = {}
        # Made here, on the session's thread: the first mktemp of a session (re)creates its base
        # directory, which must not race the tests'.
        dirs = [tmp_path_factory.mktemp(m.__name__.rsplit(".", 1)[-1]) for m in modules]
        self._thread = threading.Thread(target=self._run_all, args=(modules, dirs), daemon=True,
                                        name="background-scenarios")
        self._thread.start()

    def _run_all(self, modules: list, dirs: list[Path]) -> None:
        for module, tmp_path in zip(modules, dirs):
            started = time.monotonic()
            try:
                self._outcome[module.__name__] = (True, module.run_in_background(tmp_path),
                                                  time.monotonic() - started)
            except BaseException as e:  # noqa: BLE001 - re-raised in the test that reads it
                self._outcome[module.__name__] = (False, e, time.monotonic() - started)
            self._done[module.__name__].set()

    def result(self, module: Any, timeout: float = 1800.0) -> Any:
        assert self._done[module.__name__].wait(timeout), f"{module.__name__}: its scenario did not end"
        ok, value, seconds = self._outcome[module.__name__]
        print(f"\n{module.__name__}: background scenario {seconds:.0f} s")
        if not ok:
            raise value
        return value


@pytest.fixture(scope="session", autouse=True)
def background_scenarios(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """Starts the scenarios of the selected tests marked `background` when the session starts."""
    modules: list = []
    for item in request.session.items:
        if item.get_closest_marker("background") and item.module not in modules:
            modules.append(item.module)
    return BackgroundScenarios(modules, tmp_path_factory) if modules else None


@pytest.fixture(scope="module")
def background_result(request: pytest.FixtureRequest, background_scenarios: BackgroundScenarios) -> Any:
    """What this module's `run_in_background` returned (its scenario ran during the session)."""
    return background_scenarios.result(request.module)
