"""A hung trainer round on the session's Ray cluster: the driver's train stage (`rrhf_ray.stages.train`)
waits on a real warm trainer whose one worker process is frozen (SIGSTOP, as a stuck GPU or a hung
collective leaves it); state.json names what the driver waits on while it waits, the stage fails
past `train.round_timeout_s` with one error naming the stage, the worker group and the limit, and
with the limit raised the same stage runs again once the worker answers (SIGCONT)."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
from pathlib import Path

import psutil
import pytest
from transformers import AutoTokenizer

from rrhf_ray import stages
from rrhf_ray.config import TrainConfig, load_config
from rrhf_ray.context import RunContext
from rrhf_ray.demo import DEMO_CONFIG
from rrhf_ray.report import format_status
from rrhf_ray.state import RunState
from rrhf_ray.train.warm import WarmJob, WarmTrainer
from rrhf_ray.types import read_groups, write_groups
from rrhf_ray.waits import StageTimeout
from tests.helpers import wait_until, write_ranked

pytestmark = pytest.mark.ray

CFG = TrainConfig(epochs=1, lr=3e-4, queries_per_step=4, micro_batch_queries=2, seed=7)


def this_sessions_train_workers(node_cache: Path) -> list[int]:
    """The Ray Train workers of this session's cluster (its raylet gave them RRHF_RAY_CACHE =
    `node_cache`), not those of another test session on the machine."""
    pids = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if " ".join(p.info["cmdline"] or []).startswith("ray::RayTrainWorker") and \
                    p.environ().get("RRHF_RAY_CACHE") == str(node_cache):
                pids.append(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return pids


def _context(out: Path, *overrides: str) -> RunContext:
    config = load_config(DEMO_CONFIG, [f"output.dir={out}", "rounds=1", *overrides])
    return RunContext(config=config, state=RunState(out, config), preset=None, external=[], tracker=None)


def test_a_hung_round_is_shown_while_it_waits_fails_past_its_limit_and_resumes(
        ray_cluster, tiny_model_dir: Path, node_cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    ctx = _context(out, "train.round_timeout_s=10")
    pool = ctx.round_dir(1) / "pool.parquet"
    pool.parent.mkdir(parents=True)
    write_groups(read_groups(write_ranked(tmp_path / "pool.jsonl", 8)), pool)
    ctx.tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ctx.trainer = WarmTrainer(WarmJob(model_path=str(tiny_model_dir), output_dir=str(tmp_path), train=CFG), 0,
                              storage_path=str(tmp_path / "ray_train"))
    frozen: list[int] = []
    try:
        # The worker has loaded the policy and said `ready`; it now waits for a command. Frozen,
        # it never takes round 1.
        wait_until(lambda: ctx.trainer.results.qsize() > 0, 300, "the warm trainer's worker starting")
        frozen = this_sessions_train_workers(node_cache)
        assert len(frozen) == 1, frozen
        os.kill(frozen[0], signal.SIGSTOP)

        failed: list[BaseException] = []

        def run() -> None:
            try:
                ctx.run_stage(1, "train", stages.train)
            except StageTimeout as err:
                failed.append(err)

        thread = threading.Thread(target=run)
        thread.start()
        seen: dict = {}

        def waiting_recorded() -> bool:
            assert thread.is_alive() or seen, f"the stage ended before its wait was recorded: {failed}"
            running = json.loads((out / "state.json").read_text()).get("running") or {}
            if "waiting" in running:
                state = json.loads((out / "state.json").read_text())
                seen.update(running=running, status=format_status(state, str(out)))
            return bool(seen)

        wait_until(waiting_recorded, 60, "state.json naming what the driver waits on")
        thread.join(timeout=120)
        assert not thread.is_alive()

        waiting = seen["running"]["waiting"]
        assert seen["running"]["stage"] == "round1/train"
        assert waiting["on"].startswith(f"the trainer worker group (fit {ctx.trainer.name}, 1 worker, round 1)")
        assert waiting["limit_s"] == 10.0 and waiting["key"] == "train.round_timeout_s"
        assert re.search(rf"^round1/train: waiting \d+ s on the trainer worker group \(fit {ctx.trainer.name}, "
                         r"1 worker, round 1\) \(limit 10 s: train.round_timeout_s\)$", seen["status"], re.MULTILINE), \
            seen["status"]

        [err] = failed
        assert str(err).startswith(f"round1/train: the trainer worker group (fit {ctx.trainer.name}, 1 worker, "
                                   "round 1) did not finish within its limit of 10 s (train.round_timeout_s; ")
        state = json.loads((out / "state.json").read_text())
        assert state["failed"]["stage"] == "round1/train" and "round1/train" not in state["stages"]
        assert "running" not in state and ctx.trainer.hung

        # The cause gone (the worker answers again) and the limit raised, the same stage runs.
        os.kill(frozen.pop(), signal.SIGCONT)
        resumed = _context(out, "train.round_timeout_s=600")
        resumed.tokenizer, resumed.trainer = ctx.tokenizer, ctx.trainer
        assert resumed.run_stage(1, "train", stages.train)
        state = json.loads((out / "state.json").read_text())
        assert "failed" not in state and state["stages"]["round1/train"]["train"]["round"] == 1.0
        assert (resumed.checkpoint(1) / "model.safetensors").exists() and not ctx.trainer.hung
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
        assert ctx.trainer.close() is True
