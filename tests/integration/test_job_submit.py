"""`ray job submit` against a real Ray head, the way docs/cluster.md tells users to run on a cluster.

The fixture starts its own head (`ray start --head --block`, every port free-picked, bound to
127.0.0.1, its own temp dir) in a new session, and stops exactly that session's processes at
the end: `ray stop` would also stop other test clusters running on this machine.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent  # the job runs with the cluster's python: the head's
RAY = str(VENV_BIN / "ray")
RUNTIME_ENV = "cluster/runtime_env.yaml"

# tests/integration/test_workflow.py's quick demo, without the SFT stage (the random tiny base).
QUICK = ["rounds=1", "data.max_prompts=16", "data.max_eval_prompts=8", "train.epochs=1",
         "sampling.max_new_tokens=16", "eval.max_new_tokens=16", "eval.num_samples=2",
         "sampling.chunk_prompts=8", "sft=null"]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@dataclass
class Head:
    address: str  # the job server, http://127.0.0.1:PORT
    temp_dir: str
    proc: subprocess.Popen
    env: dict[str, str]  # with this head's own auth token (Ray's token authentication)

    def job(self, command: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """`ray job COMMAND --address … ARGS` (the address before any `--` entry point)."""
        return subprocess.run([RAY, "job", command, "--address", self.address, *args], cwd=REPO,
                              env=self.env, capture_output=True, text=True, timeout=timeout, check=False)


def _session_processes(sid: int, temp_dir: str) -> list[psutil.Process]:
    """Live processes of the head: its session, or anything naming its temp dir."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if os.getsid(p.pid) == sid or temp_dir in " ".join(p.info["cmdline"] or []):
                found.append(p)
        except (psutil.Error, ProcessLookupError):
            continue
    return found


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _stop_head(head: Head) -> None:
    """SIGTERM the head's session (ray start --block shuts its children down), SIGKILL what is left."""
    sid = head.proc.pid
    try:
        os.killpg(sid, signal.SIGTERM)
        head.proc.wait(timeout=15)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        pass
    for p in _session_processes(sid, head.temp_dir):
        try:
            p.kill()
        except psutil.Error:
            pass
    try:
        head.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


@pytest.fixture(scope="module")
def head() -> Iterator[Head]:
    # Unix socket paths are limited to ~107 characters: keep the temp dir short, not pytest's tmp_path.
    temp_dir = tempfile.mkdtemp(prefix="rjs", dir="/tmp")
    (gcs, dash, agent_http, agent_grpc, env_agent, metrics, client, node_mgr, obj_mgr) = _free_ports(9)
    # Workers' ports: a window below the kernel's ephemeral range (32768+), where the free ports
    # above come from; per process, so two test sessions at once do not share a window.
    low = 10000 + (os.getpid() % 90) * 220
    cmd = [RAY, "start", "--head", "--block", "--disable-usage-stats",
           "--node-ip-address", "127.0.0.1", "--port", str(gcs),
           "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
           "--dashboard-agent-listen-port", str(agent_http), "--dashboard-agent-grpc-port", str(agent_grpc),
           "--runtime-env-agent-port", str(env_agent), "--metrics-export-port", str(metrics),
           "--ray-client-server-port", str(client), "--node-manager-port", str(node_mgr),
           "--object-manager-port", str(obj_mgr), "--min-worker-port", str(low),
           "--max-worker-port", str(low + 200), "--temp-dir", temp_dir, "--num-cpus", "4"]
    # The job's `python` is whatever the head's PATH finds first: the venv's.
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "RAY_TRAIN_V2_ENABLED": "1",
           # Token authentication with a token of this head's own: the client must present it,
           # and nothing depends on (or writes) a token file shared with other clusters here.
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("RAY_ADDRESS", None)
    with open(Path(temp_dir) / "ray_start.log", "w") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    h = Head(address=f"http://127.0.0.1:{dash}", temp_dir=temp_dir, proc=proc,
             env={**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": env["RAY_AUTH_TOKEN"]})
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (Path(temp_dir) / "ray_start.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the Ray head's job server did not come up"
            try:
                urllib.request.urlopen(f"{h.address}/api/version", timeout=2).read()
                break
            except urllib.error.HTTPError:  # 401 without Ray's auth token: the server is up
                break
            except OSError:
                time.sleep(1)
        yield h
    finally:
        _stop_head(h)
        left = _session_processes(proc.pid, temp_dir)
        for _ in range(20):  # a process killed a moment ago may still be exiting
            left = [p for p in left if _alive(p)]
            if not left:
                break
            time.sleep(0.5)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"processes of the test head survived: {[p.pid for p in left]}"


def submit(head: Head, job_id: str, *args: str) -> None:
    res = head.job("submit", "--no-wait", "--submission-id", job_id, "--working-dir", ".",
                   "--runtime-env", RUNTIME_ENV, "--", "python", "-m", "rrhf_ray", "run", *args)
    assert res.returncode == 0, res.stdout + res.stderr


def wait_for(head: Head, job_id: str, timeout: float) -> tuple[str, str]:
    """Poll `ray job status` until the job ends; returns (status, the command's output)."""
    deadline = time.monotonic() + timeout
    while True:
        res = head.job("status", job_id)
        out = res.stdout + res.stderr
        # `ray job status` words the end states ("Job 'x' failed") and prints the others as
        # "Status for job 'x': RUNNING".
        m = re.search(r"Job '[^']+' (succeeded|failed|was stopped)", out)
        if m:
            return {"succeeded": "SUCCEEDED", "failed": "FAILED", "was stopped": "STOPPED"}[m.group(1)], out
        if time.monotonic() > deadline:
            head.job("stop", job_id)
            pytest.fail(f"job {job_id} did not finish in {timeout:.0f} s:\n{out}\n"
                        + head.job("logs", job_id).stdout[-4000:])
        time.sleep(3)


def test_a_bad_override_fails_the_job_with_the_one_line_error(head, tmp_path):
    submit(head, "rrhf-bad-override", "builtin:demo", "train.epochz=1", f"output.dir={tmp_path / 'x'}")
    status, out = wait_for(head, "rrhf-bad-override", timeout=180)
    assert status == "FAILED"
    # Ray puts the tail of the logs into the status message: the user sees the cause, not a trace.
    assert "train.epochz: unknown key" in out
    assert "exit code 2" in out
    logs = head.job("logs", "rrhf-bad-override").stdout
    assert "error: invalid config in" in logs and "train.epochz: unknown key" in logs
    assert "train.epochz: unknown key" in logs
    assert "Traceback" not in logs
    assert not (tmp_path / "x").exists()


def test_the_demo_runs_as_a_submitted_job(head, tmp_path):
    out = tmp_path / "run"  # absolute: the job runs in an unpacked copy of the working dir
    submit(head, "rrhf-demo", "builtin:demo", *QUICK, f"output.dir={out}")
    status, status_out = wait_for(head, "rrhf-demo", timeout=600)
    logs = head.job("logs", "rrhf-demo").stdout
    assert status == "SUCCEEDED", status_out + logs[-4000:]

    assert f"outputs go to {out}" in logs
    assert "joining the Ray cluster" in logs  # the job joined the head, it did not start its own
    assert "round1/train: finished" in logs
    assert "RRHF rounds" in logs and "metrics.jsonl" in logs  # the closing table

    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [0, 1]
    assert metrics[1]["train_loss"] > 0 and metrics[1]["seconds_train"] > 0
    assert -1.0 <= metrics[1]["eval_reward_mean"] <= 1.0
    assert (out / "rounds/1/checkpoint/model.safetensors").stat().st_size > 0
    assert not list((out / "rounds/1/checkpoint").glob("*.bin")), "a pickle checkpoint was written"
    assert (out / "ray_train").is_dir()  # Ray Train's storage under the absolute output dir

    # `rrhf-ray status` reads the same directory the job wrote.
    res = subprocess.run([sys.executable, "-m", "rrhf_ray", "status", str(out)], cwd=REPO,
                         capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    assert "finished" in res.stdout and "round1/train" in res.stdout
