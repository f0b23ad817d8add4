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


MUTATORS = {"append", "extend", "insert", "update", "pop", "popitem", "clear", "setdefault", "add",
            "discard", "remove"}
# Two tables that belong to the process, not to a run: the built-ins registry, filled when a
# package that registers built-ins is imported (the entry-point mechanism of rrhf_ray/registry.py),
# and the process's logging set-up (the console handler and its verbosity, the attached
# driver.log, Ray's print hook: rrhf_ray/logs.py), which like the logging module's own state
# exists once per process. What a run's actors need of it (its log directory) is passed to them.
ALLOWED_STATE = {"rrhf_ray.registry": {"_REGISTRY"}, "rrhf_ray.logs": {"_state"}}


def _root_name(node: ast.AST) -> str | None:
    """`a` of `a`, `a[k]`, `a[k][j]`, `a.b[k]`."""
    while isinstance(node, (ast.Subscript, ast.Attribute)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def _module_state(path: Path) -> list[str]:
    """Module-level runtime state in one file: a `global` statement (a function rebinding a
    module name), and a module-level container (dict / list / set, a display, a comprehension or
    a call of the type) that code in the module changes in place."""
    tree = ast.parse(path.read_text())
    found = [f"global {', '.join(n.names)} (line {n.lineno})" for n in ast.walk(tree) if isinstance(n, ast.Global)]
    containers = {}
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        value = getattr(node, "value", None)
        mutable = isinstance(value, (ast.Dict, ast.List, ast.Set, ast.DictComp, ast.ListComp, ast.SetComp)) or (
            isinstance(value, ast.Call) and isinstance(value.func, ast.Name)
            and value.func.id in {"dict", "list", "set", "defaultdict", "OrderedDict", "Counter", "deque"})
        for t in targets:
            if mutable and isinstance(t, ast.Name):
                containers[t.id] = node.lineno
    for node in ast.walk(tree):
        name = None
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.Delete)):
            for t in getattr(node, "targets", None) or [node.target]:
                if isinstance(t, ast.Subscript):
                    name = _root_name(t)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in MUTATORS:
            name = _root_name(node.func.value)
        if name in containers:
            found.append(f"{name} (line {containers[name]}) changed at line {node.lineno}")
    return found


def test_no_module_holds_mutable_runtime_state():
    """What a run holds (kept engines, the bucket store, handles) is passed as an argument or
    kept in an object, never in module state a function reads implicitly; module-level names are
    constants (never changed after import)."""
    offenders = {m: [f for f in _module_state(p) if f.split()[0] not in ALLOWED_STATE.get(m, ())]
                 for m, p in MODULES.items()}
    offenders = {m: found for m, found in offenders.items() if found}
    assert offenders == {}


def test_the_module_state_check_finds_what_it_forbids(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("_KEPT = {}\nCACHE: list = []\nLIMITS = {'a': 1}\n_ACTIVE = None\n"
                    "def keep(k, v):\n    _KEPT[k][0] = v\n    CACHE.append(v)\n"
                    "def activate(s):\n    global _ACTIVE\n    _ACTIVE = s\n"
                    "def read():\n    return LIMITS['a']\n")
    assert sorted(_module_state(path)) == ["CACHE (line 2) changed at line 7",
                                           "_KEPT (line 1) changed at line 6", "global _ACTIVE (line 9)"]
