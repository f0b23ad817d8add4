"""docs/cluster.md's "Many nodes on one machine", run as it stands: Ray's real autoscaler (the
fake multi-node provider of cluster/local-autoscale.yaml) adds a sampler node and a trainer node
for the shortened demo, the roles land there by their resources (docs/cluster.md, "Placement"),
and the idle nodes go away afterwards.

The block runs in the sandbox of tests/integration/test_job_submit.py (its own network, PID and
mount namespaces, a private /tmp/ray, a fresh HOME, a copy of this checkout): its `ray start`
and `ray stop` never touch another Ray cluster on this machine. The autoscaler's own log
(monitor.log, in the private /tmp/ray) says which nodes it launched and removed. The run's
output is a bucket on a real S3-compatible server (moto, started inside the sandbox: its network
is the sandbox's own), as the block's `OUT=s3://…` comment says: so no node shares the driver's
files, and each node's cache (`RRHF_RAY_CACHE=…/{node_id}`) shows what that node read.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from rrhf_ray.remote import cache_key
from tests.helpers import required_sandbox, sandbox_env
from tests.integration.test_job_submit import _checkout_copy
from tests.object_store import moto_server_command

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "cluster.md"
MARKER = "<!-- many-nodes-on-one-machine"


def doc_block() -> str:
    """The ```bash block right after the marker comment in docs/cluster.md."""
    text = DOC.read_text()
    assert text.count(MARKER) == 1, f"{DOC} must mark exactly one block with {MARKER}"
    m = re.compile(r"```bash\n(.*?)```", re.DOTALL).search(text, text.index(MARKER))
    assert m and text[text.index(MARKER):m.start()].count("\n") == 1, "the marker must sit right above the block"
    return m.group(1)


def autoscaler_events(ray_dir: Path) -> list[str]:
    """The autoscaler's launch and removal events (`:event_summary:` lines of monitor.log)."""
    (log,) = ray_dir.glob("session_2*/logs/monitor.log")
    return [line.split(":event_summary:", 1)[1].strip() for line in log.read_text().splitlines()
            if ":event_summary:" in line]


# In the sandbox: loopback up, a private /tmp/ray, an S3 server on loopback with a bucket, then the
# block with errexit in the copy of the checkout, OUT the bucket's prefix.
SANDBOX_INIT = """ip link set lo up && mkdir -p /tmp/ray && mount --bind "$1" /tmp/ray && cd "$2"
"$4" -H 127.0.0.1 -p 9000 > "$5" 2>&1 &
export AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_DEFAULT_REGION=us-east-1
export AWS_ENDPOINT_URL=http://127.0.0.1:9000 AWS_EC2_METADATA_DISABLED=true
for i in $(seq 150); do .venv/bin/python -c "import urllib.request as u; u.urlopen('$AWS_ENDPOINT_URL/moto-api/', timeout=1)" 2>/dev/null && break; sleep 0.2; done
BUCKET=$(.venv/bin/python -c "from tests.object_store import create_bucket; import os; print(create_bucket(dict(os.environ)))")
export OUT=s3://$BUCKET/rrhf/autoscale
echo "OUT=$OUT"
exec bash -e "$3"
"""


def run_sandboxed(tmp_path: Path) -> tuple[int | None, str, Path]:
    """The block in its sandbox (read by the test through `sandboxed_result`, tests/conftest.py):
    its exit status, its console and `tmp_path`."""
    prefix = required_sandbox("start an autoscaling head")
    block = doc_block()
    for step in ("RAY_FAKE_CLUSTER=1", "--autoscaling-config=cluster/local-autoscale.yaml",
                 "rrhf-ray validate", "ray job submit", "ray status", "ray stop"):
        assert step in block, step
    checkout = _checkout_copy(tmp_path / "checkout")
    if not (checkout / ".venv").exists():  # a worktree without its own .venv: this interpreter's
        (checkout / ".venv").unlink()
        (checkout / ".venv").symlink_to(Path(sys.prefix))
    script = tmp_path / "block.sh"
    script.write_text(block)
    ray_dir = tmp_path / "ray"
    ray_dir.mkdir()
    home = tmp_path / "home"
    home.mkdir()
    env = sandbox_env(home, drop=("RRHF_RAY_CACHE",))
    if env.get("PYTHONPATH"):  # the copy's package, not the one PYTHONPATH named
        env["PYTHONPATH"] = str(checkout)
    with open(tmp_path / "block.log", "w") as log:
        proc = subprocess.Popen([*prefix, "bash", "-ec", SANDBOX_INIT, "sandbox", str(ray_dir), str(checkout),
                                 str(script), moto_server_command(), str(tmp_path / "moto.log")], env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=540)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # --kill-child takes the namespace down with it
            proc.wait()
            rc = None
    return rc, (tmp_path / "block.log").read_text(), tmp_path


def test_the_autoscaler_adds_a_node_per_role_and_removes_them_when_idle(sandboxed_result):
    rc, out, tmp_path = sandboxed_result
    checkout, ray_dir = tmp_path / "checkout", tmp_path / "ray"
    assert rc == 0, f"the block exited {rc}:\n{out[-6000:]}"
    assert "Traceback" not in out

    # The autoscaler launched one node of each worker type for the run, and removed both once idle.
    events = autoscaler_events(ray_dir)
    for kind in ("sampler", "trainer"):
        assert f"Adding 1 node(s) of type {kind}." in events, events
        assert f"Removing 1 nodes of type {kind} (idle)." in events, events
    assert events.index("Adding 1 node(s) of type sampler.") < events.index("Removing 1 nodes of type sampler (idle).")
    # The last `ray status` of the block: the head alone again.
    last = out[out.rindex("Node status"):]
    active = last[last.index("Active:"):last.index("Pending:")]
    assert re.findall(r"^ \d+ (\S+)$", active, re.MULTILINE) == ["ray.head.default"], active

    # The driver worked in its mirror of the bucket, in its own cache ("local": it made the
    # mirror before joining Ray); every other node has a cache of its own.
    uri = re.search(r"^OUT=(s3://\S+)$", out, re.MULTILINE).group(1)
    caches = checkout / "outputs" / "cache"
    run = caches / "local" / "runs" / cache_key(uri)
    state = json.loads((run / "state.json").read_text())
    placement = state["placement"]
    driver, sampler, trainer = (placement[k]["node_id"] for k in ("driver", "sampler-policy0", "train0"))
    # Three different nodes: the head drives, the samplers and the trainer each on their own node.
    assert len({driver, sampler, trainer}) == 3, placement
    log = (run / "logs" / "driver.log").read_text()
    assert f"sampler-policy0 runs on node {sampler}" in log and f"train0 runs on node {trainer}" in log
    # No shared disk assumed: the sampler node loaded round 1's checkpoint from the bucket into its
    # own cache, the trainer node its start model and round 1's pool into its own; neither the
    # driver's mirror nor the head's cache (the driver's node) was read for them.
    assert list((caches / sampler / "checkpoints").rglob("model.safetensors")), list(caches.rglob("*"))[:40]
    assert list((caches / trainer / "checkpoints").rglob("model.safetensors")), list(caches.rglob("*"))[:40]
    assert list((caches / trainer / "files").rglob("*.parquet"))
    assert not list((caches / driver).rglob("model.safetensors"))
    # The run finished: round 1 was sampled and scored on the sampler node, trained on the trainer
    # node, and evaluated (the block's demo has no SFT stage: plumbing, not learning).
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [0, 1]
    assert metrics[1]["train_loss"] > 0 and isinstance(metrics[1]["sampled_reward_mean"], float), metrics
    assert metrics[1]["checkpoint_download_bytes"] > 0 and metrics[1]["checkpoint_upload_bytes"] > 0
    assert (run / "rounds/1/checkpoint/model.safetensors").stat().st_size > 0
