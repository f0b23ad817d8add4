"""`absolute_path` / `with_absolute_paths`: the driver hands Ray actors and Ray Train workers (which
do not share its working directory) absolute paths; hub ids, builtin: names and URIs unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest

from rrhf_ray.config import RunConfig, absolute_path, with_absolute_paths


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Work in tmp_path/cwd with a few local files and directories."""
    cwd = tmp_path / "cwd"
    for d in ("models/base", "models/rm", "models/tok", "models/rm-base"):
        (cwd / d).mkdir(parents=True)
    for f in ("data/train.jsonl", "data/sft.jsonl", "data/sft_eval.jsonl", "data/prefs.jsonl",
              "data/prefs_eval.jsonl", "data/ext1.jsonl"):
        (cwd / f).parent.mkdir(parents=True, exist_ok=True)
        (cwd / f).write_text("{}\n")
    monkeypatch.chdir(cwd)
    return cwd


def test_an_existing_relative_path_becomes_absolute(in_tmp: Path) -> None:
    assert absolute_path("models/base") == str(in_tmp / "models" / "base")
    assert absolute_path("data/train.jsonl") == str(in_tmp / "data" / "train.jsonl")
    assert absolute_path("./data/../data/train.jsonl") == str(in_tmp / "data" / "train.jsonl")
    assert Path(absolute_path("models/base")).is_absolute()


def test_an_absolute_path_stays_the_same_path(in_tmp: Path) -> None:
    assert absolute_path(str(in_tmp / "models" / "base")) == str(in_tmp / "models" / "base")


@pytest.mark.parametrize("value", [
    "meta-llama/Llama-2-7b-hf",        # a hub id: no such local directory
    "gpt2",
    "Dahoas/rm-static",
    "data/missing.jsonl",              # a local-looking path that does not exist is left to fail later
    "builtin:demo",
    "builtin:demo-tiny-llama",
    "s3://bucket/models/base",
    "gs://bucket/data/train.jsonl",
    "",
    None,
])
def test_hub_ids_builtins_uris_and_missing_paths_are_unchanged(in_tmp: Path, value) -> None:
    assert absolute_path(value) == value


def test_builtin_names_and_uris_are_unchanged_even_if_a_local_path_of_that_name_exists(in_tmp: Path) -> None:
    (in_tmp / "builtin:demo").mkdir()
    (in_tmp / "s3:" / "bucket").mkdir(parents=True)  # Path("s3://bucket") is s3:/bucket
    assert Path("builtin:demo").exists() and Path("s3://bucket").exists()
    assert absolute_path("builtin:demo") == "builtin:demo"
    assert absolute_path("s3://bucket") == "s3://bucket"


def _config(**extra) -> RunConfig:
    return RunConfig.model_validate({
        "model": {"name_or_path": "models/base", "tokenizer": "models/tok"},
        "data": {"source": "data/train.jsonl"},
        "reward": {"kind": "model", "model": "models/rm"},
        "sampling": {"external": ["data/ext1.jsonl", "s3://bucket/ext2.jsonl", "builtin:demo"]},
        "output": {"dir": "outputs/run"},
        **extra,
    })


def test_with_absolute_paths_makes_every_local_input_and_the_output_dir_absolute(in_tmp: Path) -> None:
    config = _config(
        sft={"data": "data/sft.jsonl", "eval_data": "data/sft_eval.jsonl"},
        reward_model={"data": "data/prefs.jsonl", "eval_data": "data/prefs_eval.jsonl",
                      "base_model": "models/rm-base"},
    )
    out = with_absolute_paths(config)

    assert out.model.name_or_path == str(in_tmp / "models/base")
    assert out.model.tokenizer == str(in_tmp / "models/tok")
    assert out.data.source == str(in_tmp / "data/train.jsonl")
    assert out.reward.model == str(in_tmp / "models/rm")
    assert out.sampling.external == [str(in_tmp / "data/ext1.jsonl"), "s3://bucket/ext2.jsonl",
                                     "builtin:demo"]
    assert out.sft.data == str(in_tmp / "data/sft.jsonl")
    assert out.sft.eval_data == str(in_tmp / "data/sft_eval.jsonl")
    assert out.reward_model.data == str(in_tmp / "data/prefs.jsonl")
    assert out.reward_model.eval_data == str(in_tmp / "data/prefs_eval.jsonl")
    assert out.reward_model.base_model == str(in_tmp / "models/rm-base")
    # output.dir need not exist yet: it is made absolute anyway.
    assert not (in_tmp / "outputs").exists()
    assert out.output.dir == str(in_tmp / "outputs/run")
    # Everything else is untouched, and the input config is not changed in place.
    assert out.rounds == config.rounds and out.train == config.train and out.sampling.n == config.sampling.n
    assert out.sft.train == config.sft.train
    assert config.model.name_or_path == "models/base" and config.output.dir == "outputs/run"


def test_with_absolute_paths_keeps_hub_ids_builtins_and_absent_stages(in_tmp: Path) -> None:
    config = RunConfig.model_validate({
        "model": {"name_or_path": "builtin:demo-tiny-llama"},
        "data": {"source": "Dahoas/rm-static"},
        "reward": {"kind": "rule", "rule": "builtin:demo"},
        "output": {"dir": str(in_tmp / "abs-out")},
    })
    out = with_absolute_paths(config)
    assert out.model.name_or_path == "builtin:demo-tiny-llama"
    assert out.model.tokenizer is None
    assert out.data.source == "Dahoas/rm-static"
    assert (out.reward.kind, out.reward.model, out.reward.rule) == ("rule", None, "builtin:demo")
    assert out.sampling.external == []
    assert out.sft is None and out.reward_model is None
    assert out.output.dir == str(in_tmp / "abs-out")


def test_an_empty_reward_model_base_stays_empty(in_tmp: Path) -> None:
    """base_model "" means "model.name_or_path": it must not become the working directory."""
    out = with_absolute_paths(_config(reward_model={"data": "data/prefs.jsonl"}))
    assert out.reward_model.base_model == ""
    assert out.reward_model.eval_data is None
