"""Every static mistake is refused before Ray starts or anything trains (`rrhf_ray.preflight`):
`rrhf-ray validate` (and `run`, `sample`, `score`) exits 2 with one `error: ...` line that names
the field, the file and the row, and never a traceback.

The table of docs/errors.md, "Bad input, and the error it gets", lists these messages.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from rrhf_ray import cli
from rrhf_ray.cli import main

# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A whole tiny model directory: config.json (max_position_embeddings 512), model.safetensors,
    tokenizer.json, tokenizer_config.json."""
    from rrhf_ray.demo.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("preflight") / "m", vocab_size=300)


def base(tmp: Path, model: Path) -> dict:
    """A config that passes every check; each case below breaks one thing."""
    return {
        "rounds": 1,
        "model": {"name_or_path": str(model)},
        "data": {"source": "builtin:demo", "max_prompt_tokens": 64},
        "sampling": {"max_new_tokens": 32, "max_model_len": 256},
        "eval": {"max_new_tokens": 32},
        "reward": {"kind": "rule", "rule": "builtin:demo"},
        "output": {"dir": str(tmp / "out")},
    }


def copy_model(model: Path, dst: Path, drop: tuple[str, ...] = (), add: dict[str, str] | None = None) -> Path:
    shutil.copytree(model, dst)
    for name in drop:
        (dst / name).unlink()
    for name, text in (add or {}).items():
        (dst / name).write_text(text)
    return dst


def write_lines(path: Path, *lines: object) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def write_config(tmp: Path, config: dict | str) -> Path:
    path = tmp / "run.yaml"
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    return path


def error_line(capsys: pytest.CaptureFixture) -> str:
    """The one `error:` line on stderr (and nothing that looks like a traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


# --------------------------------------------------------------------------- the cases
# Each builds (config, expected message) from (tmp_path, model); `P` is a placeholder for tmp_path
# in the messages, filled in by the test (so the table in docs/errors.md can show them as written).

Case = Callable[[Path, Path], tuple[dict | str, str]]
CASES: dict[str, Case] = {}


def case(name: str) -> Callable[[Case], Case]:
    def register(fn: Case) -> Case:
        CASES[name] = fn
        return fn
    return register


@case("unknown key")
def _(tmp, model):
    c = base(tmp, model)
    c["sampling"]["temprature"] = 0.7
    return c, "invalid config in P/run.yaml: sampling.temprature: unknown key (did you mean sampling.temperature?)"


@case("wrong type")
def _(tmp, model):
    c = base(tmp, model)
    c["rounds"] = "three"
    return c, ("invalid config in P/run.yaml: rounds: Input should be a valid integer, unable to parse "
               "string as an integer (got 'three')")


@case("missing model section")
def _(tmp, model):
    c = base(tmp, model)
    del c["model"]
    return c, "invalid config in P/run.yaml: model: required, not set"


@case("empty data.source")
def _(tmp, model):
    c = base(tmp, model)
    c["data"]["source"] = ""
    return c, "invalid config in P/run.yaml: data.source: String should have at least 1 character (got '')"


@case("blank data.source")
def _(tmp, model):
    c = base(tmp, model)
    c["data"]["source"] = "  "
    return c, "data.source is empty: name a file, a directory, a hub id or builtin:<name>"


@case("data file not found")
def _(tmp, model):
    c = base(tmp, model)
    c["data"]["source"] = str(tmp / "missing.jsonl")
    return c, "data.source: data file not found: P/missing.jsonl"


@case("malformed JSONL line in data.source")
def _(tmp, model):
    c = base(tmp, model)
    c["data"]["source"] = str(write_lines(tmp / "prompts.jsonl", {"query": "a"}, "not json"))
    return c, "data.source: P/prompts.jsonl line 2: not valid JSON (Expecting value)"


@case("data.source row missing a field")
def _(tmp, model):
    c = base(tmp, model)
    c["data"]["source"] = str(write_lines(tmp / "prompts.jsonl", {"query": "a"}, {"quary": "b"}))
    return c, "data.source: P/prompts.jsonl line 2: missing field 'query'"


@case("data.source ranked row, scores and responses differ")
def _(tmp, model):
    c = base(tmp, model)
    c["data"]["source"] = str(write_lines(tmp / "ranked.jsonl",
                                          {"query": "q", "responses": [" a", " b"], "scores": [1.0]}))
    return c, "data.source: P/ranked.jsonl line 1: scores has 1 entries but responses has 2"


@case("unknown builtin data")
def _(tmp, model):
    c = base(tmp, model)
    c["data"]["source"] = "builtin:nope"
    return c, "data.source: unknown built-in data builtin:nope; registered: builtin:demo, builtin:demo-sft"


@case("sft.data malformed row")
def _(tmp, model):
    c = base(tmp, model)
    c["sft"] = {"data": str(write_lines(tmp / "sft.jsonl", {"query": "q", "response": " r"},
                                        {"query": "q2", "response": ""}))}
    return c, "sft.data: P/sft.jsonl line 2: field 'response' is empty"


@case("sft.eval_data not found")
def _(tmp, model):
    c = base(tmp, model)
    c["sft"] = {"data": "builtin:demo-sft", "eval_data": "./no/such/held-out.jsonl"}
    return c, "sft.eval_data: data file not found: ./no/such/held-out.jsonl"


@case("reward_model.data chosen == rejected")
def _(tmp, model):
    c = base(tmp, model)
    c["reward_model"] = {"base_model": str(model), "data": str(write_lines(
        tmp / "prefs.jsonl", {"query": "q", "chosen": " Same.", "rejected": " Same. "}))}
    return c, "reward_model.data: P/prefs.jsonl line 1: chosen and rejected are the same text"


@case("reward_model from a built-in model")
def _(tmp, model):
    c = base(tmp, model)
    c["model"]["name_or_path"] = "builtin:demo-tiny-llama"
    c["reward_model"] = {"data": "builtin:demo-sft"}
    return c, ("reward_model.base_model is empty, so the reward model would start from model.name_or_path "
               "builtin:demo-tiny-llama, which is built only for the policy; set reward_model.base_model "
               "to a model directory or a hub id")


@case("sampling.external bad line")
def _(tmp, model):
    c = base(tmp, model)
    c["sampling"]["external"] = [str(write_lines(tmp / "ext.jsonl",
                                                 {"query": "q", "responses": " one", "source": "gpt4"}))]
    return c, "sampling.external: P/ext.jsonl line 1: responses: expected a list of strings"


@case("model dir missing")
def _(tmp, model):
    c = base(tmp, model)
    c["model"]["name_or_path"] = str(tmp / "no-model")
    return c, "model.name_or_path: model directory not found: P/no-model"


@case("model path is a file")
def _(tmp, model):
    c = base(tmp, model)
    c["model"]["name_or_path"] = str(model / "config.json")
    return c, f"model.name_or_path: {model}/config.json is a file, not a model directory"


@case("model dir without config.json")
def _(tmp, model):
    c = base(tmp, model)
    c["model"]["name_or_path"] = str(copy_model(model, tmp / "m", drop=("config.json",)))
    return c, "model.name_or_path: P/m holds no config.json (not a Hugging Face model directory)"


@case("model dir with pytorch_model.bin only")
def _(tmp, model):
    c = base(tmp, model)
    c["model"]["name_or_path"] = str(copy_model(model, tmp / "m", drop=("model.safetensors",),
                                                add={"pytorch_model.bin": "pickle"}))
    return c, ("model.name_or_path: P/m holds no safetensors weights (*.safetensors or "
               "model.safetensors.index.json); found pytorch_model.bin: rrhf-ray loads safetensors only, "
               "re-save with save_pretrained(..., safe_serialization=True)")


@case("model dir without tokenizer")
def _(tmp, model):
    c = base(tmp, model)
    c["model"]["name_or_path"] = str(copy_model(model, tmp / "m", drop=("tokenizer.json", "tokenizer_config.json")))
    return c, "model.name_or_path: P/m holds no tokenizer (tokenizer.json or tokenizer_config.json)"


@case("model.tokenizer dir without tokenizer")
def _(tmp, model):
    c = base(tmp, model)
    (tmp / "tok").mkdir()
    c["model"]["tokenizer"] = str(tmp / "tok")
    return c, "model.tokenizer: P/tok holds no tokenizer (tokenizer.json or tokenizer_config.json)"


@case("unknown builtin model")
def _(tmp, model):
    c = base(tmp, model)
    c["model"]["name_or_path"] = "builtin:nope"
    return c, "model.name_or_path: unknown built-in model builtin:nope; registered: builtin:demo-tiny-llama"


@case("reward.rule not importable")
def _(tmp, model):
    c = base(tmp, model)
    c["reward"]["rule"] = "no_such_module_xyz:score"
    return c, ("reward.rule 'no_such_module_xyz:score': cannot import 'no_such_module_xyz' "
               "(No module named 'no_such_module_xyz')")


@case("reward.rule missing function")
def _(tmp, model):
    c = base(tmp, model)
    c["reward"]["rule"] = "json:no_such_function"
    return c, "reward.rule 'json:no_such_function': json has no function 'no_such_function'"


@case("reward.rule not callable")
def _(tmp, model):
    c = base(tmp, model)
    c["reward"]["rule"] = "math:pi"
    return c, "reward.rule 'math:pi': math has no function 'pi'"


@case("reward.rule not module:function")
def _(tmp, model):
    c = base(tmp, model)
    c["reward"]["rule"] = "my_reward"
    return c, "reward.rule 'my_reward' is not of the form package.module:function or path/to/file.py:function"


@case("unknown builtin reward")
def _(tmp, model):
    c = base(tmp, model)
    c["reward"]["rule"] = "builtin:nope"
    return c, "reward.rule: unknown built-in reward builtin:nope; registered: builtin:demo"


@case("reward.kind model, directory missing")
def _(tmp, model):
    c = base(tmp, model)
    c["reward"] = {"kind": "model", "model": str(tmp / "rm")}
    return c, "reward.model: model directory not found: P/rm"


@case("reward.model a built-in name")
def _(tmp, model):
    c = base(tmp, model)
    c["reward"] = {"kind": "model", "model": "builtin:demo-tiny-llama"}
    return c, ("reward.model: builtin:demo-tiny-llama: only model.name_or_path may name a built-in model "
               "(the run builds it); name a model directory or a hub id")


@case("prompt + reply longer than max_model_len")
def _(tmp, model):
    c = base(tmp, model)
    c["data"]["max_prompt_tokens"] = 240
    c["train"] = {"max_length": 273}  # room to train on it: the engine's context is what is short
    return c, ("data.max_prompt_tokens + sampling.max_new_tokens = 240 + 32 = 272 exceeds "
               "sampling.max_model_len 256: the longest prompt has no room for its reply")


@case("prompt + eval reply longer than max_model_len")
def _(tmp, model):
    c = base(tmp, model)
    c["eval"]["max_new_tokens"] = 200
    return c, ("data.max_prompt_tokens + eval.max_new_tokens = 64 + 200 = 264 exceeds "
               "sampling.max_model_len 256: the longest prompt has no room for its reply")


@case("max_model_len beyond max_position_embeddings")
def _(tmp, model):
    c = base(tmp, model)
    c["sampling"]["max_model_len"] = 1024
    return c, f"sampling.max_model_len 1024 exceeds the model's max_position_embeddings 512 ({model}/config.json)"


@case("bad preset")
def _(tmp, model):
    c = base(tmp, model)
    c["sampling"]["preset"] = "IP-0"
    return c, ("invalid config in P/run.yaml: sampling: Value error, sampling.preset 'IP-0' is not one of BP, "
               "DP, D, P, IP, IP-n, OP (got {'max_model_len': 256, 'max_new_tokens': 32, 'preset': 'IP-0'})")


@case("rounds > 1 with a preset that never samples from ρ*")
def _(tmp, model):
    c = base(tmp, model)
    c["rounds"], c["sampling"]["preset"] = 3, "DP"
    return c, ("invalid config in P/run.yaml: rounds: 3 with sampling.preset DP: DP never samples from ρ* "
               "(the last round's model), so each extra round would retrain on a pool drawn from the same "
               "frozen ρ: more epochs, not a setting of the paper; use sampling.preset IP (IP-n), or rounds: 1")


@case("train.max_length shorter than prompt + reply + EOS")
def _(tmp, model):
    c = base(tmp, model)
    c["train"] = {"max_length": 64}
    return c, ("invalid config in P/run.yaml: train.max_length 64 < data.max_prompt_tokens + "
               "sampling.max_new_tokens + 1 (EOS) = 64 + 32 + 1 = 97: the trainer would cut the longest "
               "prompt (from the left) or reply (from the right) it samples; raise train.max_length or "
               "lower data.max_prompt_tokens / sampling.max_new_tokens")


@case("prompt over half of train.max_length with data-set responses")
def _(tmp, model):
    c = base(tmp, model)
    c["data"]["max_prompt_tokens"] = 100  # 100 + 32 + 1 <= 192: every sampled reply fits
    return c, ("data.max_prompt_tokens 100 > train.max_length // 2 = 96: a data-set or sampling.external "
               "response longer than 96 tokens would cut the prompt of its whole group below "
               "data.max_prompt_tokens; raise train.max_length to at least 200, lower "
               "data.max_prompt_tokens or cap the data set's responses (data.max_response_tokens ≤ 91)")


def test_a_long_prompt_passes_when_the_data_sets_responses_are_capped_to_fit(tmp_path: Path, model: Path) -> None:
    """data.max_response_tokens 91: prompt 100 + response 91 + EOS = 192, nothing is ever cut."""
    c = base(tmp_path, model)
    c["data"]["max_prompt_tokens"], c["data"]["max_response_tokens"] = 100, 91
    assert main(["validate", str(write_config(tmp_path, c))]) == 0
    c["data"]["max_response_tokens"] = 92
    assert main(["validate", str(write_config(tmp_path, c))]) == 2


def test_a_long_prompt_passes_when_only_sampled_replies_join_the_groups(tmp_path: Path, model: Path) -> None:
    """Preset D: every candidate is sampled (at most max_new_tokens + EOS), so none is cut."""
    c = base(tmp_path, model)
    c["data"]["max_prompt_tokens"] = 100
    c["sampling"]["preset"] = "D"
    assert main(["validate", str(write_config(tmp_path, c))]) == 0


@case("eval.judge_model directory missing")
def _(tmp, model):
    c = base(tmp, model)
    c["eval"]["judge_model"] = str(tmp / "judge")
    return c, "eval.judge_model: model directory not found: P/judge"


@case("train batching")
def _(tmp, model):
    c = base(tmp, model)
    c["train"] = {"queries_per_step": 4, "micro_batch_queries": 8}
    return c, ("invalid config in P/run.yaml: train: Value error, train.queries_per_step (4) is smaller than "
               "train.micro_batch_queries × train.num_workers (8 × 1) (got {'micro_batch_queries': 8, "
               "'queries_per_step': 4})")


def expected(message: str, tmp: Path) -> str:
    return "error: " + message.replace("P/", f"{tmp}/")


@pytest.mark.parametrize("name", list(CASES))
def test_validate_refuses_with_one_line(name: str, tmp_path: Path, model: Path, capsys) -> None:
    config, message = CASES[name](tmp_path, model)
    assert main(["validate", str(write_config(tmp_path, config))]) == 2
    assert error_line(capsys) == expected(message, tmp_path)
    assert not (tmp_path / "out").exists()


def test_there_are_at_least_15_kinds() -> None:
    assert len(CASES) >= 15


# --------------------------------------------------------------------------- run, sample, score


@pytest.fixture
def ray_starts(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every attempt to start or join Ray during the test (the suite's own Ray cluster may
    already be up, so `ray.is_initialized()` cannot tell): `ray.init` and both references to
    `connect_ray` record their call instead."""
    import ray

    import rrhf_ray.cli
    import rrhf_ray.workflow

    calls: list[str] = []
    monkeypatch.setattr(ray, "init", lambda *a, **k: calls.append("ray.init"))
    for module in (rrhf_ray.workflow, rrhf_ray.cli):
        monkeypatch.setattr(module, "connect_ray", lambda *a, m=module.__name__, **k: calls.append(m))
    return calls


@pytest.mark.parametrize("name", ["sft.data malformed row", "model dir without tokenizer",
                                  "reward.rule not importable", "max_model_len beyond max_position_embeddings"])
def test_run_refuses_before_ray_starts(name: str, tmp_path: Path, model: Path, capsys, ray_starts) -> None:
    config, message = CASES[name](tmp_path, model)
    assert main(["run", str(write_config(tmp_path, config))]) == 2
    assert error_line(capsys) == expected(message, tmp_path)
    assert ray_starts == []
    assert not (tmp_path / "out").exists()  # no stage ran: not even state.json was written


def test_sample_and_score_refuse_before_ray_starts(tmp_path: Path, model: Path, capsys, ray_starts) -> None:
    config, message = CASES["model dir without config.json"](tmp_path, model)
    path = write_config(tmp_path, config)
    assert main(["sample", str(path), "--out", str(tmp_path / "pool.jsonl")]) == 2
    assert error_line(capsys) == expected(message, tmp_path)

    pool = write_lines(tmp_path / "pool.jsonl", {"query": "q", "responses": [" a"], "scores": [0.0]})
    assert main(["score", str(path), "--pool", str(pool), "--out", str(tmp_path / "scored.jsonl"),
                 "reward.rule=json:nope"]) == 2
    assert error_line(capsys) == "error: reward.rule 'json:nope': json has no function 'nope'"
    assert ray_starts == []
    assert not (tmp_path / "scored.jsonl").exists()


def test_sample_refuses_a_builtin_model(tmp_path: Path, model: Path, capsys) -> None:
    config = base(tmp_path, model)
    config["model"]["name_or_path"] = "builtin:demo-tiny-llama"
    assert main(["sample", str(write_config(tmp_path, config)), "--out", str(tmp_path / "pool.jsonl")]) == 2
    assert error_line(capsys) == (
        f"error: model.name_or_path builtin:demo-tiny-llama: `rrhf-ray sample` needs a model directory "
        f"or a hub id (a built-in model is built by `rrhf-ray run`, into {tmp_path}/out/base)")


# --------------------------------------------------------------------------- what passes


def test_a_good_config_validates_and_says_what_it_checked(tmp_path: Path, model: Path, capsys) -> None:
    config = base(tmp_path, model)
    config["sft"] = {"data": str(write_lines(tmp_path / "sft.jsonl", {"query": "q", "response": " r"}))}
    config["sampling"]["external"] = [str(write_lines(
        tmp_path / "ext.jsonl", {"query": "q", "responses": [" a", " b"], "source": "gpt4"}))]
    assert main(["validate", str(write_config(tmp_path, config))]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    resolved = yaml.safe_load(out)  # the checks are YAML comments: the output is still a config
    assert resolved["model"]["name_or_path"] == str(model)
    assert f"# ok: model.name_or_path {model}: config.json, safetensors weights, tokenizer, " \
           "max_position_embeddings 512" in out
    assert "# ok: lengths: prompt 64 + reply 32 <= sampling.max_model_len 256 <= max_position_embeddings 512" in out
    assert "# ok: data.source builtin:demo: 144 training queries, 48 held-out" in out
    assert f"# ok: sft.data {tmp_path}/sft.jsonl: 1 (query, response) pairs" in out
    assert f"# ok: sampling.external {tmp_path}/ext.jsonl: 1 queries, 2 responses" in out
    assert "# ok: reward.rule builtin:demo: callable" in out
    assert not (tmp_path / "out").exists()


def test_relative_paths_are_checked_from_the_working_directory(tmp_path: Path, model: Path, capsys,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    copy_model(model, tmp_path / "models" / "m")
    write_lines(tmp_path / "prompts.jsonl", {"query": "a"}, {"query": "b"})
    monkeypatch.chdir(tmp_path)
    config = base(tmp_path, model)
    config["model"]["name_or_path"] = "models/m"  # exists here, so a path (not a hub id)
    config["data"]["source"] = "prompts.jsonl"
    config["output"]["dir"] = "out"
    assert main(["validate", str(write_config(tmp_path, config))]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"# ok: model.name_or_path {tmp_path}/models/m: config.json" in out
    # no eval split: eval_fraction 0.05 of 2 queries holds one out
    assert f"# ok: data.source {tmp_path}/prompts.jsonl: 1 training queries, 1 held-out" in out

    config["model"]["name_or_path"] = "./models/gone"
    assert main(["validate", str(write_config(tmp_path, config))]) == 2
    assert error_line(capsys) == "error: model.name_or_path: model directory not found: ./models/gone"


def test_hub_ids_are_left_to_load_time(tmp_path: Path, model: Path, capsys) -> None:
    config = base(tmp_path, model)
    config["model"]["name_or_path"] = "some-org/some-model"
    config["data"]["source"] = "some-org/some-data"
    assert main(["validate", str(write_config(tmp_path, config))]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "# skipped: model.name_or_path some-org/some-model: a hub id, checked when it loads" in out
    assert "# skipped: data.source some-org/some-data: a hub data set, read when the run starts" in out


def test_a_resumed_run_does_not_reread_a_finished_stage(tmp_path: Path, model: Path, capsys) -> None:
    """state.json of the same config says the SFT stage finished: its data is not read again."""
    from rrhf_ray.config import load_config
    from rrhf_ray.preflight import check_run
    from rrhf_ray.state import RunState

    config = base(tmp_path, model)
    config["sft"] = {"data": str(tmp_path / "sft.jsonl")}  # gone since the stage ran
    path = write_config(tmp_path, config)
    assert main(["validate", str(path)]) == 2
    assert error_line(capsys) == f"error: sft.data: data file not found: {tmp_path}/sft.jsonl"

    run_config = load_config(path)
    state = RunState(tmp_path / "out", run_config)
    (tmp_path / "out" / "sft").mkdir()
    state.finish("sft", 1.0, path=str(tmp_path / "out" / "sft"))
    assert "skipped: stage sft: finished in " + str(tmp_path / "out") + ", its inputs are not read again" \
        in check_run(run_config).lines


# --------------------------------------------------------------------------- errors from anywhere


def test_a_pydantic_error_from_job_construction_is_one_line(tmp_path: Path, model: Path, capsys) -> None:
    assert main(["sft", "--data", "", "--model", str(model), "--output", str(tmp_path / "o"), "--no-ray"]) == 2
    assert error_line(capsys) == "error: invalid DataConfig: source: String should have at least 1 character"


@pytest.mark.parametrize("raised, message", [
    (FileNotFoundError(2, "No such file or directory", "/data/x.jsonl"),
     "No such file or directory: /data/x.jsonl"),
    (IsADirectoryError(21, "Is a directory", "/data"), "Is a directory: /data"),
], ids=["FileNotFoundError", "IsADirectoryError"])
def test_os_errors_while_the_inputs_are_read_are_one_line(raised, message, monkeypatch, capsys) -> None:
    """A user's path that is missing or of the wrong kind, met while the config is read: exit 2."""
    def fail(*args, **kwargs):
        raise raised

    monkeypatch.setattr(cli, "load_config", fail)
    assert main(["validate"]) == 2
    assert error_line(capsys) == f"error: {message}"


@pytest.mark.parametrize("raised", [FileNotFoundError(2, "No such file or directory", "/data/x.jsonl"),
                                    KeyError("x")], ids=["FileNotFoundError", "KeyError"])
def test_an_error_inside_the_work_is_a_fault_with_its_traceback(raised, monkeypatch, capsys) -> None:
    """Past the reading of its inputs, an error is not the user's input (a missing file there is
    a file the work expected): exit 1, the traceback on the console when there is no run log."""
    def fail(args):
        raise raised

    monkeypatch.setattr(cli, "_cmd_validate", fail)
    assert main(["validate"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "raise raised" in err
    assert err.strip().splitlines()[-1] == f"error: {cli.error_line(raised)}"


def test_an_error_inside_a_run_goes_to_driver_log_and_one_line_to_the_console(tmp_path, monkeypatch,
                                                                              capsys) -> None:
    from rrhf_ray import logs

    def fail(args):
        logs.start_run_logs(tmp_path / "logs")
        raise RuntimeError("every worker died; 1 of 1 chunks not done")

    monkeypatch.setattr(cli, "_cmd_validate", fail)
    assert main(["validate"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    log = tmp_path / "logs" / "driver.log"
    assert err.strip().splitlines()[-1] == (f"error: every worker died; 1 of 1 chunks not done "
                                            f"(traceback in {log.resolve()})")
    text = log.read_text()
    assert "rrhf-ray validate failed" in text and "Traceback (most recent call last)" in text
    assert 'raise RuntimeError("every worker died' in text


def test_an_unknown_builtin_from_anywhere_is_one_line(monkeypatch, capsys) -> None:
    from rrhf_ray import registry

    monkeypatch.setattr(cli, "_cmd_validate", lambda args: registry.lookup("model", "builtin:nope"))
    assert main(["validate"]) == 2
    assert error_line(capsys) == "error: unknown built-in model builtin:nope; registered: builtin:demo-tiny-llama"


def test_a_multi_line_message_becomes_one_line() -> None:
    from rrhf_ray.config import ConfigError

    err = ConfigError("invalid config in x.yaml:\n  a: unknown key\n  b.c: required, not set")
    assert cli.error_line(err) == "invalid config in x.yaml: a: unknown key; b.c: required, not set"
    assert re.fullmatch(r"[^\n]+", cli.error_line(ValueError("one\ntwo")))
