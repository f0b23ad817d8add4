"""Ray Train fault tolerance: a training worker killed mid-fit is restarted by Ray and resumes
from the last per-epoch checkpoint (`ray.train.get_checkpoint()`), not from scratch."""

from __future__ import annotations

import os
import signal
import threading
import time

import psutil
import pytest

from rrhf_ray.config import TrainConfig
from rrhf_ray.train.rrhf import TrainJob, fit
from tests.helpers import write_ranked

pytestmark = pytest.mark.ray


def train_worker_pids() -> list[int]:
    """Processes of Ray Train workers on this machine (their title names the actor class)."""
    pids = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if cmd.startswith("ray::RayTrainWorker"):
            pids.append(p.pid)
    return pids


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
        deadline = time.monotonic() + 240
        # Epoch 1's checkpoint is on storage.
        while not list((storage / "fault").glob("checkpoint_*/rrhf_train_state.json")):
            assert thread.is_alive() and time.monotonic() < deadline, "no first checkpoint"
            time.sleep(0.2)
        time.sleep(4.0)  # the controller registers a reported checkpoint a moment after it is written
        pids = train_worker_pids()
        assert len(pids) == 1
        os.kill(pids[0], signal.SIGKILL)
    finally:
        thread.join(timeout=300)
    assert not thread.is_alive()
    assert result["epoch"] == 6
    assert result["resumed_at_epoch"] >= 1  # picked up after a finished epoch, not from epoch 0
    assert (tmp_path / "out" / "model.safetensors").exists()
