"""The warm round trainer (`rrhf_ray.train.warm`) on the session's Ray cluster: one worker group
trains round after round; each round computes what a fresh fit from the last round's checkpoint
computes; a worker killed mid-round is restarted from the last round's checkpoint and the round
is sent again."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rrhf_ray.config import TrainConfig
from rrhf_ray.train.core import Job
from rrhf_ray.train.rrhf import TrainJob, train_loop_per_worker
from rrhf_ray.train.warm import WarmTrainer, install_checkpoint
from tests.helpers import write_ranked
from tests.integration.train.test_train_fault import train_worker_pids

pytestmark = pytest.mark.ray

CFG = TrainConfig(epochs=2, lr=3e-4, queries_per_step=4, micro_batch_queries=2, seed=7)


def cold_fit(start: Path, pool: Path, out: Path) -> Path:
    """A fresh fit of one round in this process (no Ray): what a trainer rebuilt per round does."""
    job = TrainJob(model_path=str(start), data_paths=[str(pool)], output_dir=str(out), train=CFG)
    train_loop_per_worker({"job": job.model_dump(mode="json")})
    return out


def test_warm_rounds_equal_fresh_fits_and_survive_a_killed_worker(ray_cluster, tiny_model_dir: Path,
                                                                   tmp_path: Path) -> None:
    pools = [write_ranked(tmp_path / f"pool{r}.jsonl", 12, offset=12 * r) for r in (1, 2, 3)]
    trainer = WarmTrainer(Job(model_path=str(tiny_model_dir), output_dir=str(tmp_path), train=CFG), 0,
                          storage_path=str(tmp_path / "ray_train"))
    try:
        warm = []
        for r in (1, 2):
            result = trainer.train(r, [str(pools[r - 1])])
            install_checkpoint(result["checkpoint"], tmp_path / f"warm{r}", result["metrics"])
            warm.append(result)
        assert trainer.starts == 1
        # Steps count on across rounds: 12 groups / 4 per step × 2 epochs = 6 steps a round.
        assert [h["global_step"] for h in warm[0]["history"]] == [1, 2, 3, 4, 5, 6]
        assert [h["global_step"] for h in warm[1]["history"]] == [7, 8, 9, 10, 11, 12]
        assert all(0 <= h["lr"] <= 3e-4 and h["loss"] > 0 for h in warm[1]["history"])
        assert max(h["lr"] for h in warm[1]["history"]) == pytest.approx(3e-4)  # a fresh schedule each round

        cold1 = cold_fit(tiny_model_dir, pools[0], tmp_path / "cold1")
        cold2 = cold_fit(cold1, pools[1], tmp_path / "cold2")
        for w, c in ((tmp_path / "warm1", cold1), (tmp_path / "warm2", cold2)):
            a, b = load_file(w / "model.safetensors"), load_file(c / "model.safetensors")
            assert a.keys() == b.keys()
            for name in a:
                torch.testing.assert_close(a[name].float(), b[name].float(), rtol=1e-5, atol=1e-6, msg=name)

        # Round 3: kill the worker while it trains; Ray Train restarts the group from round 2's
        # checkpoint, the trainer sends round 3 again, and it finishes.
        big = write_ranked(tmp_path / "pool3big.jsonl", 240, offset=40)
        done: dict = {}
        thread = threading.Thread(target=lambda: done.update(trainer.train(3, [str(big)])))
        thread.start()
        time.sleep(3.0)
        assert thread.is_alive(), "round 3 ended before the kill"
        pids = train_worker_pids()
        assert len(pids) == 1
        os.kill(pids[0], signal.SIGKILL)
        thread.join(timeout=300)
        assert not thread.is_alive()
        assert trainer.starts == 2
        assert done["round"] == 3 and done["metrics"]["round"] == 3.0
        assert done["history"][0]["global_step"] == 13  # the restart resumed the step count of round 2
    finally:
        trainer.close()
    assert not (tmp_path / "ray_train" / trainer.name).exists()
