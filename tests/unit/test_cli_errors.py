"""Errors that suggest the fix, and warnings for configs that cannot learn: each mistake gets one
`error:` line naming the culprit and, where there is one, the fix (exit 2); a config that runs
but cannot learn as written gets a warning (not an error), once."""

from __future__ import annotations

import logging

import pytest

from rrhf_ray.cli import build_parser, main
from rrhf_ray.stages import no_pair_warning


def _error(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert err[0].startswith("error: ")
    return err[0]


@pytest.mark.parametrize("override, expected", [
    ("sampling.temprature=0.7", "sampling.temprature: unknown key (did you mean sampling.temperature?)"),
    ("epochs=2", ("epochs: unknown key (did you mean train.epochs or sft.train.epochs or "
                 "reward_model.train.epochs?)")),
    ("temprature=0.7", "temprature: unknown key (did you mean sampling.temperature?)"),
    ("train.loss.beta=2", ("train.loss.beta: unknown key (train.loss.name rrhf takes name, rank_weight, "
                          "length_penalty, sft_reduction; beta is a key of train.loss.name simpo, dpo)")),
    ("train.loss.name=ppo", "train.loss.name: 'ppo' is not one of rrhf, raft, pro, simpo, slic, dpo"),
    ("train.loss.rank_weight=-1", "train.loss.rank_weight: Input should be greater than or equal to 0 (got -1)"),
], ids=["typo", "other-section", "typo-other-section", "loss-variant-key", "loss-name", "variant-value"])
def test_a_config_mistake_names_the_key_and_the_fix(override, expected, capsys):
    assert main(["validate", override]) == 2
    line = _error(capsys)
    assert line.endswith(f"with overrides {override}: {expected}"), line
    assert "Input tag" not in line and ".rrhf." not in line


def test_a_key_value_written_with_a_space_gets_the_key_value_form(capsys):
    assert main(["validate", "train.epochs", "2"]) == 2
    assert _error(capsys) == ("error: config file not found: train.epochs; an override is written "
                              "key=value, e.g. train.epochs=2")
    assert main(["validate", "no/such.yaml"]) == 2
    assert _error(capsys) == "error: config file not found: no/such.yaml"


@pytest.mark.parametrize("argv", [["-v", "validate"], ["validate", "-v"], ["validate", "rounds=2", "-v"],
                                  ["run", "rounds=2", "-v", "train.epochs=1"],
                                  ["train", "--data", "d", "--model", "m", "--output", "o", "-v", "epochs=1"]])
def test_verbose_is_accepted_anywhere(argv):
    args, _ = build_parser().parse_known_args(argv)
    assert args.verbose is True
    assert build_parser().parse_known_args([a for a in argv if a != "-v"])[0].verbose is False


def test_a_directory_that_is_not_a_data_set_is_one_line(tmp_path, capsys):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "readme.txt").write_text("not rows\n")
    assert main(["validate", f"data.source={notes}"]) == 2
    assert _error(capsys).startswith(f"error: data.source: {notes} is a directory without data files, "
                                     "not a data set: name a .jsonl, .json, .parquet file")
    model = tmp_path / "m"  # the files that make a directory a model directory (their contents unread)
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    (model / "model.safetensors").write_bytes(b"")
    assert main(["validate", f"data.source={model}"]) == 2
    assert _error(capsys).startswith(f"error: data.source: {model} is a model directory, not a data set")


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "rrhf_ray.preflight"]


@pytest.mark.parametrize("overrides, start", [
    (["sampling.n=1"], "sampling.n 1 with no other candidate source"),
    (["sampling.temperature=0"], "sampling.temperature 0 with sampling.n 4: greedy decoding draws the same reply"),
    (["train.queries_per_step=10", "train.micro_batch_queries=4"],
     ("train.queries_per_step 10 is not a multiple of train.micro_batch_queries × train.num_workers = 4: "
     "a worker's share of a step (up to 10 queries) ends in a smaller micro-batch of 2")),
], ids=["n=1", "temperature=0", "uneven-micro-batches"])
def test_a_config_that_cannot_learn_as_written_is_warned_once(overrides, start, capsys, caplog):
    caplog.set_level(logging.WARNING)
    assert main(["validate", *overrides]) == 0
    warned = _warnings(caplog)
    assert len(warned) == 1 and warned[0].startswith(start), warned
    out = capsys.readouterr().out
    assert f"# warning: {warned[0]}" in out.splitlines()


def test_the_demo_as_shipped_gets_no_warning(capsys, caplog):
    caplog.set_level(logging.WARNING)
    assert main(["validate"]) == 0
    assert _warnings(caplog) == []
    assert "# warning:" not in capsys.readouterr().out


def test_a_round_without_any_strict_pair_is_warned_with_the_count():
    assert no_pair_warning(1, {"groups": 16, "groups_without_pair": 16}).startswith(
        "round 1: 16 of 16 groups have no strict pair (k = 1, or every candidate's reward tied)")
    assert no_pair_warning(1, {"groups": 16, "groups_without_pair": 15}) is None
    assert no_pair_warning(2, {"groups": 0, "groups_without_pair": 0}) is None
