"""The Python API (`rrhf_ray.api`, re-exported from `rrhf_ray`): a config from a RunConfig, a dict
or a path with keyword overrides; training on a ranked file in this process, without Ray, on the
tiny model. (`rrhf_ray.run` on a real run: tests/integration/test_object_storage.py, the resume test.)"""

from __future__ import annotations

import json

import pytest

import rrhf_ray
from rrhf_ray.api import resolve_config
from rrhf_ray.config import ConfigError, load_config
from rrhf_ray.demo import DEMO_CONFIG
from rrhf_ray.state import config_fingerprint
from tests.helpers import write_ranked


def test_the_package_exports_the_api():
    assert rrhf_ray.run is rrhf_ray.api.run and rrhf_ray.train_ranked is rrhf_ray.api.train_ranked
    assert {"run", "train_ranked"} <= set(rrhf_ray.__all__)


def test_a_config_from_a_path_a_dict_or_a_runconfig_with_overrides():
    expected = load_config(DEMO_CONFIG, ["rounds=2", "train.epochs=1", "train.lr=0.001", "output.dir=/tmp/api"])
    by_path = resolve_config("builtin:demo", rounds=2, train__epochs=1, **{"train.lr": 1e-3, "output.dir": "/tmp/api"})
    as_dict = resolve_config(load_config(DEMO_CONFIG).model_dump(mode="json"), rounds=2,
                             train={"epochs": 1, "lr": 1e-3}, output={"dir": "/tmp/api"})  # merged
    from_config = resolve_config(load_config(DEMO_CONFIG), rounds=2, train={"epochs": 1, "lr": 1e-3},
                                 **{"output.dir": "/tmp/api"})
    for config in (by_path, as_dict, from_config):
        assert config == expected
        assert config.train.max_length == 128  # the section was merged into, not replaced
    assert resolve_config(str(DEMO_CONFIG)) == load_config(DEMO_CONFIG)
    assert config_fingerprint(by_path) == config_fingerprint(expected)


def test_a_bad_config_raises_the_command_lines_message():
    with pytest.raises(ConfigError, match=r"train\.epoch: unknown key \(did you mean train\.epochs\?\)"):
        resolve_config("builtin:demo", train__epoch=2)
    with pytest.raises(ConfigError, match="unknown built-in config builtin:nope"):
        resolve_config("builtin:nope")
    with pytest.raises(ConfigError, match="expected a RunConfig, a dict or a path, got int"):
        resolve_config(3)


def test_train_ranked_trains_in_process_and_saves_the_model(tiny_model_dir, tmp_path):
    data = write_ranked(tmp_path / "ranked.jsonl", 8)
    out = tmp_path / "out"
    metrics = rrhf_ray.train_ranked(data, tiny_model_dir, out, epochs=1, queries_per_step=4,
                                    micro_batch_queries=4, loss={"name": "rrhf", "rank_weight": 1.0})
    saved = json.loads((out / "train_metrics.json").read_text())
    assert saved["queries"] == 8 and saved["epoch"] == 1
    assert isinstance(metrics["loss"], float) and metrics["loss"] > 0
    assert metrics["loss"] == pytest.approx(saved["loss"])
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()


def test_train_ranked_refuses_a_broken_model_before_reading_the_data(tmp_path):
    with pytest.raises(ConfigError, match=f"model: model directory not found: {tmp_path}/gone"):
        rrhf_ray.train_ranked(tmp_path / "none.jsonl", tmp_path / "gone", tmp_path / "out")
    with pytest.raises(ConfigError, match=r"(?s)train options loss\.nam='x'.*loss\.nam: unknown key \(did you mean loss\.name\? "):
        rrhf_ray.train_ranked(tmp_path / "none.jsonl", tmp_path / "gone", tmp_path / "out", **{"loss.nam": "x"})
