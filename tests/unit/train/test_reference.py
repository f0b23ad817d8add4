"""DPO's reference log-probabilities (`rrhf_ray.train.reference`): the same tokens and forward as
the trainer, stored with the pool, a stage of the workflow that a resumed run does not redo."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rrhf_ray import stages
from rrhf_ray.cli import main
from rrhf_ray.config import TrainConfig, load_config
from rrhf_ray.context import RunContext
from rrhf_ray.data.candidates import get_preset
from rrhf_ray.demo import DEMO_CONFIG
from rrhf_ray.state import RunState
from rrhf_ray.train import reference
from rrhf_ray.train.encoding import Encoder
from rrhf_ray.train.loop import MicroBatch
from rrhf_ray.train.rrhf import encoded_logprobs, micro_batch_loss, use_prefix_sharing
from rrhf_ray.train.tokens import tokenizer_fingerprint
from rrhf_ray.types import QueryGroup, read_groups, write_groups
from tests.helpers import ranked_rows, write_ranked

DPO = TrainConfig(queries_per_step=8, micro_batch_queries=8, max_length=96, loss={"name": "dpo"})


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_reference_equals_the_policys_own_log_probabilities_so_dpo_starts_at_log_2(tiny_model_dir, tokenizer):
    """Reference = the starting policy: the stored values are the trainer's own Σ log π of each
    candidate (its tokens, its prefix-shared forward), so at step 0 h = 0 and every strict pair
    costs −log σ(0) = log 2: the preference part of the loss is log 2 in every query with a pair."""
    groups = [QueryGroup(**r) for r in ranked_rows(8)]
    refs = reference.reference_logprobs(str(tiny_model_dir), groups, DPO)
    assert [len(r) for r in refs] == [g.k for g in groups]

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    shared = use_prefix_sharing(model, DPO.prefix_sharing)
    assert shared  # Llama: the trainer's prompt-shared forward
    encoder = Encoder(tokenizer, DPO.max_length)
    enc = [encoder(g) for g in reference.with_reference(groups, refs)]
    own = encoded_logprobs(model.eval(), enc, DPO, shared)
    for e, mine in zip(enc, own):
        assert e.refs == pytest.approx(mine, abs=1e-4)

    model.train()
    out, _ = micro_batch_loss(model, enc, DPO, MicroBatch(list(range(len(enc))), 1.0, torch.device("cpu")),
                              shared=shared)
    assert out.rank_loss.item() == pytest.approx(math.log(2), abs=1e-4)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-4)  # sft_weight 0


def test_a_candidate_the_trainer_drops_gets_no_reference(tiny_model_dir, tokenizer):
    """train.truncated: drop leaves a cut-off reply out of training: its reference is None, the
    others are those of the candidates the trainer keeps (same prompt cut, same tokens)."""
    row = ranked_rows(1)[0]
    q = row["query"]
    ids = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in row["responses"]]
    group = QueryGroup(**row, finish_reasons=["stop", "length", "stop"], token_ids=ids,
                       prompt_ids=tokenizer(q)["input_ids"], tokenizer=tokenizer_fingerprint(tokenizer))
    cfg = DPO.model_copy(update={"truncated": "drop"})
    (refs,) = reference.reference_logprobs(str(tiny_model_dir), [group], cfg)
    assert refs[1] is None and refs[0] is not None and refs[2] is not None
    (stored,) = reference.with_reference([group], [refs])
    enc = Encoder(tokenizer, cfg.max_length, "drop")(stored)
    assert enc.kept == [0, 2] and enc.refs == [refs[0], refs[2]]


def test_ref_logprobs_round_trip_through_jsonl_and_parquet_and_are_validated(tmp_path):
    row = ranked_rows(1)[0]
    g = QueryGroup(**row, ref_logprobs=[-3.5, None, -7.25])
    for name in ("pool.jsonl", "pool.parquet"):
        write_groups([g], tmp_path / name)
        assert read_groups(tmp_path / name)[0].ref_logprobs == [-3.5, None, -7.25]
    with pytest.raises(ValueError, match="ref_logprobs has 2 entries but responses has 3"):
        QueryGroup(**row, ref_logprobs=[-1.0, -2.0])
    with pytest.raises(ValueError, match="ref_logprobs"):
        QueryGroup(**row, ref_logprobs=[-1.0, float("nan"), -2.0])


def test_the_reference_stage_runs_once_and_a_resumed_run_does_not_recompute(tiny_model_dir, tmp_path,
                                                                             monkeypatch):
    """The workflow's stage round<r>/reference writes pool_ref.parquet (pool + ref_logprobs) and
    records itself in state.json; started again, it is skipped: no forward runs."""
    out = tmp_path / "run"
    config = load_config(DEMO_CONFIG, ["train.loss.name=dpo", f"output.dir={out}"])
    rd = out / "rounds" / "1"
    pool = write_ranked(tmp_path / "pool.jsonl", 6)
    write_groups(read_groups(pool), rd / "pool.parquet")
    calls = []
    compute = reference.compute_reference
    monkeypatch.setattr(reference, "compute_reference", lambda *a, **k: calls.append(1) or compute(*a, **k))

    def stage(state: RunState) -> bool:
        ctx = RunContext(config=config, state=state, preset=get_preset("IP"), external=[], tracker=None,
                         rho=str(tiny_model_dir))
        return ctx.run_stage(1, "reference", stages.reference)

    assert stage(RunState(out, config)) and calls == [1]
    groups = read_groups(rd / "pool_ref.parquet")
    assert len(groups) == 6 and all(len(g.ref_logprobs) == g.k for g in groups)
    assert [g.scores for g in groups] == [g.scores for g in read_groups(pool)]
    info = json.loads((out / "state.json").read_text())["stages"]["round1/reference"]
    assert info["reference"] == {"model": str(tiny_model_dir), "candidates": 18}
    mtime = (rd / "pool_ref.parquet").stat().st_mtime_ns

    assert not stage(RunState(out, config))  # resumed: finished, skipped
    assert calls == [1] and (rd / "pool_ref.parquet").stat().st_mtime_ns == mtime


def test_train_command_with_dpo_computes_the_reference_first(tiny_model_dir, tmp_path):
    data = write_ranked(tmp_path / "ranked.jsonl", 8)
    out = tmp_path / "out"
    assert main(["train", "--no-ray", "--data", str(data), "--model", str(tiny_model_dir),
                 "--output", str(out), "epochs=1", "queries_per_step=4", "micro_batch_queries=4",
                 "loss.name=dpo", "loss.beta=0.5"]) == 0
    ref_pool = tmp_path / "out.pool_ref.parquet"
    assert all(g.ref_logprobs is not None for g in read_groups(ref_pool))
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["queries"] == 8 and (out / "model.safetensors").exists()


def test_a_long_data_set_response_is_scored_as_the_trainer_cuts_it(tiny_model_dir, tokenizer):
    """A `chosen` longer than train.max_length: the reference scores the tokens the trainer keeps
    (the whole prompt, the response cut from the right without EOS); with train.truncated: drop
    the cut response is left out here as in the trainer (None)."""
    row = ranked_rows(1)[0]
    long = " and then you wipe the chain" * 40
    group = QueryGroup(query=row["query"], responses=[long, *row["responses"][1:]], scores=row["scores"])
    (refs,) = reference.reference_logprobs(str(tiny_model_dir), [group], DPO)
    enc = Encoder(tokenizer, DPO.max_length)(group)
    assert enc.prompt == tokenizer(row["query"])["input_ids"] and len(enc.ids[0]) == DPO.max_length
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    (own,) = encoded_logprobs(model, [enc], DPO, use_prefix_sharing(model, DPO.prefix_sharing))
    assert refs == pytest.approx(own, abs=1e-4)

    drop = DPO.model_copy(update={"truncated": "drop"})
    (dropped,) = reference.reference_logprobs(str(tiny_model_dir), [group], drop)
    assert dropped[0] is None and dropped[1:] == pytest.approx(refs[1:], abs=1e-4)
