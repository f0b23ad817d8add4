"""Run config: YAML + dotted overrides, and errors that name the key and the file."""

from __future__ import annotations

import pytest

from rrhf_ray.cli import main
from rrhf_ray.config import ConfigError, RunConfig, TrainConfig, load_config

# The three sections every run config must set; the tests below add what they exercise.
REQUIRED = """model:
  name_or_path: builtin:demo-tiny-llama
data:
  source: builtin:demo
reward:
  rule: builtin:demo
"""


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(REQUIRED + text)
    return path


def test_yaml_and_overrides_resolve(tmp_path):
    path = write(tmp_path, "rounds: 2\ntrain:\n  epochs: 1\n  lr: 3.0e-4\n")
    cfg = load_config(path, ["train.lr=1e-4", "sampling.n=6", "sampling.stop=[END]"])
    assert isinstance(cfg, RunConfig)
    assert cfg.rounds == 2
    assert cfg.train.epochs == 1
    assert cfg.train.lr == pytest.approx(1e-4)  # YAML 1.1 reads "1e-4" as a string: parsed as a number
    assert cfg.sampling.n == 6
    assert cfg.sampling.stop == ["END"]


def test_unknown_key_is_named_with_the_file(tmp_path):
    path = write(tmp_path, "train:\n  epoch: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "train.epoch: unknown key" in str(err.value)
    assert str(path) in str(err.value)


def test_wrong_type_is_named(tmp_path):
    path = write(tmp_path, "train:\n  epochs: three\n")
    with pytest.raises(ConfigError, match=r"train\.epochs: Input should be a valid integer"):
        load_config(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(None, ["train.lr"])


def test_required_sections_have_no_empty_default(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("rounds: 2\ndata:\n  source: ''\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "model: required, not set" in str(err.value)
    assert "reward: required, not set" in str(err.value)
    assert "data.source: String should have at least 1 character" in str(err.value)


def test_cross_field_checks(tmp_path):
    with pytest.raises(ValueError, match="fsdp"):
        TrainConfig(strategy="fsdp")
    with pytest.raises(ValueError, match="queries_per_step"):
        TrainConfig(queries_per_step=4, micro_batch_queries=4, num_workers=2)
    assert TrainConfig(queries_per_step=64, micro_batch_queries=2, num_workers=4).accumulation_steps == 8
    with pytest.raises(ValueError, match="reward.rule is not set"):
        load_config(write(tmp_path, ""), ["reward.rule=null"])


def test_validate_command_prints_resolved_config(tmp_path, capsys):
    path = write(tmp_path, "rounds: 5\n")
    assert main(["validate", str(path), "train.epochs=2"]) == 0
    out = capsys.readouterr().out
    assert "rounds: 5" in out and "epochs: 2" in out


def test_validate_command_reports_errors(tmp_path, capsys):
    path = write(tmp_path, "sampling:\n  temprature: 0.7\n")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "sampling.temprature: unknown key" in err and str(path) in err
