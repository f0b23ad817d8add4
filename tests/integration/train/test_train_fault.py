"""Ray Train fault tolerance: a training worker killed mid-fit is restarted by Ray and resumes
from the last per-epoch checkpoint (`ray.train.get_checkpoint()`), not from scratch."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from rrhf_ray.config import TrainConfig
from rrhf_ray.train.checkpoints import STATE_FILE
from rrhf_ray.train.rrhf import TrainJob, fit
from tests.helpers import kill_the_train_worker, write_ranked

pytestmark = pytest.mark.ray


def wait_for_registered_checkpoint(run_dir: Path, thread: threading.Thread, timeout_s: float) -> dict:
    """The first checkpoint that is both on storage (`checkpoint_*/` with our state file) and
    registered by the Ray Train controller: the controller records a reported checkpoint in
    `checkpoint_manager_snapshot.json` (its `latest_checkpoint_result`) when it registers it, and
    restarts a failed worker group from that checkpoint. A worker killed before the registration
    would start again from epoch 0. Returns the snapshot's entry (`checkpoint_dir_name`, `metrics`)."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + timeout_s
    last_seen = "nothing"
    while True:
        assert thread.is_alive(), f"training ended before a checkpoint was registered (saw {last_seen})"
        try:
            latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
        except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or being written
            latest = None
        if latest is not None:
            last_seen = f"{snapshot.name}: {latest['checkpoint_dir_name']}"
            if (run_dir / latest["checkpoint_dir_name"] / STATE_FILE).exists():
                return latest
        elif list(run_dir.glob(f"checkpoint_*/{STATE_FILE}")):
            last_seen = "a checkpoint on storage, not yet registered by the controller"
        assert time.monotonic() < deadline, (
            f"no checkpoint registered by the Ray Train controller in {run_dir} within "
            f"{timeout_s:.0f} s (saw {last_seen})")
        time.sleep(0.2)


def test_a_killed_worker_resumes_from_the_last_epoch_checkpoint(ray_cluster, tiny_model_dir, tmp_path):
    data = write_ranked(tmp_path / "ranked.jsonl", 64)
    cfg = TrainConfig(epochs=6, lr=1e-4, queries_per_step=4, micro_batch_queries=1)
    job = TrainJob(model_path=str(tiny_model_dir), data_paths=[str(data)],
                   output_dir=str(tmp_path / "out"), train=cfg)
    storage = tmp_path / "storage"
    result: dict = {}
    thread = threading.Thread(
        target=lambda: result.update(fit(job, name="fault", storage_path=str(storage), max_failures=1)))
    thread.start()
    try:
        registered = wait_for_registered_checkpoint(storage / "fault", thread, timeout_s=240)
        assert registered["metrics"]["epoch"] < cfg.epochs, "training ended before the kill"
        kill_the_train_worker()
    finally:
        thread.join(timeout=300)
    assert not thread.is_alive()
    assert result["epoch"] == 6
    # Picked up after the epoch the controller had registered before the kill (or a later one
    # registered in between), not from epoch 0.
    assert result["resumed_at_epoch"] >= registered["metrics"]["epoch"] >= 1
    assert (tmp_path / "out" / "model.safetensors").exists()
