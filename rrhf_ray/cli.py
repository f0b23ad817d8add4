"""`rrhf-ray` / `python -m rrhf_ray`: the command line.

Each subcommand is one `_cmd_*` function plus its parser in `build_parser`. Config and data
errors print one clear message and exit with status 2 before any expensive work starts.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from rrhf_ray.config import ConfigError, TrainConfig, apply_overrides, build, dump_config, load_config
from rrhf_ray.pool import DataError

logger = logging.getLogger("rrhf_ray")


def _cmd_validate(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    print(dump_config(config), end="")
    return 0


def _train_overrides(overrides: list[str]) -> TrainConfig:
    """`train` takes TrainConfig keys, with or without the `train.` prefix."""
    items = [o.removeprefix("train.") for o in overrides]
    return build(TrainConfig, apply_overrides({}, items), f"(train overrides {' '.join(overrides)})")


def _cmd_train(args: argparse.Namespace) -> int:
    from rrhf_ray.pool import read_groups
    from rrhf_ray.training import TrainJob, fit, train_loop_per_worker

    train_cfg = _train_overrides(args.overrides)
    if not Path(args.model).exists() and args.model.startswith((".", "/")):
        raise ConfigError(f"--model: directory not found: {args.model}")
    groups = read_groups(args.data)  # validates every line before anything starts
    logger.info("read %d query groups (%d candidates) from %s",
                len(groups), sum(g.k for g in groups), args.data)
    job = TrainJob(model_path=args.model, data_paths=[args.data], output_dir=args.output, train=train_cfg,
                   trust_remote_code=args.trust_remote_code)
    if args.no_ray:
        metrics = train_loop_per_worker({"job": job.model_dump(mode="json")})
    else:
        import ray

        ray.init(address=args.address, ignore_reinit_error=True, log_to_driver=True)
        metrics = fit(job, name=Path(args.output).name)
    print(f"saved the trained model to {args.output}")
    print("final epoch: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rrhf-ray", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check a run config and print it resolved")
    p.add_argument("config", help="YAML run config")
    p.add_argument("overrides", nargs="*", help="dotted.key=value")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("train", help="RRHF-train a model on a ranked file {query, responses, scores}")
    p.add_argument("--data", required=True, help="reference-format JSONL or a Parquet pool")
    p.add_argument("--model", required=True, help="HF model directory or hub id to start from")
    p.add_argument("--output", required=True, help="directory for the trained HF model")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or local)")
    p.add_argument("--no-ray", action="store_true", help="train in this process, without Ray")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("overrides", nargs="*", help="train keys, e.g. epochs=1 lr=1e-4 num_workers=2")
    p.set_defaults(func=_cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
