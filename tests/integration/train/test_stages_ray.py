"""The stages before RRHF on a real local Ray cluster: SFT with 2 DDP workers through
`rrhf-ray sft`, and a reward model through the workflow's stage function, which the
project's RewardScorer actor then reads with no extra code."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from rrhf_ray.cli import main
from rrhf_ray.config import RewardConfig, RunConfig
from rrhf_ray.data.pairs import read_preference_pairs, read_sft_pairs
from rrhf_ray.train.reward_model import encode_text, pairwise_accuracy, run_reward_model_stage
from rrhf_ray.train.sft import heldout_nll
from tests.stage_data import preference_rows, sft_rows, write_jsonl

pytestmark = pytest.mark.ray


def test_two_worker_sft_lowers_heldout_nll_and_reloads(ray_cluster, tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows(16))
    held_file = write_jsonl(tmp_path / "held.jsonl", sft_rows(8, held_out=True))
    held = read_sft_pairs(str(held_file))
    out = tmp_path / "sft"
    rc = main(["sft", "--data", str(data), "--model", str(tiny_model_dir), "--output", str(out),
               "--eval-data", str(held_file), "epochs=3", "lr=3e-3", "queries_per_step=8",
               "micro_batch_queries=4", "warmup_ratio=0.0", "num_workers=2"])
    assert rc == 0 and "saved the fine-tuned model" in capsys.readouterr().out
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["epoch"] == 3 and metrics["step"] == 6
    assert heldout_nll(out, held) < heldout_nll(tiny_model_dir, held) - 0.5
    assert metrics["eval_nll"] == pytest.approx(heldout_nll(out, held), rel=1e-4)
    AutoModelForCausalLM.from_pretrained(out)  # a plain HF directory


def test_reward_model_stage_trains_once_and_scores_the_same_in_reward_scorer(ray_cluster, tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "pref.jsonl", preference_rows(32))
    held_file = write_jsonl(tmp_path / "held.jsonl", preference_rows(16, held_out=True))
    run = RunConfig.model_validate({
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"source": str(data)}, "reward": {"rule": "builtin:demo"},
        "reward_model": {"data": str(data), "eval_data": str(held_file),
                         "train": {"epochs": 2, "lr": 1e-3, "queries_per_step": 8, "warmup_ratio": 0.0}},
        "output": {"dir": str(tmp_path / "run")},
    })
    assert run.reward_model.train.micro_batch_queries == 4  # the stage's defaults under the overrides
    out = run_reward_model_stage(run, tmp_path / "run")
    assert out == tmp_path / "run" / "reward_model"
    metrics = json.loads((out / "train_metrics.json").read_text())
    pairs = read_preference_pairs(str(held_file))
    assert pairwise_accuracy(out, pairs) >= 0.9 and metrics["eval_accuracy"] >= 0.9

    # A second call finds the finished model and trains nothing.
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert run_reward_model_stage(run, tmp_path / "run") == out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp

    # The project's reward actor loads it with from_pretrained alone and gets the same scores.
    from rrhf_ray.actors.scorer import RewardScorer

    queries = [p.query for p in pairs[:6] for _ in (0, 1)]
    responses = [r for p in pairs[:6] for r in (p.chosen, p.rejected)]
    actor = ray_cluster.remote(RewardScorer).remote(str(out), RewardConfig(kind="model", model=str(out)))
    remote = ray_cluster.get(actor.score.remote(queries, responses)).scores
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        local = [model(input_ids=torch.tensor([encode_text(tok, q, r, 512)])).logits[0, 0].item()
                 for q, r in zip(queries, responses)]
    assert remote == pytest.approx(local, abs=1e-5)
    assert all(c > r for c, r in zip(remote[0::2], remote[1::2]))
    ray_cluster.kill(actor)
