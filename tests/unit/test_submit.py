"""`rrhf-ray submit` before anything reaches a cluster (`rrhf_ray.submit`): a bad config, a relative
output directory or a missing token exit 2 with one `error:` line and never contact the job
server; what the job uploads; where the token comes from and where it is sent.

The job server here is a plain listening socket that counts connections: a submission that got
as far as the network would show up there. The submission itself, against a real Ray head, is
tests/integration/test_job_submit.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import rrhf_ray
from rrhf_ray import submit as sub
from rrhf_ray.cli import main
from rrhf_ray.config import load_config
from rrhf_ray.state import config_fingerprint

REPO = Path(__file__).resolve().parents[2]
RRHF_RAY = Path(sys.executable).parent / "rrhf-ray"


class Listener:
    """A TCP socket on 127.0.0.1 that accepts nothing; `connections()` counts who knocked."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.setblocking(False)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def connections(self) -> int:
        n = 0
        while True:
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                return n
            conn.close()
            n += 1


@pytest.fixture
def server() -> Iterator[Listener]:
    listener = Listener()
    yield listener
    listener.sock.close()


@pytest.fixture
def no_token(tmp_path, monkeypatch) -> Path:
    """No Ray token anywhere: a fresh HOME, no token variables."""
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS",
                 "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


def test_a_bad_key_exits_2_with_one_line_and_submits_nothing(server, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER"))}
    res = subprocess.run([str(RRHF_RAY), "submit", "builtin:demo", "train.epochz=1",
                          f"output.dir={tmp_path / 'run'}", "--address", server.url, "--wait"],
                         capture_output=True, text=True, timeout=120, check=False, cwd=REPO, env=env)
    assert res.returncode == 2
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: invalid config in ") and lines[0].endswith("train.epochz: unknown key (did you mean train.epochs?)")
    assert res.stdout == ""
    assert server.connections() == 0  # the job server never heard of it
    assert not (tmp_path / "run").exists()


def test_a_relative_output_dir_is_refused_with_the_absolute_one_to_use(server, no_token, capsys, monkeypatch,
                                                                       tmp_path):
    monkeypatch.chdir(tmp_path)
    assert main(["submit", "builtin:demo", "output.dir=outputs/x", "--address", server.url]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [("error: output.dir outputs/x is relative, but a submitted job runs in a temporary copy "
                    "of its sources that Ray deletes: give an absolute path on the cluster (for a head on "
                    f"this machine, output.dir={tmp_path / 'outputs/x'})")]
    assert server.connections() == 0


def test_a_relative_storage_path_is_refused_too(server, no_token, capsys, tmp_path):
    assert main(["submit", "builtin:demo", f"output.dir={tmp_path}", "output.storage_path=ray_train",
                 "--address", server.url]) == 2
    assert capsys.readouterr().err.startswith("error: output.storage_path ray_train is relative")
    assert server.connections() == 0


def test_token_mode_without_a_token_exits_2_before_connecting(server, tmp_path):
    # In a process of its own: Ray reads RAY_AUTH_MODE once, and this one's must stay as it is.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER", "RAY_AUTH"))}
    env.update(RAY_AUTH_MODE="token", HOME=str(tmp_path))  # no ~/.ray/auth_token there
    res = subprocess.run([str(RRHF_RAY), "submit", "builtin:demo", f"output.dir={tmp_path / 'run'}",
                          "--address", server.url], capture_output=True, text=True, timeout=120,
                         check=False, cwd=REPO, env=env)
    assert res.returncode == 2
    err = [line for line in res.stderr.splitlines() if "rrhf_ray.data.queries" not in line]  # preflight's log
    assert len(err) == 1 and err[0].startswith("error: RAY_AUTH_MODE=token but no token found"), res.stderr
    assert server.connections() == 0


def test_no_job_server_is_one_line(no_token, capsys, tmp_path):
    url = "http://127.0.0.1:1"  # a privileged port nothing listens on (a freed port may be taken at once)
    assert main(["submit", "builtin:demo", f"output.dir={tmp_path / 'run'}", "--address", url]) == 2
    assert capsys.readouterr().err.splitlines() == [
        (f"error: no Ray job server at {url}: start a head (`ray start --head`), open the tunnel to it "
         "(`ray dashboard cluster/aws.yaml`), or give --address")]


# --------------------------------------------------------------------------- the token


def test_the_token_is_found_where_ray_finds_it(no_token, tmp_path, monkeypatch):
    default = no_token / ".ray" / "auth_token"
    default.parent.mkdir()
    default.write_text("from-home\n")
    named = tmp_path / "named"
    named.write_text("from-path")
    assert sub.find_token() == ("from-home", str(default))
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(named))
    assert sub.find_token() == ("from-path", str(named))
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert sub.find_token() == ("from-env", "RAY_AUTH_TOKEN")

    # Ray's own loader, in a process of its own, agrees on each of the three.
    cases = [{}, {"RAY_AUTH_TOKEN_PATH": str(named)}, {"RAY_AUTH_TOKEN": "from-env"}]
    script = f"""
import json, os
from ray._raylet import AuthenticationTokenLoader
out = []
for env in {cases!r}:
    for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        os.environ.pop(k, None)
    os.environ.update(env)
    loader = AuthenticationTokenLoader.instance()
    loader.reset_cache()
    out.append(loader.get_raw_token(ignore_auth_mode=True))
print(json.dumps(out))
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         check=True, env={**os.environ, "RAY_AUTH_TOKEN": "", "RAY_AUTH_TOKEN_PATH": ""})
    assert json.loads(res.stdout.splitlines()[-1]) == ["from-home", "from-path", "from-env"]


def test_an_unreadable_token_path_is_an_error(no_token, monkeypatch, tmp_path):
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(sub.SubmitError, match="RAY_AUTH_TOKEN_PATH=.*missing: the file cannot be read"):
        sub.find_token()


def test_the_token_goes_to_this_machine_or_where_token_mode_says(no_token, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "secret")
    for local in ("http://127.0.0.1:8265", "http://localhost:8265", "http://[::1]:8265", "127.0.0.1:8265"):
        assert sub.auth_token(local) == ("secret", "RAY_AUTH_TOKEN"), local
    assert sub.auth_token("http://10.0.0.5:8265") is None  # not opted in: never sent away
    assert sub.auth_token("https://ray.example.com") is None
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert sub.auth_token("http://10.0.0.5:8265") == ("secret", "RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert sub.auth_token("http://127.0.0.1:8265") is None


def test_the_address_comes_from_the_option_then_the_environment(no_token, monkeypatch):
    assert sub.job_address(None) == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "http://10.0.0.1:8265/")
    assert sub.job_address(None) == "http://10.0.0.1:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://10.0.0.2:8265")
    assert sub.job_address(None) == "http://10.0.0.2:8265"
    assert sub.job_address("http://10.0.0.3:8265") == "http://10.0.0.3:8265"


# --------------------------------------------------------------------------- what is uploaded


def test_the_upload_is_the_package_sources_its_entry_points_and_the_checked_config(tmp_path):
    config = load_config(str(REPO / "rrhf_ray/demo/demo.yaml"),
                         ["rounds=1", f"output.dir={tmp_path / 'run'}", "ray.address=auto"])
    resolved = sub.resolve(config)
    assert resolved.ray.address is None  # a submitted job joins the cluster it runs on
    staged = sub.stage(resolved, tmp_path / "up")

    info = f"rrhf_ray-{rrhf_ray.__version__}.dist-info"
    assert sorted(p.name for p in staged.iterdir()) == ["rrhf_ray", info, "run.yaml"]
    shipped = {p.relative_to(staged / "rrhf_ray") for p in (staged / "rrhf_ray").rglob("*") if p.is_file()}
    package = REPO / "rrhf_ray"
    sources = {p.relative_to(package) for p in package.rglob("*")
               if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}
    assert shipped == sources and Path("demo/demo.yaml") in shipped
    assert "[rrhf_ray.builtins]" in (staged / info / "entry_points.txt").read_text()
    # run.yaml is the config as checked: the same run (the fingerprint a resumed run compares).
    again = load_config(str(staged / "run.yaml"))
    assert again == resolved
    assert config_fingerprint(again) == config_fingerprint(config)

    # From the uploaded directory alone, the shipped copy is the package, and built-ins resolve.
    probe = ("import rrhf_ray, rrhf_ray.registry as r; print(rrhf_ray.__file__); "
             "print(r.lookup('config', 'builtin:demo')); print(r.lookup('reward', 'builtin:demo').__module__)")
    res = subprocess.run([sys.executable, "-c", probe], cwd=staged, capture_output=True, text=True,
                         timeout=120, check=True)
    file, demo_config, reward_module = res.stdout.split()
    assert Path(file).resolve() == (staged / "rrhf_ray/__init__.py").resolve()
    assert Path(demo_config).resolve() == (staged / "rrhf_ray/demo/demo.yaml").resolve()
    assert reward_module.startswith("rrhf_ray.demo")
