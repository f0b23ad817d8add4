"""Preflight: every mistake in a run config that can be found without Ray, an engine or the
network, found before Ray starts and before any stage trains.

`check_run` (called by `workflow.run` and `rrhf-ray validate`) checks, after the config's own
keys, types and cross-field rules (`rrhf_ray.config`):

- the sampling preset, and the lengths: the longest prompt plus the longest reply (sampled or
  evaluated) must fit `sampling.max_model_len`, which must fit the model's
  `max_position_embeddings` when its directory is local; when data-set or external responses
  (of any length) join the groups, the longest prompt must be at most half of `train.max_length`,
  so that the trainer cuts such a response and never the prompt;
- every model a stage loads (`model.name_or_path`, `model.tokenizer`, `reward.model`,
  `reward_model.base_model`): a ``builtin:`` name must be registered; a local directory must
  exist and hold `config.json`, safetensors weights (the only format the project loads) and a
  tokenizer; a hub id is left to load time (there is no network here);
- the reward: a rule must import and be callable, a built-in rule registered;
- every data file of every stage, read and converted row by row (`data.source`, `sft.data`,
  `sft.eval_data`, `reward_model.data`, `reward_model.eval_data`, `sampling.external`): the
  first bad row is named by file and line. Hub data sets are left to load time.

A stage already finished in `output.dir` (a resumed run with the same config) is not checked
again: its inputs are no longer read. Each failure is a `ConfigError` (the config names
something unusable) or a `DataError` (a file's contents), one line naming the field, the file
and the row.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rrhf_ray import registry
from rrhf_ray.config import ConfigError, DataConfig, RewardConfig, RunConfig, with_absolute_paths
from rrhf_ray.data.candidates import Preset, get_preset, read_external
from rrhf_ray.state import STATE_FILE, config_fingerprint, earlier_fingerprints
from rrhf_ray.types import DataError

logger = logging.getLogger(__name__)

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")  # read as a file by rrhf_ray.data.queries
DATA_DIR_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".arrow")  # in a directory: datasets.load_dataset
SAVED_DATASET_FILES = ("dataset_dict.json", "state.json")  # datasets.save_to_disk's directory
WEIGHTS_INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass
class Preflight:
    """What a passed check found: the config with local paths absolute, the sampling preset,
    the `sampling.external` files read (`read_external`), and one line per check."""

    config: RunConfig
    preset: Preset | None = None
    external: list[dict] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)

    def ok(self, line: str) -> None:
        self.lines.append(f"ok: {line}")

    def skipped(self, line: str) -> None:
        logger.info("preflight skipped %s", line)
        self.lines.append(f"skipped: {line}")

    def warn(self, line: str) -> None:
        """A config that runs but cannot learn, or not as written: a warning (once), not an error."""
        logger.warning("%s", line)
        self.lines.append(f"warning: {line}")


# --------------------------------------------------------------------------- what a name is


def is_local(value: str) -> bool:
    """A local path: written as one ('/', '.', '~') or existing; not a builtin, hub id or URI."""
    if not value or registry.is_builtin(value) or "://" in value:
        return False
    return value.startswith(("/", ".", "~")) or Path(value).expanduser().exists()


def _is_local_data(value: str) -> bool:
    return is_local(value) or ("://" not in value and not registry.is_builtin(value)
                               and Path(value).suffix in DATA_SUFFIXES)


# --------------------------------------------------------------------------- models


def check_tokenizer_dir(name: str, value: str) -> None:
    path = _existing_dir(name, value, "tokenizer directory")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ConfigError(f"{name}: {value} holds no tokenizer ({' or '.join(TOKENIZER_FILES)})")


def _existing_dir(name: str, value: str, what: str) -> Path:
    path = Path(value).expanduser()
    if not path.exists():
        raise ConfigError(f"{name}: {what} not found: {value}")
    if not path.is_dir():
        raise ConfigError(f"{name}: {value} is a file, not a {what}")
    return path


def check_model_dir(name: str, value: str, *, tokenizer: bool = True) -> dict[str, Any]:
    """A local Hugging Face model directory's `config.json`, after checking that the directory
    holds it, safetensors weights and (with `tokenizer`) a tokenizer."""
    path = _existing_dir(name, value, "model directory")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{name}: {value} holds no config.json (not a Hugging Face model directory)")
    try:
        model_config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{name}: {config_file} cannot be read as JSON ({err})") from None
    if not isinstance(model_config, dict):
        raise ConfigError(f"{name}: {config_file} does not hold a JSON object")
    if not ((path / WEIGHTS_INDEX).is_file() or any(path.glob("*.safetensors"))):
        other = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".h5"))
        hint = (f"; found {', '.join(other)}: rrhf-ray loads safetensors only, re-save with "
                "save_pretrained(..., safe_serialization=True)") if other else ""
        raise ConfigError(f"{name}: {value} holds no safetensors weights (*.safetensors or "
                          f"{WEIGHTS_INDEX}){hint}")
    if tokenizer and not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ConfigError(f"{name}: {value} holds no tokenizer ({' or '.join(TOKENIZER_FILES)})")
    return model_config


def check_model_arg(name: str, value: str) -> None:
    """A model a training command (`train`, `sft`, `train-rm`) starts from, checked as `run`
    checks its models: a local directory must hold config.json, safetensors weights and a
    tokenizer; a built-in name is refused (only `run` builds one); a hub id loads later."""
    _not_builtin(name, value)
    if is_local(value):
        check_model_dir(name, value)


def _not_builtin(name: str, value: str | None) -> None:
    """Only `model.name_or_path` may be a built-in model: the run builds it into output.dir/base."""
    if registry.is_builtin(value):
        raise ConfigError(f"{name}: {value}: only model.name_or_path may name a built-in model "
                          "(the run builds it); name a model directory or a hub id")


def _check_policy(config: RunConfig, check: Preflight) -> int | None:
    """model.name_or_path and model.tokenizer; returns the model's max_position_embeddings when
    its local config.json has one."""
    model = config.model
    value = model.name_or_path
    max_pos = None
    if registry.is_builtin(value):
        try:
            registry.lookup("model", value)
        except registry.UnknownBuiltinError as err:
            raise ConfigError(f"model.name_or_path: {err}") from None
        check.ok(f"model.name_or_path {value}: a registered built-in model, built into "
                 f"{config.output.dir}/base")
    elif is_local(value):
        model_config = check_model_dir("model.name_or_path", value, tokenizer=model.tokenizer is None)
        max_pos = model_config.get("max_position_embeddings")
        max_pos = max_pos if isinstance(max_pos, int) and max_pos > 0 else None
        check.ok(f"model.name_or_path {value}: config.json, safetensors weights, "
                 + ("tokenizer" if model.tokenizer is None else "tokenizer in model.tokenizer")
                 + (f", max_position_embeddings {max_pos}" if max_pos else ""))
    else:
        check.skipped(f"model.name_or_path {value}: a hub id, checked when it loads")
    if model.tokenizer:
        _not_builtin("model.tokenizer", model.tokenizer)
        if is_local(model.tokenizer):
            check_tokenizer_dir("model.tokenizer", model.tokenizer)
            check.ok(f"model.tokenizer {model.tokenizer}")
        else:
            check.skipped(f"model.tokenizer {model.tokenizer}: a hub id, checked when it loads")
    return max_pos


def _check_backbone(name: str, value: str, check: Preflight) -> None:
    """A model another stage loads from a directory (reward model, its backbone)."""
    _not_builtin(name, value)
    if is_local(value):
        check_model_dir(name, value)
        check.ok(f"{name} {value}: config.json, safetensors weights, tokenizer")
    else:
        check.skipped(f"{name} {value}: a hub id, checked when it loads")


# --------------------------------------------------------------------------- lengths


def check_lengths(config: RunConfig, max_pos: int | None, check: Preflight, *, evaluation: bool = True) -> None:
    """The longest prompt plus the longest reply fit the engine's context, which fits the model's;
    the longest prompt survives the trainer's cut of a long data-set or external response."""
    prompt, ctx = config.data.max_prompt_tokens, config.sampling.max_model_len
    replies = [("sampling.max_new_tokens", config.sampling.max_new_tokens)]
    if evaluation:
        replies.append(("eval.max_new_tokens", config.eval.max_new_tokens))
    for key, reply in replies:
        if prompt + reply > ctx:
            raise ConfigError(
                f"data.max_prompt_tokens + {key} = {prompt} + {reply} = {prompt + reply} exceeds "
                f"sampling.max_model_len {ctx}: the longest prompt has no room for its reply")
    if max_pos is not None and ctx > max_pos:
        raise ConfigError(f"sampling.max_model_len {ctx} exceeds the model's max_position_embeddings "
                          f"{max_pos} ({config.model.name_or_path}/config.json)")
    half = config.train.max_length // 2
    cap = config.data.max_response_tokens
    capped = cap is not None and prompt + cap + 1 <= config.train.max_length  # + EOS: never cut
    unbounded = (check.preset is not None and check.preset.dataset and not capped) or config.sampling.external
    if unbounded and prompt > half:
        # The trainer cuts a long response from the right, but the shared prompt keeps only
        # max(max_length − longest response, max_length // 2) (rrhf_ray.train.encoding.Encoder).
        raise ConfigError(
            f"data.max_prompt_tokens {prompt} > train.max_length // 2 = {half}: a data-set or "
            f"sampling.external response longer than {config.train.max_length - half} tokens would "
            "cut the prompt of its whole group below data.max_prompt_tokens; raise train.max_length "
            f"to at least {2 * prompt}, lower data.max_prompt_tokens or cap the data set's responses "
            f"(data.max_response_tokens ≤ {config.train.max_length - prompt - 1})")
    check.ok(f"lengths: prompt {prompt} + reply {max(r for _, r in replies)} <= sampling.max_model_len {ctx}"
             + (f" <= max_position_embeddings {max_pos}" if max_pos is not None else ""))


# --------------------------------------------------------------------------- reward


def has_chat_template(directory: str) -> bool:
    """Whether the tokenizer saved in `directory` has a chat template (its own file, or the key
    in tokenizer_config.json), read without loading it."""
    path = Path(directory).expanduser()
    if any((path / f).is_file() for f in ("chat_template.jinja", "chat_template.json")):
        return True
    try:
        return bool(json.loads((path / "tokenizer_config.json").read_text()).get("chat_template"))
    except (OSError, ValueError):
        return False


# What a custom chat template must render to something: one user turn, the assistant's opened.
SAMPLE_CONVERSATION = ({"role": "user", "content": "What color is the sky?"},)


def read_chat_template(name: str, path: str, tokenizer: Any = None) -> str:
    """The Jinja template in the file `path` (the setting `name`), after checking that it exists,
    compiles and, with `tokenizer` (whose template it replaces: the tokenizer holds it after the
    call), renders `SAMPLE_CONVERSATION` to at least one token; else a ConfigError naming `name`
    and the file."""
    import jinja2

    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"{name}: template file not found: {path}")
    try:
        template = file.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{name}: {path} cannot be read ({err})") from None
    if tokenizer is None:
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        try:  # the environment transformers renders chat templates in, without a tokenizer
            ImmutableSandboxedEnvironment(extensions=[loopcontrols]).parse(template)
        except jinja2.TemplateSyntaxError as err:
            raise ConfigError(f"{name}: {path} does not compile as a Jinja template: {err.message} "
                              f"(line {err.lineno})") from None
        return template
    from rrhf_ray.train.tokens import chat_ids

    tokenizer.chat_template = template
    try:
        chat_ids(tokenizer, list(SAMPLE_CONVERSATION), add_generation_prompt=True)
    except jinja2.TemplateSyntaxError as err:
        raise ConfigError(f"{name}: {path} does not compile as a Jinja template: {err.message} "
                          f"(line {err.lineno})") from None
    except ValueError as err:
        if "renders the conversation to nothing" not in str(err):
            raise ConfigError(f"{name}: {path} fails on a sample conversation (one user turn): {err}") from None
        raise ConfigError(f"{name}: {path} renders a sample conversation (one user turn) to nothing") from None
    except Exception as err:  # noqa: BLE001 - a template may raise anything (raise_exception, undefined names)
        raise ConfigError(f"{name}: {path} fails on a sample conversation (one user turn): "
                          f"{type(err).__name__}: {err}") from None
    return template


def _local_tokenizer(value: str | None) -> Any:
    """The tokenizer saved in the local directory `value`; None for a hub id, a built-in or nothing."""
    if not value or registry.is_builtin(value) or not is_local(value) or not Path(value).expanduser().is_dir():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(value)


def check_reward(reward: RewardConfig, check: Preflight) -> None:
    """A rule imports and is callable; a reward model's directory is whole (and, with
    reward.chat_template on, its tokenizer has a template, or reward.chat_template_path gives
    one that renders)."""
    if reward.kind == "model":
        _check_backbone("reward.model", reward.model or "", check)
        if reward.chat_template_path:
            read_chat_template("reward.chat_template_path", reward.chat_template_path,
                               _local_tokenizer(reward.model))
            check.ok(f"reward.chat_template_path {reward.chat_template_path}: renders a conversation")
        elif reward.chat_template == "on" and is_local(reward.model or "") and not has_chat_template(reward.model):
            raise ConfigError(f"reward.chat_template is on but the tokenizer of reward.model {reward.model} "
                              "has no chat_template (use auto or off)")
        return
    from rrhf_ray.actors.scorer import load_rule

    spec = reward.rule or ""
    try:
        load_rule(spec)
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - a user's module may raise anything on import
        raise DataError(f"reward.rule {spec!r}: importing it raised {type(err).__name__}: {err}") from None
    check.ok(f"reward.rule {spec}: callable")


# --------------------------------------------------------------------------- data


def _named(name: str, err: Exception) -> str:
    text = str(err)
    return text if text.startswith(name) else f"{name}: {text}"


def _data_source(name: str, value: str, check: Preflight) -> bool:
    """Whether `value` is read here: a registered builtin or an existing local path. Unknown
    builtins and missing local paths raise; hub ids are skipped (no network)."""
    if not value.strip():
        raise ConfigError(f"{name} is empty: name a file, a directory, a hub id or builtin:<name>")
    if registry.is_builtin(value):
        try:
            registry.lookup("data", value)
        except registry.UnknownBuiltinError as err:
            raise DataError(f"{name}: {err}") from None
        return True
    if _is_local_data(value):
        if not Path(value).expanduser().exists():
            raise DataError(f"{name}: data file not found: {value}")
        if Path(value).expanduser().is_dir():
            check_data_dir(name, Path(value).expanduser())
        return True
    check.skipped(f"{name} {value}: a hub data set, read when the run starts")
    return False


def check_data_dir(name: str, path: Path) -> None:
    """A directory named as data is a saved data set (`datasets.save_to_disk`) or holds data
    files `datasets.load_dataset` reads into rows with fields (a model directory does not)."""
    if any((path / f).is_file() for f in SAVED_DATASET_FILES):
        return
    usage = (f"name a {', '.join(DATA_SUFFIXES)} file, a directory of {', '.join(DATA_DIR_SUFFIXES)} "
             "files, a saved data set, a hub id or builtin:<name>")
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        raise DataError(f"{name}: {path} is a model directory, not a data set: {usage}")
    files = [p for p in path.rglob("*") if p.is_file() and p.suffix in DATA_DIR_SUFFIXES
             and p.name not in ("config.json", *TOKENIZER_FILES)]
    if not files:
        raise DataError(f"{name}: {path} is a directory without data files, not a data set: {usage}")


def policy_chat_tokenizer(config: RunConfig, check: Preflight | None = None) -> Any:
    """The policy's local tokenizer when `data.chat_template` needs it here (it is on, or the
    tokenizer has a template, or `data.chat_template_path` gives one: it then holds that template),
    else None; on with a local tokenizer that has no template is a ConfigError. A template file is
    checked (`read_chat_template`) with the tokenizer when it is local, else on its own."""
    model = config.model
    value = model.tokenizer or model.name_or_path
    if config.data.chat_template_path:
        tokenizer = _local_tokenizer(value)
        read_chat_template("data.chat_template_path", config.data.chat_template_path, tokenizer)
        if check is not None:
            check.ok(f"data.chat_template_path {config.data.chat_template_path}: "
                     + ("renders a conversation" if tokenizer is not None else "compiles"))
        return tokenizer
    if registry.is_builtin(value) or not is_local(value) or not Path(value).expanduser().is_dir():
        return None
    mode, has = config.data.chat_template, has_chat_template(value)
    if mode == "on" and not has:
        raise ConfigError(f"data.chat_template is on but the tokenizer in {value} has no chat_template "
                          "(use auto or off, or a tokenizer with a template: model.tokenizer)")
    if mode == "off" or not has:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(value)


def check_queries(data: DataConfig, check: Preflight, chat_tokenizer: Any = None) -> int | None:
    """Every row of data.source converted (no tokenizer: the max_prompt_tokens fit comes later;
    with the policy's `chat_tokenizer`, every conversation rendered by its template); returns how
    many training queries carry the data set's own responses (None: not read here)."""
    if not _data_source("data.source", data.source, check):
        return None
    from rrhf_ray.data.queries import load_data

    try:
        loaded = load_data(data, chat_tokenizer=chat_tokenizer)
    except DataError as err:
        raise DataError(_named("data.source", err)) from None
    check.ok(f"data.source {data.source}: {len(loaded.train)} training queries, {len(loaded.eval)} held-out "
             "(before the max_prompt_tokens fit)")
    return sum(1 for r in loaded.train if r.responses)


# --------------------------------------------------------------------------- configs that cannot learn


def check_learnable(config: RunConfig, with_responses: int | None, check: Preflight) -> None:
    """Warnings for a config that runs but cannot learn, or not as written: one candidate per
    query and no other source (no pair to rank), greedy sampling of several candidates (the same
    reply k times), and steps that do not split into whole micro-batches."""
    sampling, preset = config.sampling, check.preset
    samples = preset is not None and preset.policy is not None
    dataset = preset is not None and preset.dataset and with_responses != 0
    if sampling.n == 1 and samples and not dataset and not sampling.external:
        check.warn("sampling.n 1 with no other candidate source (data-set responses, sampling.external): "
                   "one candidate per query has no pair to rank, so the update only fine-tunes on "
                   "each query's one reply, whatever its reward; set sampling.n to 2 or more")
    if sampling.temperature == 0 and sampling.n > 1 and samples and not sampling.use_beam_search:
        check.warn(f"sampling.temperature 0 with sampling.n {sampling.n}: greedy decoding draws the same "
                   f"reply {sampling.n} times (merged into one candidate); raise sampling.temperature "
                   "(e.g. 1.0) or use sampling.use_beam_search")
    fits = [("train", config.train)]
    fits += [(f"{s}.train", getattr(config, s).train) for s in ("sft", "reward_model") if getattr(config, s)]
    for name, fit in fits:
        if getattr(fit, "micro_batch_tokens", None) is not None:
            continue  # packed by tokens: micro_batch_queries does not cut the step
        per_step = fit.micro_batch_queries * fit.num_workers
        if fit.queries_per_step % per_step:
            share = -(-fit.queries_per_step // fit.num_workers)
            check.warn(f"{name}.queries_per_step {fit.queries_per_step} is not a multiple of "
                       f"{name}.micro_batch_queries × {name}.num_workers = {per_step}: a worker's share of "
                       f"a step (up to {share} queries) ends in a smaller micro-batch of "
                       f"{share % fit.micro_batch_queries or fit.micro_batch_queries}; set "
                       f"{name}.queries_per_step to a multiple of {per_step} for even micro-batches")


def check_pairs(name: str, value: str | None, fmt: str, read: Callable[..., list], what: str,
                check: Preflight) -> None:
    if value is None or not _data_source(name, value, check):
        return
    try:
        pairs = read(value, format=fmt)
    except DataError as err:
        raise DataError(_named(name, err)) from None
    check.ok(f"{name} {value}: {len(pairs)} {what}")


def check_external(paths: list[str], check: Preflight) -> None:
    for path in paths:
        try:
            found = read_external(path)
        except DataError as err:
            raise DataError(_named("sampling.external", err)) from None
        check.external.append(found)
        check.ok(f"sampling.external {path}: {len(found)} queries, "
                 f"{sum(len(c) for c in found.values())} responses")


# --------------------------------------------------------------------------- entry points


def finished_stages(config: RunConfig) -> set[str]:
    """Stages of a run in output.dir with this same config whose output directory still exists
    (a resumed run reads their inputs no more)."""
    state_file = Path(config.output.dir) / STATE_FILE  # a URI: none here (run_mirrored pulls it first)
    try:
        state = json.loads(state_file.read_text())
        if state.get("fingerprint") not in {config_fingerprint(config), *earlier_fingerprints(config)}:
            return set()  # RunState refuses it, after these checks
        return {name for name, info in state.get("stages", {}).items()
                if isinstance(info, dict) and info.get("path") and Path(info["path"]).exists()}
    except (OSError, ValueError, AttributeError):
        return set()


def _check_output(value: str, check: Preflight) -> None:
    """A URI output.dir: a supported scheme with a bucket, and the client for it (no network)."""
    from rrhf_ray.mirror import mirror_dir
    from rrhf_ray.remote import check_uri, is_remote

    if is_remote(value):
        check.ok(f"output.dir {check_uri(value)}: object storage, mirrored in {mirror_dir(value)}")


def _preset(config: RunConfig) -> Preflight:
    try:
        preset = get_preset(config.sampling.preset)
    except ValueError as err:
        raise ConfigError(f"sampling.preset: {err}") from None
    check = Preflight(config=with_absolute_paths(config), preset=preset)
    check.ok(f"sampling.preset {config.sampling.preset}")
    return check


def check_run(config: RunConfig) -> Preflight:
    """Everything `workflow.run` will load, checked statically; raises ConfigError / DataError."""
    done = finished_stages(config)  # before the paths change: the fingerprint is of the config as given
    check = _preset(config)
    _check_output(config.output.dir, check)
    config = check.config
    sft_done, rm_done = "sft" in done, "reward_model" in done
    rm = None if rm_done else config.reward_model
    if rm is not None and not rm.base_model and registry.is_builtin(config.model.name_or_path):
        raise ConfigError(
            f"reward_model.base_model is empty, so the reward model would start from "
            f"model.name_or_path {config.model.name_or_path}, which is built only for the policy; "
            "set reward_model.base_model to a model directory or a hub id")

    max_pos = None
    if not sft_done or (rm is not None and not rm.base_model):
        max_pos = _check_policy(config, check)
    check_lengths(config, max_pos, check)
    if config.eval.judge_model:  # judge_perplexity's fixed judge (null: ρ, checked above)
        _check_backbone("eval.judge_model", config.eval.judge_model, check)
    if rm is not None and rm.base_model:
        _check_backbone("reward_model.base_model", rm.base_model, check)
    if config.reward_model is None:
        check_reward(config.reward, check)
    else:
        check.ok("reward: the reward model the reward_model stage trains")
        if config.reward.chat_template_path:  # that model does not exist yet: the file alone
            read_chat_template("reward.chat_template_path", config.reward.chat_template_path)
            check.ok(f"reward.chat_template_path {config.reward.chat_template_path}: compiles")

    check_learnable(config, check_queries(config.data, check, policy_chat_tokenizer(config, check)), check)
    from rrhf_ray.data.pairs import read_preference_pairs, read_sft_pairs

    if config.sft is not None and not sft_done:
        for key in ("data", "eval_data"):
            check_pairs(f"sft.{key}", getattr(config.sft, key), config.sft.format, read_sft_pairs,
                        "(query, response) pairs", check)
    if rm is not None:
        for key in ("data", "eval_data"):
            check_pairs(f"reward_model.{key}", getattr(rm, key), rm.format, read_preference_pairs,
                        "preference pairs", check)
    check_external(config.sampling.external, check)
    from rrhf_ray.tracking import check_tracking

    check_tracking(config.tracking)  # a backend turned on without its package: named here
    for stage in sorted(done & {"base", "sft", "reward_model"}):
        check.skipped(f"stage {stage}: finished in {config.output.dir}, its inputs are not read again")
    return check


def check_sample(config: RunConfig) -> Preflight:
    """What `rrhf-ray sample` loads: the preset, the policy when the preset samples from one (else
    its tokenizer only, for the max_prompt_tokens fit), the lengths, the external files.
    The data rows are read (and checked) by the command itself."""
    check = _preset(config)
    config = check.config
    model = config.model
    policy = check.preset.policy is not None
    if registry.is_builtin(model.name_or_path) and (policy or not model.tokenizer):
        raise ConfigError(
            f"model.name_or_path {model.name_or_path}: `rrhf-ray sample` needs a model directory or a "
            f"hub id (a built-in model is built by `rrhf-ray run`, into {config.output.dir}/base)")
    if policy:
        check_lengths(config, _check_policy(config, check), check, evaluation=False)
    else:  # no engine: only the tokenizer is loaded
        name, value = ("model.tokenizer", model.tokenizer) if model.tokenizer else ("model.name_or_path", model.name_or_path)
        if is_local(value):
            check_tokenizer_dir(name, value)
            check.ok(f"{name} {value}: tokenizer")
        else:
            check.skipped(f"{name} {value}: a hub id, checked when it loads")
    _data_source("data.source", config.data.source, check)  # a directory that is not a data set: one line
    check_external(config.sampling.external, check)
    return check


def check_score(config: RunConfig) -> Preflight:
    """What `rrhf-ray score` loads: the reward rule or reward model."""
    check = Preflight(config=with_absolute_paths(config))
    check_reward(check.config.reward, check)
    return check
