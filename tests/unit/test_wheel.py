"""The wheel, not the checkout: what a `pip install rrhf-ray` user gets.

The editable install of this repository reads every file straight from the source tree, so a
file left out of the package data (`demo.yaml`) or a lost entry point would pass every other test
and break only after a real install. These tests build the wheel offline from a clean copy of the
working tree (tracked and untracked, not ignored, files: no stale `build/` or `*.egg-info` can slip
into it), look inside it, then run `rrhf-ray validate` from the unpacked wheel alone.
"""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "rrhf_ray"

# `files("pkg.name") / "a" / "b"`: a resource read through importlib.resources.
RESOURCE = re.compile(r"""files\(\s*["']([\w.]+)["']\s*\)((?:\s*/\s*["'][^"']+["'])+)""")


IGNORED = {".git", ".venv", "outputs", "runs", "build", "dist", "__pycache__", ".pytest_cache"}


def _source_files() -> list[str]:
    """The working tree's source files: what git tracks or would track, or, without a git
    checkout, every file outside the ignored build and run directories (as .gitignore lists)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        return [str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
                if p.is_file() and not IGNORED & set(p.relative_to(ROOT).parts)
                and not any(part.endswith(".egg-info") for part in p.parts)]
    out = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True, text=True, check=True,
    ).stdout
    return [p for p in out.split("\0") if p and (ROOT / p).is_file()]  # skip deleted files


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import setuptools  # noqa: F401  (the offline build, --no-build-isolation, uses the installed one)

    tmp = tmp_path_factory.mktemp("wheel")
    src, dist = tmp / "src", tmp / "dist"
    for rel in _source_files():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, src / rel)
    # No network: the build uses the setuptools already installed (since 70.1 it builds wheels
    # without the `wheel` package); --no-index makes any download attempt an error.
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "-w", str(dist), str(src)],
        check=False, capture_output=True, text=True, cwd=tmp,
    )
    assert proc.returncode == 0, f"pip wheel failed:\n{proc.stdout}\n{proc.stderr}"
    (built,) = dist.glob("rrhf_ray-*.whl")
    return built


def _resources() -> list[str]:
    """Every file the package reads through importlib.resources, as a path inside the wheel."""
    found = []
    for py in sorted(PACKAGE.rglob("*.py")):
        text = py.read_text()
        if not re.search(r"(?<![\w.])files\(|resources\.files\(", text):
            continue
        hits = RESOURCE.findall(text)
        # A `files(` call this scan cannot read would otherwise be skipped in silence.
        assert hits, f"{py.relative_to(ROOT)} calls files( in a form this test does not parse"
        for package, parts in hits:
            names = re.findall(r"""["']([^"']+)["']""", parts)
            found.append("/".join([*package.split("."), *names]))
    return found


def test_wheel_holds_every_resource_the_package_reads(wheel: Path) -> None:
    resources = _resources()
    assert "rrhf_ray/demo/demo.yaml" in resources  # the scan sees today's one resource
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [r for r in resources if r not in names]
    assert not missing, f"read through importlib.resources but not in {wheel.name}: {missing}"


def test_wheel_holds_every_module(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p for p in _source_files() if p.startswith("rrhf_ray/") and p.endswith(".py")}
    assert modules and not modules - names, f"modules missing from the wheel: {sorted(modules - names)}"


def test_wheel_announces_the_builtins_and_the_command(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        (ep_file,) = [n for n in zf.namelist() if n.endswith(".dist-info/entry_points.txt")]
        text = zf.read(ep_file).decode()
    eps = configparser.ConfigParser(delimiters=("=",))
    eps.optionxform = str  # entry point names are case-sensitive
    eps.read_string(text)
    assert dict(eps["rrhf_ray.builtins"]) == {"demo": "rrhf_ray.demo"}
    assert eps["console_scripts"]["rrhf-ray"] == "rrhf_ray.cli:main"


# Run in a fresh interpreter started with -I -S: no current directory, no PYTHONPATH and no .pth
# file on the path, so the editable install's finder (`__editable__*.pth`) is never installed.
# The unpacked wheel comes first; this environment's site-packages follows, for the dependencies
# only (named by the parent: under -S, sys.prefix is the base interpreter's, not the venv's).
_CHECK = """
import importlib.metadata as md, sys
from pathlib import Path
wheel_dir = Path(sys.argv[1]).resolve()
sys.path.insert(0, str(wheel_dir))
sys.path.append(sys.argv[2])
assert not [f for f in sys.meta_path if "editable" in repr(f).lower()], sys.meta_path

import rrhf_ray
assert Path(rrhf_ray.__file__).resolve().is_relative_to(wheel_dir), rrhf_ray.__file__
(ep,) = [e for e in md.entry_points(group="rrhf_ray.builtins") if e.name == "demo"]
assert Path(str(ep.dist.locate_file(""))).resolve() == wheel_dir, ep.dist.locate_file("")

from rrhf_ray.cli import main
code = main(["validate"])

import rrhf_ray.demo
assert Path(rrhf_ray.demo.__file__).resolve().is_relative_to(wheel_dir), rrhf_ray.demo.__file__
assert rrhf_ray.demo.DEMO_CONFIG.resolve().is_relative_to(wheel_dir), rrhf_ray.demo.DEMO_CONFIG
sys.exit(code)
"""


def test_installed_wheel_runs_the_packaged_default(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)  # a non-editable install is this, plus scripts and a RECORD
    work = tmp_path / "cwd"
    work.mkdir()
    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-c", _CHECK, str(site), sysconfig.get_paths()["purelib"]],
        check=False, capture_output=True, text=True, cwd=work, timeout=300,
    )
    assert proc.returncode == 0, f"validate from the wheel failed:\n{proc.stdout}\n{proc.stderr}"
    assert "builtin:demo-tiny-llama" in proc.stdout
