"""The package's layout holds: dependencies point down, the core never imports the demo, no
module reaches into another's private names, and there is no import cycle (function-level
imports included: a lazy import is still a dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "rrhf_ray"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module imported, names imported from it) for every import statement in the file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.extend((alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, [a.name for a in node.names]))
    return out


def _project_deps(module: str) -> set[str]:
    """The project modules `module` imports (a `from pkg import mod` counts as importing mod)."""
    deps = set()
    for target, names in _imports(MODULES[module]):
        if not target.startswith("rrhf_ray"):
            continue
        subs = {f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES}
        deps |= subs or ({target} if target in MODULES else set())
    deps.discard(module)
    return deps


GRAPH = {m: _project_deps(m) for m in MODULES}


def test_the_package_has_the_documented_layers():
    for name in ("types", "config", "config.base", "config.training", "config.run", "config.loading",
                 "loss", "registry", "workflow", "cli", "state", "preflight",
                 "data.queries", "data.pairs", "data.candidates", "actors.engine",
                 "actors.dispatch", "actors.sampler", "actors.scorer", "train.jobs", "train.worker",
                 "train.loop", "train.checkpoints", "train.launch", "train.encoding", "train.ranking",
                 "train.tokens", "train.rrhf", "train.sft", "train.reward_model", "demo.task"):
        assert f"rrhf_ray.{name}" in MODULES, name


CONFIG_MODULES = {m for m in MODULES if m == "rrhf_ray.config" or m.startswith("rrhf_ray.config.")}


@pytest.mark.parametrize("module", ["rrhf_ray.loss", "rrhf_ray.types", *sorted(CONFIG_MODULES),
                                    "rrhf_ray.registry", "rrhf_ray.state"])
def test_the_bottom_of_the_graph_imports_no_ray_and_no_engine(module):
    imported = {t.split(".")[0] for t, _ in _imports(MODULES[module])}
    assert not imported & {"ray", "vllm", "transformers"}, imported


def test_the_loss_and_the_config_import_nothing_of_the_project():
    assert GRAPH["rrhf_ray.loss"] == set()
    assert GRAPH["rrhf_ray.types"] == set()
    # The config is a package of modules that import only each other.
    assert len(CONFIG_MODULES) > 1
    assert {m: GRAPH[m] - CONFIG_MODULES for m in CONFIG_MODULES} == {m: set() for m in CONFIG_MODULES}
    assert GRAPH["rrhf_ray.config.base"] == set()


def test_the_core_never_imports_the_demo():
    offenders = {m: sorted(d for d in deps if d.startswith("rrhf_ray.demo"))
                 for m, deps in GRAPH.items() if not m.startswith("rrhf_ray.demo")}
    assert {m: d for m, d in offenders.items() if d} == {}


def test_no_module_imports_another_modules_private_names():
    bad = []
    for module, path in MODULES.items():
        for target, names in _imports(path):
            if target.startswith("rrhf_ray") and target != module:
                bad += [f"{module}: from {target} import {n}" for n in names if n.startswith("_")]
    assert bad == []


def test_there_is_no_import_cycle():
    seen: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(m: str, path: list[str]) -> None:
        seen[m] = 1
        for d in sorted(GRAPH[m]):
            if seen.get(d) == 1:
                pytest.fail("import cycle: " + " → ".join(path[path.index(d):] + [m, d]))
            if d not in seen:
                visit(d, path + [m])
        seen[m] = 2

    for m in sorted(GRAPH):
        if m not in seen:
            visit(m, [])
