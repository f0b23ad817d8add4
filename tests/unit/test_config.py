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


@pytest.mark.parametrize("preset", ["BP", "DP", "D", "P"])
def test_more_than_one_round_without_sampling_from_the_last_rounds_model_is_refused(tmp_path, preset):
    with pytest.raises(ConfigError, match=rf"rounds: 2 with sampling.preset {preset}: {preset} never samples "
                                          r"from ρ\*.*more epochs, not a setting of the paper; use "
                                          r"sampling.preset IP \(IP-n\), or rounds: 1"):
        load_config(write(tmp_path, ""), ["rounds=2", f"sampling.preset={preset}"])
    assert load_config(write(tmp_path, ""), ["rounds=1", f"sampling.preset={preset}"]).rounds == 1


@pytest.mark.parametrize("preset", ["IP", "IP-1", "IP-3"])
def test_iterated_presets_take_any_number_of_rounds(tmp_path, preset):
    assert load_config(write(tmp_path, ""), ["rounds=4", f"sampling.preset={preset}"]).rounds == 4


def test_train_max_length_must_hold_the_longest_prompt_reply_and_eos(tmp_path):
    cfg = load_config(write(tmp_path, ""))  # the defaults: the paper's 63 + 128 + 1 = 192
    assert (cfg.data.max_prompt_tokens, cfg.sampling.max_new_tokens, cfg.train.max_length) == (63, 128, 192)
    with pytest.raises(ConfigError, match=r"train.max_length 192 < data.max_prompt_tokens \+ "
                                          r"sampling.max_new_tokens \+ 1 \(EOS\) = 64 \+ 128 \+ 1 = 193"):
        load_config(write(tmp_path, ""), ["data.max_prompt_tokens=64"])
    assert load_config(write(tmp_path, ""), ["data.max_prompt_tokens=64", "train.max_length=193"])


def test_default_stop_strings_cover_the_next_turn():
    cfg = load_config(None, ["model.name_or_path=m", "data.source=d", "reward.rule=a:b"])
    assert cfg.sampling.stop == ["\n\nHuman:", "\n\nAssistant:", "\nHuman:", "\nAssistant:"]
    assert cfg.eval.judge_model is None and cfg.eval.bootstrap_resamples == 1000


# --------------------------------------------------------------------------- train.loss


def test_the_loss_union_and_the_loss_functions_cover_the_same_names():
    """A sixth loss is one function in rrhf_ray/loss.py (LOSSES) and one class in config.py
    (LossConfig / LOSS_CONFIGS); each class's fields are its function's keyword options."""
    import inspect

    from rrhf_ray.config import LOSS_CONFIGS
    from rrhf_ray.loss import LOSSES

    assert set(LOSS_CONFIGS) == set(LOSSES)
    for name, cls in LOSS_CONFIGS.items():
        options = {p.name: p.default for p in inspect.signature(LOSSES[name]).parameters.values()
                   if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "ref_logp_sum"}
        fields = {k: v.default for k, v in cls.model_fields.items() if k != "name"}
        assert fields == options, name  # the same options, the same documented defaults


@pytest.mark.parametrize(("yaml_loss", "expected"), [
    ("{name: rrhf, rank_weight: 0.5, sft_reduction: sum}", {"rank_weight": 0.5, "sft_reduction": "sum"}),
    ("{name: raft}", {"length_penalty": 1.0, "sft_reduction": "mean"}),
    ("{name: pro, sft_weight: 0.1}", {"sft_weight": 0.1, "length_penalty": 1.0}),
    ("{name: simpo, beta: 2.5}", {"beta": 2.5, "gamma": 1.0, "sft_weight": 0.0}),
    ("{name: slic, margin: 2.0}", {"margin": 2.0, "sft_weight": 0.5}),
    ("{name: dpo, beta: 0.2}", {"beta": 0.2, "sft_weight": 0.0}),
    ("{rank_weight: 0}", {"name": "rrhf", "rank_weight": 0.0}),  # no name: RRHF
    ("simpo", {"name": "simpo", "beta": 2.0}),  # a bare name: that loss with its defaults
])
def test_each_loss_parses_from_yaml(tmp_path, yaml_loss, expected):
    cfg = load_config(write(tmp_path, f"train:\n  loss: {yaml_loss}\n"))
    loss = cfg.train.loss.model_dump()
    assert {k: loss[k] for k in expected} == expected
    if "name" not in expected:
        assert loss["name"] == yaml_loss.split(",")[0].removeprefix("{name: ").rstrip("}")


def test_the_default_loss_is_rrhf_and_overrides_pick_another(tmp_path):
    assert TrainConfig().loss.name == "rrhf" and TrainConfig().loss.rank_weight == 1.0
    path = write(tmp_path, "")
    assert load_config(path, ["train.loss.name=pro"]).train.loss.sft_weight == 0.05
    cfg = load_config(path, ["train.loss.name=simpo", "train.loss.beta=2.5", "train.reference=previous_round"])
    assert (cfg.train.loss.name, cfg.train.loss.beta, cfg.train.reference) == ("simpo", 2.5, "previous_round")
    assert load_config(path, ["train.loss.rank_weight=0"]).train.loss.rank_weight == 0.0
    assert load_config(path, ["train.loss={name: dpo}", "train.loss.beta=0.3"]).train.loss.beta == 0.3
    assert load_config(path, ["train.shuffle_rewards=true"]).train.shuffle_rewards


def test_loss_mistakes_are_named(tmp_path):
    path = write(tmp_path, "")
    with pytest.raises(ConfigError, match=r"train\.loss\.name: 'ppo' is not one of rrhf, raft, pro, simpo, "
                                          r"slic, dpo$"):
        load_config(path, ["train.loss.name=ppo"])
    with pytest.raises(ConfigError, match=r"train\.loss\.rank_weight: unknown key \(train\.loss\.name pro takes "
                       r"name, sft_weight, length_penalty; rank_weight is a key of train\.loss\.name rrhf\)"):
        load_config(path, ["train.loss.name=pro", "train.loss.rank_weight=1"])
    with pytest.raises(ConfigError, match=r"train\.loss\.beta: Input should be greater than 0"):
        load_config(path, ["train.loss.name=dpo", "train.loss.beta=0"])
    with pytest.raises(ConfigError, match=r"train\.reference: Input should be 'initial' or 'previous_round'"):
        load_config(path, ["train.reference=ref"])
    # The three RRHF keys moved into train.loss: the old spelling says where they went.
    with pytest.raises(ConfigError, match=r"train\.rank_weight moved into train\.loss .*train\.loss\.rank_weight"):
        load_config(path, ["train.rank_weight=0"])


@pytest.mark.parametrize("loss", ["simpo", "slic", "dpo"])
def test_the_pairwise_losses_take_pairs(tmp_path, loss):
    """`pairs` (rrhf_ray/loss.py, `_select_pairs`): all by default, best_worst or best_rest, and it
    reaches the loss function's keyword options."""
    path = write(tmp_path, f"train:\n  loss: {{name: {loss}, pairs: best_worst}}\n")
    assert load_config(path).train.loss.pairs == "best_worst"
    plain = write(tmp_path, "")
    assert load_config(plain, [f"train.loss.name={loss}"]).train.loss.pairs == "all"
    cfg = load_config(plain, [f"train.loss.name={loss}", "train.loss.pairs=best_rest"])
    assert cfg.train.loss.model_dump(exclude={"name"})["pairs"] == "best_rest"
    with pytest.raises(ConfigError, match=r"train\.loss\.pairs: Input should be 'all', "
                                          r"'best_worst' or 'best_rest'"):
        load_config(plain, [f"train.loss.name={loss}", "train.loss.pairs=worst"])


@pytest.mark.parametrize("loss", ["rrhf", "pro", "raft"])
def test_the_losses_without_pairs_refuse_the_key(tmp_path, loss):
    """RRHF, PRO and RAFT always read every strict pair: `pairs` there is an unknown key."""
    with pytest.raises(ConfigError, match=rf"train\.loss\.pairs: unknown key \(train\.loss\.name {loss} takes .*; pairs is a "
                       r"key of train\.loss\.name simpo, slic, dpo\)"):
        load_config(write(tmp_path, ""), [f"train.loss.name={loss}", "train.loss.pairs=best_worst"])


def test_prefix_sharing_reads_yaml_on_and_off(tmp_path):
    """YAML 1.1 reads a bare on / off as booleans; the setting still means what was written."""
    assert load_config(write(tmp_path, "train:\n  prefix_sharing: off\n")).train.prefix_sharing == "off"
    assert load_config(write(tmp_path, ""), ["train.prefix_sharing=on"]).train.prefix_sharing == "on"
    assert load_config(write(tmp_path, "")).train.prefix_sharing == "auto"


@pytest.mark.parametrize("stage", ["sft", "reward_model"])
@pytest.mark.parametrize("key", ["loss=dpo", "reference=previous_round", "prefix_sharing=off",
                                 "shuffle_rewards=true", "micro_batch_tokens=512", "candidate_chunk_size=2",
                                 "truncated=drop"])
def test_rrhf_only_keys_in_a_stage_before_round_1_are_unknown(tmp_path, stage, key):
    """The SFT and reward-model stages train with `FitConfig`: a key only the RRHF trainer reads
    is refused by name instead of being accepted and ignored."""
    path = write(tmp_path, "sft:\n  data: pairs.jsonl\nreward_model:\n  data: prefs.jsonl\n")
    with pytest.raises(ConfigError, match=rf"{stage}\.train\.{key.split('=')[0]}: unknown key"):
        load_config(path, [f"{stage}.train.{key}"])
    cfg = load_config(path, [f"{stage}.train.epochs=2"])  # a key every fit reads is taken
    assert getattr(cfg, stage).train.epochs == 2
    assert getattr(cfg, stage).train.lr == {"sft": 2e-5, "reward_model": 1e-5}[stage]  # the stage's defaults


def test_switches_read_a_bare_yaml_on_or_off_as_the_word():
    """`auto | on | off` settings (config.base.Switch): YAML 1.1 reads bare on / off as booleans."""
    from rrhf_ray.config import load_config
    from rrhf_ray.demo import DEMO_CONFIG

    demo = load_config(DEMO_CONFIG, [])
    assert (demo.sft.train.packing, demo.train.packing, demo.train.prefix_sharing) == ("auto", "off", "auto")
    c = load_config(DEMO_CONFIG, ["sft.train.packing=off", "train.prefix_sharing=on", "data.chat_template=off"])
    assert (c.sft.train.packing, c.train.prefix_sharing, c.data.chat_template) == ("off", "on", "off")
