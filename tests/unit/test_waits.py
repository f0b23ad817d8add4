"""The driver's waits (`rrhf_ray.waits`): each stage's time limit derived from the run's earlier
rounds (the rule of the dispatch's chunk limit) or set by its config key, the record of the wait
in state.json and the line `rrhf-ray status` shows for it, the error past the limit, and the
keys left out of the run's fingerprint (a run that failed past a limit resumes with a higher one)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rrhf_ray.actors.dispatch import chunk_timeout, work_timeout
from rrhf_ray.config import load_config
from rrhf_ray.demo import DEMO_CONFIG
from rrhf_ray.report import format_status
from rrhf_ray.state import RunState, StageTimer, config_fingerprint
from rrhf_ray.waits import FIRST_LIMIT_S, StageTimeout, Wait, stage_limit


def _config(tmp_path: Path, *overrides: str):
    return load_config(DEMO_CONFIG, [f"output.dir={tmp_path / 'run'}", "rounds=3", *overrides])


class FakeClock:
    """`rrhf_ray.waits.time` with a clock the test moves (`now`): no test waits for real time."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now + 1.7e9


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr("rrhf_ray.waits.time", fake)
    return fake


def test_the_limit_is_the_config_key_else_ten_times_the_longest_earlier_round_at_least_300_s() -> None:
    stages = {"round0/eval": {"seconds": 12.0}, "round1/sample": {"seconds": 500.0},
              "round1/train": {"seconds": 45.0}, "round2/train": {"seconds": 20.0},
              "round1/refresh": {"seconds": 3.0}, "round1/eval": {"seconds": 40.0}}
    assert stage_limit(stages, "train", None) == 450.0  # 10× round 1's 45 s, the longer of two
    assert stage_limit(stages, "eval", None) == 400.0  # round 0's evaluation counts too
    assert stage_limit(stages, "refresh", None) == 300.0  # never under 5 minutes
    assert stage_limit(stages, "train", 12.5) == 12.5  # train.round_timeout_s
    assert stage_limit({"round0/eval": {"seconds": 12.0}}, "train", None) == FIRST_LIMIT_S == 7200.0
    # The rule is the dispatch's: a chunk is 10× its size × the slowest pace, 30 min before any.
    assert work_timeout([45.0, 20.0]) == 450.0 and work_timeout([], first=60.0) == 60.0
    assert chunk_timeout(32, [0.5, 2.0]) == work_timeout([16.0, 64.0]) == 640.0
    assert chunk_timeout(32, []) == 1800.0


def test_a_long_wait_is_recorded_in_state_json_shown_by_status_and_removed_when_it_ends(tmp_path, clock) -> None:
    config = _config(tmp_path, "train.round_timeout_s=900")
    state = RunState(tmp_path / "run", config)
    on_disk = lambda: json.loads(state.path.read_text())
    with StageTimer(state, "round2/train"):
        limit = stage_limit(state.data["stages"], "train", config.train.round_timeout_s)
        with Wait(state, "the trainer worker group", limit, "train.round_timeout_s") as wait:
            clock.now += 30.0  # made, not waited on yet: its clock has not started
            wait.poll()  # the driver starts waiting
            clock.now += 1.0
            wait.poll()
            assert "waiting" not in on_disk()["running"]  # a short wait costs no write
            clock.now += 1.5
            wait.poll()
            record = on_disk()["running"]["waiting"]
            assert record == {"on": "the trainer worker group", "since": 1030.0 + 1.7e9, "limit_s": 900.0,
                              "key": "train.round_timeout_s"}
            written = state.path.stat().st_mtime_ns
            clock.now += 0.5
            wait.poll()  # nothing new to say: no write
            wait.poll("sampler replica 1")  # something new, 0.5 s after the last write: later
            assert state.path.stat().st_mtime_ns == written
            clock.now += 5.0
            wait.poll("sampler replica 1")
            assert on_disk()["running"]["waiting"]["on"] == "sampler replica 1"
            clock.now += 135.0  # 143 s since the wait began
            status = format_status(on_disk(), "outs/demo", now=clock.time())
            assert not wait.expired() and wait.remaining() == 900.0 - 143.0
        assert "waiting" not in on_disk()["running"]  # the wait ended: its record went with it
    lines = status.splitlines()
    # The running line's duration is the real clock's (StageTimer); the waiting line follows it.
    assert lines[-1] == ("round2/train: waiting 2 min 23 s on sampler replica 1 (limit 900 s: "
                         "train.round_timeout_s)")
    assert lines[-2].startswith("round2/train: running for ")


def test_past_the_limit_the_error_names_the_stage_what_it_waited_on_and_the_limit(tmp_path, clock) -> None:
    state = RunState(tmp_path / "run", _config(tmp_path))
    with pytest.raises(StageTimeout) as caught, StageTimer(state, "round1/refresh"):
        wait = Wait(state, "the sampler replicas", 300.0, "sampling.refresh_timeout_s")
        assert not wait.expired()  # the clock starts
        clock.now += 299.0
        assert not wait.expired()
        clock.now += 1.0
        assert wait.expired()
        raise wait.timeout("sampler replica 1 (the refresh probe)")
    assert str(caught.value).startswith(
        "round1/refresh: sampler replica 1 (the refresh probe) did not finish within its limit of 300 s "
        "(sampling.refresh_timeout_s; ")
    assert "raise sampling.refresh_timeout_s if the work is that slow" in str(caught.value)
    failed = json.loads(state.path.read_text())["failed"]
    assert failed["stage"] == "round1/refresh" and failed["error"].startswith("StageTimeout: round1/refresh: ")
    # Without a state (a caller outside a run) nothing is recorded, and the error has no stage.
    bare = Wait(None, "the judge perplexity task", 5.0, "eval.task_timeout_s")
    clock.now += 10.0
    bare.poll()
    assert str(bare.timeout()).startswith("the judge perplexity task did not finish within its limit of 5 s")


def test_the_limits_are_not_fingerprinted_so_a_run_resumes_with_a_higher_one(tmp_path) -> None:
    plain = _config(tmp_path)
    limited = _config(tmp_path, "train.round_timeout_s=60", "sampling.refresh_timeout_s=30",
                      "eval.task_timeout_s=45")
    assert limited.train.round_timeout_s == 60.0 and limited.eval.task_timeout_s == 45.0
    assert config_fingerprint(limited) == config_fingerprint(plain)
    RunState(tmp_path / "run", limited)
    RunState(tmp_path / "run", _config(tmp_path, "train.round_timeout_s=600"))  # resumes: no ConfigError
    with pytest.raises(Exception, match="round_timeout_s"):
        _config(tmp_path, "train.round_timeout_s=0")  # a limit must be positive


def test_status_without_a_waiting_record_is_unchanged() -> None:
    from rrhf_ray.report import waiting_line

    assert waiting_line({"stage": "round1/train", "started": 0.0}, now=10.0) is None
    line = waiting_line({"stage": "round1/eval", "waiting": {"on": "the judge perplexity task", "since": 0.0,
                                                             "limit_s": None, "key": "eval.task_timeout_s"}}, 7.0)
    assert line == "round1/eval: waiting 7 s on the judge perplexity task"


def test_the_workers_a_stage_waits_on_are_recorded_and_shown(tmp_path, clock) -> None:
    """A sampling stage's wait names the replicas its coordinating task waits on (the task's board,
    `rrhf_ray.actors.dispatch.read_board`): recorded with the wait, rewritten when a worker moves
    to another chunk, one line each in `rrhf-ray status`."""
    from rrhf_ray.report import waiting_line

    state = RunState(tmp_path / "run", _config(tmp_path))
    on_disk = lambda: json.loads(state.path.read_text())
    board = [{"worker": "sampler replica 1", "chunk": 2, "chunks": 12, "queries": 8, "since": 1.7e9 + 1000.0},
             {"worker": "sampler replica 0", "chunk": 5, "chunks": 12, "queries": 8, "since": 1.7e9 + 1040.0}]
    with StageTimer(state, "round1/sample"), \
            Wait(state, "the sampler replicas", None, "sampling.chunk_timeout_s") as wait:
        wait.poll(None, board)
        clock.now += 3.0
        wait.poll(None, board)
        assert on_disk()["running"]["waiting"]["workers"] == board
        moved = [board[0], {**board[1], "chunk": 6, "since": 1.7e9 + 1044.0}]
        clock.now += 6.0
        wait.poll(None, moved)
        running = on_disk()["running"]
        assert running["waiting"]["workers"][1]["chunk"] == 6
    line = waiting_line(running, now=1.7e9 + 1060.0)
    assert line.splitlines()[1:] == ["  sampler replica 1: chunk 3 of 12 (8 queries) for 1 min 0 s",
                                     "  sampler replica 0: chunk 7 of 12 (8 queries) for 16 s"]
    assert line.splitlines()[0].startswith("round1/sample: waiting ")


def test_a_wait_of_the_stage_beside_is_recorded_on_its_entry_and_names_its_stage(tmp_path, clock) -> None:
    """One-step overlap: segment 1 trains in a thread of its own while the driver's thread samples
    segment 2. The training's wait belongs to its stage: it is written on that stage's entry
    under `running.beside`, status shows it under that stage, and its error names that stage."""
    import threading

    state = RunState(tmp_path / "run", _config(tmp_path))
    on_disk = lambda: json.loads(state.path.read_text())
    trained, sampling, done = threading.Event(), threading.Event(), threading.Event()
    errors: list[StageTimeout] = []

    def train() -> None:
        with StageTimer(state, "round1/seg1/train"):
            trained.set()
            sampling.wait(10)
            with Wait(state, "the trainer worker group", 60.0, "train.round_timeout_s") as wait:
                wait.poll()
                clock.now += 3.0
                wait.poll()
                errors.append(wait.timeout())
                done.set()
                sampling.wait(10)  # until the driver's thread has read the record

    thread = threading.Thread(target=train)
    thread.start()
    trained.wait(10)
    with StageTimer(state, "round1/seg2/sample"):
        sampling.set()
        done.wait(10)
        running = on_disk()["running"]
        assert running["stage"] == "round1/seg2/sample" and "waiting" not in running
        assert running["beside"][0]["stage"] == "round1/seg1/train"
        assert running["beside"][0]["waiting"]["on"] == "the trainer worker group"
        lines = format_status(on_disk(), "outs/demo", now=clock.time()).splitlines()
        sampling.clear()
        thread_lines = [line for line in lines if line.startswith("round1/seg1/train: ")]
        assert thread_lines[0].startswith("round1/seg1/train: running beside it for ")
        assert thread_lines[1] == ("round1/seg1/train: waiting 3 s on the trainer worker group "
                                   "(limit 60 s: train.round_timeout_s)")
        sampling.set()
        thread.join(10)
    assert str(errors[0]).startswith("round1/seg1/train: the trainer worker group did not finish")
    assert "waiting" not in json.dumps(on_disk())  # the wait ended: its record went with it
