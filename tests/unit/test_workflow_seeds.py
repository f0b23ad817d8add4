"""Seeds of the driver's sampling: each training round draws a new pool (the round mixed into
`sampling.seed`, still one seed per query, so replica counts do not matter), while evaluation
samples with one fixed seed in every round (a paired comparison across rounds)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rrhf_ray.actors import sampler
from rrhf_ray.actors.sampler import query_seed, round_seed
from rrhf_ray.config import EvalConfig, SamplingConfig
from rrhf_ray.data.candidates import get_preset
from rrhf_ray.evaluation import eval_sampling
from rrhf_ray.types import Candidate, read_groups
from rrhf_ray.workflow import round_sampling, sample_stage

QUERIES = [f"\n\nHuman: question {i}?\n\nAssistant:" for i in range(5)]


def test_round_seeds_differ_by_round_and_by_base_seed() -> None:
    seeds = {(s, r): round_seed(s, r) for s in range(3) for r in range(1, 6)}
    assert len(set(seeds.values())) == len(seeds)
    assert round_seed(0, 1) == round_seed(0, 1)  # deterministic
    assert all(0 <= v < 2**30 for v in seeds.values())


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
        calls = 0

        def busy_seconds(self) -> float:
            self.calls += 1
            return 2.0 * (self.calls // 2)

    pools, preset, sampling = {"current": Pool()}, get_preset("IP"), SamplingConfig(seed=5)
    for r in (1, 2):
        info = sample_stage(pools, preset, [], QUERIES, sampling, [], tmp_path / f"{r}.jsonl", r)
        assert info["seconds_compute"] == 2.0
    assert [c.seed for c in calls] == [round_seed(5, 1), round_seed(5, 2)]
    one, two = (read_groups(tmp_path / f"{r}.jsonl", scored=False) for r in (1, 2))
    assert all(a.responses != b.responses for a, b in zip(one, two))


@pytest.mark.parametrize("round_index", [1, 3])
def test_query_seeds_of_a_round_do_not_depend_on_how_queries_are_split(round_index: int) -> None:
    seed = round_sampling(SamplingConfig(seed=1), get_preset("IP"), round_index).seed
    whole = [query_seed(seed, i) for i in range(10)]
    halves = [query_seed(seed, i) for i in range(5)] + [query_seed(seed, 5 + i) for i in range(5)]
    assert whole == halves
