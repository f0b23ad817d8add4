"""The keys a config class takes, and the closest ones to a key it does not: what an unknown-key
error suggests ("did you mean sampling.temperature?", `epochs` → `train.epochs`), and a
pydantic location as the user writes it (a tagged union's tag left out: `train.loss.beta`, not
`train.loss.rrhf.beta`)."""

from __future__ import annotations

import difflib
import types
import typing
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel


def _sections(annotation: Any) -> list[type[BaseModel]]:
    """The config classes an annotation names (`X`, `X | None`, `A | B | …`, `Annotated[...]`)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, typing.Annotated):
        return [c for arg in typing.get_args(annotation) for c in _sections(arg)]
    return []


def tagged(model: type[BaseModel], field: str) -> tuple[str, dict[str, type[BaseModel]]] | None:
    """(discriminator, {tag: class}) when `field` of `model` is a tagged union (`train.loss`)."""
    info = model.model_fields.get(field)
    if info is None or not isinstance(info.discriminator, str):
        return None
    key = info.discriminator
    return key, {c.model_fields[key].default: c for c in _sections(info.annotation)}


@dataclass
class Located:
    """A pydantic error location as the user writes it: `path` (tags left out), the config class
    that holds its last key (None past a list or a plain value), and, inside a tagged union, the
    union's path, its discriminator and the tag chosen."""

    path: list[str]
    holder: type[BaseModel] | None
    union: tuple[str, str, str] | None = None  # (path of the union field, discriminator, tag)


def locate(model: type[BaseModel], loc: tuple[Any, ...]) -> Located:
    path: list[str] = []
    holder: type[BaseModel] | None = model
    union = None
    parts = list(loc)
    i = 0
    while i < len(parts):
        part = str(parts[i])
        path.append(part)
        if i == len(parts) - 1:
            break
        cls, holder, i = holder, None, i + 1
        if cls is None or part not in cls.model_fields:
            continue
        tags = tagged(cls, part)
        if tags is not None and parts[i] in tags[1]:
            holder, union = tags[1][parts[i]], (".".join(path), tags[0], parts[i])
            i += 1
            continue
        found = _sections(cls.model_fields[part].annotation)
        holder = found[0] if len(found) == 1 else None
    return Located(path, holder, union)


def all_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key of `model` (a tagged union's variants' keys under the union's path)."""
    out = []
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        out.append(key)
        for sub in dict.fromkeys(_sections(info.annotation)):
            out.extend(k for k in all_keys(sub, f"{key}.") if k not in out)
    return out


def suggest(model: type[BaseModel], where: Located) -> str:
    """What an unknown key's error adds: the closest valid keys in its own section, the same key
    in other sections, and for a union variant its valid keys and the variants that take it."""
    key, parent = where.path[-1], ".".join(where.path[:-1])
    if where.union is not None and where.holder is not None:
        upath, disc, tag = where.union
        owners = [t for t, cls in (tagged_at(model, upath) or {}).items() if key in cls.model_fields]
        valid = ", ".join(where.holder.model_fields)
        hint = f"{upath}.{disc} {tag} takes {valid}"
        close = difflib.get_close_matches(key, list(where.holder.model_fields), n=1, cutoff=0.7)
        if close and not owners:
            hint = f"did you mean {parent}.{close[0]}? {hint}"
        if owners:
            hint += f"; {key} is a key of {upath}.{disc} {', '.join(owners)}"
        return f" ({hint})"
    own = list(where.holder.model_fields) if where.holder is not None else []
    close = [f"{parent}.{k}" if parent else k for k in difflib.get_close_matches(key, own, n=3, cutoff=0.7)]
    everywhere = all_keys(model)
    full = ".".join(where.path)
    same = [k for k in everywhere if k.rsplit(".", 1)[-1] == key and k != full]
    hints = close + [k for k in same if k not in close]
    if not hints:
        leaves = {k.rsplit(".", 1)[-1] for k in everywhere}
        near = difflib.get_close_matches(key, sorted(leaves), n=2, cutoff=0.8)
        hints = [k for k in everywhere if k.rsplit(".", 1)[-1] in near]
    return f" (did you mean {' or '.join(hints[:3])}?)" if hints else ""


def tagged_at(model: type[BaseModel], dotted: str) -> dict[str, type[BaseModel]] | None:
    """The {tag: class} of the tagged union at `dotted` (e.g. `train.loss` of RunConfig)."""
    parts = dotted.split(".")
    holder = locate(model, tuple(parts)).holder
    if holder is None:
        return None
    tags = tagged(holder, parts[-1])
    return tags[1] if tags else None
