"""The online policy's pure pieces (OP-k): segment planning, the KL estimators, resume
bookkeeping, the config's refusals, and per-token reference log-probabilities."""

from __future__ import annotations

import math

import pytest
import torch

from rrhf_ray.cli import main
from rrhf_ray.config import ConfigError, load_config
from rrhf_ray.demo import DEMO_CONFIG
from rrhf_ray.loss import kl_to_reference
from rrhf_ray.segments import (
    Segment,
    last_trained,
    pass_order,
    plan_segments,
    sampler_version,
    serving_version,
    steps_of,
    total_steps,
)
from rrhf_ray.state import config_fingerprint

OP = ["sampling.preset=OP", "train.epochs=1"]


# --------------------------------------------------------------------------- segment planning


def test_segments_cut_each_pass_into_k_steps_of_queries():
    """10 queries, 2 a step, refresh every 2 steps: segments of 4, 4 and 2 queries (2, 2 and 1
    steps) per pass; 2 passes = 6 segments numbered 1-6 over the run, 10 steps in all."""
    segs = plan_segments(10, queries_per_step=2, refresh_every=2, rounds=2, seed=0)
    assert [(s.round, s.index, s.number, len(s.queries), s.steps) for s in segs] == [
        (1, 1, 1, 4, 2), (1, 2, 2, 4, 2), (1, 3, 3, 2, 1),
        (2, 1, 4, 4, 2), (2, 2, 5, 4, 2), (2, 3, 6, 2, 1)]
    assert total_steps(segs) == 10
    assert segs[3].name == "round2/seg1"
    for r in (1, 2):  # each pass visits every query once, in its own order
        visited = [q for s in segs if s.round == r for q in s.queries]
        assert sorted(visited) == list(range(10)) and visited == pass_order(10, 0, r)
    assert pass_order(10, 0, 1) != pass_order(10, 0, 2)  # a new order each pass
    assert plan_segments(10, 2, 2, 2, seed=0) == segs  # seeded: the same plan on resume


def test_a_last_segment_too_small_for_the_workers_joins_the_one_before():
    """7 queries, segments of 3 over 2 workers: 3, 3 and 1 → the lone query joins: 3 + 4; the
    joined segment's 4 queries make 2 steps (plan_steps: 2 + 2)."""
    segs = plan_segments(7, queries_per_step=3, refresh_every=1, rounds=1, num_workers=2)
    assert [len(s.queries) for s in segs] == [3, 4]
    assert [s.steps for s in segs] == [1, 1]  # 4 in steps of 3: 3 + 1, the 1 joins the first
    assert steps_of(4, 3, num_workers=2) == 1 and steps_of(5, 3, num_workers=2) == 2
    assert steps_of(8, 8) == 1 and steps_of(9, 8) == 2


def test_the_last_trained_segment_is_the_end_of_the_finished_prefix():
    segs = plan_segments(8, 2, 1, 1)
    assert last_trained(segs, set()) == 0
    assert last_trained(segs, {"round1/seg1/train", "round1/seg2/train"}) == 2
    # A later segment recorded without the one before it does not count (trained in order).
    assert last_trained(segs, {"round1/seg1/train", "round1/seg3/train"}) == 1
    assert Segment(1, 2, 2, (0,), 1).name == "round1/seg2"


def test_the_version_that_samples_each_segment():
    """Without staleness segment s is sampled by version s − 1; with one-step overlap by s − 2
    (ρ for the first two): every candidate at most one version behind the weights it trains."""
    assert [sampler_version(s, 0) for s in (1, 2, 3, 4)] == [0, 1, 2, 3]
    assert [sampler_version(s, 1) for s in (1, 2, 3, 4)] == [0, 0, 1, 2]
    assert all(0 <= (s - 1) - sampler_version(s, 1) <= 1 for s in range(1, 20))


def test_a_resumed_overlapping_run_samples_from_the_version_the_killed_one_drew_from():
    segs = plan_segments(8, 2, 1, 1)  # 4 one-step segments
    fronts = {f"round1/seg{i}/kl" for i in (1, 2)}
    # Killed while segment 2 trained beside segment 3's sampling: segment 3 is drawn by version 1.
    assert serving_version(segs, fronts, last=1, staleness=1) == 1
    # Segment 2 trained, segment 3's sampling not finished: still version 1, not 2.
    assert serving_version(segs, fronts, last=2, staleness=1) == 1
    # Without staleness the samplers serve the last trained version.
    assert serving_version(segs, fronts, last=2, staleness=0) == 2
    # Everything sampled (the last segment trains): the last trained.
    assert serving_version(segs, {f"round1/seg{i}/kl" for i in (1, 2, 3, 4)}, last=3, staleness=1) == 3
    assert serving_version(segs, set(), last=0, staleness=1) == 0


def test_beside_runs_both_at_once_and_raises_after_both_end():
    import threading

    from rrhf_ray.workflow import beside

    met = threading.Barrier(2, timeout=10)  # passes only when both sides wait at once
    seen: list[str] = []
    beside(lambda: (met.wait(), seen.append("first")), lambda: (met.wait(), seen.append("second")))
    assert sorted(seen) == ["first", "second"]
    done = threading.Event()

    def slow_failure() -> None:
        done.wait(10)
        raise ValueError("the trainer failed")

    with pytest.raises(ValueError, match="the trainer failed"):  # raised once the second is over
        beside(slow_failure, done.set)
    with pytest.raises(KeyError):  # the second's error first, after the first has ended
        beside(lambda: seen.append("ended"), lambda: (_ for _ in ()).throw(KeyError("x")))
    assert seen[-1] == "ended"


# --------------------------------------------------------------------------- KL estimators


def test_kl_estimators_by_hand():
    """Two tokens, π = (1/2, 1/4), π_ref = (1/4, 1/2):
    k1 = (log 1/2 − log 1/4) + (log 1/4 − log 1/2) = log 2 − log 2 = 0;
    k3: ρ = (1/2, 2): (1/2 − 1 − log 1/2) + (2 − 1 − log 2) = (−1/2 + log 2) + (1 − log 2) = 1/2.
    A third, padded position counts for nothing whatever its values."""
    logp = torch.tensor([[math.log(0.5), math.log(0.25), 5.0]])
    ref = torch.tensor([[math.log(0.25), math.log(0.5), -5.0]])
    mask = torch.tensor([[True, True, False]])
    assert kl_to_reference(logp, ref, mask, "k1").item() == pytest.approx(0.0, abs=1e-7)
    assert kl_to_reference(logp, ref, mask, "k3").item() == pytest.approx(0.5, abs=1e-7)
    # π = π_ref: both 0; and k3 ≥ 0 per token where k1 can be negative.
    assert kl_to_reference(logp, logp, mask, "k3").item() == 0.0
    one = torch.tensor([[math.log(0.25)]]), torch.tensor([[math.log(0.5)]]), torch.tensor([[True]])
    assert kl_to_reference(*one, "k1").item() == pytest.approx(-math.log(2))
    assert kl_to_reference(*one, "k3").item() == pytest.approx(2 - 1 - math.log(2))
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_to_reference(*one, "k2")


def test_kl_estimators_are_unbiased_for_the_true_kl():
    """Tokens drawn from π over 3 symbols: the means of k1 and k3 approach Σ π log(π / π_ref)."""
    pi = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    ref = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    true = float((pi * (pi / ref).log()).sum())
    draws = torch.multinomial(pi, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    logp, logr = pi.log()[draws][:, None], ref.log()[draws][:, None]
    mask = torch.ones_like(logp, dtype=torch.bool)
    for est in ("k1", "k3"):
        assert kl_to_reference(logp, logr, mask, est).mean().item() == pytest.approx(true, abs=0.01)


# --------------------------------------------------------------------------- config


def test_op_config_and_the_ip_fingerprint():
    config = load_config(DEMO_CONFIG, [*OP, "online.refresh_every=2", "online.kl_coef=0.1"])
    assert config.online.refresh_every == 2 and config.online.kl_estimator == "k1"
    assert load_config(DEMO_CONFIG, OP).online.refresh_every == 1  # the defaults under OP
    ip = load_config(DEMO_CONFIG)
    assert ip.online is None
    # The online section is absent from an IP run's fingerprint (earlier runs still resume), and
    # part of an OP run's.
    from rrhf_ray.state import _fingerprint_data

    assert "online" not in _fingerprint_data(ip) and _fingerprint_data(config)["online"]["kl_coef"] == 0.1
    assert config_fingerprint(config) != config_fingerprint(
        config.model_copy(update={"online": config.online.model_copy(update={"kl_coef": 0.2})}))
    # max_staleness 0 (as before it existed) leaves an OP run's fingerprint as it was; 1 is another run.
    assert "max_staleness" not in _fingerprint_data(config)["online"]
    stale = load_config(DEMO_CONFIG, [*OP, "online.refresh_every=2", "online.kl_coef=0.1", "online.max_staleness=1"])
    assert stale.online.max_staleness == 1 and config_fingerprint(stale) != config_fingerprint(config)


@pytest.mark.parametrize("overrides, expected", [
    (["online.refresh_every=2"], "online.refresh_every: sampling.preset is IP, and only sampling.preset OP"),
    (["online.kl_coef=0.1", "sampling.preset=DP", "rounds=1"], "online.kl_coef: sampling.preset is DP"),
    (["sampling.preset=OP"], "train.epochs: 4 with sampling.preset OP"),
    ([*OP, "train.lora.enabled=true"], "train.lora.enabled: LoRA with sampling.preset OP"),
    ([*OP, "train.loss=dpo"], "train.loss.name: dpo with sampling.preset OP"),
    ([*OP, "online.max_staleness=2"], "online.max_staleness: Input should be 0 or 1"),
    (["online.max_staleness=1"], "online.max_staleness: sampling.preset is IP"),
])
def test_online_mistakes_are_one_error_line_naming_the_field(overrides, expected, capsys):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(")):
        load_config(DEMO_CONFIG, overrides)
    assert main(["validate", *overrides]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err


# --------------------------------------------------------------------------- per-token log-probs


def test_per_token_reference_log_probs_sum_to_the_trainers(tiny_model_dir):
    """The per-token values the KL stage reads sum to the sequence log-probs DPO's reference
    stores (the trainer's own forward), one list per candidate, as many values as tokens."""
    from rrhf_ray.config import TrainConfig
    from rrhf_ray.train import reference
    from rrhf_ray.types import QueryGroup
    from tests.helpers import ranked_rows

    cfg = TrainConfig(queries_per_step=4, micro_batch_queries=2, max_length=96)
    groups = [QueryGroup(**r) for r in ranked_rows(3)]
    sums = reference.reference_logprobs(str(tiny_model_dir), groups, cfg)
    tokens = reference.reference_logprobs(str(tiny_model_dir), groups, cfg, per_token=True)
    for s, t in zip(sums, tokens):
        assert [sum(x) for x in t] == pytest.approx(s, abs=1e-3)
        assert all(len(x) > 1 and all(v <= 0 for v in x) for x in t)


# --------------------------------------------------------------------------- the penalty


def _group(scores):
    from rrhf_ray.types import QueryGroup

    return QueryGroup(query="\n\nHuman: hi\n\nAssistant:", responses=[f" r{i}" for i in range(len(scores))],
                      scores=scores)


def test_the_reward_penalty_by_hand():
    """β = 2, rewards (1, 0, 5), KL (0.5, −0.25, None: a candidate the trainer drops):
    kl_in reward → rewards (1 − 1, 0 + 0.5, 5) = (0, 0.5, 5): the ranking of the first two flips.
    Means over the two kept candidates: reward 0.5, KL 0.125, r − β·KL (0 + 0.5) / 2 = 0.25,
    length (2 + 3) / 2 = 2.5 tokens (the per-token lists under ρ)."""
    from rrhf_ray.config import OnlineConfig
    from rrhf_ray.online import candidate_kl, penalized

    ref = [[-1.0, -1.0], [-0.5, -0.5, -0.5], None]
    pool, numbers = penalized([_group([1.0, 0.0, 5.0])], [[0.5, -0.25, None]], [ref],
                              OnlineConfig(kl_coef=2.0))
    assert pool[0].scores == [0.0, 0.5, 5.0] and pool[0].ref_logprobs is None
    assert numbers == {"candidates": 2, "reward_mean": 0.5, "kl_mean": 0.125, "reward_minus_kl_mean": 0.25,
                       "response_length_mean": 2.5, "kl_coef": 2.0, "kl_estimator": "k1", "kl_in": "reward"}
    # kl_in loss: the rewards as scored, Σ log ρ of each candidate for the trainer's term.
    pool, numbers = penalized([_group([1.0, 0.0, 5.0])], [[0.5, -0.25, None]], [ref],
                              OnlineConfig(kl_coef=2.0, kl_in="loss"))
    assert pool[0].scores == [1.0, 0.0, 5.0] and pool[0].ref_logprobs == [-2.0, -1.5, None]
    assert numbers["reward_minus_kl_mean"] == 0.25  # reported alike
    # Per candidate from per-token lists: π = (1/2, 1/4), ρ = (1/4, 1/2) as in the estimators' case.
    lp, lr = [math.log(0.5), math.log(0.25)], [math.log(0.25), math.log(0.5)]
    assert candidate_kl([lp, None], [lr, None], "k3") == [pytest.approx(0.5), None]


def test_the_loss_term_by_hand():
    """kl_in loss, β = 0.5, one query, Σ log π = (−1, −3), Σ log ρ = (−2, −2): the term is
    β · mean(½·1², ½·(−1)²) = 0.25 on the query's loss, and its gradient on Σ log π is
    β · (log π − log ρ) / K = (0.25, −0.25): the candidate π favours over ρ is pushed down."""
    from rrhf_ray.loss import rrhf_loss
    from rrhf_ray.train.rrhf import with_kl_term

    logp = torch.tensor([[-1.0, -3.0]], requires_grad=True)
    lengths, rewards = torch.tensor([[2, 2]]), torch.tensor([[1.0, 0.0]])
    valid, ref = torch.ones(1, 2, dtype=torch.bool), torch.tensor([[-2.0, -2.0]])
    base = rrhf_loss(logp, lengths, rewards, valid)
    out = with_kl_term(base, logp, ref, valid, 0.5)
    assert (out.loss - base.loss).item() == pytest.approx(0.25)
    assert (out.per_query_loss - base.per_query_loss).tolist() == pytest.approx([0.25])
    (g_out,) = torch.autograd.grad(out.loss, logp, retain_graph=True)
    (g_base,) = torch.autograd.grad(base.loss, logp)
    assert (g_out - g_base)[0].tolist() == pytest.approx([0.25, -0.25])


def test_status_of_an_online_run_names_the_segments():
    """`rrhf-ray status` of an OP run stopped in round 1's segments: the stage names aligned, and
    the next step is round 1's remaining segments, then its evaluation (not round1/sample)."""
    from rrhf_ray.report import format_status

    stages = {"round0/eval": {"seconds": 2.0, "eval": {}}, "round1/seg1/sample": {"seconds": 0.25},
              "round1/seg1/train": {"seconds": 1.5}}
    state = {"rounds": 2, "stages": stages, "config": {"sampling": {"preset": "OP"}}}
    lines = format_status(state, "out").splitlines()
    assert lines[1:4] == ["  done  round0/eval             2.0 s", "  done  round1/seg1/sample      0.2 s",
                          "  done  round1/seg1/train       1.5 s"]  # one column, as wide as the longest name
    assert lines[4] == "next: round1's segments, then round1/eval"
    assert format_status({**state, "stages": {}}, "out").splitlines()[1] == "next: round0/eval"


def test_a_damaged_segment_checkpoint_is_removed_and_what_follows_it_redone(tmp_path, caplog):
    """Segments 1-3 of pass 1 trained, pass 1 evaluated, pass 2's segment 1 sampled; segment 3's
    checkpoint is cut short: it is named and removed, and segment 3's train and refresh, round 1's
    evaluation and every later segment stage are forgotten; segments 1 and 2 and segment 3's
    sampling (by segment 2's weights) stay."""
    from rrhf_ray.context import RunContext
    from rrhf_ray.data.candidates import get_preset
    from rrhf_ray.segments import redone_with
    from rrhf_ray.state import RunState
    from rrhf_ray.train.checkpoints import write_manifest
    from rrhf_ray.workflow import drop_damaged_segments

    segs = plan_segments(6, queries_per_step=2, refresh_every=1, rounds=2)  # 3 segments a pass
    names = ["round0/eval", *[f"round1/seg{i}/{s}" for i in (1, 2, 3) for s in ("sample", "train", "refresh")],
             "round1/eval", "round2/seg1/sample"]
    assert redone_with(segs[2], segs, names) == ["round1/seg3/train", "round1/seg3/refresh", "round1/eval",
                                                 "round2/seg1/sample"]
    config = load_config(DEMO_CONFIG, [*OP, "rounds=2", f"output.dir={tmp_path}"])
    state = RunState(tmp_path, config)
    state.data["stages"] = {name: {"seconds": 1.0} for name in names}
    ctx = RunContext(config=config, state=state, preset=get_preset("OP"), external=[], tracker=None,
                     segments=segs)
    for seg in segs[:3]:
        ckpt = ctx.segment_dir(seg) / "checkpoint"
        ckpt.mkdir(parents=True)
        (ckpt / "model.safetensors").write_bytes(b"x" * 100)
        write_manifest(ckpt)
    (ctx.segment_dir(segs[2]) / "checkpoint/model.safetensors").write_bytes(b"x" * 50)
    drop_damaged_segments(ctx)
    assert list(state.data["stages"]) == names[:8]  # round 0, segments 1 and 2, segment 3's sampling
    assert not (ctx.segment_dir(segs[2]) / "checkpoint").exists()
    assert (ctx.segment_dir(segs[1]) / "checkpoint").exists()
    assert "round1/seg3's checkpoint is damaged" in caplog.text and "has 50 bytes" in caplog.text
