"""Seeds of the driver's sampling: each training round draws a new pool (the round mixed into
`sampling.seed`, still one seed per query, so replica counts do not matter), while evaluation
samples with one fixed seed in every round (a paired comparison across rounds)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from rrhf_ray.actors import sampler
from rrhf_ray.actors.sampler import query_seed, round_seed
from rrhf_ray.config import EvalConfig, SamplingConfig
from rrhf_ray.data.candidates import get_preset
from rrhf_ray.evaluation import eval_sampling
from rrhf_ray.stages import round_sampling, sample_candidates
from rrhf_ray.types import Candidate, read_groups

QUERIES = [f"\n\nHuman: question {i}?\n\nAssistant:" for i in range(5)]


def test_round_seeds_differ_by_round_and_by_base_seed() -> None:
    seeds = {(s, r): round_seed(s, r) for s in range(3) for r in range(1, 6)}
    assert len(set(seeds.values())) == len(seeds)
    assert all(0 <= v < 2**30 for v in seeds.values())


def test_seeds_are_the_same_in_another_process_whatever_its_hash_seed() -> None:
    """A resumed run (a new driver process) must draw the pools the killed one would have drawn:
    the seeds may not depend on anything per-process, such as Python's salted `hash`."""
    code = ("from rrhf_ray.actors.sampler import query_seed, round_seed; "
            "print([round_seed(s, r) for s in range(3) for r in range(1, 4)], "
            "[query_seed(round_seed(0, 1), i) for i in range(5)])")
    here = f"{[round_seed(s, r) for s in range(3) for r in range(1, 4)]} " \
           f"{[query_seed(round_seed(0, 1), i) for i in range(5)]}"
    for hash_seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={"PYTHONHASHSEED": hash_seed, "PATH": "/usr/bin:/bin",
                                  "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
        assert out.stdout.strip() == here


def test_two_rounds_draw_different_seeds_per_query_and_evaluation_keeps_one() -> None:
    sampling = SamplingConfig(seed=0)
    preset = get_preset("IP")
    r1, r2 = round_sampling(sampling, preset, 1), round_sampling(sampling, preset, 2)
    seeds1 = [query_seed(r1.seed, i) for i in range(len(QUERIES))]
    seeds2 = [query_seed(r2.seed, i) for i in range(len(QUERIES))]
    assert r1.seed != r2.seed and not set(seeds1) & set(seeds2)
    # the rest of the settings are the configured ones
    assert r1.model_copy(update={"seed": 0}) == sampling
    assert round_sampling(sampling, get_preset("BP"), 1).use_beam_search
    # evaluation: no round in its settings, the same seeds in every round
    _, sampled = eval_sampling(sampling, EvalConfig())
    assert sampled.seed == sampling.seed + 10_000
    assert sampled.seed not in (r1.seed, r2.seed)


def test_sample_stage_samples_each_round_with_that_rounds_seed(tmp_path: Path, monkeypatch) -> None:
    calls: list[SamplingConfig] = []

    def fake_get_samples(pool, queries, cfg, **kwargs):
        calls.append(cfg)
        return [[Candidate(f" reply seeded {query_seed(cfg.seed, i)}", source="policy@0", version=0)]
                for i in range(len(queries))]

    monkeypatch.setattr(sampler, "get_samples", fake_get_samples)

    class Pool:  # the engines' busy seconds: 2 s per sampling call
        @contextlib.contextmanager
        def engine_seconds(self):
            busy = SimpleNamespace(seconds=0.0)
            yield busy
            busy.seconds = 2.0

    pools, preset, sampling = {"current": Pool()}, get_preset("IP"), SamplingConfig(seed=5)
    for r in (1, 2):
        info = sample_candidates(pools, preset, records=[], queries=QUERIES, sampling=sampling, external=[],
                                 path=tmp_path / f"{r}.jsonl", round_index=r)
        assert info["seconds_compute"] == 2.0
    assert [c.seed for c in calls] == [round_seed(5, 1), round_seed(5, 2)]
    one, two = (read_groups(tmp_path / f"{r}.jsonl", scored=False) for r in (1, 2))
    assert all(a.responses != b.responses for a, b in zip(one, two))


@pytest.mark.parametrize("round_index", [1, 3])
def test_a_query_gets_the_seed_of_its_index_in_the_whole_set_however_the_calls_split_it(round_index: int) -> None:
    """`SamplerPool.sample_refs(…, start_index=i)` gives query j of a slice the seed of query i+j
    of the whole set, and `sample_many_refs` seeds each part as a call of its own: a round's pool
    does not depend on how the driver splits its queries into calls (the replicas and chunks are
    the coordinator's business, which gets the seeds as given). The coordinator is stood in for
    by a recorder: this checks the seeds the pool hands it, not the engines."""
    cfg = round_sampling(SamplingConfig(seed=1), get_preset("IP"), round_index)
    sent: list[list[int]] = []
    pool = sampler.SamplerPool.__new__(sampler.SamplerPool)
    pool.config, pool.tag, pool.version, pool.replicas = cfg, "policy", 0, [None, None]
    pool._dispatch = lambda prompts, seeds, *a, **k: sent.append(list(seeds))
    queries = [f"q{i}" for i in range(10)]
    pool.sample_refs(queries, cfg)
    pool.sample_refs(queries[:4], cfg, start_index=0)
    pool.sample_refs(queries[4:], cfg, start_index=4)
    pool.sample_many_refs([(queries, cfg), (queries[:3], cfg.model_copy(update={"seed": 7}))])
    whole = [query_seed(cfg.seed, i) for i in range(10)]
    assert sent[0] == whole and len(set(whole)) == 10
    assert sent[1] + sent[2] == whole
    assert sent[3] == whole + [query_seed(7, i) for i in range(3)]
