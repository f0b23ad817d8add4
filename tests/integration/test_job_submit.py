"""docs/cluster.md's "Try it without a cloud", run as it stands against the real Ray head it starts.

The fenced block (`ray start --head` on the default ports, `rrhf-ray submit … --wait`, a plain
`ray job submit`, `ray stop`) runs in a sandbox that keeps it from touching anything else on this
machine, where other test sessions and people run Ray clusters of their own:

- its own network namespace: the default ports 6379 / 8265 are free there, and nobody else's;
- its own PID namespace: `ray stop` sees and stops only the head the block started, and whatever
  is left when the block ends dies with the namespace (`unshare --kill-child`);
- a private `/tmp/ray` (Ray's session files and the `ray_current_cluster` file that a plain
  `ray.init()`, such as the test session's own cluster of tests/conftest.py, reads);
- a fresh HOME: the block makes its own `~/.ray/auth_token`, as on a fresh machine;
- a copy of this checkout (its `.venv` a link to this one's), so `OUT=$PWD/outputs/try` lands in
  the copy.

Nothing of the block is changed: it runs with `bash -e`, so a failing step fails the test.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import required_sandbox, sandbox_env

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[2]

DOC = REPO / "docs" / "cluster.md"
MARKER = "<!-- try-without-a-cloud"
COPY_IGNORED = {".git", ".venv", "outputs", "runs", "build", "dist", "__pycache__", ".pytest_cache",
                ".ruff_cache"}


def doc_block() -> str:
    """The ```bash block right after the marker comment in docs/cluster.md."""
    text = DOC.read_text()
    assert text.count(MARKER) == 1, f"{DOC} must mark exactly one block with {MARKER}"
    m = re.compile(r"```bash\n(.*?)```", re.DOTALL).search(text, text.index(MARKER))
    assert m and text[text.index(MARKER):m.start()].count("\n") == 1, "the marker must sit right above the block"
    return m.group(1)


def _checkout_copy(dest: Path) -> Path:
    """This checkout's source files (what git tracks or would track; without git, everything
    outside the ignored directories), `.venv` a link to this one's."""
    if shutil.which("git") and (REPO / ".git").exists():
        out = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others",
                              "--exclude-standard"], capture_output=True, text=True, check=True).stdout
        files = [p for p in out.split("\0") if p and (REPO / p).is_file()]
    else:
        files = [str(p.relative_to(REPO)) for p in REPO.rglob("*")
                 if p.is_file() and not COPY_IGNORED & set(p.relative_to(REPO).parts)]
    for rel in files:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, dest / rel)
    (dest / ".venv").symlink_to(REPO / ".venv")
    return dest




# In the sandbox: loopback up, a private /tmp/ray, then the block with errexit (a failing step
# fails the test) in the copy of the checkout.
SANDBOX_INIT = 'ip link set lo up && mkdir -p /tmp/ray && mount --bind "$1" /tmp/ray && cd "$2" && exec bash -e "$3"'


def run_sandboxed(tmp_path: Path) -> tuple[int | None, str, float, Path]:
    """The block in its sandbox (read by the test through `sandboxed_result`, tests/conftest.py):
    its exit status, console, seconds and `tmp_path`."""
    prefix = required_sandbox("run the doc's `ray start` / `ray stop`")
    block = doc_block()
    # The commands the issue was about are there, as the reader types them.
    for step in ("source .venv/bin/activate", "export RAY_AUTH_MODE=token", "ray start --head",
                 "rrhf-ray submit builtin:demo", "--wait", "ray job submit", "ray stop"):
        assert step in block, step
    checkout = _checkout_copy(tmp_path / "checkout")
    script = tmp_path / "try.sh"
    script.write_text(block)
    (tmp_path / "ray").mkdir()
    home = tmp_path / "home"
    home.mkdir()
    env = sandbox_env(home)  # a fresh machine: no ~/.ray/auth_token yet
    started = time.monotonic()
    with open(tmp_path / "try.log", "w") as log:
        proc = subprocess.Popen([*prefix, "bash", "-c", SANDBOX_INIT, "sandbox", str(tmp_path / "ray"),
                                 str(checkout), str(script)], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=400)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # --kill-child takes the namespace down with it
            proc.wait()
            rc = None
    return rc, (tmp_path / "try.log").read_text(), time.monotonic() - started, tmp_path


def test_the_doc_block_runs_as_written(sandboxed_result):
    rc, out, seconds, tmp_path = sandboxed_result
    home, checkout = tmp_path / "home", tmp_path / "checkout"
    assert rc == 0, f"the block exited {rc} after {seconds:.0f} s:\n{out[-6000:]}"

    # The token was made on this fresh HOME, and the head required it.
    assert (home / ".ray" / "auth_token").stat().st_size > 0
    # rrhf-ray submit: the job ran the checked config it shipped, joined the head, and succeeded.
    submitted = re.search(r"submitted job (raysubmit_\w+) to http://127\.0\.0\.1:8265", out)
    assert submitted, out[-6000:]
    assert f"job {submitted.group(1)} SUCCEEDED" in out
    assert "run config run.yaml" in out
    assert "round1/train done in" in out  # the job's quiet console: one line per stage
    assert "RRHF rounds" in out  # the closing table, in the job's log
    # Plain ray job submit: `rrhf-ray status` ran as a second job, on the head, and read the run.
    plain = re.search(r"Job '(raysubmit_\w+)' succeeded", out)
    assert plain and plain.group(1) != submitted.group(1), out[-6000:]
    status_job = out[out.index("Running entrypoint for job " + plain.group(1)):plain.start()]
    assert "python -m rrhf_ray status" in status_job and "round1/train" in status_job
    assert "Stopped all" in out  # ray stop, on the head the block started
    assert "Traceback" not in out

    run = checkout / "outputs" / "try"  # OUT=$PWD/outputs/try
    assert "joining the Ray cluster" in (run / "logs" / "driver.log").read_text()  # the job joined the head
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [0, 1]
    assert metrics[1]["train_loss"] > 0 and metrics[1]["seconds_train"] > 0
    assert -1.0 <= metrics[1]["eval_reward_mean"] <= 1.0
    assert (run / "rounds/1/checkpoint/model.safetensors").stat().st_size > 0
    assert not list((run / "rounds/1/checkpoint").glob("*.bin")), "a pickle checkpoint was written"
    assert (run / "ray_train").is_dir()  # Ray Train's storage under the absolute output dir
    state = json.loads((run / "state.json").read_text())
    assert "round1/train" in state["stages"]
