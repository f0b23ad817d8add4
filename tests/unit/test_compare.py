"""`rrhf-ray compare` without running anything: variants, seeds, the plan of runs, the shared
stages a run adopts, and the aggregation into compare.jsonl / compare.md / compare.png."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from rrhf_ray import compare, compare_table
from rrhf_ray.compare import Plan, parse_seeds, parse_variant
from rrhf_ray.compare_table import RunResult, Variant, aggregate
from rrhf_ray.config import ConfigError, load_config
from rrhf_ray.demo import DEMO_CONFIG
from rrhf_ray.loss import LOSSES
from rrhf_ray.preflight import finished_stages
from rrhf_ray.state import RunState, config_fingerprint
from rrhf_ray.workflow import path_stage


def test_builtin_variants_are_every_loss_and_the_shuffled_control():
    builtin = compare.builtin_variants()
    assert set(builtin) == set(LOSSES) | {"shuffled"}
    assert parse_variant("pro") == Variant("pro", ("train.loss={name: pro}",))
    assert parse_variant("shuffled").overrides == ("train.shuffle_rewards=true",)
    # A built-in with overrides: its own first, then those.
    assert parse_variant("simpo:train.loss.beta=2.5").overrides == ("train.loss={name: simpo}",
                                                                    "train.loss.beta=2.5")


def test_a_named_variant_is_its_overrides_split_at_top_level_commas():
    v = parse_variant("rank0:train.loss.rank_weight=0, sampling.stop=[a, b],train.loss={name: rrhf}")
    assert v == Variant("rank0", ("train.loss.rank_weight=0", "sampling.stop=[a, b]",
                                  "train.loss={name: rrhf}"))


@pytest.mark.parametrize(("spec", "match"), [
    ("mine", "not a built-in variant"),
    ("shared:train.epochs=1", "not 'shared'"),
    ("a/b:train.epochs=1", "letters, digits"),
    ("x:train.epochs", "dotted.key=value"),
])
def test_bad_variants_are_named(spec, match):
    with pytest.raises(ConfigError, match=match):
        parse_variant(spec)


def test_seeds():
    assert parse_seeds("0,1,2") == [0, 1, 2] and parse_seeds("7") == [7]
    for bad in ("", "a,b", "1,1"):
        with pytest.raises(ConfigError, match="--seeds"):
            parse_seeds(bad)


@pytest.fixture
def plan(tmp_path) -> Plan:
    variants = [parse_variant(v) for v in ("rrhf", "raft", "dpo", "shuffled", "rank0:train.loss.rank_weight=0",
                                           "longsft:sft.train.epochs=9")]
    return Plan(str(DEMO_CONFIG), ["rounds=1"], variants, [0, 3], tmp_path / "cmp")


def test_the_plan_gives_each_variant_and_seed_its_config_and_directory(plan, tmp_path):
    by_name = {v.name: v for v in plan.variants}
    c = plan.run_config(by_name["dpo"], 3)
    assert c.train.loss.name == "dpo" and c.train.loss.beta == 0.1  # the loss with its defaults
    assert (c.train.seed, c.sampling.seed, c.sft.train.seed) == (3, 3, 3)
    assert c.data.seed == 0  # the same queries and held-out split in every run
    assert c.output.dir == str(tmp_path / "cmp" / "dpo" / "seed3") and c.rounds == 1
    assert plan.run_config(by_name["raft"], 0).train.loss.name == "raft"
    assert plan.run_config(by_name["shuffled"], 0).train.shuffle_rewards
    rank0 = plan.run_config(by_name["rank0"], 0).train.loss
    assert (rank0.name, rank0.rank_weight) == ("rrhf", 0.0)

    shared = plan.shared_config(3)
    assert shared.output.dir == str(tmp_path / "cmp" / "shared" / "seed3") and shared.sft.train.seed == 3
    assert all(compare.shares_stages(plan.run_config(v, 3), shared) for v in plan.variants if v.name != "longsft")
    assert not compare.shares_stages(plan.run_config(by_name["longsft"], 3), shared)
    assert plan.has_shared_stages()


def test_a_configured_ray_train_storage_gets_a_corner_per_run(tmp_path):
    plan = Plan(str(DEMO_CONFIG), ["output.storage_path=/mnt/x/rt"], [parse_variant("pro")], [1], tmp_path / "c")
    assert plan.run_config(plan.variants[0], 1).output.storage_path == "/mnt/x/rt/c/pro/seed1"
    assert plan.shared_config(1).output.storage_path == "/mnt/x/rt/c/shared/seed1"


def test_bad_plans_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="must differ"):
        Plan(str(DEMO_CONFIG), [], [parse_variant("pro"), parse_variant("pro")], [0], tmp_path)
    plan = Plan(str(DEMO_CONFIG), [], [parse_variant("bad:train.loss.name=nope")], [0], tmp_path)
    with pytest.raises(ConfigError, match="variant bad: .*train.loss"):
        plan.run_config(plan.variants[0], 0)


def test_a_run_adopts_the_shared_stages_so_the_driver_skips_them(plan, tmp_path):
    """The shared base and SFT stages, recorded as finished in the variant's state.json: the
    driver's `path_stage` returns the shared directories without running anything, preflight
    treats them as finished, and the run's fingerprint is that of `rrhf-ray run` with the same
    overrides."""
    shared_dir = plan.shared_dir(0)
    for d in ("base", "sft"):
        (shared_dir / d).mkdir(parents=True)
    shared = {"base": {"seconds": 1.0, "finished": 0, "path": str(shared_dir / "base")},
              "sft": {"seconds": 42.0, "finished": 0, "path": str(shared_dir / "sft")}}
    v = plan.variants[1]
    config = plan.run_config(v, 0)
    assert compare.adopt_shared(config, shared, shared_dir) == ["base", "sft"]
    assert compare.adopt_shared(config, shared, shared_dir) == []  # idempotent

    same = load_config(DEMO_CONFIG, plan.run_overrides(v, 0))
    assert config_fingerprint(same) == config_fingerprint(config)
    state = RunState(Path(config.output.dir), same)  # the driver's own state: accepted
    info = state.data["stages"]["sft"]
    assert info["path"] == str(shared_dir / "sft") and info["seconds"] == 0.0
    assert info["shared_from"] == str(shared_dir) and info["shared_seconds"] == 42.0

    def must_not_run():
        raise AssertionError("a shared stage ran again")

    assert path_stage(state, "sft", must_not_run) == str(shared_dir / "sft")
    assert path_stage(state, "base", must_not_run) == str(shared_dir / "base")
    assert finished_stages(same) == {"base", "sft"}
    assert not compare.is_finished(config)


def test_a_run_directory_of_another_config_is_refused(plan):
    v = plan.variants[0]
    RunState(Path(plan.run_config(v, 0).output.dir), plan.run_config(plan.variants[1], 0))
    with pytest.raises(ConfigError, match="different config"):
        compare.is_finished(plan.run_config(v, 0))


def test_is_finished_needs_every_round_evaluated(plan):
    config = plan.run_config(plan.variants[0], 0)
    out = Path(config.output.dir)
    state = RunState(out, config)
    state.finish("round0/eval", 1.0)
    assert not compare.is_finished(config)
    state.finish("round1/eval", 1.0)
    (out / "metrics.jsonl").write_text("{}\n")
    assert compare.is_finished(config)


# --------------------------------------------------------------------------- aggregation


def rows(rewards, win=(0.5, 0.7), ppl_key="perplexity", length=None):
    out = []
    for r, (reward, w) in enumerate(zip(rewards, win)):
        row = {"round": r, "sampled_reward_mean": reward, "win_rate_vs_round0": w, ppl_key: 1.5 - 0.1 * r}
        if length is not None:
            row["eval_reply_length_mean"] = length[r]
        out.append(row)
    return out


def test_round_seconds_sum_each_rounds_stages():
    stages = {"base": {"seconds": 5.0}, "sft": {"seconds": 0.0, "shared_from": "x"},
              "round0/eval": {"seconds": 3.0}, "round1/sample": {"seconds": 1.5},
              "round1/reference": {"seconds": 0.5}, "round1/train": {"seconds": 2.0},
              "round1/eval": {"seconds": 3.0}, "round2/seg1/sample": {"seconds": 1.0},
              "round2/seg2/train": {"seconds": 2.5}, "round2/eval": {"seconds": 0.5}}
    assert compare_table.round_seconds(stages) == {0: 3.0, 1: 7.0, 2: 4.0}  # a pass's segments count


def test_candidates_sampled_add_up_over_rounds_and_an_online_pass_segments():
    """IP rounds' pools and an OP pass's segment pools, as drawn (before duplicates merge)."""
    def score(drawn, merged):
        return {"seconds": 0.1, "pool": {"candidates_premerge": drawn, "candidates": merged}}

    ip = {"round0/eval": {"seconds": 1.0}, "round1/score": score(576, 540), "round2/score": score(576, 500)}
    assert compare_table.round_candidates(ip) == {0: 0.0, 1: 576.0, 2: 1152.0}
    op = {"round0/eval": {}, "round1/seg1/score": score(256, 250), "round1/seg2/score": score(256, 240),
          "round1/seg3/score": score(64, 60), "round1/eval": {}, "round2/seg4/score": score(256, 256)}
    assert compare_table.round_candidates(op) == {0: 0.0, 1: 576.0, 2: 832.0}
    # A pool that does not say what it drew (an older state.json): unknown, not a partial sum.
    assert compare_table.round_candidates({**ip, "round3/score": {"seconds": 0.1, "pool": {}}}) == {}


def test_aggregate_means_and_stds_over_seeds_per_variant_and_round():
    results = [
        RunResult("rrhf", 1, rows([0.0, 0.4], length=[10, 8]), {0: 3.0, 1: 10.0}),
        RunResult("rrhf", 0, rows([0.2, 0.6], length=[12, 9]), {0: 5.0, 1: 12.0}),
        RunResult("raft", 0, rows([0.1, float("nan")], ppl_key="reference_perplexity"), {0: 4.0, 1: 9.0}),
    ]
    out = aggregate(results, ["raft", "rrhf"])
    assert [(r["variant"], r["round"]) for r in out] == [("raft", 0), ("raft", 1), ("rrhf", 0), ("rrhf", 1)]
    rrhf1 = out[3]
    assert rrhf1["seeds"] == [0, 1]  # sorted by seed; values follow that order
    assert rrhf1["sampled_reward"]["values"] == [0.6, 0.4]
    assert rrhf1["sampled_reward"]["mean"] == pytest.approx(0.5)
    assert rrhf1["sampled_reward"]["std"] == pytest.approx(math.sqrt(0.02))  # sample std, n − 1
    assert rrhf1["reply_length"]["mean"] == pytest.approx(8.5)
    assert rrhf1["seconds"]["mean"] == pytest.approx(11.0)
    assert rrhf1["perplexity"]["mean"] == pytest.approx(1.4)
    raft1 = out[1]
    assert raft1["sampled_reward"] == {"mean": None, "std": None, "n": 0, "values": [None]}  # NaN: absent
    assert raft1["perplexity"]["mean"] == pytest.approx(1.4)  # reference_perplexity read too
    assert raft1["win_rate_vs_round0"]["std"] is None  # one seed: no spread
    assert raft1["reply_length"]["n"] == 0
    json.dumps(out, allow_nan=False)  # compare.jsonl is strict JSON


def test_markdown_and_plot():
    results = [RunResult("rrhf", s, rows([0.0 + s / 10, 0.4 + s / 10]), {0: 3.0, 1: 10.0}) for s in (0, 1)]
    results.append(RunResult("shuffled", 0, rows([0.0, -0.3]), {0: 3.0, 1: 9.0}))
    out = aggregate(results)
    md = compare_table.format_markdown(out, seeds=[0, 1], variants=[Variant("rrhf", ()),
                                                              Variant("shuffled", ("train.shuffle_rewards=true",))])
    assert "| variant | round | sampled reward | win vs r0 (greedy) | perplexity | seconds |" in md
    assert "| rrhf | 1 | +0.450 ± 0.071 | 0.70 ± 0.00 | 1.40 ± 0.00 | 10 ± 0 |" in md
    assert "| shuffled | 1 | -0.300 | 0.70 | 1.40 | 9 |" in md
    assert "reply length |" not in md  # no run reported it: the column is left out
    assert "- `shuffled`: `train.shuffle_rewards=true`" in md
    png = compare_table.plot(out)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    # With the candidates each run sampled: a column, and the plot's x-axis.
    counted = aggregate([RunResult("op8", s, rows([0.0, 0.5]), {0: 3.0, 1: 9.0}, {0: 0.0, 1: 576.0 + s})
                         for s in (0, 1)])
    md = compare_table.format_markdown(counted, seeds=[0, 1])
    assert "| variant | round | sampled reward | win vs r0 (greedy) | perplexity | seconds | candidates sampled |" in md
    assert "| op8 | 1 | +0.500 ± 0.000 | 0.70 ± 0.00 | 1.40 ± 0.00 | 9 ± 0 | 576 ± 1 |" in md
    assert compare_table.plot(counted)[:8] == b"\x89PNG\r\n\x1a\n"


def test_parallel_runs_at_most_n_drivers_at_once_and_reports_the_failed(plan, monkeypatch):
    """--parallel N: N driver processes at a time; a failed one does not stop the others."""
    running, most, started = set(), [0], []

    class FakeDriver:
        def __init__(self, job):
            self.job, self.polls, self.returncode = job, 0, None
            running.add(job.variant.name)
            most[0] = max(most[0], len(running))

        def poll(self):
            self.polls += 1
            if self.polls < 3:
                return None
            running.discard(self.job.variant.name)
            self.returncode = 1 if self.job.variant.name == "raft" else 0
            return self.returncode

    def start(job, config_path, env):
        assert config_path == str(DEMO_CONFIG) and env["RAY_ADDRESS"] == "x:1"
        started.append(job.variant.name)
        return FakeDriver(job)

    monkeypatch.setattr(compare, "_start_driver", start)
    monkeypatch.setattr(compare, "POLL_SECONDS", 0.0)
    jobs = [compare.PlannedRun(v, 0, plan.run_config(v, 0), plan.run_overrides(v, 0)) for v in plan.variants]
    failed = compare._run_jobs(plan, jobs, 2, {"RAY_ADDRESS": "x:1"})
    assert started == [v.name for v in plan.variants] and most[0] == 2
    assert len(failed) == 1 and failed[0].startswith("raft seed 0: exit 1, see ")
