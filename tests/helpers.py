"""Helpers several test modules share: small ranked data sets written by tests (no hub), report
and tracking fixtures, Ray Train worker processes, driver processes to kill."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

TOPICS = ["bake bread", "fix a bike", "plant tomatoes", "learn chess", "paint a wall", "tie a tie",
          "brew tea", "clean a pan", "write a letter", "fold a shirt", "tune a guitar", "sharpen a knife"]


def ranked_rows(n: int, offset: int = 0) -> list[dict]:
    """n query groups with three candidates of clearly different quality:
    polite and helpful (1.0), terse (0.0), rude (−1.0), in shuffled positions."""
    rows = []
    for i in range(offset, offset + n):
        topic = TOPICS[i % len(TOPICS)]
        cands = [
            (f" Sure, happy to help! To {topic}, take it one step at a time. Thank you!", 1.0),
            (" I do not know.", 0.0),
            (" No. Figure it out yourself, that is a stupid question.", -1.0),
        ]
        shift = i % 3
        cands = cands[shift:] + cands[:shift]
        rows.append({
            "query": f"\n\nHuman: How do I {topic}? (question {i})\n\nAssistant:",
            "responses": [c[0] for c in cands],
            "scores": [c[1] for c in cands],
        })
    return rows


def write_ranked(path: Path, n: int, offset: int = 0) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in ranked_rows(n, offset)))
    return path


# --------------------------------------------------------------------------- reports and tracking
# Shared by tests/unit/test_report.py, test_status.py, test_tracking.py and
# tests/integration/test_demo.py.

EVAL0 = {"eval_reward_mean": -0.5, "eval_reward_std": 0.25, "eval_reward_mean_ci95": [-0.75, -0.25],
         "sampled_reward_mean": -0.75, "sampled_reward_std": 0.5, "sampled_reward_mean_ci95": [-1.0, -0.5],
         "reference_perplexity": 40.0, "judge_perplexity": 30.0, "heldout_rank_accuracy": 0.5,
         "win_rate_vs_round0": 0.5, "win_rate_vs_round0_ci95": None,
         "sampled_win_rate_vs_round0": 0.5, "sampled_win_rate_vs_round0_ci95": None,
         "sampled_reward_delta_vs_round0": 0.0, "sampled_reward_delta_vs_round0_ci95": None,
         "eval_reply_length_mean": 12.5, "sampled_reply_length_mean": 10.25}
EVAL1 = {"eval_reward_mean": 0.5, "eval_reward_std": 0.125, "eval_reward_mean_ci95": [0.375, 0.625],
         "sampled_reward_mean": 0.25, "sampled_reward_std": 0.375, "sampled_reward_mean_ci95": [0.125, 0.375],
         "reference_perplexity": None, "judge_perplexity": 25.0, "heldout_rank_accuracy": float("nan"),
         "win_rate_vs_round0": 0.875, "win_rate_vs_round0_ci95": [0.75, 1.0],
         "sampled_win_rate_vs_round0": 0.75, "sampled_win_rate_vs_round0_ci95": [0.5, 1.0],
         "sampled_reward_delta_vs_round0": 1.0, "sampled_reward_delta_vs_round0_ci95": [0.75, 1.25],
         "eval_reply_length_mean": 20.0, "sampled_reply_length_mean": None}  # None: lengths unknown
POOL1 = {"all": {"mean": 0.25, "std": 1.0, "max": 2.0, "count": 8.0},
         "policy@0": {"mean": 0.25, "std": 1.0, "max": 2.0, "count": 8.0}}
SHAPE1 = {"groups": 4, "k_histogram": {"1": 1, "2": 2, "3": 1}, "groups_without_pair": 2,
          "candidates": 8, "candidates_premerge": 10, "reward_mean": 0.25, "reward_mean_premerge": 0.5}
TRAIN1 = {"loss": 1.5, "rank_loss": 0.5, "sft_loss": 1.0, "rank_accuracy": float("nan"),
          "tokens_per_s": 900.0, "epoch": 1.0}


def state_stages() -> dict:
    """The `stages` of a state.json: round 0 and 1 finished, round 2 sampled and scored only."""
    return {
        "round0/eval": {"seconds": 3.0, "finished": 1.0, "eval": EVAL0},
        "round1/sample": {"seconds": 10.4, "finished": 2.0, "groups": 4, "candidates": 8},
        "round1/score": {"seconds": 2.0, "finished": 3.0, "pool_stats": POOL1, "pool": SHAPE1},
        "round1/train": {"seconds": 30.6, "finished": 4.0, "train": TRAIN1},
        "round1/eval": {"seconds": 4.0, "finished": 5.0, "eval": EVAL1},
        "round2/sample": {"seconds": 9.0, "finished": 6.0},
        "round2/score": {"seconds": 1.0, "finished": 7.0, "pool_stats": POOL1},
    }


def tensorboard_scalars(log_dir: Path) -> tuple[object, dict[str, list[tuple[int, float]]]]:
    """The event files under `log_dir` read back: (the accumulator, {tag: [(step, value), …]})."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    acc.Reload()
    return acc, {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


# --------------------------------------------------------------------------- training workers


def train_worker_pids() -> list[int]:
    """Processes of Ray Train workers on this machine (their title names the actor class)."""
    import psutil

    pids = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if cmd.startswith("ray::RayTrainWorker"):
            pids.append(p.pid)
    return pids


def kill_the_train_worker() -> int:
    """SIGKILL the one Ray Train worker on this machine (a test's single-worker fit); its pid."""
    import os
    import signal

    pids = train_worker_pids()
    assert len(pids) == 1, pids
    os.kill(pids[0], signal.SIGKILL)
    return pids[0]


def perturbed_copy(model_dir: Path, out: Path) -> Path:
    """`model_dir` with every weight moved by seeded noise, saved (float32) with its tokenizer at
    `out`: a stand-in for a trained round's ρ*."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


# In the sandbox: loopback up, a private /tmp/ray, then python -c CODE ARG.
SCENARIO_INIT = 'ip link set lo up && mkdir -p /tmp/ray && mount --bind "$1" /tmp/ray && exec "$2" -c "$3" "$4"'


def sandbox_prefix() -> list[str] | None:
    """`unshare` with new network, PID and mount namespaces (as root, or in a new user namespace
    mapped to root), or None where this machine does not allow them."""
    unshare = shutil.which("unshare")
    if unshare is None or shutil.which("ip") is None:
        return None
    base = [unshare, "--net", "--pid", "--fork", "--kill-child", "--mount-proc", "--mount"]
    for prefix in ([base] if os.geteuid() == 0 else []) + [[unshare, "--user", "--map-root-user", *base[1:]]]:
        probe = subprocess.run([*prefix, "sh", "-c", "ip link set lo up && mount -t tmpfs none /mnt"],
                               capture_output=True, timeout=30, check=False)
        if probe.returncode == 0:
            return prefix
    return None


WITHOUT_SANDBOX = "RRHF_RAY_TESTS_WITHOUT_SANDBOX"  # =1: skip, not fail, where namespaces cannot exist


def required_sandbox(what: str) -> list[str]:
    """The namespace prefix (`sandbox_prefix`) for a test that starts and stops a Ray cluster of
    its own. Where this machine has no such namespaces the test fails, naming what it needs: a
    test that runs docs/cluster.md's commands is never skipped unasked. A developer whose machine
    cannot have them (a container without the privilege) sets `WITHOUT_SANDBOX`=1 to skip it
    instead; under CI=true that is refused (CI runs on Linux VMs as root, where they exist)."""
    prefix = sandbox_prefix()
    if prefix is not None:
        return prefix
    need = (f"needs Linux network, PID and mount namespaces (unshare) to {what} without touching "
            "other Ray clusters on this machine")
    if os.environ.get(WITHOUT_SANDBOX) == "1" and os.environ.get("CI") != "true":
        pytest.skip(f"{need} ({WITHOUT_SANDBOX}=1)")
    pytest.fail(f"{need}; where they cannot exist, {WITHOUT_SANDBOX}=1 skips this test instead "
                "(not under CI=true)", pytrace=False)


def sandbox_env(home: Path, drop: tuple[str, ...] = ()) -> dict[str, str]:
    """This environment without the variables that would join or authenticate to another Ray
    cluster (and `drop`), with a fresh HOME: a new machine's. Ray Train's preemption watcher is
    Ray's default there (tests/conftest.py turns it off for the session's one-machine cluster);
    vLLM's cache (VLLM_CACHE_ROOT) is the session's."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER", "RAY_AUTH", "VIRTUAL_ENV",
                                "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", *drop))}
    env["HOME"] = str(home)
    return env




def run_scenario(module: str, tmp_path: Path, drop: tuple[str, ...] = ()) -> dict:
    """`module.scenario(tmp_path)` in a subprocess inside private network, PID and mount
    namespaces (tests/integration/test_job_submit.py's sandbox: its own ports, /tmp/ray and
    processes), so the Ray cluster it starts and stops never touches another on this machine.
    `drop`: environment variables (or prefixes) not passed in. Returns the scenario's
    result.json; fails the test with the end of its log when it does not exit 0 in 900 s."""
    prefix = required_sandbox("start a cluster of its own")
    (tmp_path / "ray").mkdir()
    (tmp_path / "home").mkdir()
    env = sandbox_env(tmp_path / "home", drop=drop)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    code = f"import sys; from {module} import scenario; scenario(sys.argv[1])"
    with open(tmp_path / "scenario.log", "w") as log:
        proc = subprocess.Popen([*prefix, "bash", "-c", SCENARIO_INIT, "sandbox", str(tmp_path / "ray"),
                                 sys.executable, code, str(tmp_path)], env=env, cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=900)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    assert rc == 0, (tmp_path / "scenario.log").read_text()[-6000:]
    return json.loads((tmp_path / "result.json").read_text())


def lose_node(cluster, node, marker: str) -> int:
    """`node` of a `ray.cluster_utils.Cluster` lost at once, as a machine that dies: SIGKILL every
    process whose environment holds `marker` (a `KEY=VALUE` of that node's
    `add_node(env_vars=...)`: its raylet and every worker it started), then `cluster.remove_node`.
    `remove_node` alone stops the raylet first, and a worker that has not noticed yet may finish
    its call (a chunk, a training round) from its old process, so the fault would miss. Returns
    how many processes were killed."""
    wanted = marker.encode()
    killed = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if wanted not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            os.kill(int(entry.name), signal.SIGKILL)
            killed += 1
        except (OSError, ProcessLookupError):  # gone already, or not ours to read
            continue
    cluster.remove_node(node, allow_graceful=False)
    return killed


def wait_until(condition, timeout_s: float, what: str, poll_s: float = 0.1) -> None:
    """Return once `condition()` is true; fail the test, naming `what`, after `timeout_s`."""
    import time

    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:.0f} s"
        time.sleep(poll_s)


# --------------------------------------------------------------------------- driver processes
# Shared by the integration tests that run the shortened demo (test_object_storage.py, test_faults.py, ...).

REPO = Path(__file__).resolve().parents[1]

# A quick variant of the embedded default: no SFT stage (a random tiny base), few queries.
QUICK = ["sft=null", "rounds=1", "data.max_prompts=16", "data.max_eval_prompts=8", "train.epochs=1",
         "sampling.max_new_tokens=16", "eval.max_new_tokens=16", "eval.num_samples=2",
         "sampling.chunk_prompts=8"]


def kill_driver_when(overrides: list[str], env: dict, reached: Callable[[], bool], what: str,
                     log: Path | None = None, poll_s: float = 0.5) -> None:
    """Run `rrhf-ray run` with `overrides` as a driver process of its own (`env`: RAY_ADDRESS of
    the session's cluster) and SIGKILL its process group as soon as `reached()` is true (checked
    every `poll_s` seconds: short where the stage after the one awaited takes a second or less)."""
    with open(log or os.devnull, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "rrhf_ray", "run", *overrides], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not reached():
            tail = log.read_text()[-3000:] if log else ""
            assert proc.poll() is None, f"the driver ended before it could be killed:\n{tail}"
            assert time.monotonic() < deadline, f"the driver did not reach {what} in time"
            time.sleep(poll_s)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
