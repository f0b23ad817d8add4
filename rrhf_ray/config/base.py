"""What every section of the run config shares: the pydantic base that forbids unknown keys, and
the error a config that cannot be used raises."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Strict,
    StringConstraints,
)


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and the offending key."""


class Section(BaseModel):
    """A config section: an unknown key is an error (a typo never becomes a silently ignored
    setting), and an assignment is validated like a loaded value."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _on_off_word(value: Any) -> Any:
    """YAML 1.1 reads a bare `on` / `off` as a boolean: take it back as the word."""
    return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


# A setting that is automatic, forced on or off (`prefix_sharing`, `packing`, `chat_template`);
# `on` / `off` written bare in YAML arrive as booleans and are read as the words.
Switch = Annotated[Literal["auto", "on", "off"], BeforeValidator(_on_off_word)]


# Ray's own resources have their own keys in each section (cpus_*, gpus_* / use_gpu, tensor_parallel_size).
RAY_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


def _check_resources(value: dict[str, float]) -> dict[str, float]:
    for name, amount in value.items():
        if name in RAY_BUILTIN_RESOURCES or name.startswith("node:"):
            raise ValueError(f"{name!r} is one of Ray's own resources, set by the section's cpus / gpus "
                             "keys; resources are custom ones that the cluster YAML's node types declare")
        if not math.isfinite(amount) or amount <= 0:
            raise ValueError(f"resource {name!r}: amount {amount} must be a positive number")
    return value


# The Ray custom resources a role's actors or workers ask for, each ({name: amount}), beside their
# CPUs and GPUs: only a node that declares them (its node type's `resources` in the cluster YAML)
# runs them, and the autoscaler starts such a node when none has room (docs/cluster.md, "Placement").
Resources = Annotated[dict[Annotated[str, StringConstraints(min_length=1)], Annotated[float, Strict()]],
                      AfterValidator(_check_resources)]
