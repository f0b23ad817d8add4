"""Built-ins: data sets, models and rewards a config names as ``builtin:<name>``.

One registry for the three kinds. A package registers its built-ins at import time with
`register(kind, name, obj)`, and announces the module that does so as an entry point in the
group ``rrhf_ray.builtins`` (see pyproject.toml: the embedded demo is one such package). A lookup
of an unknown name loads the announced modules once, so the core never imports a task by name,
and a Ray worker that never imported the demo still finds its data set.

- ``data``: a callable returning rows (QueryRecords or dicts in a layout `rrhf_ray.data.queries`
  reads), or a mapping from split name to such rows;
- ``model``: a callable `build(out_dir) -> Path` that writes an HF model directory;
- ``reward``: a rule `fn(queries, responses) -> list[float]`;
- ``config``: the path of a packaged run config (`rrhf-ray run` with no config runs
  ``builtin:demo``).
"""

from __future__ import annotations

import functools
from importlib.metadata import entry_points
from typing import Any, Literal

from rrhf_ray.config import BUILTIN_PREFIX

Kind = Literal["config", "data", "model", "reward"]
PREFIX = BUILTIN_PREFIX
ENTRY_POINT_GROUP = "rrhf_ray.builtins"

_REGISTRY: dict[str, dict[str, Any]] = {"config": {}, "data": {}, "model": {}, "reward": {}}


class UnknownBuiltinError(KeyError):
    """No built-in of this kind has this name; the message lists the registered ones."""

    def __str__(self) -> str:  # KeyError quotes its message; this one is a sentence
        return str(self.args[0])


def register(kind: Kind, name: str, obj: Any) -> Any:
    """Make ``builtin:<name>`` resolve to `obj` for `kind`; returns `obj`."""
    if kind not in _REGISTRY:
        raise ValueError(f"unknown built-in kind {kind!r}; known: {sorted(_REGISTRY)}")
    _REGISTRY[kind][name] = obj
    return obj


def unregister(kind: Kind, name: str) -> None:
    """Forget ``builtin:<name>`` of `kind` (no error if it was not registered)."""
    _REGISTRY[kind].pop(name.removeprefix(PREFIX), None)


def is_builtin(value: str | None) -> bool:
    return bool(value) and value.startswith(PREFIX)


@functools.cache
def _load_entry_points() -> None:
    """Import every module announced in the entry-point group, once per process."""
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        ep.load()  # the module registers its built-ins on import


def names(kind: Kind) -> list[str]:
    _load_entry_points()
    return sorted(_REGISTRY[kind])


def lookup(kind: Kind, name: str) -> Any:
    """The built-in `name` (with or without the ``builtin:`` prefix) of `kind`."""
    name = name.removeprefix(PREFIX)
    if name not in _REGISTRY[kind]:
        _load_entry_points()
    if name not in _REGISTRY[kind]:
        raise UnknownBuiltinError(
            f"unknown built-in {kind} {PREFIX}{name}; registered: "
            f"{', '.join(PREFIX + n for n in sorted(_REGISTRY[kind])) or 'none'}"
        )
    return _REGISTRY[kind][name]
