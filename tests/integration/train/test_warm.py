"""The warm round trainer (`rrhf_ray.train.warm`) on the session's Ray cluster: one worker group
trains round after round; each round computes what a fresh fit from the last round's checkpoint
computes; a worker killed mid-round is restarted from the last round's checkpoint and the round
is sent again; `close` reports a fit that did not stop."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from rrhf_ray.config import TrainConfig
from rrhf_ray.train.checkpoints import install_checkpoint
from rrhf_ray.train.loop import round_train_seed
from rrhf_ray.train.rrhf import TrainJob, train_loop_per_worker
from rrhf_ray.train.warm import WarmJob, WarmTrainer
from tests.helpers import kill_the_train_worker, wait_until, write_ranked

pytestmark = pytest.mark.ray

CFG = TrainConfig(epochs=2, lr=3e-4, queries_per_step=4, micro_batch_queries=2, seed=7)


def cold_fit(start: Path, pool: Path, out: Path, round_index: int) -> Path:
    """A fresh fit of one round in this process (no Ray): what a trainer rebuilt per round does,
    with the round's seed."""
    cfg = CFG.model_copy(update={"seed": round_train_seed(CFG.seed, round_index)})
    job = TrainJob(model_path=str(start), data_paths=[str(pool)], output_dir=str(out), train=cfg)
    train_loop_per_worker({"job": job.model_dump(mode="json")})
    return out


@pytest.fixture(scope="module")
def warm(ray_cluster, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """One warm trainer after rounds 1 and 2 (12 query groups each), their checkpoints installed
    at warm1/, warm2/; `starts` is the worker group starts seen by then."""
    d = tmp_path_factory.mktemp("warm")
    pools = [write_ranked(d / f"pool{r}.jsonl", 12, offset=12 * r) for r in (1, 2)]
    trainer = WarmTrainer(WarmJob(model_path=str(tiny_model_dir), output_dir=str(d), train=CFG), 0,
                          storage_path=str(d / "ray_train"))
    try:
        results = {}
        for r in (1, 2):
            results[r] = trainer.train(r, [str(pools[r - 1])])
            install_checkpoint(results[r]["checkpoint"], d / f"warm{r}", results[r]["metrics"])
        yield SimpleNamespace(trainer=trainer, dir=d, pools=pools, results=results, starts=trainer.starts)
    finally:
        trainer.close()


def test_the_step_count_goes_on_across_rounds_with_a_fresh_schedule_each(warm) -> None:
    assert warm.starts == 1  # one worker group for both rounds
    # 12 groups / 4 per step × 2 epochs = 6 steps a round.
    assert [h["global_step"] for h in warm.results[1]["history"]] == [1, 2, 3, 4, 5, 6]
    assert [h["global_step"] for h in warm.results[2]["history"]] == [7, 8, 9, 10, 11, 12]
    assert all(0 <= h["lr"] <= 3e-4 and h["loss"] > 0 for h in warm.results[2]["history"])
    assert max(h["lr"] for h in warm.results[2]["history"]) == pytest.approx(3e-4)  # warm-up again


def test_each_warm_round_equals_a_fresh_fit_from_the_last_rounds_model(warm, tiny_model_dir: Path) -> None:
    cold1 = cold_fit(tiny_model_dir, warm.pools[0], warm.dir / "cold1", 1)
    cold2 = cold_fit(cold1, warm.pools[1], warm.dir / "cold2", 2)
    for w, c in ((warm.dir / "warm1", cold1), (warm.dir / "warm2", cold2)):
        a, b = load_file(w / "model.safetensors"), load_file(c / "model.safetensors")
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(a[name].float(), b[name].float(), rtol=1e-5, atol=1e-6, msg=name)


def test_a_worker_killed_mid_round_is_restarted_from_the_last_round_and_the_round_sent_again(warm) -> None:
    trainer = warm.trainer
    starts = trainer.starts
    big = write_ranked(warm.dir / "pool3big.jsonl", 240, offset=40)  # 120 steps: long enough to kill in
    done: dict = {}
    thread = threading.Thread(target=lambda: done.update(trainer.train(3, [str(big)])))
    thread.start()
    try:
        # Mid-round: round 3 is in the worker's queue and the worker has taken it.
        wait_until(lambda: trainer.training_round == 3 and trainer.commands[0].qsize() == 0, 120,
                   "the worker taking round 3")
        assert thread.is_alive(), "round 3 ended before the kill"
        kill_the_train_worker()
    finally:
        thread.join(timeout=300)
    assert not thread.is_alive()
    assert trainer.starts == starts + 1  # Ray Train restarted the group, which said `ready` again
    assert done["round"] == 3 and done["metrics"]["round"] == 3.0
    assert done["history"][0]["global_step"] == 13  # the restart resumed the step count of round 2


def test_close_reports_a_fit_that_did_not_stop_then_ends_it(ray_cluster, tiny_model_dir: Path, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    trainer = WarmTrainer(WarmJob(model_path=str(tiny_model_dir), output_dir=str(tmp_path), train=CFG), 0,
                          storage_path=str(tmp_path / "ray_train"))
    try:
        with caplog.at_level(logging.ERROR, logger="rrhf_ray.train.warm"):
            # No fit ends within 0 s of its stop command: the group is still starting.
            assert trainer.close(timeout_s=0.0) is False
        assert f"fit {trainer.name} did not stop within 0 s" in caplog.text
    finally:
        assert trainer.close() is True  # the stop already sent: the fit ends
    assert not (tmp_path / "ray_train" / trainer.name).exists()
