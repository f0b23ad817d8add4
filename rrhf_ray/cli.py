"""`rrhf-ray` / `python -m rrhf_ray`: the command line.

Each subcommand is one `_cmd_*` function plus its parser in `build_parser`.

Two kinds of error end a command. A user's input that is wrong (a config, a data row, a path,
an unknown built-in: `ConfigError`, `DataError`, `UnknownBuiltinError`, and what pydantic or the
file system raise while the command's inputs are read, inside `user_input`) prints one `error:`
line and exits 2, before any expensive work starts. Anything else is a fault inside the work: its
traceback goes to the run's `logs/driver.log` (to the console when there is no run log) and the
console gets one `error:` line naming the cause and the log; the exit status is 1.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from rrhf_ray import registry
from rrhf_ray.config import (
    ConfigError,
    TrainConfig,
    absolute_path,
    apply_overrides,
    build,
    dump_config,
    load_config,
)
from rrhf_ray.connection import connect_ray
from rrhf_ray.types import DataError

logger = logging.getLogger("rrhf_ray")

DEFAULT_CONFIG = "builtin:demo"  # `rrhf-ray run` with no config: the embedded default
_DOTTED_KEY = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")  # `train.epochs`: a key, not a file name
# Errors that are the user's input by their type, wherever they are raised (exit 2).
INPUT_ERRORS = (ConfigError, DataError, registry.UnknownBuiltinError)


@contextlib.contextmanager
def user_input() -> Iterator[None]:
    """Around the reading of a command's inputs (config, overrides, data files, paths): what
    pydantic or the file system raise here is the user's input too, one `ConfigError` line."""
    try:
        yield
    except (ValidationError, FileNotFoundError, IsADirectoryError, NotADirectoryError) as err:
        raise ConfigError(error_line(err)) from None


def _load_run_config(args: argparse.Namespace) -> tuple[str, Any]:
    """(the config's path, the validated RunConfig) of `run` / `validate`: CONFIG may be left
    out (the embedded default), and `rrhf-ray run rounds=2` means overrides of the default."""
    if args.config and "=" in args.config and not Path(args.config).exists():
        args.overrides.insert(0, args.config)
        args.config = None
    with user_input():
        path = _config_path(args.config, args.overrides)
        return path, load_config(path, args.overrides)


def _cmd_validate(args: argparse.Namespace) -> int:
    """The resolved config, then what `rrhf_ray.preflight` checked (as YAML comments, so the
    output stays a loadable config); a config that `run` would refuse exits 2 here."""
    from rrhf_ray.preflight import check_run

    _, config = _load_run_config(args)
    checked = check_run(config)
    print(dump_config(config), end="")
    for line in checked.lines:
        print(f"# {line}")
    return 0


def _train_overrides(overrides: list[str]) -> TrainConfig:
    """`train` takes TrainConfig keys, with or without the `train.` prefix."""
    items = [o.removeprefix("train.") for o in overrides]
    with user_input():
        return build(TrainConfig, apply_overrides({}, items), f"(train overrides {' '.join(overrides)})")


def _cmd_train(args: argparse.Namespace) -> int:
    from rrhf_ray.api import ranked_train_job
    from rrhf_ray.train.rrhf import fit, train_loop_per_worker

    train_cfg = _train_overrides(args.overrides)
    job = ranked_train_job(args.data, args.model, args.output, train_cfg,  # model and rows checked
                           trust_remote_code=args.trust_remote_code, name="--model")
    _print_result("trained model", args.output, _train(args, job, train_loop_per_worker, fit))
    return 0


def _sample_queries(config) -> tuple[list[str], list[object]]:
    """Training queries and their data-set records (`rrhf_ray.data.queries`), every row validated."""
    from rrhf_ray.data.queries import load_data

    tokenizer = None
    if config.model.name_or_path:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(config.model.tokenizer or config.model.name_or_path)
    records = load_data(config.data, tokenizer).train
    return [r.query for r in records], list(records)


class _PathThenOverrides(argparse.Action):
    """`--out PATH [key=value …]`: argparse (3.11) cannot take positionals after an option once
    the positional list was matched, so overrides written after `--out PATH` are collected here."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values[0])
        namespace.overrides = list(getattr(namespace, "overrides", None) or []) + list(values[1:])


def _cmd_sample(args: argparse.Namespace) -> int:
    with contextlib.ExitStack() as scratch:
        return _sample(args, scratch)


def _sample(args: argparse.Namespace, scratch: contextlib.ExitStack) -> int:
    from rrhf_ray.preflight import check_sample

    with user_input():
        checked = check_sample(load_config(_config_path(args.config, args.overrides), args.overrides))  # model, lengths, files
        config, preset, external = checked.config, checked.preset, checked.external
        if config.data.chat_template_path:  # as `run` renders: the tokenizer with the file's template
            from rrhf_ray.workflow import with_run_tokenizer

            config = with_run_tokenizer(config, config.model.name_or_path,
                                        Path(scratch.enter_context(tempfile.TemporaryDirectory())))
        queries, records = _sample_queries(config)  # every row validated before engines start
    pools = {}
    # IP-n samples from ρ* = round n−1's model (model.name_or_path is that checkpoint), with the
    # seeds `run` gives round n; the other presets sample as round 1.
    name = config.sampling.preset
    version = int(name.split("-")[1]) - 1 if name.startswith("IP-") else 0
    if preset.policy is not None:
        from rrhf_ray.actors.pools import build_pools

        log_dir = connect_ray(config)
        model = config.model.name_or_path
        pools = build_pools(config, preset, model, model, version, log_dir=log_dir)
    from rrhf_ray.stages import sample_candidates

    try:
        info = sample_candidates(pools, preset, records=records, queries=queries, sampling=config.sampling,
                                 external=external, path=Path(args.out), round_index=version + 1)
    finally:
        for pool in pools.values():
            pool.shutdown()
    print(f"wrote {info['groups']} queries, {info['candidates']} candidates "
          f"(preset {preset.name}, rewards 0.0 until `rrhf-ray score`) to {args.out}")
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    import ray

    from rrhf_ray.actors.scorer import RewardError, RewardPool
    from rrhf_ray.preflight import check_score
    from rrhf_ray.types import CandidateGroup, read_groups, reward_stats, write_groups

    with user_input():
        config = check_score(load_config(_config_path(args.config, args.overrides), args.overrides)).config  # rule or model
        groups = [CandidateGroup.from_group(g) for g in read_groups(args.pool, scored=False)]
    pool = RewardPool(config.reward, log_dir=connect_ray(config))
    try:
        scored = ray.get(pool.score_refs(groups))
    except RewardError as err:
        out = Path(args.out)
        partial = out.with_name(f"{out.stem}.partial{out.suffix}")
        if err.scored:
            write_groups(err.scored, partial)
        raise RewardError(f"{err}; {len(err.scored)} scored groups written to {partial}",
                          err.scored) from None
    finally:
        pool.shutdown()
    write_groups(scored, args.out)
    for tag, st in reward_stats(scored).items():
        print(f"{tag:>20}: mean {st['mean']:.4g} std {st['std']:.4g} max {st['max']:.4g} "
              f"(n={int(st['count'])})")
    print(f"wrote {len(scored)} scored queries to {args.out}")
    return 0


def _config_path(config: str | None, overrides: Sequence[str] = ()) -> str:
    """A run config's path: the file named, a packaged ``builtin:<name>`` config, or (none
    given) the embedded default."""
    from rrhf_ray import registry

    name = config or DEFAULT_CONFIG
    if registry.is_builtin(name):
        try:
            return str(registry.lookup("config", name))
        except registry.UnknownBuiltinError as err:
            raise ConfigError(str(err)) from None
    if (not Path(name).exists() and _DOTTED_KEY.fullmatch(name)
            and Path(name).suffix not in (".yaml", ".yml", ".json")):  # `validate train.epochs 2`
        value = next((o for o in overrides if "=" not in o), "VALUE")
        raise ConfigError(f"config file not found: {name}; an override is written key=value, "
                          f"e.g. {name}={value}")
    return name


def _cmd_run(args: argparse.Namespace) -> int:
    from rrhf_ray.report import format_console_table
    from rrhf_ray.workflow import run

    # Config errors stop here; `run` checks models, data and reward (rrhf_ray.preflight) before Ray starts.
    path, config = _load_run_config(args)
    logger.info("run config %s%s; outputs go to %s", path, " (the embedded default)" if not args.config else "",
                Path(config.output.dir).resolve())
    rows = run(config)
    print("\nRRHF rounds (held-out queries; [lo, hi]: 95 % interval):\n")
    print(format_console_table(rows))
    print(f"\nEvery column: {config.output.dir}/summary.md (also metrics.jsonl, report.png)")
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    """`run` as a Ray job (`rrhf_ray.submit`): the config checked here first, as `validate` does."""
    from rrhf_ray.submit import SubmitError, submit

    _, config = _load_run_config(args)
    try:
        return submit(config, args.config or DEFAULT_CONFIG, address=args.address, wait=args.wait,
                      local_checks=not args.skip_local_checks)
    except SubmitError as err:
        print(f"error: {error_line(err)}", file=sys.stderr)
        return 2


def _cmd_compare(args: argparse.Namespace) -> int:
    from rrhf_ray.compare import Plan, format_markdown, parse_seeds, parse_variant, run_compare

    path = _config_path(args.config, args.overrides)
    variants = [parse_variant(v) for v in args.variant]
    plan = Plan(path, list(args.overrides), variants, parse_seeds(args.seeds),
                Path(args.out) if args.out else Path(load_config(path, args.overrides).output.dir + "-compare"))
    logger.info("compare %d variant(s) × %d seed(s) of %s in %s", len(variants), len(plan.seeds), path, plan.out)
    rows = run_compare(plan, args.parallel)
    print(f"\nCompare ({plan.out}/compare.md, compare.jsonl, compare.png):\n")
    print(format_markdown(rows, seeds=plan.seeds, variants=plan.variants))
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    """Finished stages, the stage running (or stopped / failed), the next one, the rounds' table.
    An `s3://` / `gs://` output directory is read from the bucket (its state.json, which the
    driver syncs every few seconds: what a driver on another machine has finished)."""
    import json
    import time

    from rrhf_ray.remote import is_remote, read_object
    from rrhf_ray.report import format_status
    from rrhf_ray.state import STATE_FILE

    if is_remote(args.output_dir):
        raw = read_object(f"{args.output_dir.rstrip('/')}/{STATE_FILE}", "output_dir")
        if raw is None:
            raise ConfigError(f"{args.output_dir} holds no run ({STATE_FILE} not found)")
        print(format_status(json.loads(raw), args.output_dir.rstrip("/"), now=time.time()))
        return 0
    state_file = Path(args.output_dir) / STATE_FILE
    if not state_file.exists():
        raise ConfigError(f"{args.output_dir} holds no run ({STATE_FILE} not found)")
    print(format_status(json.loads(state_file.read_text()), args.output_dir, now=time.time()))
    return 0


def _stage_train(stage_cls: type, args: argparse.Namespace) -> object:
    """The stage's TrainConfig: its own defaults (SFT / reward model) with the `key=value` overrides."""
    items = [o.removeprefix("train.") for o in args.overrides]
    data = {"data": args.data, "train": apply_overrides({}, items)}
    with user_input():
        return build(stage_cls, data, f"(train overrides {' '.join(args.overrides)})").train


def _check_model_arg(model: str, data: str | None = None) -> None:
    """`--model` checked as `run` checks model.name_or_path, and a `--data` directory as a data
    set (`rrhf_ray.preflight`)."""
    from rrhf_ray.preflight import check_data_dir, check_model_arg

    check_model_arg("--model", model)
    if data and Path(data).is_dir():
        check_data_dir("--data", Path(data))


def _train(args: argparse.Namespace, job: Any, loop: Callable, fit: Callable) -> dict:
    """`loop` in this process (--no-ray), else `fit` under Ray Train on the joined cluster."""
    if args.no_ray:
        return loop({"job": job.model_dump(mode="json")})
    import ray

    ray.init(address=args.address, ignore_reinit_error=True, log_to_driver=True)
    return fit(job, name=Path(args.output).name)


def _print_result(what: str, output: str, metrics: dict) -> None:
    print(f"saved the {what} to {output}")
    print("final epoch: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float)))


def _cmd_sft(args: argparse.Namespace) -> int:
    from rrhf_ray.config import SFTStageConfig
    from rrhf_ray.train.sft import SFTJob, fit_sft, load_job_pairs, sft_loop_per_worker

    train_cfg = _stage_train(SFTStageConfig, args)
    _check_model_arg(args.model, args.data)
    with user_input():
        job = SFTJob(model_path=args.model, data_path=args.data, output_dir=args.output, train=train_cfg,
                     eval_path=args.eval_data, trust_remote_code=args.trust_remote_code)
        train_pairs, held = load_job_pairs(job)  # validates every row before anything starts
    logger.info("read %d SFT pairs (%d held out) from %s", len(train_pairs), len(held), args.data)
    _print_result("fine-tuned model", args.output, _train(args, job, sft_loop_per_worker, fit_sft))
    return 0


def _cmd_train_rm(args: argparse.Namespace) -> int:
    from rrhf_ray.config import RewardModelStageConfig
    from rrhf_ray.train.reward_model import (
        RewardModelJob,
        fit_reward_model,
        load_job_pairs,
        rm_loop_per_worker,
    )

    train_cfg = _stage_train(RewardModelStageConfig, args)
    _check_model_arg(args.model, args.data)
    with user_input():
        job = RewardModelJob(model_path=args.model, data_path=args.data, output_dir=args.output,
                             train=train_cfg, eval_path=args.eval_data, trust_remote_code=args.trust_remote_code)
        if args.eval_fraction is not None:
            job.eval_fraction = args.eval_fraction
        train_pairs, held = load_job_pairs(job)  # validates every row before anything starts
    logger.info("read %d preference pairs (%d held out) from %s", len(train_pairs), len(held), args.data)
    _print_result("reward model", args.output, _train(args, job, rm_loop_per_worker, fit_reward_model))
    return 0


def _add_training_parser(sub: argparse._SubParsersAction, name: str, help_: str,
                         data_help: str) -> argparse.ArgumentParser:
    """The arguments `train`, `sft` and `train-rm` share."""
    p = sub.add_parser(name, help=help_)
    p.add_argument("--data", required=True, help=data_help)
    p.add_argument("--model", required=True, help="HF model directory or hub id to start from")
    p.add_argument("--output", required=True, help="directory for the trained HF model")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or local)")
    p.add_argument("--no-ray", action="store_true", help="train in this process, without Ray")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("overrides", nargs="*", help="train keys, e.g. epochs=1 lr=1e-4 num_workers=2")
    return p


def _add_stage_parser(sub: argparse._SubParsersAction, name: str, help_: str, data_help: str) -> argparse.ArgumentParser:
    p = _add_training_parser(sub, name, help_, data_help)
    p.add_argument("--eval-data", default=None, help="held-out pairs, measured after each epoch")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rrhf-ray", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check a run config and print it resolved")
    p.add_argument("config", nargs="?", default=None, help="YAML run config (default: the embedded demo)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value")
    p.set_defaults(func=_cmd_validate)

    p = _add_training_parser(sub, "train", "RRHF-train a model on a ranked file {query, responses, scores}",
                             "reference-format JSONL or a Parquet pool")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("sample", help="draw k candidates per training query (vLLM replicas + sources)")
    p.add_argument("config", help="YAML run config (model, data, sampling, ray)")
    p.add_argument("--out", required=True, nargs="+", action=_PathThenOverrides,
                   metavar=("OUT", "OVERRIDE"), help="candidate pool, reference JSONL or .parquet")
    p.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. sampling.n=8")
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("score", help="reward every candidate of a pool file")
    p.add_argument("config", help="YAML run config (reward, ray)")
    p.add_argument("--pool", required=True, nargs="+", action=_PathThenOverrides,
                   metavar=("POOL", "OVERRIDE"), help="pool file from `sample` (or any reference JSONL)")
    p.add_argument("--out", required=True, nargs="+", action=_PathThenOverrides,
                   metavar=("OUT", "OVERRIDE"), help="scored pool, reference JSONL or .parquet")
    p.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. reward.num_workers=2")
    p.set_defaults(func=_cmd_score)
    p = sub.add_parser("run", help="run (or resume) RRHF rounds; no CONFIG = the embedded demo")
    p.add_argument("config", nargs="?", default=None, help="YAML run config (default: the embedded demo)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. rounds=2 output.dir=out/x")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("submit", help="submit `run` as a Ray job to a cluster's job server (docs/cluster.md)")
    p.add_argument("config", nargs="?", default=None, help="YAML run config (default: the embedded demo)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value; output.dir must be absolute")
    p.add_argument("--address", default=None, help="the job server, default RAY_API_SERVER_ADDRESS, "
                   "RAY_ADDRESS or http://127.0.0.1:8265")
    p.add_argument("--wait", action=argparse.BooleanOptionalAction, default=False,
                   help="follow the job's log here and exit with its status (0: SUCCEEDED)")
    p.add_argument("--skip-local-checks", action="store_true",
                   help="check only keys and types here (files that exist only on the cluster)")
    p.set_defaults(func=_cmd_submit)

    p = sub.add_parser("compare", help="run variants (losses, controls, overrides) × seeds of one config; "
                       "one table of the held-out metrics")
    p.add_argument("config", help="YAML run config, or builtin:demo (the embedded default)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value for every run, e.g. rounds=2")
    p.add_argument("--variant", action="append", required=True, metavar="NAME[:key=value,...]",
                   help="a run per seed: a built-in name (rrhf, raft, pro, simpo, slic, dpo, shuffled) "
                   "or NAME:overrides, e.g. rank0:train.loss.rank_weight=0; repeat for more")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (train, sampling, sft.train), e.g. 0,1,2")
    p.add_argument("--out", default=None, help="comparison directory (default: <output.dir>-compare)")
    p.add_argument("--parallel", type=int, default=1,
                   help="runs at once, each a driver process on this Ray cluster (default 1: one after another)")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("status", help="where a run stands: the stage running and for how long (or "
                       "stopped), finished stages, per-round metrics")
    p.add_argument("output_dir", help="the run's output.dir: a directory, or s3://… / gs://… (its bucket)")
    p.set_defaults(func=_cmd_status)

    p = _add_stage_parser(sub, "sft", "fine-tune a causal LM on (query, response) pairs, prompt masked",
                          "JSONL/Parquet {query, response}, or an HH-layout source (chosen responses)")
    p.set_defaults(func=_cmd_sft)
    p = _add_stage_parser(sub, "train-rm", "train a reward model on preference pairs (Bradley-Terry)",
                          "JSONL/Parquet {query, chosen, rejected}, or an HH-layout source")
    p.add_argument("--eval-fraction", type=float, default=None,
                   help="without --eval-data: share of the pairs held out (default 0.05)")
    p.set_defaults(func=_cmd_train_rm)
    for p in sub.choices.values():  # `-v` after the subcommand too (rrhf-ray run -v, run rounds=2 -v)
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse cannot take positionals after an option once the positional list was matched:
    # `key=value` overrides written after the options (`compare CONFIG --variant a rounds=1`) join
    # the command's overrides; anything else is the usual error.
    if extra and isinstance(getattr(args, "overrides", None), list) and all(
            "=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    # Ray Train workers do not run in this directory: hand them absolute paths.
    for name in ("model", "data", "eval_data", "pool"):
        if getattr(args, name, None):
            setattr(args, name, absolute_path(getattr(args, name)))
    for name in ("output", "out"):
        if getattr(args, name, None):
            setattr(args, name, str(Path(getattr(args, name)).resolve()))
    from rrhf_ray.logs import setup_console

    setup_console(args.verbose)  # a run's console turns quiet once its logs/ exist (rrhf_ray.logs)
    from rrhf_ray.logs import (
        current_log_dir,
        resume_worker_progress,
        stop_run_logs,
        stop_worker_progress,
    )

    resume_worker_progress()
    try:
        return args.func(args)
    except KeyboardInterrupt as err:  # SIGINT / SIGTERM (rrhf_ray.workflow.stop_signals)
        # The stage's Ray work in flight was abandoned on purpose and its actors shut down: the
        # errors its refs carry ("every worker died"), printed by Ray as they are freed, are the
        # stop itself, not news, and would bury this line. This process ends right after.
        os.environ["RAY_IGNORE_UNHANDLED_ERRORS"] = "1"
        stop_worker_progress()  # the trainer's bar, still updating as it stops, stays above this line
        sig = str(err) or "SIGINT"
        stage = getattr(err, "stage", None)
        where = f" in stage {stage}" if stage else ""
        print(f"error: stopped by {sig}{where}; the same command resumes the run there", file=sys.stderr)
        return 143 if sig == "SIGTERM" else 130
    except INPUT_ERRORS as err:  # a bad input: one line, never a traceback
        print(f"error: {error_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # a fault inside the work: its traceback where the user can find it
        stop_worker_progress()
        log_dir = current_log_dir()
        if log_dir is None:
            traceback.print_exc()
            print(f"error: {error_line(err)}", file=sys.stderr)
        else:
            logger.debug("rrhf-ray %s failed", args.command, exc_info=err)  # driver.log only
            print(f"error: {error_line(err)} (traceback in {Path(log_dir) / 'driver.log'})", file=sys.stderr)
        return 1
    finally:
        stop_run_logs()


def error_line(err: BaseException) -> str:
    """One line for a user: pydantic's errors joined, an OS error's path, a Ray task's own error
    without Ray's traceback, several lines joined with '; '."""
    # ray.exceptions.RayTaskError wraps the task's error, once per task between it and the driver
    while isinstance(cause := getattr(err, "cause", None), BaseException) and cause is not err:
        err = cause
    if isinstance(err, ValidationError):
        text = f"invalid {err.title}: " + "; ".join(
            (f"{'.'.join(map(str, e['loc']))}: " if e["loc"] else "") + e["msg"] for e in err.errors())
    elif isinstance(err, OSError) and err.filename:
        text = f"{err.strerror or type(err).__name__}: {err.filename}"
    else:
        text = str(err)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    head, rest = lines[0], "; ".join(lines[1:])
    if not rest:
        return head
    return f"{head} {rest}" if head.endswith(":") else f"{head}; {rest}"


if __name__ == "__main__":
    sys.exit(main())
