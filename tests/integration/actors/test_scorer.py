"""Rewards on a real local Ray cluster: a tiny HF reward model in 2 actors, and rule rewards."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from rrhf_ray.actors.scorer import RewardError, RewardPool, RewardScorer
from rrhf_ray.config import RewardConfig
from rrhf_ray.types import Candidate, CandidateGroup, DataError

pytestmark = pytest.mark.ray

GROUPS = [
    CandidateGroup(f"\n\nHuman: {q}\n\nAssistant:", tuple(
        Candidate(r, source=s) for r, s in zip(rs, ("policy@0", "chosen", "rejected"))))
    for q, rs in [
        ("How do I reset my password?", [" Open settings and press reset.", " No.", " Whatever."]),
        ("Can you help me fix a flat tyre?", [" Sure. Loosen the nuts, lift the car.", " BAD"]),
        ("What is a good way to learn to cook?", [" Start with simple recipes.", " Sorry."]),
        ("How do I water a cactus?", [" Rarely, and only when the soil is dry.", " Figure it out."]),
    ]
]


def length_reward(queries: list[str], responses: list[str]) -> list[float]:
    """A rule reward: longer is better, plus the query's length so the pairing is checked."""
    return [len(r) + len(q) / 1000 for q, r in zip(queries, responses)]


def nan_on_bad(queries: list[str], responses: list[str]) -> list[float]:
    return [math.nan if r.strip() == "BAD" else 1.0 for r in responses]


@pytest.fixture(scope="module")
def reward_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LlamaForSequenceClassification (one logit) from the tiny config, with its tokenizer."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = AutoConfig.from_pretrained(tiny_model_dir, num_labels=1, pad_token_id=tok.pad_token_id)
    torch.manual_seed(1)
    model = LlamaForSequenceClassification(config)
    out = tmp_path_factory.mktemp("rm") / "reward-model"
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def _hf_reward(model_dir: Path, ids: list[int]) -> float:
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0, 0].item()


def test_model_rewards_equal_a_direct_hf_forward(ray_cluster, reward_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    config = RewardConfig(kind="model", model=str(reward_model_dir), num_workers=2, batch_size=2,
                          chunk_queries=1)
    pool = RewardPool(config)
    try:
        scored = ray_cluster.get(pool.score_refs(GROUPS))
    finally:
        pool.shutdown()
    tok = AutoTokenizer.from_pretrained(reward_model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(reward_model_dir, dtype=torch.float32).eval()
    assert [g.query for g in scored] == [g.query for g in GROUPS]
    for group, src in zip(scored, GROUPS):
        assert group.responses == src.responses and group.sources == src.sources
        for response, score in zip(group.responses, group.scores):
            # Unpadded, one pair at a time: the actor's padded batches must not change a reward.
            ids = tok(group.query)["input_ids"] + tok(response, add_special_tokens=False)["input_ids"]
            with torch.inference_mode():
                expected = model(input_ids=torch.tensor([ids])).logits[0, 0].item()
            assert score == pytest.approx(expected, abs=1e-5)
    assert len({s for g in scored for s in g.scores}) > 1


def test_long_query_is_cut_from_the_left_and_the_response_kept(reward_model_dir: Path) -> None:
    scorer = RewardScorer(str(reward_model_dir), RewardConfig(kind="model", model=str(reward_model_dir),
                                                              max_length=24))
    tok = scorer.tokenizer
    query = "\n\nHuman: " + "please help me with my long question " * 8 + "\n\nAssistant:"
    response = " Sure, loosen the nuts first."
    ids = scorer.encode(query, response)
    reply = tok(response, add_special_tokens=False)["input_ids"]
    body = tok(query, add_special_tokens=False)["input_ids"]
    assert len(ids) == 24
    assert ids[0] == tok.bos_token_id
    assert ids[-len(reply):] == reply                             # the response is intact
    assert ids[1:-len(reply)] == body[-(24 - 1 - len(reply)):]    # the query's end survives
    assert scorer.score([query], [response]).scores[0] == pytest.approx(
        _hf_reward(reward_model_dir, ids), abs=1e-5)
    short = scorer.encode("\n\nHuman: Hi\n\nAssistant:", response)  # nothing cut when it fits
    assert short == tok("\n\nHuman: Hi\n\nAssistant:")["input_ids"] + reply


def test_rule_rewards_run_as_tasks_in_order(ray_cluster) -> None:
    pool = RewardPool(RewardConfig(kind="rule", rule=f"{__name__}:length_reward", num_workers=2,
                                   chunk_queries=1))
    scored = ray_cluster.get(pool.score_refs(GROUPS))
    for group in scored:
        assert group.scores == [len(r) + len(group.query) / 1000 for r in group.responses]
        assert group.sources == ["policy@0", "chosen", "rejected"][:group.k]


def test_a_nan_reward_names_the_query_and_keeps_the_scored_prefix(ray_cluster) -> None:
    pool = RewardPool(RewardConfig(kind="rule", rule=f"{__name__}:nan_on_bad", num_workers=2,
                                   chunk_queries=1))
    with pytest.raises(RewardError, match=r"nan \(not finite\) for response 1 \(chosen\) of query 1: "
                                          r".*fix a flat tyre") as info:
        ray_cluster.get(pool.score_refs(GROUPS))
    assert [g.query for g in info.value.scored] == [GROUPS[0].query]
    assert info.value.scored[0].scores == [1.0, 1.0, 1.0]


def test_a_wrong_rule_fails_before_any_work() -> None:
    """The pool loads the rule in the driver: a wrong one is a DataError naming the part that is
    wrong, raised before any task or actor starts (this test needs no Ray cluster)."""
    with pytest.raises(DataError) as info:
        RewardPool(RewardConfig(kind="rule", rule="no_such_module:fn"))
    assert type(info.value) is DataError
    assert str(info.value) == ("reward.rule 'no_such_module:fn': cannot import 'no_such_module' "
                               "(No module named 'no_such_module')")
    with pytest.raises(DataError) as info:
        RewardPool(RewardConfig(kind="rule", rule=f"{__name__}:missing"))
    assert type(info.value) is DataError
    assert str(info.value) == f"reward.rule '{__name__}:missing': {__name__} has no function 'missing'"
    with pytest.raises(DataError) as info:
        RewardPool(RewardConfig(kind="rule", rule=f"{__name__}.length_reward"))
    assert str(info.value) == (f"reward.rule '{__name__}.length_reward' is not of the form "
                               "package.module:function or path/to/file.py:function")


def test_sample_and_score_commands_write_the_reference_format(ray_cluster, tiny_model_dir: Path,
                                                                tmp_path: Path) -> None:
    """`sample` with preset P (the data set's responses + an external file, no engine), then
    `score` with a rule; a NaN rule exits 2 and leaves the scored prefix beside the output."""
    import json

    from rrhf_ray.cli import main
    from rrhf_ray.types import read_groups

    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"query": g.query, "responses": g.responses[1:],
                                        "scores": [1.0, 0.0][:len(g.candidates) - 1]}) + "\n" for g in GROUPS))
    ext = tmp_path / "ext.jsonl"
    ext.write_text(json.dumps({"query": GROUPS[0].query, "responses": [" Ask the admin.", " No."],
                               "source": "gpt4"}) + "\n")
    config = tmp_path / "run.yaml"
    config.write_text("rounds: 1\n"  # P never samples from ρ*: one round is all it takes
                      f"model: {{name_or_path: {tiny_model_dir}}}\n"  # P: only its tokenizer loads
                      f"data: {{source: {data}, eval_split: null, eval_fraction: 0.0}}\n"
                      f"sampling: {{preset: P, external: [{ext}]}}\n"
                      f"reward: {{kind: rule, rule: '{__name__}:length_reward'}}\n"
                      f"output: {{dir: {tmp_path / 'run'}}}\n")  # the commands' logs/ go there
    pool, scored = tmp_path / "pool.jsonl", tmp_path / "scored.jsonl"
    assert main(["sample", str(config), "--out", str(pool)]) == 0
    groups = {g.query: g for g in read_groups(pool, scored=False)}
    first = groups[GROUPS[0].query]
    assert first.responses == [" No.", " Whatever.", " Ask the admin."]
    assert first.sources == ["dataset+gpt4", "dataset", "gpt4"]

    assert main(["score", str(config), "--pool", str(pool), "--out", str(scored),
                 "reward.num_workers=2"]) == 0
    for g in read_groups(scored):
        assert g.scores == [len(r) + len(g.query) / 1000 for r in g.responses]
        assert g.sources == groups[g.query].sources

    assert main(["score", str(config), "--pool", str(pool), "--out", str(tmp_path / "bad.jsonl"),
                 f"reward.rule={__name__}:nan_on_bad"]) == 2
    assert not (tmp_path / "bad.jsonl").exists()
    order = [g.query for g in read_groups(pool, scored=False)]
    bad_at = order.index(GROUPS[1].query)
    assert bad_at > 0  # data.seed 0 shuffles it off the front, so there is a prefix to keep
    assert [g.query for g in read_groups(tmp_path / "bad.partial.jsonl")] == order[:bad_at]
