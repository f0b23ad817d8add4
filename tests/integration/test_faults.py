"""Faults a long run survives (docs/faults.md), injected into real runs of the shortened demo
(`QUICK`: real Ray, real vLLM, real Ray Train). One output directory goes through four driver
starts, each ending in (or recovering from) one or two faults, so that the faults share the
run's set-up instead of paying for a run each (the end of a resumed run is checked by
tests/integration/test_object_storage.py):

1. a driver (a process of its own) whose reward rule raises on the training queries: while it
   runs, a second driver on its directory is refused naming its pid and host; then it stops at
   round1/score with one `error:` line naming the rule, its exception and the query (exit 2);
2. the rule fixed, a driver in this process resumes at round1/score (the sampling is not
   redone) and runs out of disk space while it records round1/eval: `no space left` naming
   state.json, which keeps its previous, whole version;
3. round 1's checkpoint is then cut short; a driver (a process of its own) names the damaged
   file, forgets round 1's training, redoes it, and is sent SIGTERM while it trains: it stops,
   records round1/train as failed, interrupted, and shuts the trainer and the actors down;
4. a last driver, asked for a second round, resumes at round1/train (nothing finished before is
   redone), trains and refreshes round 1, and gets SIGINT (Ctrl-C) while it samples round 2 (in
   one engine pass with round 1's evaluation): it stops, exit 130, the pass recorded as failed,
   interrupted, and the trainer's round 1 kept.

Non-finite training runs on the warm trainer alone (no engines): a learning rate of 1e30.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rrhf_ray.cli import main
from rrhf_ray.train.checkpoints import MANIFEST_FILE, checkpoint_problem
from tests.helpers import QUICK, REPO, wait_until, write_ranked

pytestmark = pytest.mark.ray

RULE = f"{__name__}:faulty_rule"
SWITCH = "faults-rule"  # under the workers' RRHF_RAY_CACHE: "raise" while the rule is broken


def faulty_rule(queries: list[str], responses: list[str]) -> list[float]:
    """The demo's reward, broken on the training queries while the switch file says so (a rule
    reads its own files: this is how a user's rule breaks, and is fixed, under a running cluster)."""
    from rrhf_ray.demo.task import EVAL_PHRASINGS, reward

    switch = Path(os.environ.get("RRHF_RAY_CACHE", "/nonexistent")) / SWITCH
    if switch.exists() and switch.read_text() == "raise":
        held_out = [p.split("{")[0] for p in EVAL_PHRASINGS]
        for q in queries:
            if not any(h in q for h in held_out):
                raise ValueError("cannot parse the dialogue")
    return reward(queries, responses)


def read_state(out: Path) -> dict:
    return json.loads((out / "state.json").read_text())


def start_driver(overrides: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "wb") as f:
        return subprocess.Popen([sys.executable, "-m", "rrhf_ray", "run", *overrides], cwd=REPO, env=env,
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def wait_driver(proc: subprocess.Popen, log: Path, what: str) -> int:
    try:
        return proc.wait(timeout=600)  # a guard against a hang, not a measurement
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"{what}: the driver did not end:\n{log.read_text()[-3000:]}")


def alive(proc: subprocess.Popen, log: Path) -> bool:
    assert proc.poll() is None, f"the driver ended early:\n{log.read_text()[-3000:]}"
    return True


def last_line(text: str) -> str:
    return [line for line in text.splitlines() if line.strip()][-1]


@pytest.mark.vllm
def test_a_run_survives_a_broken_rule_a_second_driver_a_full_disk_a_damaged_checkpoint_and_sigterm(
        ray_cluster, node_cache: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    out = tmp_path / "run"
    overrides = QUICK + ["train.epochs=30", f"reward.rule={RULE}", f"output.dir={out}"]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    switch = node_cache / SWITCH
    console: dict[str, str] = {}

    # ---- 1. the rule raises; a second driver is refused while the first runs
    switch.write_text("raise")
    log1 = tmp_path / "driver1.log"
    first = start_driver(overrides, env, log1)
    try:
        wait_until(lambda: alive(first, log1) and (out / "state.json").exists() and "running" in read_state(out),
                   300, "the first driver starting a stage")
        assert main(["run", *overrides]) == 2
        refused = capsys.readouterr().err
        assert f"is in use by a running driver (pid {first.pid} on host {socket.gethostname()}" in refused
        assert refused.startswith("error: output directory ")
    finally:
        rc1 = wait_driver(first, log1, "the rule's fault")
    text1 = log1.read_text()
    console["rule"] = last_line(text1)
    assert rc1 == 2, text1[-3000:]
    assert console["rule"].startswith(f"error: reward.rule {RULE} raised ValueError: cannot parse the dialogue "
                                      "on response ")
    assert "of query '\\n\\nHuman: " in console["rule"]
    assert "Traceback" not in text1 and "RayTaskError" not in text1
    state = read_state(out)
    assert state["failed"]["stage"] == "round1/score" and "ValueError: cannot parse" in state["failed"]["error"]
    assert "round1/sample" in state["stages"] and "round1/score" not in state["stages"]
    assert not (out / "rounds/1/pool.parquet").exists()
    sampled = state["stages"]["round1/sample"]["finished"]

    # ---- 2. the rule fixed: resumes at round1/score; the disk fills while round1/eval is recorded
    switch.unlink()
    import rrhf_ray.state

    real_open = open

    class FullDisk:
        """A file on a disk that fills up: half of the write lands, then ENOSPC."""

        def __init__(self, f) -> None:
            self.f = f

        def write(self, data: bytes) -> int:
            if b'"round1/eval": {' in data:
                self.f.write(data[:len(data) // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(data)

        def __getattr__(self, name: str):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.f.close()

    monkeypatch.setattr(rrhf_ray.state, "open", lambda *a, **k: FullDisk(real_open(*a, **k)), raising=False)
    assert main(["run", *overrides]) == 1
    console["disk"] = last_line(capsys.readouterr().err)
    monkeypatch.undo()
    assert console["disk"].startswith(f"error: no space left on device: {out / 'state.json'}")
    state = read_state(out)  # whole: the previous version
    assert state["stages"]["round1/sample"]["finished"] == sampled  # not sampled again
    assert {"round1/score", "round1/train", "round1/refresh"} <= set(state["stages"])
    assert "round1/eval" not in state["stages"]
    assert not list(out.glob(".state.json.tmp*"))
    checkpoint = out / "rounds/1/checkpoint"
    assert checkpoint_problem(checkpoint) is None and (checkpoint / MANIFEST_FILE).exists()
    scored = state["stages"]["round1/score"]["finished"]

    # ---- 3. a damaged checkpoint is named and redone; SIGTERM while it trains again
    weights = checkpoint / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size // 2)
    log3 = tmp_path / "driver3.log"
    third = start_driver(overrides, env, log3)
    try:
        wait_until(lambda: alive(third, log3) and read_state(out).get("running", {}).get("stage") == "round1/train",
                   300, "the redone round1/train")
        time.sleep(1.0)  # the trainer is given the round
        signalled = time.monotonic()
        os.kill(third.pid, signal.SIGTERM)
    finally:
        rc3 = wait_driver(third, log3, "SIGTERM")
    stopped_in = time.monotonic() - signalled
    text3 = log3.read_text()
    console["damaged"] = next(line for line in text3.splitlines() if "checkpoint is damaged" in line)
    console["sigterm"] = last_line(text3)
    assert f"{weights} has {size // 2} bytes, its manifest says {size}" in console["damaged"]
    assert "round1/train, round1/refresh are redone" in console["damaged"]
    assert rc3 == 143, text3[-3000:]
    assert console["sigterm"] == ("error: stopped by SIGTERM in stage round1/train; the same command "
                                  "resumes the run there")
    state = read_state(out)
    assert state["failed"]["stage"] == "round1/train" and state["failed"]["interrupted"] is True
    assert state["failed"]["error"] == "StopSignal: SIGTERM" and "running" not in state
    assert "round1/train" not in state["stages"]
    assert not checkpoint.exists()  # the damaged copy is gone; nothing loaded it
    assert "shut down the trainer in" in (out / "logs/driver.log").read_text()

    # ---- 4. resumes at round1/train, asked for a second round; SIGINT (Ctrl-C) while it samples
    log4 = tmp_path / "driver4.log"
    fourth = start_driver([*overrides, "rounds=2"], env, log4)
    joint = "round1/eval + round2/sample"  # round 1's evaluation and round 2's sampling: one pass
    try:
        wait_until(lambda: alive(fourth, log4) and read_state(out).get("running", {}).get("stage") == joint,
                   300, joint, poll_s=0.02)
        signalled = time.monotonic()
        os.kill(fourth.pid, signal.SIGINT)
    finally:
        rc4 = wait_driver(fourth, log4, "SIGINT")
    sigint_in = time.monotonic() - signalled
    console["sigint"] = last_line(log4.read_text())
    assert rc4 == 130, log4.read_text()[-3000:]
    assert console["sigint"] == (f"error: stopped by SIGINT in stage {joint}; the same command "
                                 "resumes the run there")
    state = read_state(out)
    assert state["failed"]["stage"] == joint and state["failed"]["interrupted"] is True
    assert state["stages"]["round1/sample"]["finished"] == sampled  # nothing finished is redone
    assert state["stages"]["round1/score"]["finished"] == scored
    assert {"round1/train", "round1/refresh"} <= set(state["stages"])  # resumed there, kept
    assert "round1/eval" not in state["stages"] and "round2/sample" not in state["stages"]
    assert "running" not in state and not (out / "driver.lock").read_text()  # released
    assert checkpoint_problem(checkpoint) is None
    assert not (out / "rounds/2/candidates.jsonl").exists()  # no half-written candidates
    print(f"\nconsole's last lines per fault (SIGTERM: exit {stopped_in:.1f} s after the signal, "
          f"SIGINT: {sigint_in:.1f} s):")
    for name, line in console.items():
        print(f"  {name}: {line}")


def test_non_finite_training_stops_the_round_naming_the_step(ray_cluster, tiny_model_dir: Path,
                                                            tmp_path: Path) -> None:
    """The warm trainer with a learning rate of 1e30: the first step (finite) makes the weights
    huge, the second's loss is not finite: the round stops there, naming the step, the loss
    parts and the learning rate, and reports no checkpoint. With `train.skip_nonfinite` the same
    fit (in this process, without Ray) skips every such step and counts them."""
    from rrhf_ray.config import TrainConfig
    from rrhf_ray.train.loop import NonFiniteTraining
    from rrhf_ray.train.rrhf import TrainJob, train_loop_per_worker
    from rrhf_ray.train.warm import WarmJob, WarmTrainer

    cfg = TrainConfig(epochs=2, lr=1e30, warmup_ratio=0.0, lr_scheduler="constant", queries_per_step=4,
                      micro_batch_queries=2)
    pool = write_ranked(tmp_path / "pool.jsonl", 12)  # 3 steps an epoch
    trainer = WarmTrainer(WarmJob(model_path=str(tiny_model_dir), output_dir=str(tmp_path), train=cfg), 0,
                          storage_path=str(tmp_path / "ray_train"))
    try:
        with pytest.raises(NonFiniteTraining) as info:
            trainer.train(1, [str(pool)])
    finally:
        trainer.close()
    message = str(info.value)
    assert message.startswith("round 1: RRHF training: step 2 of 6 (global step 2, epoch 1) is not finite: loss ")
    assert "rank_loss " in message and "sft_loss " in message and "lr 1e+30" in message
    assert not list((tmp_path / "ray_train").rglob("round_0001"))  # no checkpoint reported

    skipping = cfg.model_copy(update={"skip_nonfinite": True})
    job = TrainJob(model_path=str(tiny_model_dir), data_paths=[str(pool)], output_dir=str(tmp_path / "skip"),
                   train=skipping)
    metrics = train_loop_per_worker({"job": job.model_dump(mode="json")})
    # 6 steps: the first applied, the five after it not finite (the weights stay step 1's).
    assert metrics["nonfinite_steps_skipped"] == 5.0
    assert metrics["step"] == 6.0
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "skip" / "model.safetensors")
    assert all(bool(t.float().isfinite().all()) for t in saved.values())
