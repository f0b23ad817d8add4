"""One model check everywhere: `train`, `sft` and `train-rm` check `--model` as `run` checks
model.name_or_path (rrhf_ray.preflight: the directory, config.json, safetensors weights, a
tokenizer) and refuse with one `error:` line, exit 2; `sample` and `score` take `builtin:`
configs as `run` does."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from rrhf_ray.cli import main


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rrhf_ray.demo.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("cli-models") / "m", vocab_size=300)


def _only_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def _broken(model: Path, tmp: Path) -> dict[str, tuple[Path, str]]:
    """Each broken --model and the end of the line it gets."""
    no_config = tmp / "no-config"
    shutil.copytree(model, no_config)
    (no_config / "config.json").unlink()
    bin_only = tmp / "bin-only"
    shutil.copytree(model, bin_only)
    (bin_only / "model.safetensors").rename(bin_only / "pytorch_model.bin")
    no_tok = tmp / "no-tokenizer"
    shutil.copytree(model, no_tok)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (no_tok / name).unlink()
    return {
        "a file": (model / "config.json", f"{model}/config.json is a file, not a model directory"),
        "missing": (tmp / "gone", f"model directory not found: {tmp}/gone"),
        "no config.json": (no_config, f"{no_config} holds no config.json (not a Hugging Face model directory)"),
        "bin only": (bin_only, f"{bin_only} holds no safetensors weights"),
        "no tokenizer": (no_tok, f"{no_tok} holds no tokenizer (tokenizer.json or tokenizer_config.json)"),
    }


@pytest.mark.parametrize("command", ["train", "sft", "train-rm"])
def test_a_training_command_refuses_a_broken_model_in_one_line(command, model, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"query": "q", "responses": [" a", " b"], "scores": [0.0, 1.0]}) + "\n")
    for case, (path, message) in _broken(model, tmp_path).items():
        rc = main([command, "--data", str(data), "--model", str(path), "--output", str(tmp_path / "o"), "--no-ray"])
        line = _only_line(capsys)
        assert rc == 2, (case, line)
        assert line.startswith(f"error: --model: {message}"), (case, line)
    assert main([command, "--data", str(data), "--model", "builtin:demo-tiny-llama",
                 "--output", str(tmp_path / "o"), "--no-ray"]) == 2
    assert _only_line(capsys).startswith("error: --model: builtin:demo-tiny-llama: only model.name_or_path")
    assert not (tmp_path / "o").exists()


def test_sample_and_score_take_builtin_configs(tmp_path, capsys):
    assert main(["sample", "builtin:demo", "--out", str(tmp_path / "pool.jsonl")]) == 2
    assert _only_line(capsys).startswith(
        "error: model.name_or_path builtin:demo-tiny-llama: `rrhf-ray sample` needs a model directory")
    assert main(["score", "builtin:demo", "--pool", str(tmp_path / "none.jsonl"),
                 "--out", str(tmp_path / "scored.jsonl")]) == 2
    assert _only_line(capsys) == f"error: data file not found: {tmp_path}/none.jsonl"


def test_a_data_directory_that_is_not_a_data_set_is_one_line_in_every_command(model, tmp_path, capsys):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "readme.txt").write_text("not rows\n")
    expected = f"{notes} is a directory without data files, not a data set: name a .jsonl, .json, .parquet file"
    for command in ("sft", "train-rm"):
        assert main([command, "--data", str(notes), "--model", str(model), "--output", str(tmp_path / "o"),
                     "--no-ray"]) == 2
        assert _only_line(capsys).startswith(f"error: --data: {expected}")
    assert main(["sample", "builtin:demo", "--out", str(tmp_path / "pool.jsonl"), f"model.name_or_path={model}",
                 f"data.source={notes}"]) == 2
    assert _only_line(capsys).startswith(f"error: data.source: {expected}")
    assert not (tmp_path / "o").exists() and not (tmp_path / "pool.jsonl").exists()
