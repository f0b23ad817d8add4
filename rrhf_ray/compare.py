"""`rrhf-ray compare`: variants × seeds of one run config, each a run of its own, and one table.

    rrhf-ray compare CONFIG [key=value ...] --variant NAME[:key=value,...] ... --seeds 0,1,2 \\
        [--out DIR] [--parallel N]

A *variant* is a name and overrides applied on top of the base config (and its `key=value`
overrides): `rank0:train.loss.rank_weight=0`, `pro:train.loss.name=pro`. Built-in names need no
overrides: each loss of `rrhf_ray.loss.LOSSES` (`rrhf`, `raft`, `pro`, `simpo`, `slic`, `dpo`:
`train.loss` replaced by that loss with its defaults) and the control `shuffled`
(`train.shuffle_rewards=true`: the trainer sees each group's rewards shuffled, so the held-out
reward must not rise). A built-in name with overrides applies its own first, then those.

A *seed* s goes into `train.seed`, `sampling.seed` and, when the config has an SFT stage,
`sft.train.seed`; `data.seed` is not changed, so every run has the same queries and the same
held-out split.

Layout of the comparison directory (default `<output.dir>-compare`):

    shared/seed<s>/        the stages every variant of seed s would repeat identically: the built
                           base model (`base/`), the SFT model (`sft/`), the reward model
                           (`reward_model/`); run once, with a state.json of their own
    <variant>/seed<s>/     one whole run: `rrhf-ray run`'s output directory (state.json,
                           metrics.jsonl, summary.md, rounds/...)
    compare.jsonl  compare.md  compare.png

Sharing, exactly: a variant whose resolved `model`, `sft` and `reward_model` sections equal those
of the base config (with the seed) starts from the shared stages: before its run, its state.json
records them as finished stages whose outputs are the shared directories (`"shared_from"`, 0
seconds), so the driver's own resume logic (`workflow.path_stage`) skips them and the run starts
from the shared SFT model; its config and fingerprint are exactly those of `rrhf-ray run` with
the same overrides, so `rrhf-ray status` and `rrhf-ray run` work on its directory. A variant that
changes one of those sections runs its own stages in its own directory.

Runs: one after another in this process (`--parallel 1`, the default), or N at a time
(`--parallel N`), each a `python -m rrhf_ray run` driver process (its log in
`<variant>/seed<s>/driver.log`) that joins this command's Ray cluster, whose resources the runs
then share. A finished run (every round evaluated) is skipped; an unfinished one resumes as
`rrhf-ray run` does; a run directory holding another config is refused before anything runs.
A failed run does not stop the others; the command reports it at the end.

The aggregation (`rrhf_ray.compare_table`: `collect_run`, `aggregate`, `format_markdown`,
`plot`) is pure: it reads the runs' `metrics.jsonl` and `state.json` and nothing else.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rrhf_ray.compare_table import Variant, aggregate, collect_run, format_markdown, plot
from rrhf_ray.config import LOSS_CONFIGS, ConfigError, RunConfig, load_config, parse_override
from rrhf_ray.state import STATE_FILE, RunState, config_fingerprint
from rrhf_ray.types import atomic_write, write_jsonl

logger = logging.getLogger(__name__)

SHARED_STAGES = ("base", "sft", "reward_model")
POLL_SECONDS = 1.0  # how often --parallel N looks at its driver processes
CONTROLS: dict[str, tuple[str, ...]] = {"shuffled": ("train.shuffle_rewards=true",)}


def builtin_variants() -> dict[str, tuple[str, ...]]:
    """Variant names that need no overrides: every loss with its defaults, and the controls."""
    out = {name: (f"train.loss={{name: {name}}}",) for name in LOSS_CONFIGS}
    out.update(CONTROLS)
    return out


# --------------------------------------------------------------------------- the command line


def split_overrides(text: str) -> list[str]:
    """`a=1,b=[x, y],c={k: v}` → ["a=1", "b=[x, y]", "c={k: v}"]: commas inside brackets or quotes
    do not split."""
    parts, depth, quote, current = [], 0, "", []
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(ch)
    parts.append("".join(current).strip())
    return [p for p in parts if p]


def parse_variant(spec: str) -> Variant:
    """`NAME` (a built-in) or `NAME:key=value,...`; the name becomes a directory."""
    name, _, rest = spec.partition(":")
    name = name.strip()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) or name == "shared":
        raise ConfigError(f"--variant {spec!r}: the name must be letters, digits, '_', '.', '-' (and not "
                          "'shared'): it names the variant's directory")
    overrides = split_overrides(rest)
    for item in overrides:
        parse_override(item)  # the syntax, with the variant named on error
    builtin = builtin_variants()
    if name not in builtin and not overrides:
        raise ConfigError(f"--variant {spec!r}: {name!r} is not a built-in variant "
                          f"({', '.join(builtin)}); give its overrides: {name}:key=value,...")
    return Variant(name, (*builtin.get(name, ()), *overrides))


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: expected integers separated by commas, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r}: expected distinct integers, e.g. 0,1,2")
    return seeds


# --------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    """Every run of a comparison: its config and its directory."""

    config_path: str
    overrides: list[str]
    variants: list[Variant]
    seeds: list[int]
    out: Path
    base: RunConfig = field(init=False)

    def __post_init__(self) -> None:
        names = [v.name for v in self.variants]
        if not names:
            raise ConfigError("compare: give at least one --variant")
        if len(set(names)) != len(names):
            raise ConfigError(f"compare: variant names must differ, got {', '.join(names)}")
        self.out = Path(self.out).resolve()
        self.base = load_config(self.config_path, self.overrides)

    def seed_overrides(self, seed: int) -> list[str]:
        items = [f"train.seed={seed}", f"sampling.seed={seed}"]
        if self.base.sft is not None:
            items.append(f"sft.train.seed={seed}")
        return items

    def _storage(self, *parts: str) -> list[str]:
        # A configured Ray Train storage is shared by every run: give each run its own corner.
        storage = self.base.output.storage_path
        return [f"output.storage_path={storage.rstrip('/')}/{self.out.name}/{'/'.join(parts)}"] if storage else []

    def shared_dir(self, seed: int) -> Path:
        return self.out / "shared" / f"seed{seed}"

    def shared_overrides(self, seed: int) -> list[str]:
        return [*self.overrides, *self.seed_overrides(seed), f"output.dir={self.shared_dir(seed)}",
                *self._storage("shared", f"seed{seed}")]

    def run_dir(self, variant: Variant, seed: int) -> Path:
        return self.out / variant.name / f"seed{seed}"

    def run_overrides(self, variant: Variant, seed: int) -> list[str]:
        return [*self.overrides, *self.seed_overrides(seed), *variant.overrides,
                f"output.dir={self.run_dir(variant, seed)}", *self._storage(variant.name, f"seed{seed}")]

    def shared_config(self, seed: int) -> RunConfig:
        return load_config(self.config_path, self.shared_overrides(seed))

    def run_config(self, variant: Variant, seed: int) -> RunConfig:
        try:
            return load_config(self.config_path, self.run_overrides(variant, seed))
        except ConfigError as err:
            raise ConfigError(f"variant {variant.name}: {err}") from None

    def has_shared_stages(self) -> bool:
        from rrhf_ray import registry

        b = self.base
        return registry.is_builtin(b.model.name_or_path) or b.sft is not None or b.reward_model is not None


def shares_stages(run: RunConfig, shared: RunConfig) -> bool:
    """Whether `run` would build the same base, SFT and reward model as `shared`."""
    return all(getattr(run, s) == getattr(shared, s) for s in ("model", "sft", "reward_model"))


def run_state(config: RunConfig) -> dict | None:
    """The state.json of `config`'s output directory, or None; a different config there is refused."""
    path = Path(config.output.dir) / STATE_FILE
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    if data.get("fingerprint") != config_fingerprint(config):
        raise ConfigError(f"{path.parent} holds a run with a different config (see {path}); use "
                          "another --out, or the same config, variants and seeds")
    return data


def is_finished(config: RunConfig) -> bool:
    state = run_state(config)
    stages = state["stages"] if state else {}
    return (all(f"round{r}/eval" in stages for r in range(config.rounds + 1))
            and (Path(config.output.dir) / "metrics.jsonl").exists())


# --------------------------------------------------------------------------- running


def run_shared_stages(config: RunConfig) -> dict[str, dict]:
    """Run (or find finished) the base, SFT and reward-model stages of `config` in its output
    directory; returns their state entries."""
    from rrhf_ray.connection import connect_ray
    from rrhf_ray.preflight import check_run
    from rrhf_ray.workflow import base_model, reward_config, sft_model

    checked = check_run(config)
    state = RunState(Path(config.output.dir), config)
    cfg = checked.config
    log_dir = connect_ray(cfg)
    out = Path(cfg.output.dir)
    sft_model(cfg, out, state, base_model(cfg, out, state), None, log_dir)
    reward_config(cfg, out, state, None, log_dir)
    return {k: v for k, v in state.data["stages"].items() if k in SHARED_STAGES}


def adopt_shared(config: RunConfig, shared: dict[str, dict], shared_dir: Path) -> list[str]:
    """Record the shared stages as finished in the run directory of `config` (unless it finished
    its own): the driver then skips them and starts from their outputs. Returns those adopted."""
    state = RunState(Path(config.output.dir), config)
    adopted = []
    for name, info in shared.items():
        if name in state.data["stages"] and Path(state.data["stages"][name].get("path", "")).exists():
            continue
        state.finish(name, 0.0, path=info["path"], shared_from=str(shared_dir),
                     shared_seconds=info.get("seconds", 0.0))
        adopted.append(name)
    return adopted


@dataclass
class PlannedRun:
    """One variant × seed of a comparison: its run config and the overrides that make it."""

    variant: Variant
    seed: int
    config: RunConfig
    overrides: list[str]


def _start_driver(job: PlannedRun, config_path: str, env: dict[str, str]) -> subprocess.Popen:
    out = Path(job.config.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    log = (out / "driver.log").open("ab")
    try:
        return subprocess.Popen([sys.executable, "-m", "rrhf_ray", "run", config_path, *job.overrides],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
    finally:
        log.close()


def run_compare(plan: Plan, parallel: int = 1) -> list[dict[str, Any]]:
    """Run every unfinished variant × seed of `plan`, then write compare.jsonl, compare.md and
    compare.png; returns the compare.jsonl rows."""
    if parallel < 1:
        raise ConfigError(f"--parallel {parallel}: must be at least 1")
    jobs = [PlannedRun(v, s, plan.run_config(v, s), plan.run_overrides(v, s)) for s in plan.seeds for v in plan.variants]
    todo = []
    for j in jobs:
        if is_finished(j.config):  # also refuses a directory that holds another config
            logger.info("compare: %s seed %d finished already, skipped", j.variant.name, j.seed)
        else:
            todo.append(j)
    failed: list[str] = []
    if todo:
        from rrhf_ray.connection import connect_ray

        # The comparison's own driver log goes to <out>/logs, never to the base config's output.dir.
        own_logs = plan.base.output.model_copy(update={"dir": str(plan.out)})
        connect_ray(plan.base.model_copy(update={"output": own_logs}))
        if plan.has_shared_stages():
            for seed in sorted({j.seed for j in todo}):
                shared_cfg = plan.shared_config(seed)
                mine = [j for j in todo if j.seed == seed and shares_stages(j.config, shared_cfg)]
                if not mine:
                    continue
                logger.info("compare: the shared stages of seed %d in %s", seed, plan.shared_dir(seed))
                shared = run_shared_stages(shared_cfg)
                for j in mine:
                    adopt_shared(j.config, shared, plan.shared_dir(seed))
        env = None
        if parallel > 1:  # the driver processes join this cluster
            import ray

            env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
        failed = _run_jobs(plan, todo, parallel, env)
    rows = aggregate([collect_run(j.variant.name, j.seed, Path(j.config.output.dir)) for j in jobs
                      if is_finished(j.config)], [v.name for v in plan.variants])
    write_outputs(plan, rows)
    if failed:
        raise RuntimeError(f"compare: {len(failed)} run(s) failed: {'; '.join(failed)} (run the same "
                           f"command again to resume them; {plan.out}/compare.md holds the others)")
    return rows


def _run_jobs(plan: Plan, todo: list[PlannedRun], parallel: int, env: dict[str, str] | None = None) -> list[str]:
    """Run `todo` one after another in this process (`parallel` 1), or `parallel` driver processes
    at a time with `env`; returns a line per failed run."""
    failed = []
    if parallel == 1:
        from rrhf_ray.actors.pools import EngineCache
        from rrhf_ray.workflow import run

        with EngineCache() as engines:  # consecutive runs with the same model and engine settings share them
            for j in todo:
                logger.info("compare: ── %s seed %d → %s", j.variant.name, j.seed, j.config.output.dir)
                try:
                    run(j.config, engines)
                except Exception as err:
                    logger.exception("compare: %s seed %d failed", j.variant.name, j.seed)
                    failed.append(f"{j.variant.name} seed {j.seed}: {type(err).__name__}: {err}")
        return failed

    queue, running = list(todo), []
    while queue or running:
        while queue and len(running) < parallel:
            j = queue.pop(0)
            logger.info("compare: ── %s seed %d → %s (driver.log there)", j.variant.name, j.seed,
                        j.config.output.dir)
            running.append((j, _start_driver(j, plan.config_path, env or dict(os.environ))))
        time.sleep(POLL_SECONDS)
        for j, proc in list(running):
            if proc.poll() is not None:
                running.remove((j, proc))
                if proc.returncode != 0:
                    failed.append(f"{j.variant.name} seed {j.seed}: exit {proc.returncode}, see "
                                  f"{j.config.output.dir}/driver.log")
    return failed


def write_outputs(plan: Plan, rows: list[dict[str, Any]]) -> None:
    plan.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(rows, plan.out / "compare.jsonl")
    atomic_write(plan.out / "compare.md", format_markdown(rows, seeds=plan.seeds, variants=plan.variants))
    atomic_write(plan.out / "compare.png", plot(rows))
