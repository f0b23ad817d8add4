"""Small ranked data sets written by tests (no hub)."""

from __future__ import annotations

import json
from pathlib import Path

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


def wait_until(condition, timeout_s: float, what: str, poll_s: float = 0.1) -> None:
    """Return once `condition()` is true; fail the test, naming `what`, after `timeout_s`."""
    import time

    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:.0f} s"
        time.sleep(poll_s)
