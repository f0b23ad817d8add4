"""Reward-model training without Ray: the Bradley-Terry loss by hand, a clear preference
learned to held-out accuracy ≥ 0.9, a saved model that `from_pretrained` alone scores the same,
and malformed pairs named by file and line."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rrhf_ray.config import LoraConfig, TrainConfig
from rrhf_ray.data.pairs import read_preference_pairs
from rrhf_ray.train.checkpoints import is_finished_model
from rrhf_ray.train.reward_model import (
    RewardModelJob,
    bradley_terry_loss,
    encode_text,
    pairwise_accuracy,
    rm_loop_per_worker,
)
from rrhf_ray.types import DataError
from tests.stage_data import preference_rows, write_jsonl

CFG = TrainConfig(epochs=2, lr=1e-3, queries_per_step=8, micro_batch_queries=4, warmup_ratio=0.0)


def test_bradley_terry_loss_by_hand():
    """r_c − r_r = 0 → log 2; = 2 → log(1 + e^−2) = 0.126928; = −1 → log(1 + e) = 1.313262;
    a margin of −200 stays finite (200), where log(σ(·)) would give −inf."""
    chosen = torch.tensor([0.5, 3.0, -1.0, -100.0])
    rejected = torch.tensor([0.5, 1.0, 0.0, 100.0])
    expected = [math.log(2), math.log1p(math.exp(-2)), math.log1p(math.e), 200.0]
    assert bradley_terry_loss(chosen, rejected).tolist() == pytest.approx(expected, rel=1e-6)


def test_encoding_cuts_the_query_from_the_left(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    query = "\n\nHuman: " + "a long question " * 30 + "\n\nAssistant:"
    ids = encode_text(tok, query, " Sure, happy to help!", 24)
    reply = tok(" Sure, happy to help!", add_special_tokens=False)["input_ids"]
    assert len(ids) == 24 and ids[0] == tok.bos_token_id and ids[-len(reply):] == reply
    assert tok.decode(ids[1 : -len(reply)]).endswith("\n\nAssistant:")
    short = encode_text(tok, "\n\nHuman: hi\n\nAssistant:", " Hello", 64)
    assert short == tok("\n\nHuman: hi\n\nAssistant: Hello")["input_ids"]


@pytest.fixture(scope="module")
def trained_rm(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("rm")
    data = write_jsonl(d / "pref.jsonl", preference_rows(32))
    held = write_jsonl(d / "held.jsonl", preference_rows(16, held_out=True))
    job = RewardModelJob(model_path=str(tiny_model_dir), data_path=str(data), output_dir=str(d / "rm"),
                         train=CFG, eval_path=str(held))
    metrics = rm_loop_per_worker({"job": job.model_dump()})
    return d / "rm", held, metrics


def test_reward_model_learns_a_clear_preference(trained_rm):
    out, held, metrics = trained_rm
    pairs = read_preference_pairs(str(held))
    acc = pairwise_accuracy(out, pairs)
    assert acc >= 0.9
    assert metrics["eval_accuracy"] == acc and metrics["eval_margin"] > 1.0
    assert is_finished_model(out)
    assert json.loads((out / "train_metrics.json").read_text())["pairs"] == 32


def test_saved_reward_model_scores_the_same_with_plain_from_pretrained(trained_rm):
    """No project code: AutoModelForSequenceClassification + its tokenizer, padded batch of the
    concatenated texts. pad_token_id in the config makes the model read the last real token."""
    out, held, _ = trained_rm
    rows = [json.loads(line) for line in held.read_text().splitlines()[:6]]
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id
    texts = [r["query"] + r[side] for r in rows for side in ("chosen", "rejected")]
    with torch.no_grad():
        batched = model(**tok(texts, return_tensors="pt", padding=True)).logits[:, 0]
        alone = torch.cat([model(**tok([t], return_tensors="pt")).logits[:, 0] for t in texts])
        encoded = torch.cat([
            model(input_ids=torch.tensor([encode_text(tok, r["query"], r[side], 512)])).logits[:, 0]
            for r in rows for side in ("chosen", "rejected")
        ])
    torch.testing.assert_close(batched, alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(encoded, alone, rtol=0, atol=1e-5)
    assert (batched[0::2] > batched[1::2]).all()


def test_lora_reward_model_saves_merged_with_its_head(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "pref.jsonl", preference_rows(8))
    cfg = CFG.model_copy(update={"epochs": 1, "lora": LoraConfig(enabled=True, r=4)})
    job = RewardModelJob(model_path=str(tiny_model_dir), data_path=str(data), output_dir=str(tmp_path / "rm"),
                         train=cfg, eval_fraction=0.25)
    metrics = rm_loop_per_worker({"job": job.model_dump()})
    assert metrics["pairs"] == 6 and "eval_accuracy" in metrics  # 2 of 8 held out
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert model.score.weight.abs().sum() > 0


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"query": "q", "chosen": " Sure!"}, "line 2: missing field 'rejected'"),
        ({"query": "q", "chosen": " Sure!", "rejected": " Sure!"}, "line 2: chosen and rejected are the same text"),
        ({"query": "q", "chosen": "", "rejected": " No."}, "line 2: field 'chosen' is empty"),
        ({"query": "  ", "chosen": " Yes", "rejected": " No."}, "line 2: field 'query' is empty"),
    ],
)
def test_malformed_pairs_are_named(tmp_path, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [preference_rows(1)[0], row])
    with pytest.raises(DataError, match=message) as err:
        read_preference_pairs(str(path))
    assert str(path) in str(err.value)


def test_malformed_hh_rows_are_named(tmp_path):
    ok = {"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": " Hello!", "rejected": " Go away."}
    same = ok | {"rejected": " Hello!"}
    path = write_jsonl(tmp_path / "rm_static.jsonl", [ok, ok, same])
    with pytest.raises(DataError, match="rm_static.jsonl line 3: chosen and rejected are the same text"):
        read_preference_pairs(str(path))
    empty = {"chosen": "\n\nHuman: hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: hi\n\nAssistant:"}
    path = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": ok["prompt"] + " Yes", "rejected": ok["prompt"] + " No"},
                                               empty])
    with pytest.raises(DataError, match="hh.jsonl line 2: the rejected response is empty"):
        read_preference_pairs(str(path))
    missing = write_jsonl(tmp_path / "m.jsonl", [ok, {"prompt": "q", "chosen": " a"}])
    with pytest.raises(DataError, match="m.jsonl line 2: missing field 'rejected'"):
        read_preference_pairs(str(missing))


def test_fit_validates_before_any_worker_starts(tiny_model_dir, tmp_path):
    """fit_reward_model raises on a bad row without needing (or touching) a Ray cluster."""
    from rrhf_ray.train.reward_model import fit_reward_model

    path = write_jsonl(tmp_path / "bad.jsonl", [preference_rows(1)[0], {"query": "q", "chosen": "a", "rejected": "a"}])
    job = RewardModelJob(model_path=str(tiny_model_dir), data_path=str(path), output_dir=str(tmp_path / "o"))
    with pytest.raises(DataError, match="line 2"):
        fit_reward_model(job, name="never")
    assert not (tmp_path / "o").exists()
