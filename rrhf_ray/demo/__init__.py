"""The embedded default: a synthetic help desk (`task`), the tiny-model kit (`tiny`) and the run
config `demo.yaml` that `rrhf-ray run` uses when no config is given.

Importing this package registers the demo's built-ins (`rrhf_ray.registry`); the core never
imports it: pyproject.toml announces it as an entry point of ``rrhf_ray.builtins``.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from rrhf_ray import registry
from rrhf_ray.demo import task

DEMO_CONFIG = Path(str(files("rrhf_ray.demo") / "demo.yaml"))  # the embedded default run config

registry.register("config", "demo", DEMO_CONFIG)
registry.register("data", "demo", task.prompts)
registry.register("data", "demo-sft", task.sft_rows)
registry.register("model", "demo-tiny-llama", task.build_demo_model)
registry.register("reward", "demo", task.reward)
