"""A real S3-compatible server for tests: moto's `moto_server` on a free localhost port, as a
subprocess, with a bucket created; the client finds it through AWS_ENDPOINT_URL."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def moto_server_command() -> str:
    exe = Path(sys.executable).with_name("moto_server")
    found = str(exe) if exe.exists() else shutil.which("moto_server")
    # The dev extra (scripts/setup.sh) installs it: missing, the set-up is broken, not optional.
    assert found, "moto_server not installed: pip install 'moto[server]' (the dev extra has it)"
    return found


@contextlib.contextmanager
def moto_s3(log: Path) -> Iterator[dict[str, str]]:
    """Start `moto_server`, yield the environment that points an S3 client at it (test
    credentials, region, endpoint), stop it."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        proc = subprocess.Popen([moto_server_command(), "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, f"moto_server exited: {log.read_text()[-2000:]}"
                assert time.monotonic() < deadline, "moto_server did not answer in 30 s"
                time.sleep(0.2)
        yield {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_ENDPOINT_URL": endpoint, "AWS_EC2_METADATA_DISABLED": "true"}
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def create_bucket(env: dict[str, str]) -> str:
    """A new bucket on the server `env` points at; its name."""
    import pyarrow.fs as pafs

    name = f"rrhf-{uuid.uuid4().hex[:12]}"
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        endpoint = env["AWS_ENDPOINT_URL"].split("://", 1)[1]
        pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", region="us-east-1",
                          allow_bucket_creation=True).create_dir(name)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return name


def bucket_files(uri: str) -> dict[str, int]:
    """{path under `uri`: size} of every object (through rrhf_ray.storage's client)."""
    from rrhf_ray.remote import filesystem, remote_files

    fs, root = filesystem(uri)
    return {rel: size for rel, (size, _) in remote_files(fs, root).items()}


def read_object(uri: str) -> bytes:
    from rrhf_ray.remote import filesystem

    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.read()
