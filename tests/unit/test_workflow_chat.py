"""workflows/ultrafeedback_instruct.yaml (the chat recipe, docs/chat.md) passes `rrhf-ray
validate` with tiny local stand-ins for its hub policy, reward model and data set, so the
preflight reads every conversation and renders it with the stand-in's chat template."""

from __future__ import annotations

import json
from pathlib import Path

from rrhf_ray.cli import main
from rrhf_ray.config import load_config

RECIPE = Path(__file__).resolve().parents[2] / "workflows" / "ultrafeedback_instruct.yaml"


def test_ultrafeedback_recipe_validates_with_tiny_stand_ins(tmp_path, capsys):
    from rrhf_ray.demo.tiny import build_tiny_chat_model, build_tiny_chat_reward_model

    policy = build_tiny_chat_model(tmp_path / "policy", end_logit=0, max_position_embeddings=2048)
    reward = build_tiny_chat_reward_model(tmp_path / "reward")
    data = tmp_path / "ultrafeedback.jsonl"
    rows = [{"chosen": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": "Gladly."}],
             "rejected": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": "No."}]}
            for i in range(4)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = [f"model.name_or_path={policy}", f"reward.model={reward}", f"data.source={data}",
                 f"output.dir={tmp_path / 'out'}", f"output.storage_path={tmp_path / 'ray'}"]
    assert main(["validate", str(RECIPE), *overrides]) == 0, capsys.readouterr().err

    c = load_config(RECIPE)
    assert (c.data.format, c.data.chat_template, c.reward.chat_template) == ("implicit-preference", "on", "on")
    assert c.reward.kind == "model" and "8B" in c.reward.model
    assert c.sampling.stop == [] and c.sampling.use_gpu and c.train.use_gpu
    assert c.train.max_length >= c.data.max_prompt_tokens + c.sampling.max_new_tokens + 1
