"""The run state of one output directory: which stages finished, with which config.

`state.json` records each finished stage (its seconds and what it produced); the driver skips a
finished stage whose outputs exist, so a killed run resumes where it stopped. The config's
fingerprint (everything but the round count and the Ray connection) must not change within one
output directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rrhf_ray.config import ConfigError, RunConfig
from rrhf_ray.types import atomic_write

logger = logging.getLogger(__name__)

STATE_FILE = "state.json"


def config_fingerprint(config: RunConfig) -> str:
    """What must not change within one output directory: everything but the round count,
    the Ray connection and progress display."""
    data = config.model_dump(mode="json", exclude={"rounds": True, "ray": True})
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def write_json_atomic(path: Path, data: Any) -> None:
    atomic_write(path, json.dumps(data, indent=2, default=str))


class RunState:
    """The finished stages of one output directory, and the config they were made with."""

    def __init__(self, out: Path, config: RunConfig) -> None:
        self.path = out / STATE_FILE
        fingerprint = config_fingerprint(config)
        if self.path.exists():
            self.data = json.loads(self.path.read_text())
            if self.data["fingerprint"] != fingerprint:
                raise ConfigError(
                    f"output directory {out} holds a run with a different config "
                    f"(see {self.path}); use another output.dir, or the same config "
                    f"(only `rounds` may grow)"
                )
        else:
            self.data = {"fingerprint": fingerprint, "config": config.model_dump(mode="json"), "stages": {}}
        self.data["rounds"] = config.rounds
        write_json_atomic(self.path, self.data)

    def done(self, stage: str, *outputs: Path) -> bool:
        return stage in self.data["stages"] and all(p.exists() for p in outputs)

    def finish(self, stage: str, seconds: float, **info: Any) -> None:
        self.data["stages"][stage] = {"seconds": round(seconds, 2), "finished": time.time(), **info}
        write_json_atomic(self.path, self.data)

    def seconds(self, stage: str) -> float:
        return self.data["stages"].get(stage, {}).get("seconds", 0.0)


def timed_stage(state: RunState, stage: str, outputs: list[Path], work: Callable[[], dict | None]) -> bool:
    """Run `work` unless the stage is finished with all its outputs; returns True if it ran."""
    if state.done(stage, *outputs):
        logger.info("%s: done already, skipped", stage)
        return False
    logger.info("%s: starting", stage)
    start = time.perf_counter()
    info = work() or {}
    state.finish(stage, time.perf_counter() - start, **info)
    logger.info("%s: finished in %.1f s", stage, state.seconds(stage))
    return True
