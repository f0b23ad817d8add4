"""`read_state_dict`: the weights a refresh through memory hands the samplers, read from an
installed checkpoint in the served dtype."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from rrhf_ray.train.checkpoints import CheckpointError, read_state_dict


def test_the_state_dict_is_the_checkpoints_tensors_in_the_served_dtype(tiny_model_dir):
    saved = load_file(str(tiny_model_dir / "model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.float32}

    state = read_state_dict(tiny_model_dir, "bfloat16")

    assert set(state) == set(saved) and "model.embed_tokens.weight" in state
    for name, t in saved.items():
        assert state[name].dtype == torch.bfloat16
        assert torch.equal(state[name], t.to(torch.bfloat16)), name  # rounded once, as vLLM would
    same = read_state_dict(tiny_model_dir, "float32")
    assert all(torch.equal(same[name], t) for name, t in saved.items())


def test_a_directory_without_weights_is_named(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=f"{tmp_path} holds no \\*.safetensors weights"):
        read_state_dict(tmp_path, "bfloat16")
