"""`rrhf-ray train` on a real local Ray cluster: 2 DDP workers learn the ranking, equal one
process on the same global batches, and leave a checkpoint that `from_pretrained` reloads."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rrhf_ray.cli import main
from rrhf_ray.train.ranking import ranking_metrics
from rrhf_ray.types import read_groups
from tests.helpers import write_ranked

pytestmark = pytest.mark.ray

ARGS = ["epochs=3", "lr=1e-3", "queries_per_step=4", "micro_batch_queries=1", "warmup_ratio=0.0"]


def logits(path, text):
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([tok(text)["input_ids"]])).logits


def test_two_worker_ddp_learns_the_ranking_and_matches_one_process(ray_cluster, tiny_model_dir, tmp_path, capsys):
    data = write_ranked(tmp_path / "ranked.jsonl", 24)
    groups = read_groups(data)
    before = ranking_metrics(str(tiny_model_dir), groups)

    ddp_out = tmp_path / "ddp"
    rc = main(["train", "--data", str(data), "--model", str(tiny_model_dir), "--output", str(ddp_out),
               *ARGS, "num_workers=2"])
    assert rc == 0
    assert "saved the trained model" in capsys.readouterr().out
    after = ranking_metrics(str(ddp_out), groups)
    # The ranking term and the fine-tuning term both work: the policy now orders the candidates
    # by reward, and the best responses became far more likely.
    assert after["rank_accuracy"] >= 0.95 > before["rank_accuracy"] + 0.2
    assert after["best_nll"] < before["best_nll"] - 2.0
    metrics = json.loads((ddp_out / "train_metrics.json").read_text())
    assert metrics["epoch"] == 3 and metrics["tokens_per_s"] > 0

    single_out = tmp_path / "single"
    assert main(["train", "--no-ray", "--data", str(data), "--model", str(tiny_model_dir),
                 "--output", str(single_out), *ARGS]) == 0
    text = "\n\nHuman: How do I brew tea?\n\nAssistant: Sure"
    torch.testing.assert_close(logits(ddp_out, text), logits(single_out, text), rtol=1e-3, atol=1e-3)


def test_malformed_row_stops_before_training(ray_cluster, tiny_model_dir, tmp_path, capsys):
    data = write_ranked(tmp_path / "ranked.jsonl", 3)
    with data.open("a") as f:
        f.write(json.dumps({"query": "q", "responses": ["a", "b"], "scores": [1.0]}) + "\n")
    rc = main(["train", "--data", str(data), "--model", str(tiny_model_dir), "--output", str(tmp_path / "o")])
    assert rc == 2
    assert "line 4: scores has 1 entries but responses has 2" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
