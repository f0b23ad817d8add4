"""A run config from a YAML file plus `dotted.key=value` overrides, its errors turned into one
`ConfigError` that names the key and the file, and the resolved config as YAML."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from rrhf_ray.config.base import ConfigError
from rrhf_ray.config.keys import locate, suggest, tagged_at
from rrhf_ray.config.run import RunConfig

_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` → (["a", "b", "c"], value), the value parsed as YAML (so 3, 1e-4, true, [a, b])."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
    value = yaml.safe_load(raw) if raw.strip() else ""
    # YAML 1.1 reads '1e-4' (no dot) as a string; users mean a number.
    if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        value = float(value)
    return key.strip().split("."), value


def parent_section(data: dict[str, Any], path: list[str], what: str) -> dict[str, Any]:
    """The nested dict that holds `path[-1]` (sections made on the way); `what` names the
    override in the error when a part of the path is a value, not a section."""
    node = data
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {what}: {part!r} is a value, not a section")
        node = child
    return node


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each `dotted.key=value` into a nested dict (in place) and return it."""
    for item in overrides:
        path, value = parse_override(item)
        parent_section(data, path, repr(item))[path[-1]] = value
    return data


def _format_errors(err: ValidationError, origin: str, model: type[BaseModel]) -> str:
    lines = []
    for e in err.errors():
        where = locate(model, e["loc"])
        loc = ".".join(where.path) or "(top level)"
        if not e["loc"] and e["type"] == "value_error":  # a cross-section rule: its message names the keys
            lines.append(f"  {e['msg'].removeprefix('Value error, ')}")
        elif e["type"] == "extra_forbidden":
            lines.append(f"  {loc}: unknown key{suggest(model, where)}")
        elif e["type"] == "missing":
            lines.append(f"  {loc}: required, not set")
        elif e["type"] == "union_tag_invalid":  # `train.loss.name=foo`: plain words, the valid names
            tags = ", ".join(tagged_at(model, loc) or {}) or e["ctx"]["expected_tags"]
            disc = e["ctx"]["discriminator"].strip("'")
            lines.append(f"  {loc}.{disc}: {e['ctx']['tag']!r} is not one of {tags}")
        else:
            lines.append(f"  {loc}: {e['msg']} (got {e.get('input')!r})")
    return f"invalid config {origin}:\n" + "\n".join(lines)


def build(model: type[BaseModel], data: dict[str, Any], origin: str) -> Any:
    """Validate `data` as `model`, turning pydantic's errors into one readable ConfigError."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, origin, model)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config (or defaults when `path` is None) and apply `key=value` overrides."""
    data = read_yaml(path) if path is not None else {}
    apply_overrides(data, list(overrides or []))
    origin = f"in {path}" if path is not None else "(defaults)"
    if overrides:
        origin += f" with overrides {' '.join(overrides)}"
    return build(RunConfig, data, origin)


def dump_config(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
